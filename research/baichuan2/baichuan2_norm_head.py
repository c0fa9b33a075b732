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

Whether a network uses it is decided by ``baichuan2_device.use_norm_head_kernels``; without it (other devices,
half precision, no compiler) ``NormHead`` keeps MindSpore ops, which compute the same function.
"""
from mindspore import nn, ops

from baichuan2_kernel_build import build_kernel, kernel_source

SOURCE = kernel_source("baichuan2_norm_head.cc")
_LIBRARY = {}


def build_library():
    """Path of the compiled NormHead kernels (built on first use, then cached per host), or None with a warning."""
    if "path" not in _LIBRARY:
        _LIBRARY["path"] = build_kernel(SOURCE, "NormHead keeps MindSpore's elementwise ops (same function, "
                                                "more passes over the weight and the logits).")
    return _LIBRARY["path"]


def _aot(library, name, out_shape, out_dtype):
    return ops.Custom(f"{library}:{name}", out_shape=out_shape, out_dtype=out_dtype, func_type="aot")


def row_inv_norm_primitive(library):
    """``inv[v] = 1 / max(||W[v]||, 1e-12)`` for W (V, h) fp32 -> (V,) fp32 (no backward: callers stop it)."""
    return _aot(library, "RowInvNorm", lambda w: [w[0]], lambda w: w)


class FusedNormHeadProduct(nn.Cell):
    """``(x @ W.T) * inv`` for x (N, h), W (V, h), inv (V,), all fp32 -> logits (N, V) fp32.

    ``inv`` must be ``row_inv_norm_primitive(W)`` behind ``ops.stop_gradient``: the backward returns W's
    gradient through the norm itself and none for ``inv``. The backward keeps only the output (which the
    loss keeps anyway); the raw product ``x @ W.T`` is freed after the forward.
    """

    def __init__(self, library):
        super().__init__()
        self.product = ops.MatMul(transpose_b=True)         # x @ W.T
        self.product_grad_x = ops.MatMul()                 # g @ W
        self.product_grad_w = ops.MatMul(transpose_a=True)  # g.T @ x
        self.scale_columns = _aot(library, "ScaleColumns", lambda raw, inv: raw, lambda raw, inv: raw)
        self.scale_columns_grad = _aot(library, "ScaleColumnsGrad", lambda dout, out, inv: (dout, inv),
                                       lambda dout, out, inv: (dout, inv))
        self.weight_grad = _aot(library, "NormHeadWeightGrad", lambda gw, w, inv, s: gw,
                                lambda gw, w, inv, s: gw)

    def construct(self, x, weight, inv):
        return self.scale_columns(self.product(x, weight), inv)

    def bprop(self, x, weight, inv, out, dout):
        """(dx (N, h), dW (V, h), zeros for inv)."""
        grad_raw, column_sums = self.scale_columns_grad(dout, out, inv)
        grad_x = self.product_grad_x(grad_raw, weight)
        grad_w = self.weight_grad(self.product_grad_w(grad_raw, x), weight, inv, column_sums)
        return grad_x, grad_w, ops.zeros_like(inv)
