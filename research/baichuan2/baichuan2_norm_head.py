"""NormHead's row norms and their gradient as one-pass CPU kernels (training, fp32).

Baichuan2's lm_head computes ``logits = (x @ W.T) * inv``, ``inv[v] = 1 / max(||W[v]||, 1e-12)``
(``baichuan2_layers.NormHead``). Written with MindSpore ops, the row norms, the column scaling and their
autodiff gradients are a dozen memory-bound passes over the (V, h) weight and the (T, V) logits every
training step (0.25 s of a 3.65 s bench-shape step, measured 2026-12-04 on an AVX-512 host before these
kernels; docs/performance.md now gives the kernels' cost). ``baichuan2_norm_head.cc`` does
the same arithmetic in one pass over each operand; this module wraps it as MindSpore AOT custom operators:

* ``row_inv_norm_primitive``: W (V, h) -> inv (V);
* ``FusedNormHeadProduct``: ``(x (N, h), W (V, h), inv (V)) -> (x @ W.T) * inv (N, V)``, with a hand-written
  backward that gives W the whole gradient of the normalised head (through the product and through ``inv``):
  ``g = dout * inv``, ``dx = g @ W``, ``dW = g.T @ x + c[v] * W[v]``, ``c[v] = -inv[v]^2 * sum_t dout * out``
  where the norm is above the floor (``max`` passes no gradient to the norm below it), else 0.
* ``FusedNormHeadCrossEntropy``: the head and the masked mean cross-entropy of ``baichuan2_loss`` in one cell,
  ``(x, W, inv, labels, weight) -> loss``. The logits are never written: one kernel takes each row's
  log-sum-exp from the raw product and ``inv``, and the backward writes ``d raw`` and the column sums for the
  norm's gradient in one pass, recomputing the softmax from the raw product it keeps. It replaces the
  column scaling, ``log_softmax``, its gather, the softmax, the scaling and the label scatter (five passes
  over (N, V) and two (N, V) buffers).

Whether a network uses it is decided by ``baichuan2_device.use_norm_head_kernels``; without it (other devices,
half precision, no compiler) ``NormHead`` keeps MindSpore ops, which compute the same function.
"""
from mindspore import nn, ops
from mindspore import dtype as mstype

from baichuan2_kernel_build import cached_kernel, kernel_source
from baichuan2_loss import masked_mean, masked_mean_scale

SOURCE = kernel_source("baichuan2_norm_head.cc")


def build_library():
    """Path of the compiled NormHead kernels (built on first use, then cached per host), or None with a warning."""
    return cached_kernel(SOURCE, "NormHead keeps MindSpore's elementwise ops (same function, more passes over "
                                 "the weight and the logits).")


def _aot(library, name, out_shape, out_dtype):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def row_inv_norm_primitive(library):
    """``inv[v] = 1 / max(||W[v]||, 1e-12)`` for W (V, h) fp32 -> (V,) fp32 (no backward: callers stop it)."""
    return _aot(library, "RowInvNorm", lambda w: [w[0]], lambda w: w)


class _NormWeightGrad(nn.Cell):
    """``(gw (V, h), W (V, h), inv (V), s (V)) -> gw + c[v] * W[v]``: the norm's share of W's gradient added
    (``NormHeadWeightGrad``). A cell of its own so that profiles name it apart from the loss kernels."""

    def __init__(self, library):
        super().__init__()
        self.kernel = _aot(library, "NormHeadWeightGrad", lambda gw, w, inv, s: gw, lambda gw, w, inv, s: gw)

    def construct(self, grad_w, weight, inv, column_sums):
        return self.kernel(grad_w, weight, inv, column_sums)


class _NormHeadProductCell(nn.Cell):
    """What both fused cells share: the product ``x @ W.T`` and its backward through the normalised head.

    ``_product_grads(grad_raw (N, V), column_sums (V,), x, W, inv) -> (dx (N, h), dW (V, h))`` with
    ``dx = grad_raw @ W`` and ``dW = grad_raw.T @ x + c[v] * W[v]`` (the norm's share, ``NormHeadWeightGrad``).
    """

    def __init__(self, library):
        super().__init__()
        self.product = ops.MatMul(transpose_b=True)         # x @ W.T
        self.product_grad_x = ops.MatMul()                 # g @ W
        self.product_grad_w = ops.MatMul(transpose_a=True)  # g.T @ x
        self.weight_grad = _NormWeightGrad(library)

    def _product_grads(self, grad_raw, column_sums, x, weight, inv):
        grad_x = self.product_grad_x(grad_raw, weight)
        grad_w = self.weight_grad(self.product_grad_w(grad_raw, x), weight, inv, column_sums)
        return grad_x, grad_w


class FusedNormHeadProduct(_NormHeadProductCell):
    """``(x @ W.T) * inv`` for x (N, h), W (V, h), inv (V,), all fp32 -> logits (N, V) fp32.

    ``inv`` must be ``row_inv_norm_primitive(W)`` behind ``ops.stop_gradient``: the backward returns W's
    gradient through the norm itself and none for ``inv``. The backward keeps only the output (which the
    loss keeps anyway); the raw product ``x @ W.T`` is freed after the forward.
    """

    def __init__(self, library):
        super().__init__(library)
        self.scale_columns = _aot(library, "ScaleColumns", lambda raw, inv: raw, lambda raw, inv: raw)
        self.scale_columns_grad = _aot(library, "ScaleColumnsGrad", lambda dout, out, inv: (dout, inv),
                                       lambda dout, out, inv: (dout, inv))

    def construct(self, x, weight, inv):
        return self.scale_columns(self.product(x, weight), inv)

    def bprop(self, x, weight, inv, out, dout):
        """(dx (N, h), dW (V, h), zeros for inv)."""
        grad_raw, column_sums = self.scale_columns_grad(dout, out, inv)
        grad_x, grad_w = self._product_grads(grad_raw, column_sums, x, weight, inv)
        return grad_x, grad_w, ops.zeros_like(inv)


class FusedNormHeadCrossEntropy(_NormHeadProductCell):
    """Masked mean cross-entropy of the normalised head's logits, without writing the logits.

    ``construct(x (N, h), W (V, h), inv (V,), labels (N,) int32, label_weight (N,))`` returns
    ``(loss, raw (N, V), lse (N,))``, all fp32 but the labels:
    ``loss = sum_t w_t * (lse_t - logits_t[label_t]) / (sum_t w_t + 1e-8)``, w = label_weight, with
    ``logits = (x @ W.T) * inv`` (``baichuan2_loss.MaskedCrossEntropy``'s function); take ``[0]``. ``raw`` and
    ``lse`` are returned so that the backward gets them (a cell's bprop sees its inputs and outputs only):
    they are what the backward keeps, one (N, V) buffer, as the unfused head kept its logits. Rows of weight
    0 (padding, ignored labels) are skipped in both passes; their labels may be anything (-100).
    ``inv`` must be ``row_inv_norm_primitive(W)`` behind ``ops.stop_gradient``, as for ``FusedNormHeadProduct``.
    """

    def __init__(self, library):
        super().__init__(library)
        self.log_sum_exp = _aot(library, "NormHeadLogSumExp",
                                lambda raw, inv, labels, weight: (weight, weight),
                                lambda raw, inv, labels, weight: (mstype.float32, mstype.float32))
        self.loss_grad = _aot(library, "NormHeadCrossEntropyGrad",
                              lambda raw, inv, lse, labels, scale: (raw, inv),
                              lambda raw, inv, lse, labels, scale: (mstype.float32, mstype.float32))

    def construct(self, x, weight, inv, labels, label_weight):
        raw = self.product(x, weight)
        lse, nll = self.log_sum_exp(raw, inv, labels, label_weight)
        return masked_mean(nll, label_weight), raw, lse

    def bprop(self, x, weight, inv, labels, label_weight, out, dout):
        """(dx (N, h), dW (V, h), and zeros for inv, labels and the label weights)."""
        _, raw, lse = out
        scale = masked_mean_scale(label_weight, dout[0])
        grad_raw, column_sums = self.loss_grad(raw, inv, lse, labels, scale)
        grad_x, grad_w = self._product_grads(grad_raw, column_sums, x, weight, inv)
        return grad_x, grad_w, ops.zeros_like(inv), ops.zeros_like(labels), ops.zeros_like(label_weight)
