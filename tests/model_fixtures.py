"""Tiny Baichuan2 networks with random weights that went through the real HF -> MindSpore converter.

``tiny_pair(kind, tmp_dir)`` writes a random Hugging Face checkpoint, converts it with
``convert_weight.py`` (fp32) and returns the HF state dict, its config and the MindSpore checkpoint
path, so every test compares the MindSpore network against a reference fed the same weights.
"""
import contextlib
import os

import mindspore as ms
from mindformers.models import LlamaConfig

from hf_fixtures import tiny_hf_config, random_hf_state_dict, write_hf_checkpoint

import convert_weight
from baichuan2_7b import Baichuan7BV2ForCausalLM
from baichuan2_13b import Baichuan13BV2ForCausalLM
from baichuan2_names import is_runtime_buffer

NETWORKS = {"7b": Baichuan7BV2ForCausalLM, "13b": Baichuan13BV2ForCausalLM}


def ms_config_from_hf(hf_config, **overrides):
    """fp32 ``LlamaConfig`` with the shapes of a HF Baichuan2 config.json dict."""
    kwargs = dict(batch_size=1, seq_length=64, hidden_size=hf_config["hidden_size"],
                  num_layers=hf_config["num_hidden_layers"], num_heads=hf_config["num_attention_heads"],
                  intermediate_size=hf_config["intermediate_size"], vocab_size=hf_config["vocab_size"],
                  rms_norm_eps=hf_config["rms_norm_eps"], compute_dtype="float32", param_init_type="float32",
                  layernorm_compute_type="float32", softmax_compute_type="float32", rotary_dtype="float32",
                  use_past=False, fused_rms_norm=False, do_sample=False, pad_token_id=0, eos_token_id=2)
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def tiny_pair(kind, tmp_dir, seed=0, **hf_overrides):
    """Random HF checkpoint of ``kind`` ("7b"/"13b") converted to MindSpore fp32.

    Returns ``(hf_state_dict, hf_config, ms_ckpt_path)``.
    """
    hf_config = tiny_hf_config(kind, **hf_overrides)
    state_dict = random_hf_state_dict(hf_config, seed=seed)
    hf_dir = os.path.join(tmp_dir, f"hf_{kind}")
    write_hf_checkpoint(hf_dir, state_dict, hf_config, fmt="safetensors")
    ckpt = os.path.join(tmp_dir, f"ms_{kind}.ckpt")
    convert_weight.main(["--torch_ckpt_path", hf_dir, "--mindspore_ckpt_path", ckpt, "--dtype", "fp32"])
    return state_dict, hf_config, ckpt


def build_network(kind, hf_config, ckpt, **overrides):
    """Network of ``kind`` with the converted weights loaded; asserts that every weight was loaded."""
    net = NETWORKS[kind](ms_config_from_hf(hf_config, **overrides))
    not_loaded, _ = ms.load_param_into_net(net, ms.load_checkpoint(ckpt))
    missing = [n for n in not_loaded if not is_runtime_buffer(n)]
    assert not missing, f"parameters not loaded from {ckpt}: {missing}"
    net.set_train(False)
    return net


@contextlib.contextmanager
def execution_mode(mode):
    """Run the body in ``ms.PYNATIVE_MODE`` or ``ms.GRAPH_MODE`` and restore the previous mode."""
    previous = ms.get_context("mode")
    ms.set_context(mode=mode)
    try:
        yield
    finally:
        ms.set_context(mode=previous)
