"""NormHead's one-pass CPU kernels: the normalised head's function and gradient, taken where they are meant to be.

``baichuan2_norm_head`` builds ``baichuan2_norm_head.cc`` and wraps it; ``NormHead`` uses it for fp32 heads on
CPU. Each kernel is checked against the published formula in float64; the whole network's gradients against
PyTorch autograd are in ``test_baichuan2_models.py`` (which runs this path on CPU).
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import baichuan2_norm_head as norm_head
from baichuan2_device import use_norm_head_kernels
from model_fixtures import tiny_pair, build_network

EPS32 = float(np.finfo(np.float32).eps)
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


@pytest.fixture(scope="module")
def library():
    path = norm_head.build_library()
    assert path, "the host C++ compiler could not build baichuan2_norm_head.cc (see the warning above)"
    return path


def _reference(x, w, dout):
    """Float64 logits, dx, dW of ``logits = x @ normalize_rows(W).T`` (F.normalize: norm floored at 1e-12)."""
    x, w, dout = (a.astype(np.float64) for a in (x, w, dout))
    norm = np.sqrt((w * w).sum(1))
    inv = 1.0 / np.maximum(norm, 1e-12)
    wn = w * inv[:, None]
    logits = x @ wn.T
    grad_wn = dout.T @ x                                                  # (V, h)
    above = norm > 1e-12            # below the floor the norm is a constant: dW = grad_wn * inv
    radial = np.where(above, (grad_wn * wn).sum(1), 0.0)
    grad_w = (grad_wn - radial[:, None] * wn) * inv[:, None]
    return inv, logits, dout @ wn, grad_w


class _Head(nn.Cell):
    """The fused product as NormHead calls it: inv from the kernel, behind stop_gradient."""

    def __init__(self, weight, library):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.inv = norm_head.row_inv_norm_primitive(library)
        self.product = norm_head.FusedNormHeadProduct(library)

    def construct(self, x):
        return self.product(x, self.weight, ops.stop_gradient(self.inv(self.weight)))


class _Weighted(nn.Cell):
    """sum(head(x) * dout): its gradients are the head's backward given ``dout``."""

    def __init__(self, head):
        super().__init__()
        self.head = head

    def construct(self, x, dout):
        return (self.head(x) * dout).sum()


@pytest.mark.parametrize("mode", sorted(MODES))
def test_kernels_are_the_normalised_head_and_its_gradient(library, mode):
    # V not a multiple of the 2048-column block or of the thread split, h not a multiple of 8: every tail runs.
    rng = np.random.RandomState(3)
    n, h, v = 7, 203, 2051
    x = rng.randn(n, h).astype(np.float32)
    w = rng.randn(v, h).astype(np.float32)
    w[5] = 1e-14                                  # norm ~1.4e-13: clamped at 1e-12, no gradient through the norm
    w[6] *= 1e3                                   # rows of very different norms
    dout = rng.randn(n, v).astype(np.float32)
    inv_want, logits_want, dx_want, dw_want = _reference(x, w, dout)
    previous = ms.get_context("mode")
    ms.set_context(mode=MODES[mode])
    try:
        head = _Head(w, library)
        inv = norm_head.row_inv_norm_primitive(library)(Tensor(w)).asnumpy()
        logits = head(Tensor(x)).asnumpy()
        weighted = _Weighted(head)
        dx, dw = ms.grad(weighted, grad_position=0, weights=weighted.trainable_params())(Tensor(x), Tensor(dout))
    finally:
        ms.set_context(mode=previous)
    dx, dw = dx.asnumpy(), dw[0].asnumpy()
    # Each result is a few fp32 roundings of a sum of K products, whose error is at most K * eps times the sum of
    # the products' magnitudes in any order (Higham, Accuracy and Stability, 3.1); +3 for the norm's square root,
    # division and the scaling. The references are float64 (their own error is ~1e-16 relative).
    absx, absw, absd = np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64)), np.abs(dout.astype(np.float64))
    wn_abs = absw * inv_want[:, None]
    assert np.all(np.abs(inv - inv_want) <= (h + 3) * EPS32 * inv_want)
    assert np.all(np.abs(logits - logits_want) <= (h + 3) * EPS32 * (absx @ wn_abs.T))
    assert np.all(np.abs(dx - dx_want) <= (v + h + 3) * EPS32 * (absd @ wn_abs))
    # dW = (dout.T x) * inv + c * W, c = -inv^2 * sum_t dout * logits: bound each term's magnitude. The clamped
    # row has no c term (its bound has none either), so a kernel that let the norm's gradient through fails there.
    radial = np.abs((absd * np.abs(logits_want)).sum(0)) * inv_want ** 2 * (inv_want < 1e12)
    assert radial[5] == 0 and radial[6] > 0
    bound = (n + h + 6) * EPS32 * ((absd.T @ absx) * inv_want[:, None] + radial[:, None] * absw)
    assert np.all(np.abs(dw - dw_want) <= bound)


def test_fp32_heads_on_cpu_take_the_kernels(monkeypatch, tmp_path):
    monkeypatch.delenv("BAICHUAN2_NORM_HEAD_KERNELS", raising=False)
    assert use_norm_head_kernels(ms.float32, ms.float32)
    assert use_norm_head_kernels(ms.float16, ms.float32) is None       # half-precision products keep MindSpore ops
    assert use_norm_head_kernels(ms.float32, ms.float16) is None
    _, hf_config, ckpt = tiny_pair("7b", str(tmp_path))
    net = build_network("7b", hf_config, ckpt, seq_length=12, batch_size=2)
    assert isinstance(net.lm_head.fused_product, norm_head.FusedNormHeadProduct)
    monkeypatch.setenv("BAICHUAN2_NORM_HEAD_KERNELS", "0")
    assert use_norm_head_kernels(ms.float32, ms.float32) is None
    net = build_network("7b", hf_config, ckpt, seq_length=12, batch_size=2)
    assert net.lm_head.fused_product is None
