"""Know before you run: one arithmetic model of the memory a Baichuan2 run needs per device.

Pure Python, no MindSpore/MindFormers import, so the planner CLI (``plan_memory.py``) and the pre-flight
of the entry scripts answer in milliseconds. ``plan(...)`` returns a ``MemoryPlan`` whose ``parts``
(name -> bytes) add up to ``per_device_bytes``; ``preflight(config, run_mode)`` turns a YAML config into a
one-line verdict. The formula of every part is in ``docs/memory.md``.

What one device holds (the largest pipeline stage decides; ``mp`` splits every linear weight, the heads and
the lm_head's vocabulary; the embedding is replicated when ``vocab_emb_dp``):

* weights: linear and embedding weights and the NormHead weight in ``param_init_type``, RMSNorm weights fp32;
* gradients: one per trainable weight, in its dtype (full size: ``gradient_accumulation_shard: False``); on
  CPU they and the optimizer's update temporaries come after the loss phase's buffers are freed, so only what
  they add beyond that phase is counted (``CPU_UPDATE_PART``);
* optimizer states: AdamW moments m and v, fp32 for ``FP32StateAdamWeightDecay`` (param dtype for the
  plain ``AdamWeightDecay``), divided by ``dp`` under ``enable_parallel_optimizer``;
* activations kept for the backward pass, per micro batch, times the micro batches in flight (1F1B keeps up
  to ``pp`` on stage 0); with recompute only each layer's input plus one layer's full set;
* logits and loss temporaries: ``tokens x vocab/mp`` fp32 buffers (count per backend, see ``_LOGIT_BUFFERS``);
* KV cache for predict with ``use_past``: ``batch x layers x 2 x heads/mp x seq x head_dim x compute dtype``;
* LoRA: adapters are the only trainable weights (their gradients and moments), the base stays frozen;
* CPU kernel index tables: MindSpore's CPU Transpose kernels keep a size_t index per output element for the
  life of each compiled graph (every prefill width generation compiles), ``_TRANSPOSES_PER_LAYER`` per layer;
* a framework / workspace figure: on CPU the measured process baseline (MindSpore + MindFormers imported),
  on Ascend a judgement (``ASCEND_WORKSPACE_BYTES``), reported as such in ``MemoryPlan.judgements``;
* a checkpoint being loaded before the run (``load_checkpoint``): a full copy of the weights for
  ``mindspore.load_checkpoint`` (the Trainer, safetensors, rank_x layouts: ``CHECKPOINT_COPY``), or the
  largest single tensor when complete ``.ckpt`` files are streamed (the inference scripts' ``load_weights``:
  ``CHECKPOINT_STREAM``).

Sizes are in bytes; "GB" in ``max_device_memory`` is MindSpore's GiB (2**30), as in ``"59GB"``.
"""
import re
from dataclasses import dataclass, field

from baichuan2_config import uses_alibi     # pure Python: which architecture a YAML builds
from baichuan2_names import DEFAULT_LORA_TARGETS, LINEAR_CELLS, ffn_width     # pure Python: the one lists
from baichuan2_names import config_value as _get
from baichuan2_parallel import layer_to_stage     # pure Python: the pipeline-stage rule

GIB = 2 ** 30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2}
TRAIN_MODES = ("train", "finetune")
RUN_MODES = ("train", "finetune", "eval", "predict")

# Number of (tokens x vocab/mp) fp32 buffers alive at the peak of the lm_head + loss.
# CPU: measured for this project's NormHead + ``baichuan2_loss.MaskedCrossEntropy`` under MindSpore 2.7.2 CPU
#   graph mode, by differencing two sequence lengths at fixed weights (docs/memory.md, "CPU validation").
#   With NormHead's one-pass kernels (fp32 heads, ``norm_head_kernels``), which also fuse the loss into the
#   head (``FusedNormHeadCrossEntropy``; CPU runs no model parallelism, where it would not be fused): 3 when
#   the head trains (measured 2.76 beyond the other planned growth: the raw product kept for the backward,
#   its gradient, and one more the CPU pool holds at that point), 2 with a frozen head (LoRA, measured
#   1.61). Before the loss was fused
#   (2026-12-07): 6 and 5 (the scaled logits, the log-softmax, the softmax, its scaled copy, the scatter,
#   the gradient of the raw product). Without the kernels (the head in MindSpore ops): 8 and 6 (raw and
#   scaled logits, the broadcast inv_norm, the products for d inv_norm).
#   Evaluation keeps no backward chain: logits + log-softmax work buffers (3, a judgement: not measured).
# Ascend: judgement. Static memory planning (SOMAS) reuses buffers; 4 live fp32 buffers (logits,
#   log-softmax, one-hot, d_logits) plus the fp16 matmul output.
_LOGIT_BUFFERS = {("CPU", "train"): 8, ("CPU", "lora"): 6, ("CPU", "eval"): 3,
                  ("CPU-kernels", "train"): 3, ("CPU-kernels", "lora"): 2, ("CPU-kernels", "eval"): 3,
                  ("Ascend", "train"): 4, ("Ascend", "lora"): 4, ("Ascend", "eval"): 2}
# CPU: the optimizer step runs after the backward has freed the loss buffers, and updates one weight at a
# time with a few weight-sized temporaries, measured (nn.AdamWeightDecay) as 2 of the largest trainable tensor
# with the head in MindSpore ops, 1 with NormHead's kernels (keyed by ``norm_head_kernels``). The difference is
# how the head's V x h gradient is formed: an AddN of the product's and the norm's gradients (both alive
# beside the sum) or one kernel over the product's gradient (docs/memory.md).
_UPDATE_TEMPS = {False: 2, True: 1}
CPU_UPDATE_PART = "gradients + update, beyond loss phase"
# (V/mp x h) temporaries of NormHead's row norm ``w * w`` (and, when the head trains, its gradient):
# inference computes it for every prompt, full fine-tuning keeps one through the backward pass. NormHead's
# one-pass kernels make none (measured: docs/memory.md).
_HEAD_TEMPS = {"train": 1, "infer": 1}
# Devices whose fp32 NormHead runs ``baichuan2_norm_head``'s kernels: baichuan2_device's
# ``norm_head_kernels`` capability, written here without MindSpore (a test keeps the two equal).
NORM_HEAD_KERNEL_DEVICES = ("CPU",)
# CPU only: MindSpore's CPU Transpose kernel with a constant permutation builds one size_t index per output
# element when its graph is compiled (mindspore/ops/kernel/cpu/native/transpose_cpu_kernel.cc) and keeps it
# as long as the graph lives. A decoder layer's forward has four ((B, S, h) -> heads for q, k, v and the
# context back) and a training step's backward four more. Elementwise kernels keep 16-24 such bytes per
# element too when an operand broadcasts (arithmetic_cpu_kernel.cc, select_cpu_kernel.cc); the model
# repeats operands explicitly (``baichuan2_layers._expand_as``), so none are counted. Measured per op by
# ``benchmarks/bench_cpu_kernel_tables.py``.
_TRANSPOSE_INDEX_BYTES = 8
# Score-sized tensors (softmax dtype) live at once while one layer's attention runs its backward (the
# gradient of the probabilities, the repeated row sums and their difference): 3, measured on CPU as the
# once-only part of the growth with the number of heads (docs/memory.md); a judgement elsewhere.
_ATTENTION_BACKWARD_SCORES = 3
_TRANSPOSES_PER_LAYER = {"train": 8, "infer": 4}
# CPU training without recompute: what a training step holds per token and decoder layer beyond the items
# ``activation_bytes_per_token`` lists, measured by differencing 4 against 2 layers at h 256, 16 heads, seq
# 1024, vocab 4096 (2026-12-07: 311 MiB measured against 231 MiB planned per 2 layers x 1024 tokens). Not
# attributed to a tensor (the pool's reuse of freed activation blocks for gradients of other sizes is one
# candidate); its dependence on the shape is not measured, so it is a judgement beyond that shape.
CPU_UNATTRIBUTED_PER_TOKEN_LAYER = 40 * 1024
CPU_UNATTRIBUTED_PART = "activations, unattributed (CPU, measured)"
# Ascend: HCCL buffers, graph workspace, runtime reserve and fragmentation inside max_device_memory.
ASCEND_WORKSPACE_BYTES = 2 * GIB
# CPU: the measured RSS of a process that imported MindSpore + MindFormers and set the context (no model).
CPU_FRAMEWORK_BYTES = int(0.85 * GIB)
# How a checkpoint is loaded (``plan(load_checkpoint=...)``; True means CHECKPOINT_COPY):
# mindspore.load_checkpoint builds a dict holding every tensor before load_param_into_net copies it in;
# baichuan2_ckpt_reader streams a .ckpt tensor by tensor, so one tensor is in flight at a time.
CHECKPOINT_COPY = "copy"
CHECKPOINT_STREAM = "stream"


class MemoryConfigError(ValueError):
    """A config value the planner cannot use (one line naming the field and the fix)."""


@dataclass
class MemoryPlan:
    """Per-device memory estimate. ``parts``: name -> bytes; ``per_device_bytes`` their sum."""
    parts: dict
    per_device_bytes: int
    device_memory_bytes: int
    fits: bool
    suggestions: list = field(default_factory=list)
    judgements: list = field(default_factory=list)
    layout: dict = field(default_factory=dict)

    @property
    def margin_bytes(self):
        return self.device_memory_bytes - self.per_device_bytes

    @property
    def biggest_part(self):
        return max(self.parts.items(), key=lambda item: item[1])

    def as_dict(self):
        return {"fits": self.fits, "per_device_bytes": self.per_device_bytes,
                "device_memory_bytes": self.device_memory_bytes, "margin_bytes": self.margin_bytes,
                "parts": dict(self.parts), "suggestions": list(self.suggestions),
                "judgements": list(self.judgements), "layout": dict(self.layout)}


# ----- reading config values ----------------------------------------------------------------------

def _dtype_bytes(name, field_name):
    key = str(name).lower().replace("mstype.", "")
    if key not in DTYPE_BYTES:
        raise MemoryConfigError(f"model_config.{field_name} {name!r} is not one of float32/float16/bfloat16")
    return DTYPE_BYTES[key]


def parse_size(text):
    """``"59GB"`` / ``"512MB"`` / ``"24GiB"`` / a number of bytes -> bytes (GB = 2**30, as MindSpore reads it)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        return int(text)
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(?:i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise MemoryConfigError(f"memory size {text!r} is not a size like '59GB' or '512MB'")
    scale = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


def layers_per_stage(num_layers, pp, offset=0):
    """Decoder layers of each pipeline stage under the original's rule (``baichuan2_parallel.layer_to_stage``)."""
    counts = [0] * pp
    for layer_id in range(num_layers):
        counts[layer_to_stage(layer_id, num_layers, pp, offset)] += 1
    return counts


def _lora_targets(pet_config):
    """Linear cells LoRA wraps (``re.match`` of ``target_modules`` on the cell name, as mindformers' adapter)."""
    if not pet_config or (_get(pet_config, "pet_type", "lora") != "lora"):
        return []
    pattern = _get(pet_config, "target_modules", DEFAULT_LORA_TARGETS)
    return [cell for cell in LINEAR_CELLS if re.match(pattern, cell)]


# ----- the model ------------------------------------------------------------------------------------

@dataclass
class _Shape:
    vocab: int
    hidden: int
    layers: int
    heads: int
    ffn: int
    seq: int
    param_bytes: int
    compute_bytes: int
    softmax_bytes: int
    flash_attention: bool
    rope: bool = True       # 7B rotates q and k (RoPE); 13B adds an ALiBi bias instead

    @classmethod
    def from_config(cls, model_config, seq_length=None):
        def need(key):
            value = _get(model_config, key)
            if value is None:
                raise MemoryConfigError(f"model_config.{key} is missing (needed for the memory plan)")
            return int(value)
        return cls(vocab=need("vocab_size"), hidden=need("hidden_size"), layers=need("num_layers"),
                   heads=need("num_heads"), ffn=ffn_width(model_config),
                   seq=int(seq_length or need("seq_length")),
                   param_bytes=_dtype_bytes(_get(model_config, "param_init_type", "float32"), "param_init_type"),
                   compute_bytes=_dtype_bytes(_get(model_config, "compute_dtype", "float32"), "compute_dtype"),
                   softmax_bytes=_dtype_bytes(_get(model_config, "softmax_compute_type", "float32"),
                                              "softmax_compute_type"),
                   flash_attention=bool(_get(model_config, "use_flash_attention", False)))


def layer_weight_elements(shape, mp):
    """Elements of one decoder layer's weights on one device: linear weights / mp, two fp32 norms full."""
    h, f = shape.hidden, shape.ffn
    return {"linear": (4 * h * h + 3 * h * f) // mp, "norm": 2 * h}


def lora_elements(shape, targets, rank, mp):
    """Adapter elements of one layer: A (r, in) and B (out, r) per wrapped Linear (out or in split by mp)."""
    h, f = shape.hidden, shape.ffn
    dims = {"wq": (h, h), "wk": (h, h), "wv": (h, h), "wo": (h, h), "w1": (h, f), "w3": (h, f), "w2": (f, h)}
    return sum(rank * (dims[c][0] + dims[c][1]) for c in targets) // mp


def activation_bytes_per_token(shape, mp, recompute, fused_norm):
    """Bytes one decoder layer keeps per token for its backward pass (sharded by mp where the model splits).

    Without recompute, in compute dtype c: the layer input, first norm output, rotated q and k, v, attention
    context, residual and second norm output (8 h), the SwiGLU gate, SiLU, up and product (4 I). The
    portable RMSNorm (``baichuan2_layers.Baichuan2RMSNorm``; Ascend's fused RmsNorm keeps only x and 1/rms)
    also keeps, per norm, its fp32 input copy and the repeated 1/rms factor (2 x 4 h) and the repeated weight
    (c h). RoPE keeps nothing per layer: its products are with constant tables, whose gradient is never
    formed, so only the shared tables stay (``attention_shared_bytes``). Without flash attention: the
    probabilities, in the softmax dtype for the softmax's backward (``LastAxisSoftmax`` needs only its
    output) and, when c differs, their copy in c for the context matmul (H x S each). With recompute only
    the layer input (c h).
    """
    c, h, f = shape.compute_bytes, shape.hidden, shape.ffn
    if recompute:
        return c * h
    per_token = c * (8 * h + 4 * f) // mp
    if not fused_norm:
        per_token += 2 * (2 * 4 * h + c * h)
    if not shape.flash_attention:
        probs = shape.softmax_bytes + (c if c != shape.softmax_bytes else 0)
        per_token += probs * (shape.heads // mp) * shape.seq
    return per_token


def attention_shared_bytes(shape, mp, batch_size):
    """What a training step of the portable attention holds once, not per layer: the causal mask repeated to
    the scores' shape (1 byte per score element) and the rotary tables repeated to the queries' shape (7B, 2
    fp32 (B, H, S, D)), which every layer shares (``Baichuan2Model._tile_position_inputs``), and one layer's
    backward working set (``_ATTENTION_BACKWARD_SCORES`` score-sized tensors in the softmax dtype)."""
    heads = shape.heads // mp
    scores = batch_size * heads * shape.seq * shape.seq
    shared = 2 * 4 * batch_size * shape.seq * shape.hidden // mp if shape.rope else 0
    if shape.flash_attention:
        return shared
    return shared + scores * (1 + _ATTENTION_BACKWARD_SCORES * shape.softmax_bytes)


def norm_head_kernels(shape, device):
    """Whether NormHead runs its one-pass kernels: fp32 weight and product on a device that has them
    (``baichuan2_device.use_norm_head_kernels``; a host without a C++ compiler falls back to MindSpore ops,
    which the plan does not follow)."""
    return device in NORM_HEAD_KERNEL_DEVICES and shape.param_bytes == 4 and shape.compute_bytes == 4


def _logit_buffers(device, training, lora, kernels=False):
    """The ``_LOGIT_BUFFERS`` count of a run: training with a trained head, training with LoRA, or eval;
    ``kernels``: NormHead's one-pass kernels (``norm_head_kernels``)."""
    return _LOGIT_BUFFERS[(device + "-kernels" if kernels else device,
                           ("lora" if lora else "train") if training else "eval")]


def prefill_widths(seq_length, minimum=16):
    """Widths of the prefill graphs generation compiles up to ``seq_length``: the powers of two from
    ``minimum``, capped at ``seq_length`` (``baichuan2_generation._bucket``'s rule, written here without
    MindSpore so the planner stays light; a test keeps the two equal). The server's warm-up compiles these."""
    widths, width = [], minimum
    while width < seq_length:
        widths.append(width)
        width *= 2
    return widths + [seq_length]


def cpu_kernel_table_bytes(shape, n_layers, mp, graph_tokens, training):
    """What CPU kernels keep per compiled graph, summed over graphs of ``graph_tokens`` tokens each: the
    Transposes' index tables (``_TRANSPOSES_PER_LAYER`` per layer, ``_TRANSPOSE_INDEX_BYTES`` per element)."""
    count = _TRANSPOSES_PER_LAYER["train" if training else "infer"]
    return sum(n_layers * count * _TRANSPOSE_INDEX_BYTES * tokens * shape.hidden // mp for tokens in graph_tokens)


def plan(model_config, parallel_config=None, run_mode="finetune", optimizer=None, recompute=None,
         batch_size=None, device="Ascend", device_memory_bytes=None, pet_config=None, use_past=None,
         seq_length=None, parallel_optimizer=None, framework_bytes=None, vocab_emb_dp=None,
         load_checkpoint=False, rope=True):
    """Per-device memory of one run.

    Args:
        model_config: ``model.model_config`` mapping (vocab_size, hidden_size, num_layers, num_heads,
            seq_length, param_init_type, compute_dtype, ...; ``pet_config`` read from it unless given).
        parallel_config: ``data_parallel``, ``model_parallel``, ``pipeline_stage``, ``micro_batch_num``,
            ``vocab_emb_dp`` (missing values count as 1 / True).
        run_mode: "train" / "finetune" (forward + backward + optimizer), "eval" (forward, logits of every
            position) or "predict" (generation; KV cache with ``use_past``).
        optimizer: optimizer type name ("FP32StateAdamWeightDecay" keeps fp32 moments; "AdamWeightDecay"
            keeps them in the parameter dtype); None means FP32StateAdamWeightDecay.
        recompute: whether decoder layers recompute their activations (``recompute_config.recompute``).
        batch_size: per-replica batch of one micro batch (``runner_config.batch_size``); for predict the
            generation batch (``model_config.batch_size``).
        device: "Ascend" or "CPU" (decides the framework figure and the buffer counts).
        device_memory_bytes: what one device offers (None: 64 GiB); ``plan_from_config`` passes
            ``max_device_memory`` on Ascend and the host's available RAM on CPU.
        parallel_optimizer: ``parallel.enable_parallel_optimizer``: weights and moments stored as 1/dp
            slices (gradients too when pp is 1), the gathered weights kept for the backward.
        framework_bytes: override of the framework / workspace figure, e.g. 0 when the caller has already
            imported MindSpore + MindFormers (then the available RAM it measures no longer includes them).
        load_checkpoint: a complete checkpoint is loaded into the network first. False: none;
            True or ``CHECKPOINT_COPY``: through ``mindspore.load_checkpoint``, which holds a full copy next to
            the network's weights until ``load_param_into_net`` returns (the Trainer's
            ``transform_and_load_checkpoint``, safetensors, rank_x layouts); ``CHECKPOINT_STREAM``: complete
            ``.ckpt`` files streamed tensor by tensor (``baichuan2_inference.load_weights``), one tensor in
            flight, the largest being the V x h embedding in the checkpoint's dtype.
        rope: the 7B architecture (rotary positions; True) or the 13B one (ALiBi; False). ``plan_from_config``
            reads it from ``model.arch.type`` (or ``trainer.model_name``), as the network is built.
    Returns:
        ``MemoryPlan``.
    """
    if run_mode not in RUN_MODES:
        raise MemoryConfigError(f"run_mode {run_mode!r} is not one of {', '.join(RUN_MODES)}")
    loading = checkpoint_loading(load_checkpoint)
    device = "CPU" if str(device).upper() == "CPU" else "Ascend"
    shape = _Shape.from_config(model_config, seq_length)
    shape.rope = bool(rope)
    dp = int(_get(parallel_config, "data_parallel", 1))
    mp = int(_get(parallel_config, "model_parallel", 1))
    pp = int(_get(parallel_config, "pipeline_stage", 1))
    micro = int(_get(parallel_config, "micro_batch_num", 1))
    if vocab_emb_dp is None:
        vocab_emb_dp = bool(_get(parallel_config, "vocab_emb_dp", True))
    for name, value in (("data_parallel", dp), ("model_parallel", mp), ("pipeline_stage", pp),
                        ("micro_batch_num", micro)):
        if value < 1:
            raise MemoryConfigError(f"parallel_config.{name} must be >= 1, got {value}")
    if shape.heads % mp or shape.vocab % mp:
        raise MemoryConfigError(f"model_parallel {mp} does not divide num_heads {shape.heads} and vocab_size "
                                f"{shape.vocab}")
    if pp > shape.layers:
        raise MemoryConfigError(f"pipeline_stage {pp} exceeds num_layers {shape.layers}")
    training = run_mode in TRAIN_MODES
    if not training:
        pp = 1                                   # distributed eval/predict run without pipeline stages
    if use_past is None:
        use_past = bool(_get(model_config, "use_past", False))
    use_past = bool(use_past) and run_mode == "predict"
    # The model's rule (baichuan2_device.use_flash_attention): a device that has it, and never with use_past.
    shape.flash_attention = shape.flash_attention and device == "Ascend" and not use_past
    if recompute is None:
        recompute = False
    recompute = bool(recompute) and training
    if batch_size is None:
        batch_size = int(_get(model_config, "batch_size", 1)) if run_mode == "predict" else 1
    batch_size = int(batch_size)
    if run_mode == "predict":
        batch_size = max(batch_size // dp, 1)
    if pet_config is None:
        pet_config = _get(model_config, "pet_config")
    lora_targets = _lora_targets(pet_config) if training else []
    lora_rank = int(_get(pet_config, "lora_rank", 8)) if lora_targets else 0
    optimizer = optimizer or "FP32StateAdamWeightDecay"
    if parallel_optimizer is None:
        parallel_optimizer = False
    offset = int(_get(model_config, "offset", 0) or 0)

    # Which stage is the largest: every stage's weights (+ activations in flight) compared.
    counts = layers_per_stage(shape.layers, pp, offset)
    per_layer = layer_weight_elements(shape, mp)
    embedding = shape.vocab * shape.hidden // (1 if vocab_emb_dp else mp)
    head = shape.vocab * shape.hidden // mp
    tokens = batch_size * shape.seq
    stage_parts = []
    for stage, n_layers in enumerate(counts):
        first, last = stage == 0, stage == pp - 1
        weights = n_layers * (per_layer["linear"] * shape.param_bytes + per_layer["norm"] * 4)
        weights += embedding * shape.param_bytes if first else 0
        weights += (head * shape.param_bytes + shape.hidden * 4) if last else 0
        parts = {"weights": weights}
        judgements = []
        if training:
            _training_parts(parts, judgements, shape, stage, n_layers, first, last, pp, micro, dp, mp, tokens,
                            per_layer, embedding, head, lora_targets, lora_rank, optimizer, parallel_optimizer,
                            recompute, device)
        else:
            _inference_parts(parts, shape, run_mode, n_layers, mp, batch_size, tokens, use_past, device)
        stage_parts.append((sum(parts.values()), stage, parts, judgements))
    _, stage, parts, judgements = max(stage_parts)
    if loading:
        # The load happens before the run: the peak is the larger of (weights + what loading holds) and the run.
        run_extras = sum(v for k, v in parts.items() if k != "weights")
        if loading == CHECKPOINT_STREAM:
            # One tensor in flight: the reader's copy of it, handed to the parameter, whose old data is then
            # freed. A complete checkpoint holds full tensors (not mp slices); the largest is the embedding
            # or the lm_head, V x h, next to the FFN's h x I. Its dtype is taken as param_init_type.
            held = max(shape.vocab, shape.ffn) * shape.hidden * shape.param_bytes
            judgements.append("checkpoint being loaded: the largest single tensor (V x h in param_init_type, "
                              "taken as the checkpoint's dtype) while the .ckpt streams tensor by tensor into the "
                              "network (the peak is the larger of loading and running)")
        else:
            held = parts["weights"]
            judgements.append("checkpoint being loaded: one full copy of the weights in the checkpoint's dtype "
                              "while load_param_into_net runs (the peak is the larger of loading and running)")
        parts["checkpoint being loaded"] = max(0, held - run_extras)

    if framework_bytes is None:
        framework_bytes = CPU_FRAMEWORK_BYTES if device == "CPU" else ASCEND_WORKSPACE_BYTES
    parts["framework / workspace"] = int(framework_bytes)
    if device == "CPU":
        judgements.append(f"CPU kernel index tables: {_TRANSPOSE_INDEX_BYTES} bytes per output element of each "
                          "Transpose, per compiled graph (counted from the model; the per-element size from "
                          "MindSpore's CPU kernel, measured by benchmarks/bench_cpu_kernel_tables.py)")
        judgements.append("framework / workspace: the RSS of a process with MindSpore + MindFormers imported "
                          "(measured, see docs/memory.md)")
    else:
        judgements.append(f"framework / workspace: {ASCEND_WORKSPACE_BYTES / GIB:.0f} GB for HCCL buffers, graph "
                          "workspace and fragmentation (a judgement)")
    if run_mode != "predict":
        measured = device == "CPU" and training
        count = _logit_buffers(device, training, bool(lora_targets), norm_head_kernels(shape, device))
        judgements.append(f"logits / loss: {count} fp32 "
                          f"tokens x vocab buffers ({'measured on CPU' if measured else 'a judgement'})")
    if device_memory_bytes is None:
        device_memory_bytes = 64 * GIB
    total = int(sum(parts.values()))
    layout = {"dp": dp, "mp": mp, "pp": pp, "micro_batch_num": micro, "largest_stage": stage,
              "layers_on_stage": counts[stage], "run_mode": run_mode, "batch_size": batch_size,
              "seq_length": shape.seq, "recompute": recompute, "use_past": use_past, "lora": bool(lora_targets),
              "device": device}
    memory_plan = MemoryPlan(parts={k: int(v) for k, v in parts.items()}, per_device_bytes=total,
                             device_memory_bytes=int(device_memory_bytes), fits=total <= device_memory_bytes,
                             judgements=judgements, layout=layout)
    if not memory_plan.fits:
        memory_plan.suggestions = _suggestions(model_config, parallel_config, run_mode, optimizer, recompute,
                                               batch_size, device, device_memory_bytes, pet_config, use_past,
                                               seq_length, parallel_optimizer, framework_bytes, vocab_emb_dp,
                                               load_checkpoint, rope)
    return memory_plan


def checkpoint_loading(load_checkpoint):
    """``None``, ``CHECKPOINT_COPY`` or ``CHECKPOINT_STREAM`` for ``plan(load_checkpoint=...)``: a flag (True
    means a full copy, as before there were two ways) or one of the two names."""
    if not isinstance(load_checkpoint, str):
        return CHECKPOINT_COPY if load_checkpoint else None
    if load_checkpoint in ("", CHECKPOINT_COPY, CHECKPOINT_STREAM):
        return load_checkpoint or None
    raise MemoryConfigError(f"load_checkpoint {load_checkpoint!r} is not one of False, True, "
                            f"{CHECKPOINT_COPY!r}, {CHECKPOINT_STREAM!r}")


def _training_parts(parts, judgements, shape, stage, n_layers, first, last, pp, micro, dp, mp, tokens,
                    per_layer, embedding, head, lora_targets, lora_rank, optimizer, parallel_optimizer,
                    recompute, device):
    """Gradients, optimizer moments, activations, logits of one pipeline stage (in place into ``parts``)."""
    kernels = norm_head_kernels(shape, device)
    if lora_targets:
        trainable = n_layers * lora_elements(shape, lora_targets, lora_rank, mp)
        param_bytes = shape.param_bytes
    else:
        trainable = n_layers * (per_layer["linear"] + per_layer["norm"])
        trainable += embedding if first else 0
        trainable += (head + shape.hidden) if last else 0
        param_bytes = shape.param_bytes
    shard = dp if parallel_optimizer else 1
    # MindSpore's optimizer parallel stores each weight as a 1/dp slice and all-gathers it in the forward;
    # with parallel_optimizer_comm_recompute False the gathered copy ("weights") lives until the backward.
    if shard > 1 and not lora_targets:
        parts["weight slices (parallel optimizer)"] = parts["weights"] // shard
    # Gradients are reduce-scattered to slices, except into the full-size accumulation buffers of pipeline
    # micro batches (gradient_accumulation_shard: False in every original YAML).
    grad_shard = shard if pp == 1 else 1
    parts["gradients"] = trainable * param_bytes // grad_shard
    moment_bytes = 4 if "FP32State" in optimizer else param_bytes
    parts["optimizer states (m, v)"] = 2 * trainable * moment_bytes // shard
    if shard > 1:
        sliced = "moments and gradients" if grad_shard > 1 else "moments"
        judgements.append(f"parallel optimizer over data_parallel {dp}: {sliced} sharded, gathered weights kept "
                          "to the backward (parallel_optimizer_comm_recompute False)")
    # 1F1B: stage s holds up to (pp - s) micro batches' activations when the first backward starts.
    in_flight = min(pp - stage, micro) if pp > 1 else 1
    fused_norm = device == "Ascend"
    per_token = activation_bytes_per_token(shape, mp, recompute, fused_norm)
    activations = in_flight * tokens * n_layers * per_token
    if recompute:      # the layer being recomputed holds its full set once
        activations += tokens * activation_bytes_per_token(shape, mp, False, fused_norm)
    activations += attention_shared_bytes(shape, mp, tokens // shape.seq)
    parts["activations"] = activations
    if last:
        buffers = _logit_buffers(device, True, bool(lora_targets), kernels)
        parts["logits / loss"] = buffers * tokens * (shape.vocab // mp) * 4
        if not lora_targets and not kernels:
            parts["lm_head norm temporaries"] = _HEAD_TEMPS["train"] * head * shape.param_bytes
    if in_flight > 1:
        judgements.append(f"activations of {in_flight} micro batches in flight on stage {stage} (1F1B)")
    if device == "CPU":
        parts["CPU kernel index tables"] = cpu_kernel_table_bytes(shape, n_layers, mp, [tokens], True)
        if not recompute:
            parts[CPU_UNATTRIBUTED_PART] = in_flight * tokens * n_layers * CPU_UNATTRIBUTED_PER_TOKEN_LAYER
            judgements.append(f"{CPU_UNATTRIBUTED_PER_TOKEN_LAYER // 1024} KiB per token and layer held beyond the "
                              "listed activations (CPU, measured at one shape, not attributed to a tensor)")
        # Two phases that do not overlap on CPU: the loss phase (activations, logits, head temporaries,
        # tables) ends before the gradients and the optimizer's temporaries exist. The peak is the larger.
        gradients = parts.pop("gradients")
        loss_phase = sum(parts[k] for k in ("activations", CPU_UNATTRIBUTED_PART, "logits / loss",
                                            "lm_head norm temporaries", "CPU kernel index tables") if k in parts)
        largest = min(trainable, max(shape.vocab, shape.ffn) * shape.hidden) * param_bytes
        update_temps = _UPDATE_TEMPS[kernels]
        parts[CPU_UPDATE_PART] = max(0, gradients + update_temps * largest - loss_phase)
        judgements.append(f"gradients {gradients / GIB:.2f} GB and {update_temps} update temporaries of the largest "
                          "trainable tensor exist only after the loss phase (CPU, measured); the part counts what "
                          "they add beyond it")


def _inference_parts(parts, shape, run_mode, n_layers, mp, batch_size, tokens, use_past, device):
    """Forward working set, logits and KV cache of eval / predict (in place into ``parts``)."""
    c = shape.compute_bytes
    # A forward frees each layer's tensors: the widest step (SwiGLU or the attention scores) is live.
    ffn_step = tokens * (3 * shape.ffn // mp + 2 * shape.hidden) * c
    attention_step = 0 if shape.flash_attention else \
        batch_size * (shape.heads // mp) * shape.seq * shape.seq * (2 * shape.softmax_bytes + c)
    parts["activations"] = max(ffn_step, attention_step)
    if not norm_head_kernels(shape, device):
        parts["lm_head norm temporaries"] = \
            _HEAD_TEMPS["infer"] * (shape.vocab // mp) * shape.hidden * shape.param_bytes
    if run_mode == "eval":
        parts["logits / loss"] = _logit_buffers(device, False, False) * tokens * (shape.vocab // mp) * 4
    else:      # generation scores the last valid token of each row only
        parts["logits / loss"] = 2 * batch_size * (shape.vocab // mp) * 4
    if device == "CPU":
        # eval: one graph of seq tokens; generation: one prefill graph per width a session reaches (prompts of
        # every length, or without the cache the growing sequence), decode graphs of batch tokens.
        widths = [shape.seq] if run_mode == "eval" else prefill_widths(shape.seq)
        parts["CPU kernel index tables"] = cpu_kernel_table_bytes(shape, n_layers, mp,
                                                                  [batch_size * w for w in widths], False)
    if use_past:
        head_dim = shape.hidden // shape.heads
        parts["KV cache"] = batch_size * n_layers * 2 * (shape.heads // mp) * shape.seq * head_dim * c
        parts["lm_head inv_norm"] = shape.vocab // mp * 4


def _suggestions(model_config, parallel_config, run_mode, optimizer, recompute, batch_size, device,
                 device_memory_bytes, pet_config, use_past, seq_length, parallel_optimizer, framework_bytes,
                 vocab_emb_dp, load_checkpoint=False, rope=True):
    """The smallest single changes (first that fit, in order of cost) that bring the plan under the device."""
    base = {"data_parallel": int(_get(parallel_config, "data_parallel", 1)),
            "model_parallel": int(_get(parallel_config, "model_parallel", 1)),
            "pipeline_stage": int(_get(parallel_config, "pipeline_stage", 1)),
            "micro_batch_num": int(_get(parallel_config, "micro_batch_num", 1)),
            "vocab_emb_dp": vocab_emb_dp}
    shape = _Shape.from_config(model_config, seq_length)
    kwargs = dict(run_mode=run_mode, optimizer=optimizer, recompute=recompute, batch_size=batch_size,
                  device=device, device_memory_bytes=device_memory_bytes, pet_config=pet_config,
                  use_past=use_past, seq_length=seq_length, parallel_optimizer=parallel_optimizer,
                  framework_bytes=framework_bytes, load_checkpoint=load_checkpoint, rope=rope)

    def fits(label, parallel=None, **changes):
        try:
            trial = plan(model_config, dict(base, **(parallel or {})), **dict(kwargs, **changes))
        except MemoryConfigError:
            return None
        return f"{label}: {trial.per_device_bytes / GIB:.1f} GB" if trial.fits else None

    training = run_mode in TRAIN_MODES
    candidates = []
    if training and not recompute:
        candidates.append(fits("recompute: True", recompute=True))
    if training and not parallel_optimizer and base["data_parallel"] > 1:
        candidates.append(fits("parallel.enable_parallel_optimizer: True", parallel_optimizer=True))
    if batch_size > 1:
        candidates.append(fits(f"batch_size {batch_size // 2}", batch_size=batch_size // 2))
    parallel_backend = device != "CPU"        # MindSpore's CPU backend has no operator / pipeline parallel
    for mp in (2, 4, 8):
        if parallel_backend and mp > base["model_parallel"] and shape.heads % mp == 0 and shape.vocab % mp == 0:
            candidates.append(fits(f"model_parallel {mp} (x{mp // base['model_parallel']} devices)",
                                   {"model_parallel": mp}))
            break
    if training:
        for pp in (2, 4, 8):
            if parallel_backend and base["pipeline_stage"] < pp <= shape.layers:
                candidates.append(fits(f"pipeline_stage {pp}, micro_batch_num >= {pp} "
                                       f"(x{pp // base['pipeline_stage']} devices)",
                                       {"pipeline_stage": pp,
                                        "micro_batch_num": max(base["micro_batch_num"], pp)}))
                break
        if not _lora_targets(pet_config if pet_config is not None else _get(model_config, "pet_config")):
            lora = {"pet_type": "lora", "lora_rank": 8, "target_modules": ".*wq|.*wk|.*wv"}
            candidates.append(fits("LoRA (pet_config lora_rank 8, wq/wk/wv)", pet_config=lora))
    if run_mode == "predict" and use_past:
        candidates.append(fits("use_past False (no KV cache)", use_past=False))
    found = [c for c in candidates if c]
    if not found and parallel_backend:
        found = ["no single change fits: combine model_parallel / pipeline_stage with recompute or LoRA, "
                 "or use devices with more memory"]
    elif not found:
        found = ["no single change fits on this host: free memory, use a host with more RAM, or smaller "
                 "weights (fp16 instead of fp32, LoRA instead of a full fine-tune)"]
    return found


# ----- YAML configs ---------------------------------------------------------------------------------

def device_memory_from_config(config, device):
    """``context.max_device_memory`` of an Ascend config in bytes, or None when unset."""
    text = _get(_get(config, "context"), "max_device_memory")
    return parse_size(text) if text else None


def host_available_bytes():
    """Available host RAM (``psutil.virtual_memory().available``; /proc/meminfo without psutil)."""
    try:
        import psutil  # pylint: disable=import-outside-toplevel
        return int(psutil.virtual_memory().available)
    except ImportError:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read the available host memory")


def plan_from_config(config, run_mode=None, device_memory_bytes=None, device=None, **overrides):
    """``plan()`` for a whole YAML config (dict, ``YamlConfig`` or ``MindFormerConfig``).

    Reads ``model.model_config``, ``parallel_config``, ``parallel.enable_parallel_optimizer``,
    ``recompute_config.recompute``, ``runner_config.batch_size``, ``optimizer.type`` and
    ``context.device_target`` / ``max_device_memory``. On CPU the device memory is the host's available
    RAM. ``overrides`` are ``plan()`` keywords (None values ignored) and win over the YAML.
    """
    model_config = _get(_get(config, "model"), "model_config")
    if model_config is None:
        raise MemoryConfigError("the config has no model.model_config section")
    run_mode = run_mode or _get(config, "run_mode", "finetune")
    device = device or _get(_get(config, "context"), "device_target", "Ascend")
    device = "CPU" if str(device).upper() == "CPU" else "Ascend"
    recompute = _get(_get(config, "recompute_config"), "recompute", False)
    if run_mode in TRAIN_MODES:
        batch_size = _get(_get(config, "runner_config"), "batch_size", 1)
    else:
        batch_size = _get(model_config, "batch_size", 1)
    kwargs = dict(parallel_config=_get(config, "parallel_config"), run_mode=run_mode,
                  optimizer=_get(_get(config, "optimizer"), "type"), recompute=recompute,
                  batch_size=batch_size, device=device,
                  parallel_optimizer=bool(_get(_get(config, "parallel"), "enable_parallel_optimizer", False))
                  and bool(_get(config, "use_parallel", False)),
                  rope=not uses_alibi(config))
    kwargs.update({k: v for k, v in overrides.items() if v is not None})
    if device_memory_bytes is None:
        if device == "CPU":
            device_memory_bytes = host_available_bytes()
        else:
            device_memory_bytes = device_memory_from_config(config, device) or 64 * GIB
    return plan(model_config, device_memory_bytes=device_memory_bytes, **kwargs)


def preflight(config, run_mode, available_bytes=None, **overrides):
    """Check a run before anything is built. Returns ``(ok, one_line_message)``.

    ``config``: the YAML config (dict-like; missing keys read as None) after the script's overrides;
    ``run_mode``: "train" / "finetune" / "eval" / "predict"; ``available_bytes``: what the device offers
    (None: ``context.max_device_memory`` on Ascend, the host's available RAM on CPU).
    The message names needed vs available, the biggest part and the first fix, e.g.
    ``"memory: needs 37.6 GB per device, 31.0 GB available (biggest: optimizer states 7.5 GB); try: ..."``.
    A checkpoint named by the config counts as loaded with a full copy (the Trainer's path) unless the
    caller passes ``load_checkpoint=CHECKPOINT_STREAM`` (the inference scripts' streaming loader).
    """
    if "load_checkpoint" not in overrides:
        model_config = _get(_get(config, "model"), "model_config")
        overrides["load_checkpoint"] = bool(_get(config, "load_checkpoint") or
                                            _get(model_config, "checkpoint_name_or_path"))
    memory_plan = plan_from_config(config, run_mode=run_mode, device_memory_bytes=available_bytes, **overrides)
    name, size = memory_plan.biggest_part
    where = "host RAM" if memory_plan.layout["device"] == "CPU" else "per device"
    message = (f"memory: needs {memory_plan.per_device_bytes / GIB:.1f} GB {where}, "
               f"{memory_plan.device_memory_bytes / GIB:.1f} GB available "
               f"(biggest: {name} {size / GIB:.1f} GB)")
    if not memory_plan.fits:
        message += "; does not fit, try: " + (memory_plan.suggestions[0] if memory_plan.suggestions else "more memory")
    return memory_plan.fits, message
