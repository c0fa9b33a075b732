"""Baichuan2-7B: the shared Baichuan2 decoder with rotary position embeddings (RoPE, theta 10000).

RoPE uses MindFormers' ``FreqsMgr`` table (``concat(freqs, freqs)``, half-split rotation, as in the
Hugging Face model), so Hugging Face ``W_pack`` rows load without any permutation.
"""
from mindspore import ops
from mindformers.modules.layers import FreqsMgr
from mindformers.tools.register import MindFormerRegister, MindFormerModuleType

from baichuan2_layers import Baichuan2Model, Baichuan2ForCausalLM

__all__ = ["Baichuan7BV2Model", "Baichuan7BV2ForCausalLM"]


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan7BV2Model(Baichuan2Model):
    """Baichuan2-7B decoder stack. (B, S) int32 token ids -> (B, S, h) hidden states."""
    uses_rope = True

    def __init__(self, config):
        super().__init__(config)
        head_dim = config.hidden_size // config.num_heads
        # One extra position so that evaluation can run on training records (seq_length + 1 tokens).
        self.freqs_mgr = FreqsMgr(head_dim=head_dim, seq_length=config.seq_length + 1,
                                  max_position_embedding=config.max_position_embedding,
                                  rotary_dtype=config.rotary_dtype, theta=config.theta,
                                  scaling_factor=config.scaling_factor, extend_method=config.extend_method)

    def _position_inputs(self, seq_len, position, key_positions, position_ids=None):
        """Rotary table for positions 0..S-1 (1, 1, S, D), the rows of ``position_ids`` (B, S) of packed
        rows (B, 1, S, D), or each row's decode position (B, 1, 1, D)."""
        if position is None and position_ids is not None:
            batch = position_ids.shape[0]
            cos = ops.gather(self.freqs_mgr.freqs_cos, position_ids.reshape(-1), 0)          # (B * S, D)
            sin = ops.gather(self.freqs_mgr.freqs_sin, position_ids.reshape(-1), 0)
            return (cos.reshape(batch, 1, seq_len, -1), sin.reshape(batch, 1, seq_len, -1),
                    self.freqs_mgr.swap_mask), None
        if position is None:
            return self.freqs_mgr(seq_len), None
        cos, sin, swap_mask = self.freqs_mgr.increment(position + 1)
        batch = position.shape[0]
        return (cos.reshape(batch, 1, 1, -1), sin.reshape(batch, 1, 1, -1), swap_mask), None


@MindFormerRegister.register(MindFormerModuleType.MODELS)
class Baichuan7BV2ForCausalLM(Baichuan2ForCausalLM):
    """Baichuan2-7B causal LM (RoPE). See ``Baichuan2ForCausalLM`` for inputs and outputs."""
    model_class = Baichuan7BV2Model
