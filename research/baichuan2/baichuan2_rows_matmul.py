"""Decode-step matrix products that read each weight once for up to 8 rows (CPU, fp32).

A decode step multiplies a few rows (one per sequence of the batch) by every weight of the model, so its
cost is reading the weights. MindSpore's CPU ``MatMul`` (oneDNN 2.2's gemm) reads the whole weight once
per group of 2-3 rows, so a batch-4 step reads every weight 2-3 times (``benchmarks/bench_matmul_shapes.py``,
docs/serving.md). ``baichuan2_rows_matmul.cc`` is a register-blocked kernel that reads each weight row once
for all rows; this module builds it with the host's C++ compiler into a per-user cache, wraps it as a
MindSpore AOT custom operator, and installs it, behind a row-count test, as the ``matmul`` of every
``(out, in)`` linear layer and of the lm_head of a network built for inference.

Training, prefill (more than ``MAX_ROWS`` rows) and non-fp32 products keep ``ops.MatMul``; the kernel has
no backward. Whether to use it at all is decided by ``baichuan2_device.use_rows_matmul``.
"""
from mindspore import nn, ops
from mindspore import dtype as mstype

from baichuan2_kernel_build import cached_kernel, kernel_source

MAX_ROWS = 8
SOURCE = kernel_source("baichuan2_rows_matmul.cc")


def build_library():
    """Path of the compiled kernel (built on first use, then cached per host), or None with a warning
    (``baichuan2_kernel_build.cached_kernel``)."""
    return cached_kernel(SOURCE,
                         "decode uses ops.MatMul, whose batch-4 steps read the weights 2-3 times.")


def rows_matmul_primitive(library):
    """``y = x @ W.T`` for x (M, K) fp32 with M <= MAX_ROWS and W (N, K) fp32: the AOT custom operator."""
    return ops.Custom(f"{library}:RowsMatMul", out_shape=lambda x, w: x[:-1] + [w[0]],
                      out_dtype=lambda x, w: x, func_type="aot")


class DecodeMatMul(nn.Cell):
    """Drop-in for ``ops.MatMul(transpose_b=True)``: x (M, K) @ W (N, K).T -> (M, N).

    Graph mode resolves the branch at compile time from the static shape: inference graphs with at most
    ``MAX_ROWS`` fp32 rows (decode steps) call the one-pass kernel, everything else (training, prefill,
    fp16/bf16) the MindSpore MatMul it replaces.
    """

    def __init__(self, library):
        super().__init__()
        self.matmul = ops.MatMul(transpose_b=True)
        self.rows_matmul = rows_matmul_primitive(library)

    def construct(self, x, weight):
        if not self.training and x.shape[0] <= MAX_ROWS and x.dtype == mstype.float32 \
                and weight.dtype == mstype.float32:
            return self.rows_matmul(x, weight)
        return self.matmul(x, weight)


def install_decode_matmul(network, library):
    """Replace ``matmul`` of every cell of ``network`` whose ``matmul`` is ``ops.MatMul(transpose_b=True)``
    (MindFormers' ``Linear`` with an (out, in) weight, ``NormHead``) by a ``DecodeMatMul``.

    Returns the number of cells changed. Cells whose product is sharded (operator parallel) never reach
    here: the decision in ``baichuan2_device.use_rows_matmul`` is CPU-only.
    """
    targets = []
    for _, cell in network.cells_and_names():
        matmul = getattr(cell, "matmul", None)
        if not isinstance(cell, DecodeMatMul) and isinstance(matmul, ops.MatMul) and matmul.transpose_b \
                and not matmul.transpose_a:
            targets.append(cell)
    for cell in targets:    # after the walk: a DecodeMatMul holds an ops.MatMul of its own
        cell.matmul = DecodeMatMul(library)
    return len(targets)
