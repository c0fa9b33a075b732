"""Baichuan2-13B: the shared Baichuan2 decoder with ALiBi instead of rotary embeddings.

Each head h adds ``slope_h * (j - i)`` to the score of query i and key j. Slopes follow the
ALiBi rule for a non-power-of-two head count (40 heads for 13B), as Hugging Face's
``_get_interleave`` and MindFormers' ``build_alibi_tensor_v2`` do.
"""
import math

import numpy as np
from mindspore import Tensor
from mindspore import dtype as mstype
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from baichuan2_layers import Baichuan2Model, Baichuan2ForCausalLM

__all__ = ["build_alibi_slopes", "Baichuan13BV2Model", "Baichuan13BV2ForCausalLM"]


def build_alibi_slopes(num_heads):
    """ALiBi slopes, shape (num_heads,) float64.

    For n a power of two: ``slope_i = 2 ** (-8 (i + 1) / n)``. Otherwise, with ``c`` the largest
    power of two below n: the c slopes of that rule, then the even-indexed slopes of the 2c rule,
    truncated to n - c values.
    """
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]

    if math.log2(num_heads).is_integer():
        return np.array(power_of_two(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    return np.array(power_of_two(closest) + power_of_two(2 * closest)[0::2][:num_heads - closest])


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan13BV2Model(Baichuan2Model):
    """Baichuan2-13B decoder stack. (B, S) int32 token ids -> (B, S, h) hidden states."""

    def __init__(self, config):
        super().__init__(config)
        slopes = build_alibi_slopes(config.num_heads).astype(np.float32)
        self.alibi_slopes = Tensor(slopes.reshape(1, -1, 1, 1), mstype.float32)              # (1, H, 1, 1)
        # Key positions 0..seq_length: one more than the cache, so evaluation can run on training
        # records (seq_length + 1 tokens).
        self.alibi_positions = Tensor(np.arange(config.seq_length + 1, dtype=np.float32))

    def _position_inputs(self, seq_len, position, key_positions, position_ids=None):
        """ALiBi bias: (1, H, S, S) for a full forward, (B, H, S, S) for packed rows, whose distances
        ``position_ids[j] - position_ids[i]`` restart with each conversation, (B, H, 1, T) for a decode step."""
        if position is None and position_ids is not None:
            positions = position_ids.astype(mstype.float32)
            distance = positions.reshape(-1, 1, 1, seq_len) - positions.reshape(-1, 1, seq_len, 1)  # (B, 1, S, S)
            return None, self.alibi_slopes * distance
        if position is None:
            keys = self.alibi_positions[:seq_len]
            distance = keys.reshape(1, -1) - keys.reshape(-1, 1)                             # (S, S): j - i
            return None, self.alibi_slopes * distance.reshape(1, 1, seq_len, seq_len)
        distance = key_positions.astype(mstype.float32).reshape(1, -1) - position.astype(mstype.float32).reshape(-1, 1)
        return None, self.alibi_slopes * distance.reshape(distance.shape[0], 1, 1, -1)       # (B, H, 1, T)


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan13BV2ForCausalLM(Baichuan2ForCausalLM):
    """Baichuan2-13B causal LM (ALiBi). See ``Baichuan2ForCausalLM`` for inputs and outputs."""
    model_class = Baichuan13BV2Model
