"""Building the C++ CPU kernels: cached per host, and a host without a compiler keeps MindSpore's ops.

``baichuan2_kernel_build.build_kernel`` compiles each kernel source once per host (``cached_kernel``: once per
process); each kernel module (``baichuan2_rows_matmul``, ``baichuan2_norm_head``, ``baichuan2_decode_attention``)
says what it does without its library.
"""
import os

import pytest

import baichuan2_decode_attention as decode_attention
import baichuan2_norm_head as norm_head
import baichuan2_rows_matmul as rows
import baichuan2_kernel_build as kernel_build
from baichuan2_kernel_build import build_kernel

KERNELS = {"rows_matmul": (rows, "decode uses ops.MatMul"),
           "norm_head": (norm_head, "NormHead keeps MindSpore's elementwise ops"),
           "decode_attention": (decode_attention, "decode steps use the portable attention")}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_no_compiler_means_one_warning_and_the_fallback(kernel, monkeypatch, tmp_path, caplog):
    module, fallback = KERNELS[kernel]
    monkeypatch.setattr(kernel_build, "_BUILT", {})
    monkeypatch.setenv("BAICHUAN2_KERNEL_CACHE", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    with caplog.at_level("WARNING", logger="baichuan2"):
        assert module.build_library() is None
    assert fallback in caplog.text and "could not be built" in caplog.text
    assert list(tmp_path.iterdir()) == []                        # no half-written library left behind


def test_a_library_is_built_once_per_source_compiler_and_host(monkeypatch, tmp_path):
    monkeypatch.setenv("BAICHUAN2_KERNEL_CACHE", str(tmp_path))
    first = build_kernel(norm_head.SOURCE, "unused")
    assert first and os.path.dirname(first) == str(tmp_path) and os.path.basename(first).startswith("norm_head_")

    def no_compile(*args, **kwargs):
        raise AssertionError(f"compiled again: {args}")
    monkeypatch.setattr(kernel_build.subprocess, "run", no_compile)
    assert build_kernel(norm_head.SOURCE, "unused") == first            # cached: no compiler call
    # Another version of the header every kernel includes is another library.
    header = tmp_path / "changed_common.h"
    header.write_bytes(open(kernel_build.COMMON_HEADER, "rb").read() + b"\n// changed\n")
    with monkeypatch.context() as patch:
        patch.setattr(kernel_build, "COMMON_HEADER", str(header))
        with pytest.raises(AssertionError, match="compiled again"):
            build_kernel(norm_head.SOURCE, "unused")
    monkeypatch.setenv("CXX", "c++")                                    # another compiler is another library
    with pytest.raises(AssertionError, match="compiled again"):
        build_kernel(norm_head.SOURCE, "unused")
