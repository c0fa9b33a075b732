"""NormHead's one-pass CPU kernels: the normalised head's function and gradient, and the cross-entropy fused with
it, taken where they are meant to be.

``baichuan2_norm_head`` builds ``baichuan2_norm_head.cc`` and wraps it; ``NormHead`` uses it for fp32 heads on
CPU, and the model takes its training loss from the fused cross-entropy. Each kernel is checked against the
published formula in float64; the whole network's loss gradients against PyTorch autograd are in
``test_baichuan2_models.py`` (which runs this path on CPU).
"""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Parameter, Tensor, nn, ops

import baichuan2_norm_head as norm_head
from baichuan2_device import use_norm_head_kernels
from baichuan2_layers import NormHead
from model_fixtures import tiny_pair, build_network
from run_helpers import built_kernel

EPS32 = float(np.finfo(np.float32).eps)
# The kernels' exp saturates at exp(-87) (~1.6e-38, the smallest value it keeps normal): an exponential below it
# comes back as it, an absolute error of at most that much; fp32 rounds results under 2^-126 to multiples of 2^-149.
EXP_FLOOR = float(np.exp(np.float64(-87.0)))
DENORMAL = 2.0 ** -149
MODES = {"pynative": ms.PYNATIVE_MODE, "graph": ms.GRAPH_MODE}


@pytest.fixture(scope="module")
def library():
    return built_kernel(norm_head)


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
    assert isinstance(net.lm_head.fused_loss, norm_head.FusedNormHeadCrossEntropy)   # model_parallel 1: fused loss
    monkeypatch.setenv("BAICHUAN2_NORM_HEAD_KERNELS", "0")
    assert use_norm_head_kernels(ms.float32, ms.float32) is None
    net = build_network("7b", hf_config, ckpt, seq_length=12, batch_size=2)
    assert net.lm_head.fused_product is None and net.lm_head.fused_loss is None


def test_a_split_vocabulary_keeps_the_unfused_loss(library):
    """With the vocabulary split over devices (model_parallel > 1) the model passes fuse_loss=False: MindFormers'
    sharded CrossEntropyLoss then takes the logits."""
    head = NormHead(16, 40, ms.float32, ms.float32, False, library, fuse_loss=False)
    assert head.fused_product is not None and head.fused_loss is None


# ------------------------------------------------------------------------------------------------------------
# cross-entropy fused with the head

def _loss_reference(x, w, labels, weight):
    """Float64 loss, dx, dW of ``sum_t weight_t * nll_t / (sum weight + 1e-8)`` over the normalised head's logits."""
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    inv = 1.0 / np.maximum(np.sqrt((w64 * w64).sum(1)), 1e-12)
    logits = x64 @ (w64 * inv[:, None]).T
    top = logits.max(1, keepdims=True)
    lse = (top + np.log(np.exp(logits - top).sum(1, keepdims=True)))[:, 0]
    rows = np.arange(len(labels))
    safe = np.clip(labels, 0, w.shape[0] - 1)
    scale = weight / (weight.sum() + 1e-8)
    loss = (scale * (lse - logits[rows, safe])).sum()
    dlogits = np.exp(logits - lse[:, None])
    dlogits[rows, safe] -= 1.0
    dlogits *= scale[:, None]
    _, _, dx, dw = _reference(x, w, dlogits)
    return loss, logits, lse, dlogits, dx, dw


def _loss_case(seed):
    """x, W, labels, weights with every awkward case: V not a multiple of 8 or of the 2048-column block, a label
    in the last (tail) column, ignored rows with label -100 (weight 0), a clamped and a large head row, logits
    spread over ~100 so the exponentials cover many orders of magnitude."""
    rng = np.random.RandomState(seed)
    n, h, v = 9, 37, 2053
    x = (rng.randn(n, h) * 12).astype(np.float32)
    w = rng.randn(v, h).astype(np.float32)
    w[5] = 1e-14
    w[6] *= 1e3
    labels = rng.randint(0, v, size=n).astype(np.int32)
    labels[1], labels[2], labels[3] = v - 1, 5, 6
    weight = np.ones(n, np.float32)
    labels[[4, 7]] = -100
    weight[[4, 7]] = 0.0
    return x, w, labels, weight


def _custom(library, name, out_shape, out_dtype):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def test_log_sum_exp_and_loss_gradient_kernels_against_float64(library):
    """The two loss kernels on given raw products: each row's log-sum-exp and nll, and d raw with the column sums,
    against float64 evaluated on the same fp32 inputs.

    Bounds (eps = fp32 epsilon, first order, any summation order): a logit raw * inv is rounded once (eps/2 |l|),
    ``l - max`` once more (eps/2 |z|); Cephes' expf polynomial with its range reduction is within 2 eps relative
    (its documented peak is 1.7e-7 = 1.43 eps). So every exponential is within d_v = eps (|l_v| + |z_v|) / 2 + 2 eps
    relative (or, below exp(-87), within EXP_FLOOR absolute), their sum of V positive terms within max d + (V - 1) eps
    (Higham 3.1), the log adds eps |log sum|, and ``max + log`` eps |lse|. The gradient's terms carry the same
    exponential error plus a rounding per product (and a denormal's absolute rounding); the column sums add T eps
    of the sum of their terms' magnitudes.
    """
    x, w, labels, weight = _loss_case(11)
    inv32 = norm_head.row_inv_norm_primitive(library)(Tensor(w)).asnumpy()
    raw32 = (x @ w.T).astype(np.float32)            # any fp32 product: the kernels' inputs, given to both sides
    n, v = raw32.shape
    lse_op = _custom(library, "NormHeadLogSumExp", lambda r, i, lab, wt: (wt, wt), lambda *a: (ms.float32, ms.float32))
    lse, nll = (o.asnumpy() for o in lse_op(Tensor(raw32), Tensor(inv32), Tensor(labels), Tensor(weight)))
    logits = raw32.astype(np.float64) * inv32.astype(np.float64)
    top = logits.max(1)
    log_sum = np.log(np.exp(logits - top[:, None]).sum(1))
    lse_want = top + log_sum
    rows, safe = np.arange(n), np.clip(labels, 0, v - 1)
    spread = np.abs(logits).max(1) + np.abs(logits - top[:, None]).max(1)
    bound_lse = EPS32 * (spread / 2 + 2 + (v - 1) + np.abs(log_sum) + np.abs(lse_want)) + v * EXP_FLOOR
    counted = weight != 0
    assert np.all(lse[~counted] == 0) and np.all(nll[~counted] == 0)            # skipped rows
    assert np.all(np.abs(lse - lse_want)[counted] <= bound_lse[counted])
    nll_want = lse_want - logits[rows, safe]
    bound_nll = bound_lse + EPS32 * (np.abs(logits[rows, safe]) + np.abs(nll_want))
    assert np.all(np.abs(nll - nll_want)[counted] <= bound_nll[counted])

    scale = (weight * 0.37 / weight.sum()).astype(np.float32)
    grad_op = _custom(library, "NormHeadCrossEntropyGrad", lambda r, i, l, lab, sc: (r, i), lambda *a: (ms.float32,) * 2)
    g, col = (o.asnumpy() for o in grad_op(Tensor(raw32), Tensor(inv32), Tensor(lse), Tensor(labels), Tensor(scale)))
    # Reference on the kernel's own fp32 lse (its error is bounded above). The norm's share of W's gradient
    # (NormHeadWeightGrad, from these column sums) is the head's kernel, tested above.
    p = np.exp(logits - lse.astype(np.float64)[:, None])
    onehot = np.zeros_like(p)
    onehot[rows, safe] = 1.0
    dlogits = scale.astype(np.float64)[:, None] * (p - onehot)
    g_want = dlogits * inv32.astype(np.float64)
    col_want = (dlogits * logits).sum(0)
    z = np.abs(logits - lse.astype(np.float64)[:, None])
    d_exp = EPS32 * ((np.abs(logits) + z) / 2 + 4)                  # exponential, then the two products
    magnitude = scale.astype(np.float64)[:, None] * (p + onehot)
    floor = scale.astype(np.float64)[:, None] * EXP_FLOOR + 3 * DENORMAL             # absolute, per d logits
    assert np.all(g[~counted] == 0)
    assert np.all(np.abs(g - g_want) <= ((d_exp + EPS32) * magnitude + floor) * inv32.astype(np.float64) + DENORMAL)
    assert np.all(np.abs(col - col_want) <= ((d_exp + (n + 1) * EPS32) * magnitude * np.abs(logits)
                                             + (floor + DENORMAL) * np.abs(logits)).sum(0))


class _HeadLoss(nn.Cell):
    """The fused loss as ``NormHead.cross_entropy`` calls it."""

    def __init__(self, weight, library):
        super().__init__()
        self.weight = Parameter(Tensor(weight), name="weight")
        self.inv = norm_head.row_inv_norm_primitive(library)
        self.loss = norm_head.FusedNormHeadCrossEntropy(library)

    def construct(self, x, labels, weight):
        return self.loss(x, self.weight, ops.stop_gradient(self.inv(self.weight)), labels, weight)[0]


@pytest.mark.parametrize("mode", sorted(MODES))
def test_fused_cross_entropy_is_the_loss_of_the_normalised_head_and_its_gradient(library, mode):
    """Loss, dx and dW of the fused cell (MindSpore autodiff through its bprop) against float64.

    The logits' error is the head's (the bound of the first test); a logit error e moves the log-sum-exp by at
    most the largest e of the row (softmax weights sum to 1), each probability by its relative e plus that, and
    the kernels add the rounding bounded in the kernel test; dx and dW then add the products' own bound as in the
    head's test, over |d logits| instead of |dout|.
    """
    x, w, labels, weight = _loss_case(12)
    loss_want, logits_want, lse_want, dlogits_want, dx_want, dw_want = _loss_reference(x, w, labels, weight)
    previous = ms.get_context("mode")
    ms.set_context(mode=MODES[mode])
    try:
        net = _HeadLoss(w, library)
        loss = float(net(Tensor(x), Tensor(labels), Tensor(weight)).asnumpy())
        dx, dw = ms.grad(net, grad_position=0, weights=net.trainable_params())(Tensor(x), Tensor(labels),
                                                                              Tensor(weight))
    finally:
        ms.set_context(mode=previous)
    dx, dw = dx.asnumpy(), dw[0].asnumpy()
    n, h = x.shape
    v = w.shape[0]
    absx, absw = np.abs(x.astype(np.float64)), np.abs(w.astype(np.float64))
    inv = 1.0 / np.maximum(np.sqrt((w.astype(np.float64) ** 2).sum(1)), 1e-12)
    wn_abs = absw * inv[:, None]
    e_logit = (h + 3) * EPS32 * (absx @ wn_abs.T) + EPS32 * np.abs(logits_want)
    top = logits_want.max(1, keepdims=True)
    e_lse = e_logit.max(1) + EPS32 * (np.abs(logits_want).max(1) + np.abs(logits_want - top).max(1) + 2 + v
                                      + np.abs(lse_want) + np.abs(lse_want - top[:, 0])) + v * EXP_FLOOR
    rows, safe = np.arange(n), np.clip(labels, 0, v - 1)
    scale = weight / (weight.sum() + 1e-8)
    e_nll = e_lse + e_logit[rows, safe] + EPS32 * np.abs(lse_want - logits_want[rows, safe])
    nll_want = lse_want - logits_want[rows, safe]
    assert abs(loss - loss_want) <= (scale * e_nll).sum() + (n + 2) * EPS32 * (scale * np.abs(nll_want)).sum()
    p = np.exp(logits_want - lse_want[:, None])
    onehot = np.zeros_like(p)
    onehot[rows, safe] = 1.0
    z = np.abs(logits_want - lse_want[:, None])
    e_dlogits = scale[:, None] * (p * (e_logit + e_lse[:, None] + EPS32 * (np.abs(logits_want) + z + 6))
                                  + EPS32 * onehot + EXP_FLOOR) + 4 * DENORMAL
    abs_dlogits = np.abs(dlogits_want) + e_dlogits
    assert np.all(np.abs(dx - dx_want) <= (e_dlogits + (v + h + 3) * EPS32 * abs_dlogits) @ wn_abs)
    radial = (abs_dlogits * (np.abs(logits_want) + e_logit)).sum(0) * inv ** 2 * (inv < 1e12)
    e_radial = (e_dlogits * np.abs(logits_want) + abs_dlogits * e_logit).sum(0) * inv ** 2 * (inv < 1e12)
    bound = ((e_dlogits + (n + h + 6) * EPS32 * abs_dlogits).T @ absx) * inv[:, None] \
        + (e_radial + (n + 2 * h + 12) * EPS32 * radial)[:, None] * absw
    assert radial[5] == 0 and radial[6] > 0
    assert np.all(np.abs(dw - dw_want) <= bound)
