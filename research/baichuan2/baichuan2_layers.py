"""Building blocks shared by Baichuan2-7B and Baichuan2-13B.

Both models are pre-norm decoders with RMSNorm, SwiGLU MLPs (MindFormers' ``LlamaFeedForward``;
RMSNorm and RoPE are thin subclasses of MindFormers' ``LlamaRMSNorm`` and ``RotaryEmbedding``),
multi-head attention without biases and a row-normalised lm_head (``NormHead``). They differ only
in how positions enter attention: 7B rotates queries and keys (RoPE), 13B adds a per-head linear
bias to the scores (ALiBi). The attention here therefore takes an optional rotary table and an
optional score bias, and each model builds the one it needs (``Baichuan2Model._position_inputs``).

The subclasses and ``_expand_as`` exist for memory on CPU: MindSpore's CPU kernels for Mul, Add,
Sub and Select build a table of per-element indices when their operands' shapes differ (about
16-24 bytes per output element, kept for the life of the compiled graph), so a ``(B, 1, S, T)``
mask or a ``(B, S, 1)`` norm factor broadcast inside the op costs more than the tensor it makes.
Repeating the operand explicitly first (``ops.tile``) gives the kernels same-shaped operands and
no table; the arithmetic is unchanged (see ``benchmarks/bench_cpu_kernel_tables.py``).

Incremental inference keeps a KV cache of shape (batch, heads, seq_length, head_dim) per layer in
parameters updated in place with portable ops (``IndexAdd``), so it runs on CPU and in graph mode. A
decode step writes one column per row at that row's own position, so right-padded batches of
different prompt lengths decode exactly as each prompt alone, and attends over the first W slots
only, a window that holds every row's context (``baichuan2_generation.decode_window``). On CPU in
fp32 one kernel (``baichuan2_decode_attention``) does a decode step's attention over the cache in
place, each row up to its own position, instead of copying the window out.

Packed rows (several conversations per row, ``belle_preprocess.py --pack True``) come with
``position_ids`` that restart at 0 at each conversation (see ``baichuan2_packing``). The model then
attends only within a conversation (block-diagonal causal mask, ``segment = cumsum(position_ids == 0)``),
takes RoPE/ALiBi positions from ``position_ids`` and never trains a target whose position id is 0, so
every token of a packed row gets the logits and the loss it gets alone. Without ``position_ids`` the
model is exactly the unpacked one.

Shapes: B batch, S query length, T key length (S during a full forward, the window W when decoding
from the cache), H heads, D head dim, h hidden size, V vocabulary.
"""
import math

import numpy as np
import mindspore as ms
from mindspore import nn, ops, Parameter, Tensor
from mindspore import dtype as mstype
from mindspore.common.initializer import initializer, HeUniform

from mindformers.models.llama.llama import LlamaPreTrainedModel
from mindformers.models.llama.llama_layer import LlamaEmbedding, LlamaFeedForward, LlamaRMSNorm
from mindformers.modules.layers import Linear, RotaryEmbedding

from baichuan2_device import use_fused_rms_norm, use_flash_attention, use_varlen_flash_attention, \
    use_rows_matmul, use_norm_head_kernels, use_decode_attention
from baichuan2_decode_attention import DecodeAttention
from baichuan2_loss import build_loss
from baichuan2_rows_matmul import install_decode_matmul
from baichuan2_norm_head import FusedNormHeadCrossEntropy, FusedNormHeadProduct, row_inv_norm_primitive
from baichuan2_generation import Baichuan2GenerationMixin

# Masked attention scores get this value instead of -inf, so that a row with no visible key
# (a padding query row) still gives a finite softmax.
_MASKED_SCORE = -1.0e9


def _expand_as(x, like):
    """``x`` repeated to the shape of ``like`` (NumPy broadcasting rules), for an elementwise op between them.

    Why: given operands of different shapes, MindSpore's CPU elementwise kernels (Mul, Add, Select)
    build size_t index tables with one entry per output element and operand (16 bytes for Mul/Add, 24
    for Select) when the graph is compiled and keep them as long as the graph lives, once per op. An
    explicit Tile keeps nothing, so the op after it runs on one shape. Tile rather than BroadcastTo:
    MindSpore's CPU BroadcastTo kernel is about 3x slower than Tile for a (512, 125696) result.
    Measured by ``benchmarks/bench_cpu_kernel_tables.py``; see ``docs/memory.md``.
    """
    return _expand_to(x, tuple(like.shape))


def _expand_to(x, shape):
    """``x`` repeated to ``shape`` (NumPy broadcasting rules; ``ops.tile``), or ``x`` itself if it has it."""
    if tuple(x.shape) == tuple(shape):
        return x
    padded = (1,) * (len(shape) - len(x.shape)) + tuple(x.shape)
    multiples = tuple(target // size for size, target in zip(padded, shape))
    return ops.tile(x.reshape(padded), multiples)


class LastAxisSoftmax(nn.Cell):
    """``softmax(x, axis=-1)`` whose backward repeats the row sums explicitly. (..., T) -> (..., T), dtype of x.

    Why: MindSpore's own Softmax backward, ``(dout - sum(dout * out, -1, keepdims)) * out``, subtracts a
    (..., 1) tensor from a (..., T) one, and the CPU Sub kernel keeps 16 bytes of index tables per element
    for the life of the graph (see ``_expand_as``): with the attention scores, that is 16 bytes per score
    element in every layer of a training graph. The same formula on operands of one shape keeps nothing.
    """

    def __init__(self):
        super().__init__()
        self.softmax = ops.Softmax(axis=-1)

    def construct(self, x):
        return self.softmax(x)

    def bprop(self, x, out, dout):
        row_sums = ops.reduce_sum(dout * out, -1).expand_dims(-1)
        return ((dout - _expand_as(row_sums, dout)) * out,)


class Baichuan2RMSNorm(LlamaRMSNorm):
    """MindFormers' ``LlamaRMSNorm`` (same ``weight``, same fused Ascend kernel) whose portable path
    multiplies operands of one shape (``_expand_as``). (..., h) -> (..., h), dtype of the input."""

    def _self_norm(self, x):
        original_type = x.dtype
        h = self.cast(x, self.compute_type)
        norm_factor = self.rsqrt(self.add(self.mean(self.square(h), -1), self.eps))     # (..., 1)
        output = self.cast(self.mul(h, _expand_as(norm_factor, h)), original_type)
        return self.mul2(output, _expand_as(self.cast(self.weight, original_type), output))


class Baichuan2RotaryEmbedding(RotaryEmbedding):
    """MindFormers' ``RotaryEmbedding`` in its half-split (``use_rope_slice``) form, with the cos/sin
    tables broadcast once to the query shape (``_expand_as``).

    Inputs: query, key (B, H, S, D); ``freqs_cis = (cos, sin, swap_mask)`` with cos/sin (1 or B, 1, S, D).
    Outputs: rotated query, key, dtype of the inputs.
    """

    def __init__(self, head_dim, compute_dtype):
        super().__init__(head_dim, compute_dtype, use_rope_slice=True)

    def construct(self, xq, xk, freqs_cis):
        original_type = xq.dtype
        xq = self.cast(xq, self.dtype)
        xk = self.cast(xk, self.dtype)
        freqs_cos, freqs_sin, _ = freqs_cis
        cos = _expand_as(freqs_cos.astype(self.dtype), xq)
        sin = _expand_as(freqs_sin.astype(self.dtype), xq)
        xq_out = self.add(self.mul(xq, cos), self.mul(self.slice_half(xq), sin))
        xk_out = self.add(self.mul(xk, cos), self.mul(self.slice_half(xk), sin))
        return self.cast(xq_out, original_type), self.cast(xk_out, original_type)


class KVCache(nn.Cell):
    """Per-layer key/value cache, updated in place.

    Parameters ``key_past`` / ``value_past``: (B, H, seq_length, D) in compute dtype. They are
    runtime buffers, never part of a checkpoint.
    """

    def __init__(self, batch_size, num_heads, seq_length, head_dim, dtype):
        super().__init__()
        shape = (batch_size, num_heads, seq_length, head_dim)
        self.seq_length = seq_length
        self.key_past = Parameter(Tensor(np.zeros(shape), dtype), name="key_past", requires_grad=False)
        self.value_past = Parameter(Tensor(np.zeros(shape), dtype), name="value_past", requires_grad=False)
        # IndexAdd updates the parameter in place; the CPU ScatterNdUpdate kernel copies the whole cache.
        self.index_add_key = ops.IndexAdd(axis=2)
        self.index_add_value = ops.IndexAdd(axis=2)
        self.scatter_rows_key = ops.ScatterUpdate()
        self.scatter_rows_value = ops.ScatterUpdate()
        self.row_eye = Tensor(np.eye(batch_size).reshape(batch_size, 1, batch_size, 1), dtype)

    def prefill(self, key, value, valid, rows=None):
        """Store the keys/values of positions [0, S) of b prompts, zero where ``valid`` (b, 1, S, 1) is 0.

        ``rows`` (b,) int32 names the cache rows the b prompts go to; the other rows keep their
        cache untouched (continuous batching admits a request into a free row while the others go on
        decoding). None means all rows, b == B. Every slot at or past a prompt's valid length is left
        zero, which ``update`` relies on.
        """
        key = key * valid
        value = value * valid
        pad = self.seq_length - key.shape[2]
        if pad > 0:
            key = ops.pad(key, (0, 0, 0, pad))
            value = ops.pad(value, (0, 0, 0, pad))
        if rows is None:
            key = ops.depend(key, ops.assign(self.key_past, key))
            value = ops.depend(value, ops.assign(self.value_past, value))
        else:
            # ScatterUpdate writes whole rows in place (its time does not grow with B on CPU).
            key = ops.depend(key, self.scatter_rows_key(self.key_past, rows, key))
            value = ops.depend(value, self.scatter_rows_value(self.value_past, rows, value))
        return key, value

    def update(self, key, value, position, window=None):
        """Write one step: key/value (B, H, 1, D) at ``position`` (B,) of each row.

        ``IndexAdd`` along the position axis with a block-diagonal update (row b adds its key at
        position[b] and zeros elsewhere): in place, and exact because the slot is still zero (``prefill``
        zeroes every slot past the prompt and live rows write each position once). Rows that finished
        and keep re-writing a frozen position only change their own (ignored) outputs.
        Returns the first ``window`` slots of the cache (B, H, window, D), read after the write; every
        live position must lie below ``window`` (the caller picks it, see ``decode_window``). ``window``
        None returns the whole cache (B, H, seq_length, D) without a copy: the in-place decode attention
        (``DecodeAttention``) reads only each row's own slots of it.
        """
        key_cache = ops.depend(self.key_past, self.index_add_key(self.key_past, position, key * self.row_eye))
        value_cache = ops.depend(self.value_past,
                                 self.index_add_value(self.value_past, position, value * self.row_eye))
        if window is not None and window < self.seq_length:
            # A short context reads (and attends over) only the slots it can use.
            key_cache = key_cache[:, :, :window]
            value_cache = value_cache[:, :, :window]
        return key_cache, value_cache


class Baichuan2Attention(nn.Cell):
    """Multi-head self-attention of Baichuan2 (no biases; ``W_pack`` split into wq/wk/wv).

    Inputs of ``construct``:
        x: (B, S, h) in compute dtype.
        keep: bool, broadcastable to (B, H, S, T); False hides a key. In a decode step T is the number
            of cache slots attended to (``decode_window``), at most ``seq_length``.
        rotary: ``(cos, sin, swap_mask)`` from MindFormers' ``FreqsMgr`` (7B) or None.
        bias: additive score bias broadcastable to (B, H, S, T) in fp32 (13B ALiBi) or None.
        position: (B,) int32 write position of a decode step, or None for a full forward. Where the
            in-place decode attention runs (``decode_attention``, CPU fp32) row b attends over the cache
            slots 0..position[b], the keys ``keep`` shows it, read where they lie: no copy of the window.
        write_cache: (B, 1, S, 1) mask of each row's valid positions when a full forward starts
            generation (its keys/values go to the cache, zero past each row's length); None for
            other full forwards (training, evaluation), which leave the cache alone.
        cache_rows: (B,) int32 cache rows that a prefill of B prompts writes (see ``KVCache.prefill``);
            None writes rows 0..B-1 of a cache of batch B.
        seq_ends: packed rows on Ascend's variable-length flash attention only: (N,) int64 end offsets
            of the N conversations in the flattened (B * S) token axis (``Baichuan2Model._seq_ends``).
    Output: (B, S, h).

    ``use_rope``: build the rotary application (7B); 13B (ALiBi) has none.
    """

    def __init__(self, config, use_rope=False):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.head_dim = config.hidden_size // config.num_heads
        self.compute_dtype = config.compute_dtype
        self.softmax_dtype = config.softmax_compute_type
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.score_matmul = ops.BatchMatMul(transpose_b=True)     # Q K^T without copying K
        # The primitive, not ops.matmul: on CPU ops.matmul's 4-D training graph keeps about 10 bytes more per
        # probability element and layer (measured); BatchMatMul keeps only its inputs for the backward.
        self.context_matmul = ops.BatchMatMul()
        self.softmax = LastAxisSoftmax()
        self.use_past = config.use_past
        self.is_first_iteration = True

        def linear():
            return Linear(self.hidden_size, self.hidden_size, has_bias=False,
                          compute_dtype=config.compute_dtype, param_init_type=config.param_init_type)

        self.wq, self.wk, self.wv, self.wo = linear(), linear(), linear(), linear()
        if config.n_kv_heads not in (None, config.num_heads):
            raise ValueError(f"Baichuan2 uses multi-head attention: n_kv_heads must be unset or equal to "
                             f"num_heads ({config.num_heads}), got {config.n_kv_heads}.")
        if config.qkv_concat:
            raise ValueError("qkv_concat: True is not supported by Baichuan2 (wq/wk/wv are kept separate, "
                             "as in every original Baichuan2 yaml). Set qkv_concat: False.")
        # Ascend's fused kernel for full-sequence forwards; the device module decides (never on CPU).
        self.use_flash_attention = use_flash_attention(config.use_flash_attention, config.use_past)
        self.decode_attention = None
        if self.use_past:
            self.kvcache_mgr = KVCache(config.batch_size, self.num_heads, config.seq_length, self.head_dim,
                                       config.compute_dtype)
            # CPU fp32 decode steps: one kernel over the cache in place (the device module decides).
            library = use_decode_attention(config.use_past, config.compute_dtype, config.softmax_compute_type)
            if library:
                self.decode_attention = DecodeAttention(library)
        self.apply_rotary_emb = None
        if use_rope:
            self.apply_rotary_emb = Baichuan2RotaryEmbedding(self.head_dim, config.rotary_dtype)

    def _split_heads(self, x):
        batch, seq, _ = x.shape
        return x.reshape(batch, seq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)

    def construct(self, x, keep, rotary=None, bias=None, position=None, write_cache=None, cache_rows=None,
                  seq_ends=None):
        batch, seq, _ = x.shape
        query = self._split_heads(self.wq(x))
        key = self._split_heads(self.wk(x))
        value = self._split_heads(self.wv(x))
        if rotary is not None:
            query, key = self.apply_rotary_emb(query, key, rotary)
        in_place = position is not None and self.decode_attention is not None
        if self.use_past:
            if position is not None:
                # The portable path attends over a copy of the first W = keep.shape[-1] slots; the kernel
                # reads the whole cache in place, each row up to its own position.
                key, value = self.kvcache_mgr.update(key, value, position, None if in_place else keep.shape[-1])
            elif write_cache is not None:
                self.kvcache_mgr.prefill(key, value, write_cache, cache_rows)

        if in_place:
            context = self.decode_attention(query, key, value, position, bias)
        elif seq_ends is not None:
            context = self._varlen_flash_attention(query, key, value, seq_ends)
        elif self.use_flash_attention:
            context = self._flash_attention(query, key, value, keep, bias)
        else:
            context = self._attention(query, key, value, keep, bias)
        context = context.transpose(0, 2, 1, 3).reshape(batch, seq, self.hidden_size)
        return self.wo(context)

    def _attention(self, query, key, value, keep, bias):
        """Portable attention: (B, H, S, D) x (B, H, T, D) -> (B, H, S, D)."""
        scores = self.score_matmul(query.astype(self.compute_dtype), key.astype(self.compute_dtype))
        scores = scores.astype(self.softmax_dtype) * self.scale
        if bias is not None:
            scores = scores + _expand_as(bias.astype(self.softmax_dtype), scores)
        # keep (B or 1, 1, S, T) and the fill take the scores' shape (a scalar fill would broadcast too).
        scores = ops.select(_expand_as(keep, scores), scores,
                            ops.fill(self.softmax_dtype, scores.shape, _MASKED_SCORE))
        probs = self.softmax(scores).astype(self.compute_dtype)
        return self.context_matmul(probs, value.astype(self.compute_dtype))

    def _flash_attention(self, query, key, value, keep, bias):
        """Ascend ``FlashAttentionScore`` with the same mask and ALiBi bias (fp16/bf16 compute only).

        Chosen only on Ascend (``baichuan2_device.use_flash_attention``); this CPU-built project
        cannot execute it, so it uses the kernel's most general form: an explicit mask (1 = hidden,
        shape (B, 1, S, S)) and, for 13B, the full ALiBi bias as ``real_shift``.
        """
        batch, _, seq, _ = query.shape
        hidden = ops.broadcast_to(ops.logical_not(keep), (batch, 1, seq, key.shape[2])).astype(mstype.uint8)
        shift = None if bias is None else bias.astype(self.compute_dtype)
        return ops.flash_attention_score(query.astype(self.compute_dtype), key.astype(self.compute_dtype),
                                         value.astype(self.compute_dtype), self.num_heads, real_shift=shift,
                                         attn_mask=hidden, scalar_value=self.scale, input_layout="BNSD")


    def _varlen_flash_attention(self, query, key, value, seq_ends):
        """Ascend ``FlashAttentionScore`` in its variable-length form for packed rows (7B, RoPE).

        The B rows are flattened into one token axis (TND layout, T = B * S); ``seq_ends`` holds the end
        offset of every conversation in it, so the kernel runs causal attention within each conversation
        (sparse_mode 3: causal per sequence, with the kernel's compressed 2048 x 2048 lower-triangular
        mask). This is the block-diagonal causal mask of the portable path without building it.
        Chosen only on Ascend (``baichuan2_device.use_varlen_flash_attention``) and never with an ALiBi
        bias; this CPU-built project cannot execute it (the selection logic is unit-tested).
        """
        batch, heads, seq, dim = query.shape

        def tnd(x):
            return x.transpose(0, 2, 1, 3).reshape(batch * seq, heads, dim).astype(self.compute_dtype)

        causal = Tensor(np.triu(np.ones((2048, 2048), np.uint8), 1))
        context = ops.flash_attention_score(tnd(query), tnd(key), tnd(value), self.num_heads, attn_mask=causal,
                                            actual_seq_qlen=seq_ends, actual_seq_kvlen=seq_ends,
                                            scalar_value=self.scale, input_layout="TND", sparse_mode=3)
        return context.reshape(batch, seq, heads, dim).transpose(0, 2, 1, 3)


class Baichuan2DecodeLayer(nn.Cell):
    """Pre-norm block: ``h = x + Attn(RMSNorm(x))``; ``out = h + MLP(RMSNorm(h))``. (B, S, h) -> (B, S, h)."""

    def __init__(self, config, layer_id, use_rope=False):
        super().__init__()
        self.layer_id = layer_id
        fused = use_fused_rms_norm(config.fused_rms_norm)
        self.attention_norm = Baichuan2RMSNorm(config.hidden_size, config.rms_norm_eps,
                                               compute_type=config.layernorm_compute_type, fused_kernel=fused)
        self.ffn_norm = Baichuan2RMSNorm(config.hidden_size, config.rms_norm_eps,
                                         compute_type=config.layernorm_compute_type, fused_kernel=fused)
        self.attention = Baichuan2Attention(config, use_rope)
        self.feed_forward = LlamaFeedForward(dim=config.hidden_size,
                                             intermediate_size=config.intermediate_size,
                                             hidden_dim=4 * config.hidden_size,
                                             multiple_of=config.multiple_of,
                                             ffn_dim_multiplier=config.ffn_dim_multiplier,
                                             compute_dtype=config.compute_dtype,
                                             param_init_type=config.param_init_type)
        self.residual_dtype = config.residual_dtype

    def construct(self, x, keep, rotary=None, bias=None, position=None, write_cache=None, cache_rows=None,
                  seq_ends=None):
        h = self.attention(self.attention_norm(x), keep, rotary, bias, position, write_cache, cache_rows,
                           seq_ends)
        h = x.astype(self.residual_dtype) + h.astype(self.residual_dtype)
        out = self.feed_forward(self.ffn_norm(h))
        return h + out.astype(self.residual_dtype)


class NormHead(nn.Cell):
    """Baichuan2's lm_head: ``logits = x @ normalize_rows(W).T`` with W (V, h) stored raw.

    Computed as ``(x @ W.T) * inv_norm`` with ``inv_norm[v] = 1 / max(||W[v]||, 1e-12)``
    (``F.normalize``'s rule), which is the same function, so training gradients are those of the
    normalised head. Training recomputes ``inv_norm`` every step. Inference with a KV cache computes
    it once per prompt (prefill) from the raw weight into the ``inv_norm`` buffer and reuses it for
    every decode step: the stored weight is never rewritten, so repeated ``generate()`` calls cannot
    drift and a weight loaded later is picked up at the next prompt.

    ``kernels``: path of the compiled NormHead kernels (``baichuan2_device.use_norm_head_kernels``) or None.
    With them the row norms are one kernel, and training runs the product through
    ``baichuan2_norm_head.FusedNormHeadProduct`` (one pass for the scaling, one for its gradient, one for the
    norm's share of W's gradient); the function and its gradient are the same. ``fuse_loss`` (with
    ``kernels``): training takes the loss from ``cross_entropy`` instead of the logits (the loss of
    ``baichuan2_loss.MaskedCrossEntropy``, computed without writing the logits); the caller decides it
    (the vocabulary not split over devices) and checks ``fused_loss``.

    Input (B, S, h) or (N, h); output fp32 logits (..., V).
    """

    def __init__(self, hidden_size, vocab_size, compute_dtype, param_init_type, use_past, kernels=None,
                 fuse_loss=False):
        super().__init__()
        self.weight = Parameter(initializer(HeUniform(negative_slope=math.sqrt(5)), [vocab_size, hidden_size],
                                            param_init_type), name="weight")
        self.compute_dtype = compute_dtype
        self.use_past = use_past
        self.is_first_iteration = True
        # transpose_b instead of weight.T: no per-call copy of the (V, h) matrix.
        self.matmul = ops.MatMul(transpose_b=True)
        if use_past:
            self.inv_norm = Parameter(Tensor(np.ones(vocab_size), mstype.float32), name="inv_norm",
                                      requires_grad=False)
        self.kernel_row_inv_norm = row_inv_norm_primitive(kernels) if kernels else None
        self.fused_product = FusedNormHeadProduct(kernels) if kernels else None
        self.fused_loss = FusedNormHeadCrossEntropy(kernels) if kernels and fuse_loss else None

    def _row_inv_norm(self):
        if self.kernel_row_inv_norm is not None:
            return self.kernel_row_inv_norm(self.weight)
        weight = self.weight.astype(mstype.float32)
        norm = ops.sqrt(ops.reduce_sum(weight * weight, -1))
        return 1.0 / ops.maximum(norm, 1e-12)

    def cross_entropy(self, x, labels, label_weight):
        """Training loss from hidden states (B, S, h), labels (B, S) int32 and their weights (B, S) fp32:
        ``sum(weight * nll) / (sum(weight) + 1e-8)``, fp32 scalar. Needs ``fused_loss``."""
        inv_norm = ops.stop_gradient(self._row_inv_norm())        # its gradient is in the loss's backward
        loss, _, _ = self.fused_loss(x.reshape(-1, x.shape[-1]), self.weight, inv_norm, labels.reshape(-1),
                                     label_weight.reshape(-1))
        return loss

    def construct(self, x):
        if self.training and self.fused_product is not None:
            shape = x.shape
            inv_norm = ops.stop_gradient(self._row_inv_norm())    # its gradient is in the product's backward
            logits = self.fused_product(x.reshape(-1, shape[-1]), self.weight, inv_norm)
            return logits.reshape(shape[:-1] + (logits.shape[-1],))
        if self.training or not self.use_past:
            inv_norm = self._row_inv_norm()
        elif self.is_first_iteration:
            inv_norm = self._row_inv_norm()
            inv_norm = ops.depend(inv_norm, ops.assign(self.inv_norm, inv_norm))
        else:
            inv_norm = self.inv_norm
        weight = self.weight if self.weight.dtype == self.compute_dtype else self.weight.astype(self.compute_dtype)
        shape = x.shape
        logits = self.matmul(x.reshape(-1, shape[-1]).astype(self.compute_dtype), weight)
        logits = logits.astype(mstype.float32)
        # (N, V) * (V,) inside Mul would keep two N x V index tables, and its gradient two more (_expand_as).
        logits = logits * _expand_as(inv_norm, logits)
        return logits.reshape(shape[:-1] + (logits.shape[-1],))


class Baichuan2Model(LlamaPreTrainedModel):
    """Embedding, decoder layers and final norm; subclasses supply the position inputs.

    ``construct(tokens (B, S) int32, batch_valid_length (B,) int32 or None, key_positions (W,) int32 or
    None) -> hidden (B, S, h)``.
    ``batch_valid_length`` counts the valid tokens of each row including the current one; in a
    decode step (``use_past`` and not the first iteration) the new token sits at index
    ``batch_valid_length - 1``. ``key_positions`` (W,) int32 = ``arange(W)`` limits a decode step to
    the first W cache slots (every ``batch_valid_length`` must be <= W); None reads all
    ``seq_length`` slots. Each W compiles its own graph in graph mode. ``cache_rows`` (b,) int32: in a
    prefill of b prompts, the KV-cache rows they are written to, the other rows left as they are
    (continuous batching); None writes rows 0..b-1 of a cache of batch b. Each b compiles its own graph.
    ``position_ids`` (B, S) int32, full forwards only: packed rows (see the module docstring); None
    for unpacked rows, whose positions are 0..S-1.

    The embedding behaves as ``padding_idx=pad_token_id`` (Hugging Face Baichuan2): the pad row
    ``pad_token_id`` (0, also ``<unk>``) is looked up but never receives a gradient.
    """
    uses_rope = False       # 7B: True (rotary positions); 13B: ALiBi bias

    def __init__(self, config):
        super().__init__(config, auto_prefix=True)
        self.config = config
        self.num_layers = config.num_layers
        self.num_heads = config.num_heads
        self.seq_length = config.seq_length
        self.use_past = config.use_past
        self.is_first_iteration = True
        self.pad_token_id = config.pad_token_id
        # Packed rows on Ascend: one variable-length (TND) flash-attention call per layer over all the
        # conversations. RoPE only: ALiBi's bias (13B) is not taken in that layout, so 13B packed rows use
        # the BNSD kernel with the block mask.
        self.use_varlen_flash_attention = use_varlen_flash_attention(config.use_flash_attention, True,
                                                                     config.use_past) and self.uses_rope
        self.tok_embeddings = LlamaEmbedding(config.vocab_size, config.hidden_size,
                                             init_method_std=config.init_method_std,
                                             param_init_type=config.embedding_init_type)
        self.layers = nn.CellList()
        pipeline_stages = config.parallel_config.pipeline_stage
        recompute = config.parallel_config.recompute
        for layer_id in range(config.num_layers):
            layer = Baichuan2DecodeLayer(config, layer_id, self.uses_rope)
            if pipeline_stages > 1:
                from baichuan2_parallel import layer_to_stage  # pylint: disable=import-outside-toplevel
                layer.pipeline_stage = layer_to_stage(layer_id, config.num_layers, pipeline_stages, config.offset)
            if getattr(recompute, "recompute", recompute) is True:
                layer.recompute()
            self.layers.append(layer)
        # The attention layers' own choice (made once, in Baichuan2Attention): flash attention takes the
        # mask and bias untiled.
        self.use_flash_attention = self.layers[0].attention.use_flash_attention
        self.norm_out = Baichuan2RMSNorm(config.hidden_size, config.rms_norm_eps,
                                         compute_type=config.layernorm_compute_type,
                                         fused_kernel=use_fused_rms_norm(config.fused_rms_norm))
        if pipeline_stages > 1:
            self.tok_embeddings.pipeline_stage = 0
            self.norm_out.pipeline_stage = pipeline_stages - 1
        # Key positions 0..seq_length-1, used to build decode-step masks.
        self.key_positions = Tensor(np.arange(config.seq_length, dtype=np.int32))

    def _position_inputs(self, seq_len, position, key_positions, position_ids=None):
        """Return ``(rotary, bias)`` for a full forward (``position`` None) or a decode step whose
        keys sit at ``key_positions`` (T,) int32. A full forward of packed rows takes each token's
        position from ``position_ids`` (B, S) int32 (restarting at 0 per conversation)."""
        raise NotImplementedError

    def _tile_position_inputs(self, keep, rotary, bias, batch):
        """The mask and ALiBi bias repeated to the scores' shape (B, H, S, T) and the rotary tables to the
        queries' (B, H, S, D), once for all layers (``_expand_to``).

        Why: every layer's elementwise ops take operands of one shape (see ``_expand_as``); repeating in
        each layer would make L copies, and a training step without recompute keeps each layer's copy
        (Select's condition, RoPE's cos/sin) for its backward. Here the layers share one. Flash attention
        (Ascend) takes the (B, 1, S, T) mask and the bias as they are.
        """
        heads = self.num_heads
        if rotary is not None:
            cos, sin, swap_mask = rotary
            rope_shape = (batch, heads) + tuple(cos.shape[-2:])
            rotary = (_expand_to(cos, rope_shape), _expand_to(sin, rope_shape), swap_mask)
        if not self.use_flash_attention:
            score_shape = (batch, heads) + tuple(keep.shape[-2:])
            keep = _expand_to(keep, score_shape)
            if bias is not None:
                bias = _expand_to(bias, score_shape)
        return keep, rotary, bias

    @staticmethod
    def _packed_keep(position_ids):
        """Block-diagonal causal mask (B, 1, S, S) bool of packed rows: ``keep[i, j] = j <= i and
        segment[i] == segment[j]`` with ``segment = cumsum(position_ids == 0)`` (one per conversation;
        every pad token, position id 0, is a segment of its own)."""
        seq_len = position_ids.shape[1]
        segment = ops.cumsum((position_ids == 0).astype(mstype.int32), axis=1)                  # (B, S)
        same = segment.reshape(-1, 1, seq_len, 1) == segment.reshape(-1, 1, 1, seq_len)       # (B, 1, S, S)
        causal = ops.tril(ops.ones((seq_len, seq_len), mstype.bool_)).reshape(1, 1, seq_len, seq_len)
        return ops.logical_and(same, causal)

    @staticmethod
    def _seq_ends(position_ids):
        """End offsets (N,) int64 of the N conversations (pads included, one each) of packed rows in the
        flattened (B * S) token axis: the ``actual_seq_qlen`` of variable-length flash attention.
        Dynamic shape (N depends on the data): Ascend graph mode only."""
        batch, seq_len = position_ids.shape
        starts = (position_ids == 0).astype(mstype.int32)
        # A token ends a conversation when the next one starts a new one, or it ends its row.
        next_starts = ops.concat([starts[:, 1:], ops.ones((batch, 1), mstype.int32)], axis=1)
        ends = ops.nonzero(next_starts.reshape(-1)).reshape(-1) + 1
        return ends.astype(mstype.int64)

    def construct(self, tokens, batch_valid_length=None, key_positions=None, cache_rows=None, position_ids=None):
        embedded = self.tok_embeddings(tokens)
        # padding_idx: the pad row's lookups carry no gradient (a (B, S, h) select, not a V x h op).
        is_pad = (tokens == self.pad_token_id).reshape(tokens.shape + (1,))
        hidden = ops.where(_expand_as(is_pad, embedded), ops.stop_gradient(embedded), embedded)
        hidden = hidden.astype(self.config.compute_dtype)
        seq_len = tokens.shape[1]
        if self.use_past and not self.is_first_iteration:
            if key_positions is None:
                key_positions = self.key_positions
            position = (batch_valid_length - 1).astype(mstype.int32)                    # (B,)
            keep = key_positions.reshape(1, -1) <= position.reshape(-1, 1)               # (B, T)
            keep = keep.reshape(keep.shape[0], 1, 1, -1)                                 # (B, 1, 1, T)
        elif position_ids is not None:
            position = None
            keep = self._packed_keep(position_ids)                                       # (B, 1, S, S)
        else:
            position = None
            keep = ops.tril(ops.ones((seq_len, seq_len), mstype.bool_)).reshape(1, 1, seq_len, seq_len)
        rotary, bias = self._position_inputs(seq_len, position, key_positions, position_ids)
        keep, rotary, bias = self._tile_position_inputs(keep, rotary, bias, tokens.shape[0])
        seq_ends = None
        if position_ids is not None and self.use_varlen_flash_attention:
            seq_ends = self._seq_ends(position_ids)
        write_cache = None      # prefill: (B, 1, S, 1) mask of each row's valid positions
        if self.use_past and position is None and batch_valid_length is not None:
            valid = self.key_positions[:seq_len].reshape(1, -1) < batch_valid_length.reshape(-1, 1)
            write_cache = valid.astype(self.config.compute_dtype).reshape(-1, 1, seq_len, 1)
        for layer in self.layers:
            hidden = layer(hidden, keep, rotary, bias, position, write_cache, cache_rows, seq_ends)
        return self.norm_out(hidden)


class Baichuan2ForCausalLM(Baichuan2GenerationMixin, LlamaPreTrainedModel):
    """Causal LM head, loss and generation around a ``Baichuan2Model`` subclass.

    ``construct(input_ids, labels=None, ..., position_ids=None, ..., batch_valid_length=None)``:
      * training: ``input_ids`` (B, S+1); predicts ``labels[:, 1:]`` (or, without labels,
        ``input_ids[:, 1:]``) from ``input_ids[:, :S]``. Which targets count, as the official model
        (Hugging Face Baichuan2: ``CrossEntropyLoss(ignore_index=-100)`` on the labels): with labels,
        every target whose label is not ``ignore_token_id`` (the pad id 0 is also ``<unk>``, a real
        token); without labels (continued pre-training), every target whose input is not pad.
        Returns the mean loss over those targets (fp32 scalar).
      * ``position_ids`` (B, S+1) int32 in training, (B, S) in evaluation: the rows are packed
        (``belle_preprocess.py --pack True``): attention stays within each conversation, positions
        restart with it, and a target whose position id is 0 (a conversation's first token, or
        padding) is never counted, so nothing is predicted across a boundary. This changes the
        semantics of the batch; None (the default) is one sequence per row, exactly as before.
      * inference with ``batch_valid_length`` (B,): fp32 logits (B, V) of each row's last valid
        token (prefill, into the cache rows ``cache_rows`` (B,) if given) or of the decoded token
        (decode step, reading the cache slots ``key_positions`` (W,) if given; see ``Baichuan2Model``).
      * evaluation without it: ``(logits (B, S, V) fp32, tokens (B, S), input_mask (B, S))`` as in
        MindFormers, for the perplexity metric (it predicts ``tokens[:, 1:]`` where ``input_mask[:, 1:]``
        is set); ``input_mask`` is 0 where the label is ``ignore_token_id`` (with labels) or on pad
        inputs (without), and, for packed rows, where the position id is 0, so packed and unpacked
        data give the same perplexity.
    """
    model_class = None

    def __init__(self, config):
        super().__init__(config, auto_prefix=True)
        self.config = config
        self.ignore_token_id = config.ignore_token_id
        self.pad_token_id = config.pad_token_id
        self.use_past = config.use_past
        self.vocab_size = config.vocab_size
        self.is_first_iteration = True
        self.model = self.model_class(config)
        # The loss is fused into the head where its kernels run, unless the vocabulary is split (build_loss).
        self.lm_head = NormHead(config.hidden_size, config.vocab_size, config.compute_dtype,
                                config.param_init_type, config.use_past,
                                use_norm_head_kernels(config.compute_dtype, config.param_init_type),
                                fuse_loss=config.parallel_config.model_parallel == 1)
        if config.parallel_config.pipeline_stage > 1:
            self.lm_head.pipeline_stage = config.parallel_config.pipeline_stage - 1
        self.loss = build_loss(config.parallel_config)
        rows_kernel = use_rows_matmul(config.use_past, config.compute_dtype)
        if rows_kernel:
            install_decode_matmul(self, rows_kernel)
        self.load_checkpoint(config)

    def set_decode_phase(self, is_first_iteration):
        """Switch every cell between prefill/full forward (True) and single-token decode (False)."""
        self.add_flags_recursive(is_first_iteration=is_first_iteration)

    def prepare_inputs_for_generation(self, input_ids, **kwargs):
        return {"input_ids": Tensor(input_ids, mstype.int32)}

    def construct(self, input_ids, labels=None, input_position=None, position_ids=None, attention_mask=None,
                  input_embeds=None, init_reset=None, batch_valid_length=None, key_positions=None, cache_rows=None):
        batch, seq = input_ids.shape
        if batch_valid_length is not None:
            position_ids = None         # generation (prefill/decode) is one prompt per row
        target_positions = None         # packed rows: position id of each predicted token
        if self.training:
            tokens = input_ids[:, :seq - 1]
            if position_ids is not None:
                target_positions = position_ids[:, 1:]
                position_ids = position_ids[:, :seq - 1]
        else:
            tokens = input_ids
            target_positions = position_ids
        hidden = self.model(tokens, batch_valid_length, key_positions, cache_rows, position_ids)
        if not self.training and batch_valid_length is not None:
            if self.use_past and not self.is_first_iteration:
                last = hidden[:, -1]                                                     # (B, h)
            else:
                index = (batch_valid_length - 1).astype(mstype.int32).reshape(batch, 1, 1)
                index = ops.broadcast_to(index, (batch, 1, hidden.shape[-1]))
                last = ops.gather_elements(hidden, 1, index).squeeze(1)                   # (B, h)
            return self.lm_head(last)
        if labels is not None and self.training:
            labels = labels[:, 1:]
        if labels is not None:
            input_mask = ops.not_equal(labels, self.ignore_token_id).astype(mstype.float32)
        else:
            input_mask = ops.not_equal(tokens, self.pad_token_id).astype(mstype.float32)
        if target_positions is not None:
            input_mask = input_mask * ops.not_equal(target_positions, 0).astype(mstype.float32)
        if not self.training:
            # As MindFormers: the metric shifts itself (predicts tokens[1:] where input_mask[1:] is set).
            return self.lm_head(hidden), tokens, input_mask
        if labels is None:
            labels = input_ids[:, 1:]
        labels = labels.astype(mstype.int32)
        if self.lm_head.fused_loss is not None:
            return self.lm_head.cross_entropy(hidden, labels, input_mask)
        logits = self.lm_head(hidden)
        return self.loss(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), input_mask.reshape(-1))
