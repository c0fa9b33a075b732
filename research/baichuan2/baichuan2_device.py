"""What the current device can run: the one place that knows about hardware differences.

Baichuan2's configs ask for Ascend fast paths (fused RMSNorm, flash attention, paged attention,
operator/pipeline parallel). MindSpore's CPU backend has kernels for none of them, so every model
and script asks this module which path to take instead of testing ``device_target`` itself.
"""
from dataclasses import dataclass
import logging
import os

import mindspore as ms

logger = logging.getLogger("baichuan2")

_WARNED = set()


def _warn_once(message):
    if message not in _WARNED:
        _WARNED.add(message)
        logger.warning(message)


@dataclass(frozen=True)
class DeviceCapabilities:
    """Kernels and parallel modes available on one device target.

    Attributes:
        device_target: "Ascend", "GPU" or "CPU" (from the MindSpore context).
        fused_rms_norm: the ``RmsNorm`` kernel exists.
        flash_attention: ``FlashAttentionScore`` exists.
        paged_attention: ``PagedAttention``/``ReshapeAndCache`` exist.
        operator_parallel: semi-auto/auto parallel (model parallel) can compile.
        pipeline_parallel: pipeline stages can compile.
        half_precision_matmul: fp16/bf16 matmuls are fast and accurate enough to be the default.
        varlen_flash_attention: ``FlashAttentionScore`` takes the variable-length (TND layout,
            ``actual_seq_qlen`` / ``actual_seq_kvlen``) form used for packed rows.
        fused_adam: AdamW over fp32 weights runs as one ``ops.Adam`` kernel per weight
            (``baichuan2_optim.FusedAdamW``) instead of MindFormers' dozen elementwise kernels. On CPU
            each of those is a memory-bound pass (at the bench shape the fused step is 30x faster than
            MindFormers' AdamW and 6x faster than ``nn.AdamWeightDecay``, docs/performance.md); on Ascend
            MindFormers' graph is kept as MindFormers runs it.
        rows_matmul: decode steps (at most 8 rows) of fp32 inference networks may multiply by each
            weight with ``baichuan2_rows_matmul``'s one-pass kernel instead of the device MatMul
            (MindSpore's CPU MatMul reads the weight 2-3 times for 4 rows).
        norm_head_kernels: fp32 NormHead computes its row norms, column scaling and their gradient with
            ``baichuan2_norm_head``'s one-pass kernels instead of a dozen elementwise ops.
        decode_attention: decode steps of fp32 inference networks attend over the KV cache in place with
            ``baichuan2_decode_attention``'s one-pass kernel instead of copying the cache window and running
            the portable attention's small products and elementwise ops.
    """
    device_target: str
    fused_rms_norm: bool
    flash_attention: bool
    paged_attention: bool
    operator_parallel: bool
    pipeline_parallel: bool
    half_precision_matmul: bool
    varlen_flash_attention: bool = False
    fused_adam: bool = False
    rows_matmul: bool = False
    norm_head_kernels: bool = False
    decode_attention: bool = False


_TABLE = {
    "Ascend": DeviceCapabilities("Ascend", True, True, True, True, True, True, varlen_flash_attention=True),
    "GPU": DeviceCapabilities("GPU", False, False, False, True, True, True),
    "CPU": DeviceCapabilities("CPU", False, False, False, False, False, False, fused_adam=True,
                             rows_matmul=True, norm_head_kernels=True, decode_attention=True),
}


def memory_is_host_ram(device_target=None):
    """Whether a run on ``device_target`` keeps its tensors in host RAM (CPU) rather than device memory."""
    return device_capabilities(device_target).device_target == "CPU"


def device_capabilities(device_target=None):
    """Capabilities of ``device_target`` (default: the one set in the MindSpore context)."""
    target = device_target or ms.get_context("device_target")
    return _TABLE.get(target, _TABLE["CPU"])


def use_fused_rms_norm(requested):
    """Fused RMSNorm when asked for and available; the portable ReduceMean form otherwise."""
    caps = device_capabilities()
    if requested and not caps.fused_rms_norm:
        _warn_once(f"fused_rms_norm=True is not available on {caps.device_target}; "
                   "using the portable RMSNorm (same math).")
    return bool(requested and caps.fused_rms_norm)


def use_flash_attention(requested, use_past):
    """Flash attention only for full-sequence (training / no-cache) forwards on a device that has it.

    The original disables flash attention whenever ``use_past`` is on; we keep that rule.
    """
    caps = device_capabilities()
    if requested and not caps.flash_attention:
        _warn_once(f"use_flash_attention=True is not available on {caps.device_target}; "
                   "using the portable attention (same math).")
    return bool(requested and caps.flash_attention and not use_past)


def use_varlen_flash_attention(requested, packed, use_past=False):
    """Variable-length flash attention (TND layout, one kernel call over all packed conversations) for
    packed rows (``position_ids`` given) on a device that has it, when flash attention is requested.

    Elsewhere packed rows take the path unpacked rows take (Ascend's BNSD flash attention or the
    portable attention) with the block-diagonal causal mask, which is the same math.
    """
    caps = device_capabilities()
    return bool(requested and packed and caps.varlen_flash_attention and not use_past)


def use_fused_adam(weight_dtypes):
    """Whether AdamW should update weights of ``weight_dtypes`` (MindSpore dtypes) with ``ops.Adam``:
    on a device that prefers it, when every weight is float32 (the kernel keeps weight and moments in
    one dtype, and the moments are fp32)."""
    return device_capabilities().fused_adam and all(dtype == ms.float32 for dtype in weight_dtypes)


def use_rows_matmul(use_past, compute_dtype):
    """The compiled small-row kernel's path when decode products of this network should use it, else None.

    Only for networks built for cached decoding (``use_past``) that compute in fp32, on a device that
    prefers it, and when the kernel builds (a C++ compiler on the host; otherwise one warning and MatMul).
    ``BAICHUAN2_ROWS_MATMUL=0`` turns it off (for A/B measurements).
    """
    if not (use_past and compute_dtype == ms.float32 and device_capabilities().rows_matmul):
        return None
    if os.environ.get("BAICHUAN2_ROWS_MATMUL", "1") == "0":
        return None
    from baichuan2_rows_matmul import build_library  # pylint: disable=import-outside-toplevel
    return build_library()


def use_norm_head_kernels(compute_dtype, param_init_type):
    """The compiled NormHead kernels' path when this network's lm_head should use them, else None.

    Only when the head's weight and its product are fp32, on a device that prefers them, and when the
    kernels build (a C++ compiler on the host; otherwise one warning and MindSpore's ops).
    ``BAICHUAN2_NORM_HEAD_KERNELS=0`` turns them off (for A/B measurements).
    """
    if not (compute_dtype == ms.float32 and param_init_type == ms.float32
            and device_capabilities().norm_head_kernels):
        return None
    if os.environ.get("BAICHUAN2_NORM_HEAD_KERNELS", "1") == "0":
        return None
    from baichuan2_norm_head import build_library  # pylint: disable=import-outside-toplevel
    return build_library()


def use_decode_attention(use_past, compute_dtype, softmax_dtype):
    """The compiled decode-attention kernel's path when this network's decode steps should use it, else None.

    Only for networks built for cached decoding (``use_past``) whose attention computes in fp32 (products
    and softmax), on a device that prefers it, and when the kernel builds (a C++ compiler on the host;
    otherwise one warning and the portable attention). ``BAICHUAN2_DECODE_ATTENTION=0`` turns it off (for
    A/B measurements).
    """
    if not (use_past and compute_dtype == ms.float32 and softmax_dtype == ms.float32
            and device_capabilities().decode_attention):
        return None
    if os.environ.get("BAICHUAN2_DECODE_ATTENTION", "1") == "0":
        return None
    from baichuan2_decode_attention import build_library  # pylint: disable=import-outside-toplevel
    return build_library()


def check_parallel_supported(model_parallel, pipeline_stage):
    """Raise a plain error if the requested parallelism cannot compile on this device."""
    caps = device_capabilities()
    if model_parallel > 1 and not caps.operator_parallel:
        raise ValueError(f"parallel_config.model_parallel={model_parallel} needs operator (semi-auto) "
                         f"parallel, which MindSpore's {caps.device_target} backend does not support. "
                         "Set model_parallel: 1 (data parallel only) or run on Ascend.")
    if pipeline_stage > 1 and not caps.pipeline_parallel:
        raise ValueError(f"parallel_config.pipeline_stage={pipeline_stage} needs pipeline parallel, which "
                         f"MindSpore's {caps.device_target} backend does not support. "
                         "Set pipeline_stage: 1 or run on Ascend.")


def check_device_available(device_target):
    """Raise a plain error if ``device_target`` (None: CPU) does not exist in this machine/MindSpore build."""
    target = device_target or "CPU"
    if target != "CPU" and not ms.hal.is_available(target):
        raise ValueError(f"context.device_target is {target}, which this machine/MindSpore build does not have; "
                         "pass --device_target CPU (or run on an Ascend host).")


def parallel_inference_supported(device_target):
    """Whether ``use_parallel`` inference (the model sharded over cards) can run on ``device_target``.

    Refused where operator parallel cannot compile (CPU); an unset target is left to MindSpore.
    """
    caps = _TABLE.get(device_target)
    return caps is None or caps.operator_parallel


def needs_portable_training_ops(device_target=None):
    """Whether the training paths need the portable overflow check and barrier (no NPUGetFloatStatusV2 /
    Barrier kernels: MindSpore's CPU backend)."""
    return device_capabilities(device_target).device_target == "CPU"
