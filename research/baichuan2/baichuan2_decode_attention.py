"""Decode-step attention that reads the KV cache where it lies (CPU, fp32).

A decode step attends one query per row and head over that row's cached keys and values. MindSpore's
portable path (``Baichuan2Attention._attention``) first copies each layer's cache window out of the cache,
then runs two small per-head products and five elementwise ops over the scores; at 4 rows of the real
7B width those copies and products cost 15 ms of a 202 ms step (docs/serving.md). ``baichuan2_decode_attention.cc``
does scores, softmax and context in one pass per (row, head) over the keys ``0 .. position[b]`` of row b,
the same function as the portable path's mask ``key_positions <= position``; slots past a row's position
are never read. This module builds it with the host's C++ compiler into a per-user cache and wraps it as a
MindSpore AOT custom operator.

Whether a network uses it is decided by ``baichuan2_device.use_decode_attention``; without it (other
devices, half precision, no compiler) decode steps keep the portable attention over the cache window.
"""
import numpy as np
from mindspore import nn, ops, Tensor
from mindspore import dtype as mstype

from baichuan2_kernel_build import cached_kernel, kernel_source

SOURCE = kernel_source("baichuan2_decode_attention.cc")


def build_library():
    """Path of the compiled kernel (built on first use, then cached per host), or None with a warning
    (``baichuan2_kernel_build.cached_kernel``)."""
    return cached_kernel(SOURCE,
                         "decode steps use the portable attention over a copy of the cache window.")


class DecodeAttention(nn.Cell):
    """One decode step's attention over the cache, in place.

    Inputs of ``construct``:
        query: (B, H, 1, D) float32, the step's queries (RoPE already applied for 7B).
        key_cache, value_cache: (B, H, S, D) float32, the whole cache after this step's write (the
            ``KVCache`` parameters, not a copy).
        position: (B,) int32, each row's current position; row b attends over slots 0 .. position[b].
        bias: (B, H, 1, W) float32 additive score bias (13B's ALiBi, W > every position) or None (7B).
    Output: (B, H, 1, D) float32, ``softmax(q . K^T / sqrt(D) + bias) V`` over each row's slots.
    """

    def __init__(self, library):
        super().__init__()
        self.attention = ops.Custom(f"{library}:DecodeAttention", out_shape=lambda q, *_: q,
                                    out_dtype=lambda q, *_: q, func_type="aot")
        # The kernel's "no bias" input: its rank (1, not 4) tells the kernel there is none.
        self.no_bias = Tensor(np.zeros(1, np.float32), mstype.float32)

    def construct(self, query, key_cache, value_cache, position, bias=None):
        if bias is None:
            bias = self.no_bias
        return self.attention(query, key_cache, value_cache, position, bias)
