"""Independent PyTorch reference of Baichuan2-7B/13B, written from the published math.

It reads Hugging Face parameter names (``W_pack``, ``o_proj``, ``gate_proj``...) and shares no code
with the MindSpore implementation. Default precision is float64 so that it is a stricter yardstick
than the fp32 model under test.

- RMSNorm: ``x * rsqrt(mean(x^2) + eps) * weight``.
- Attention: ``softmax(Q K^T / sqrt(d) + bias + mask) V`` with ``W_pack`` rows [0,h) = Q, [h,2h) = K,
  [2h,3h) = V. 7B: RoPE on Q and K (theta 10000, ``inv_freq[k] = theta^(-2k/d)``, half-split
  rotation ``[x1, x2] -> [-x2, x1]``). 13B: ALiBi bias ``slope_h * (j - i)``.
- MLP: ``down(silu(gate(x)) * up(x))``.
- NormHead: ``logits = x @ (W / ||W||_row).T``.
- Embedding: ``padding_idx=0`` as Hugging Face's ``nn.Embedding(vocab, h, padding_idx=0)``: row 0 (pad and
  ``<unk>``) is looked up as any row but never receives a gradient.
- Loss (Hugging Face Baichuan2 ``forward``): cross-entropy of ``labels[:, 1:]`` given ``input_ids[:, :-1]``,
  ``ignore_index=-100``, mean over the counted targets; the labels alone decide what counts. Without labels
  (continued pre-training) the targets are ``input_ids[:, 1:]`` and pad inputs do not count.
- Packed rows: ``position_ids`` restart at 0 at each conversation (pads: 0). Conversation k of a row is
  the run of tokens from one position-0 token up to the next; a token sees only the earlier tokens of its
  own run, RoPE/ALiBi use ``position_ids``, and a target whose position id is 0 is not counted.
"""
import math

import torch
import torch.nn.functional as F


def alibi_slopes(num_heads):
    """ALiBi slopes from the paper's rule, extended to non-powers of two as Baichuan/BLOOM do."""
    def pow2(n):
        start = 2.0 ** (-(2.0 ** -(math.log2(n) - 3)))
        return [start * start ** i for i in range(n)]

    if math.log2(num_heads).is_integer():
        return pow2(num_heads)
    closest = 2 ** math.floor(math.log2(num_heads))
    return pow2(closest) + pow2(2 * closest)[0::2][: num_heads - closest]


class TorchBaichuan2:
    """Functional reference model.

    Args:
        state_dict: Hugging Face names -> tensors.
        config: dict with ``hidden_size``, ``num_attention_heads``, ``num_hidden_layers``, ``rms_norm_eps``.
        position: "rope" (7B) or "alibi" (13B).
    """

    def __init__(self, state_dict, config, position, dtype=torch.float64):
        self.w = {k: v.detach().to(dtype) for k, v in state_dict.items()}
        self.h = config["hidden_size"]
        self.heads = config["num_attention_heads"]
        self.layers = config["num_hidden_layers"]
        self.eps = config["rms_norm_eps"]
        self.position = position
        self.dtype = dtype

    def _rms(self, x, weight):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * weight

    def _rope(self, x, positions):
        d = x.shape[-1]
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=self.dtype) / d))
        angles = positions.to(self.dtype)[..., None] * inv_freq          # (B, S, d/2)
        emb = torch.cat([angles, angles], dim=-1)[:, None]                # (B, 1, S, d)
        x1, x2 = x[..., : d // 2], x[..., d // 2:]
        rotated = torch.cat([-x2, x1], dim=-1)
        return x * emb.cos() + rotated * emb.sin()

    @staticmethod
    def _conversation_of_each_token(position_ids):
        """(B, S) index of the conversation each token belongs to: a new one starts at every position 0."""
        conv = torch.zeros_like(position_ids)
        for b in range(position_ids.shape[0]):
            current = -1
            for t in range(position_ids.shape[1]):
                if int(position_ids[b, t]) == 0:
                    current += 1
                conv[b, t] = current
        return conv

    def hidden_states(self, input_ids, attention_mask=None, position_ids=None):
        """input_ids (B, S) -> final normed hidden states (B, S, h).

        ``attention_mask`` (B, S) of 1/0 hides padded keys and sets positions to cumsum - 1,
        so left- or right-padded rows equal the unpadded row. ``position_ids`` (B, S): packed rows
        (see the module docstring); not combined with ``attention_mask``.
        """
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        batch, seq = ids.shape
        causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
        if position_ids is not None:
            positions = torch.as_tensor(position_ids, dtype=torch.long)
            conv = self._conversation_of_each_token(positions)
            visible = (causal[None] & (conv[:, :, None] == conv[:, None, :]))[:, None]  # (B, 1, S, S)
        else:
            if attention_mask is None:
                attention_mask = torch.ones(batch, seq, dtype=torch.long)
            attention_mask = torch.as_tensor(attention_mask, dtype=torch.long)
            positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)          # (B, S)
            visible = causal[None, None] & attention_mask[:, None, None, :].bool()
        d = self.h // self.heads
        x = F.embedding(ids, self.w["model.embed_tokens.weight"], padding_idx=0)
        for i in range(self.layers):
            p = f"model.layers.{i}."
            y = self._rms(x, self.w[p + "input_layernorm.weight"])
            qkv = y @ self.w[p + "self_attn.W_pack.weight"].T
            q, k, v = (t.reshape(batch, seq, self.heads, d).transpose(1, 2) for t in qkv.split(self.h, dim=-1))
            scores_bias = torch.zeros(1, 1, 1, 1, dtype=self.dtype)
            if self.position == "rope":
                q, k = self._rope(q, positions), self._rope(k, positions)
            else:
                slopes = torch.tensor(alibi_slopes(self.heads), dtype=self.dtype)[None, :, None, None]
                rel = (positions[:, None, :] - positions[:, :, None]).to(self.dtype)  # (B, S_q, S_k): j - i
                scores_bias = slopes * rel[:, None]
            scores = q @ k.transpose(-1, -2) / math.sqrt(d) + scores_bias
            scores = scores.masked_fill(~visible, float("-inf"))
            attn = torch.softmax(scores, dim=-1) @ v
            x = x + attn.transpose(1, 2).reshape(batch, seq, self.h) @ self.w[p + "self_attn.o_proj.weight"].T
            y = self._rms(x, self.w[p + "post_attention_layernorm.weight"])
            mlp = F.silu(y @ self.w[p + "mlp.gate_proj.weight"].T) * (y @ self.w[p + "mlp.up_proj.weight"].T)
            x = x + mlp @ self.w[p + "mlp.down_proj.weight"].T
        return self._rms(x, self.w["model.norm.weight"])

    def logits(self, input_ids, attention_mask=None, position_ids=None):
        """(B, S) -> (B, S, V) logits through the row-normalised head."""
        head = F.normalize(self.w["lm_head.weight"], dim=-1)
        return self.hidden_states(input_ids, attention_mask, position_ids) @ head.T

    def loss(self, input_ids, labels=None, position_ids=None, pad_token_id=0, ignore_index=-100):
        """Mean cross-entropy of ``labels[:, 1:]`` given ``input_ids[:, :-1]`` over the targets whose label
        is not ``ignore_index``; without labels, of ``input_ids[:, 1:]`` where the input is not pad.
        ``position_ids`` (B, S+1): packed rows; targets at position 0 are not counted."""
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        tokens = ids[:, :-1]
        if labels is None:
            labels = ids[:, 1:]
            keep = tokens != pad_token_id
        else:
            labels = torch.as_tensor(labels, dtype=torch.long)[:, 1:]
            keep = labels != ignore_index
        positions = None
        if position_ids is not None:
            position_ids = torch.as_tensor(position_ids, dtype=torch.long)
            positions = position_ids[:, :-1]
            keep = keep & (position_ids[:, 1:] != 0)
        logits = self.logits(tokens, position_ids=positions)
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.clamp(min=0).reshape(-1), reduction="none")
        return (nll * keep.reshape(-1)).sum() / keep.sum()

    def greedy(self, prompt, max_new_tokens, eos_token_id=2):
        """Greedy continuation of one unpadded prompt (list of ids), recomputing the full sequence each step."""
        seq = list(prompt)
        for _ in range(max_new_tokens):
            nxt = int(self.logits([seq])[0, -1].argmax())
            seq.append(nxt)
            if nxt == eos_token_id:
                break
        return seq
