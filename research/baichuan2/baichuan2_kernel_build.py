"""Builds the project's C++ CPU kernels (MindSpore AOT custom operators) once per host, into a cache.

Each kernel source (``baichuan2_*.cc`` beside this file) is compiled with the host's C++ compiler
(``$CXX``, default ``g++``) and ``-march=native`` into ``$BAICHUAN2_KERNEL_CACHE`` (default
``~/.cache/baichuan2_mindspore``). The file name hashes the source, the header the kernels share
(``baichuan2_kernel_common.h``), the compiler, its flags and the CPU's feature flags, so a shared home directory never serves one host's build to another; the library is
written under a temporary name and renamed, so concurrent processes (msrun ranks, test workers) never load
a half-written file. A host without a compiler gets one warning per kernel and ``None``: the callers then
keep MindSpore's own ops.
"""
import hashlib
import logging
import os
import subprocess
import tempfile

logger = logging.getLogger("baichuan2")

COMPILE_FLAGS = ("-O3", "-march=native", "-pthread", "-shared", "-fPIC")
_HERE = os.path.dirname(os.path.abspath(__file__))


def kernel_source(name):
    """Path of the kernel source ``name`` (e.g. ``"baichuan2_norm_head.cc"``) shipped beside this module."""
    return os.path.join(_HERE, name)


# Included by every kernel source, so it is part of each build's cache key.
COMMON_HEADER = kernel_source("baichuan2_kernel_common.h")


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


_BUILT = {}


def cached_kernel(source, fallback):
    """``build_kernel(source, fallback)`` once per process: the library's path, or None."""
    if source not in _BUILT:
        _BUILT[source] = build_kernel(source, fallback)
    return _BUILT[source]


def build_kernel(source, fallback):
    """Path of the shared library compiled from ``source`` (built on first use, then cached), or None.

    ``fallback`` completes the warning given when it cannot be built: what the caller does instead.
    """
    compiler = os.environ.get("CXX", "g++")
    stem = os.path.splitext(os.path.basename(source))[0].replace("baichuan2_", "")
    try:
        texts = []
        for path in (source, COMMON_HEADER):
            with open(path, "rb") as f:
                texts.append(f.read())
        key = hashlib.sha256(b"\0".join([*texts, compiler.encode(), " ".join(COMPILE_FLAGS).encode(),
                                         _host_key().encode()])).hexdigest()[:16]
        path = os.path.join(_cache_dir(), f"{stem}_{key}.so")
        if not os.path.exists(path):
            fd, tmp = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
            os.close(fd)
            try:
                subprocess.run([compiler, *COMPILE_FLAGS, source, "-o", tmp], check=True,
                               capture_output=True, text=True, timeout=120)
                os.replace(tmp, path)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
        return path
    except (OSError, subprocess.SubprocessError) as err:
        detail = (getattr(err, "stderr", "") or str(err)).strip()
        logger.warning("The CPU kernel %s could not be built with %s (%s); %s", source, compiler,
                       detail.splitlines()[-1] if detail else err, fallback)
        return None
