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
import hashlib
import logging
import os
import subprocess
import tempfile

from mindspore import nn, ops
from mindspore import dtype as mstype

logger = logging.getLogger("baichuan2")

MAX_ROWS = 8
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baichuan2_rows_matmul.cc")
COMPILE_FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC")
_LIBRARY = {}


def _cache_dir():
    root = os.environ.get("BAICHUAN2_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "baichuan2_mindspore")
    os.makedirs(root, exist_ok=True)
    return root


def _host_key():
    """Distinguishes hosts whose -march=native differs (the cache may sit on a shared home)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return flags


def build_library():
    """Path of the compiled kernel (built on first use, then cached), or None with a warning.

    The cache key hashes the source, the compiler, its flags and the CPU's feature flags; the library is
    written to a temporary name and renamed, so concurrent processes (msrun ranks, test workers) never load
    a half-written file.
    """
    if "path" in _LIBRARY:
        return _LIBRARY["path"]
    compiler = os.environ.get("CXX", "g++")
    path = None
    try:
        with open(SOURCE, "rb") as f:
            source = f.read()
        key = hashlib.sha256(b"\0".join([source, compiler.encode(), " ".join(COMPILE_FLAGS).encode(),
                                         _host_key().encode()])).hexdigest()[:16]
        path = os.path.join(_cache_dir(), f"rows_matmul_{key}.so")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
            os.close(fd)
            try:
                subprocess.run([compiler, *COMPILE_FLAGS, SOURCE, "-o", tmp], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except (OSError, subprocess.SubprocessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        logger.warning("The small-row decode kernel (%s) could not be built with %s (%s); decode uses "
                       "ops.MatMul, whose batch-4 steps read the weights 2-3 times.", SOURCE, compiler,
                       detail.strip().splitlines()[-1] if detail.strip() else err)
        path = None
    _LIBRARY["path"] = path
    return path


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
