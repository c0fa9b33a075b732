"""The device capability table: what runs where, and the plain errors for what cannot run on CPU."""
import pytest

from baichuan2_device import (device_capabilities, use_fused_rms_norm, use_flash_attention,
                              check_parallel_supported)


def test_cpu_has_no_ascend_fast_paths():
    caps = device_capabilities("CPU")
    assert not (caps.fused_rms_norm or caps.flash_attention or caps.paged_attention)
    assert not (caps.operator_parallel or caps.pipeline_parallel)


def test_ascend_has_the_fast_paths():
    caps = device_capabilities("Ascend")
    assert caps.fused_rms_norm and caps.flash_attention and caps.operator_parallel and caps.pipeline_parallel


def test_requests_resolve_to_portable_paths_on_this_cpu_context():
    assert use_fused_rms_norm(True) is False
    assert use_flash_attention(True, use_past=False) is False
    assert use_flash_attention(False, use_past=False) is False


@pytest.mark.parametrize("mp, pp, word", [(2, 1, "model_parallel=2"), (1, 4, "pipeline_stage=4")])
def test_model_and_pipeline_parallel_are_refused_plainly_on_cpu(mp, pp, word):
    with pytest.raises(ValueError, match=word) as info:
        check_parallel_supported(mp, pp)
    assert "CPU" in str(info.value) and "Ascend" in str(info.value)
    check_parallel_supported(1, 1)
