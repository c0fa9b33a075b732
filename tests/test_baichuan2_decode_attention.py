"""The in-place decode attention: the function of the portable attention, read from the cache where it lies.

``baichuan2_decode_attention`` builds a C++ kernel that attends one query per row and head over the cache
slots ``0 .. position[b]`` of row b (with 13B's ALiBi bias), and ``Baichuan2Attention`` takes it for the decode
steps of CPU fp32 networks (``baichuan2_device.use_decode_attention``). Its whole-model use is checked in
``test_baichuan2_models.py`` (decode logits against the PyTorch reference, kernel and portable path alike).
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn

import baichuan2_decode_attention as decode_attention
from baichuan2_device import use_decode_attention
from model_fixtures import tiny_pair, build_network
from run_helpers import built_kernel

EPS32 = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def library():
    return built_kernel(decode_attention)


class _OverCache(nn.Cell):
    """The kernel as a network uses it: the caches are parameters (the ``KVCache`` buffers), read in place."""

    def __init__(self, library, key_cache, value_cache):
        super().__init__()
        self.key_cache = Parameter(Tensor(key_cache), name="key_cache", requires_grad=False)
        self.value_cache = Parameter(Tensor(value_cache), name="value_cache", requires_grad=False)
        self.attention = decode_attention.DecodeAttention(library)

    def construct(self, query, position, bias=None):
        return self.attention(query, self.key_cache, self.value_cache, position, bias)


def _reference_and_bound(q, k, v, position, bias):
    """float64 attention of each row over slots 0..position[b], and a bound on the fp32 kernel's error.

    The bound, first order in eps (Higham, Accuracy and Stability, 3.1 and 4.2), any summation order:
    - score j, ``fl(fl(q.k_j) * scale) + bias_j``: delta_j = gamma_D * scale * |q|.|k_j| + eps |q.k_j scale|
      + eps |s_j|, with gamma_m = m eps / (1 - m eps);
    - ``exp(s_j - max)``: + eps |s_j - max| (the subtraction) + eps (expf, under 1 ulp). The max itself is a
      shift common to every j and cancels in the normalisation. So each e_j has relative error r_j, R = max r_j;
    - the sums of e_j and of e_j v_j (n terms, products rounded) each gamma_{n+1}, and the division eps.
    Normalised, |out_d - exact_d| <= (2 R + 2 gamma_{n+1} + eps) * sum_j p_j |v_jd|. Second-order terms are
    O(R^2) ~ 1e-10 relative; a 1% margin covers them.
    """
    def gamma(m):
        return m * EPS32 / (1 - m * EPS32)

    batch, heads, _, dim = q.shape
    scale = float(np.float32(1.0 / np.sqrt(dim)))
    exact = np.zeros(q.shape, np.float64)
    bound = np.zeros(q.shape, np.float64)
    for b in range(batch):
        n = int(position[b]) + 1
        for h in range(heads):
            qv, keys, values = (x.astype(np.float64) for x in (q[b, h, 0], k[b, h, :n], v[b, h, :n]))
            product = keys @ qv
            scores = product * scale + (0.0 if bias is None else bias[b, h, 0, :n].astype(np.float64))
            shifted = scores - scores.max()
            weights = np.exp(shifted)
            probs = weights / weights.sum()
            exact[b, h, 0] = probs @ values
            delta = (gamma(dim) * scale * (np.abs(keys) @ np.abs(qv)) + EPS32 * np.abs(product * scale)
                     + EPS32 * np.abs(scores))
            worst = (delta + EPS32 * np.abs(shifted) + EPS32).max()
            bound[b, h, 0] = 1.01 * (2 * worst + 2 * gamma(n + 1) + EPS32) * (probs @ np.abs(values))
    return exact, bound


def _case(seed, batch, heads, slots, dim, positions, window=None, alibi=False):
    rng = np.random.RandomState(seed)
    q = rng.randn(batch, heads, 1, dim).astype(np.float32)
    k = (2.0 * rng.randn(batch, heads, slots, dim)).astype(np.float32)      # scores spread over ~+-20
    v = rng.randn(batch, heads, slots, dim).astype(np.float32)
    position = np.array(positions, np.int32)
    for b, p in enumerate(position):
        k[b, :, p + 1:] = np.nan             # slots past a row's position are never read
        v[b, :, p + 1:] = np.nan
    bias = None
    if alibi:
        window = window or slots
        slopes = (2.0 ** (-8.0 * (np.arange(heads) + 1) / heads)).reshape(1, heads, 1, 1)
        distance = np.arange(window).reshape(1, 1, 1, -1) - position.reshape(-1, 1, 1, 1)
        bias = (slopes * distance).astype(np.float32)                       # (B, H, 1, W), as 13B builds it
    return q, k, v, position, bias


CASES = {
    # name: (seed, batch, heads, slots, head dim, positions, bias window, ALiBi)
    "one row, first slot": (0, 1, 2, 8, 16, [0], None, False),
    "tails of every block": (1, 3, 5, 37, 20, [36, 5, 14], None, False),
    "alibi, window shorter than the cache": (2, 2, 4, 64, 24, [30, 7], 32, True),
    "model width, 4 rows": (3, 4, 8, 300, 128, [299, 17, 128, 64], None, False),
    "model width, 4 rows, alibi": (4, 4, 8, 300, 128, [150, 3, 255, 299], None, True),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_kernel_is_softmax_attention_over_each_rows_slots(library, name):
    seed, batch, heads, slots, dim, positions, window, alibi = CASES[name]
    q, k, v, position, bias = _case(seed, batch, heads, slots, dim, positions, window, alibi)
    cell = _OverCache(library, k, v)
    got = cell(Tensor(q), Tensor(position), None if bias is None else Tensor(bias)).asnumpy()
    exact, bound = _reference_and_bound(q, k, v, position, bias)
    assert got.shape == q.shape and np.isfinite(got).all()
    assert np.all(np.abs(got - exact) <= bound), float(np.max(np.abs(got - exact) / bound))


def test_the_cache_is_read_after_its_in_place_update(library):
    """Graph mode, the cache a parameter written between calls (as ``KVCache.update`` does): each call sees
    the values the cache holds then."""
    q, k, v, position, _ = _case(5, 2, 3, 16, 8, [9, 4])
    k, v = np.nan_to_num(k), np.nan_to_num(v)
    previous = ms.get_context("mode")
    ms.set_context(mode=ms.GRAPH_MODE)
    try:
        cell = _OverCache(library, k, v)
        first = cell(Tensor(q), Tensor(position)).asnumpy()
        v2 = v.copy()
        v2[:, :, :10] += 1.0                                  # every attended value moves by exactly 1
        cell.value_cache.set_data(Tensor(v2))
        second = cell(Tensor(q), Tensor(position)).asnumpy()
    finally:
        ms.set_context(mode=previous)
    exact, bound = _reference_and_bound(q, k, v2, position, None)
    assert np.all(np.abs(second - exact) <= bound)
    # The probabilities sum to 1 (to n eps): the context moved by 1 as well.
    np.testing.assert_allclose(second - first, 1.0, rtol=0, atol=64 * EPS32 * (1 + np.abs(first).max()))


def test_networks_take_it_for_fp32_cpu_decoding_only(monkeypatch, tmp_path, library):
    _, hf_config, ckpt = tiny_pair("13b", str(tmp_path))
    cached = build_network("13b", hf_config, ckpt, use_past=True, seq_length=32)
    assert all(layer.attention.decode_attention is not None for layer in cached.model.layers)
    uncached = build_network("13b", hf_config, ckpt, use_past=False, seq_length=32)
    assert all(layer.attention.decode_attention is None for layer in uncached.model.layers)
    assert use_decode_attention(True, ms.float32, ms.float32) == library
    assert use_decode_attention(True, ms.float32, ms.float16) is None       # a half-precision softmax
    assert use_decode_attention(True, ms.bfloat16, ms.float32) is None
    assert use_decode_attention(False, ms.float32, ms.float32) is None
    monkeypatch.setenv("BAICHUAN2_DECODE_ATTENTION", "0")                     # the A/B switch
    assert use_decode_attention(True, ms.float32, ms.float32) is None
    portable = build_network("13b", hf_config, ckpt, use_past=True, seq_length=32)
    assert all(layer.attention.decode_attention is None for layer in portable.model.layers)
