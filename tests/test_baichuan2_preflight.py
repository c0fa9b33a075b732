"""Pre-flight pieces as pure functions: plain YAML configs, temporary files, no MindSpore compile.

Mirrors ``baichuan2_config`` (plain reader, overrides), ``baichuan2_checkpoints`` (what a path
names), ``baichuan2_preflight`` (resume, checkpoint fit), ``baichuan2_names`` and ``baichuan2_cli``.
"""
import argparse
import json
import os

import numpy as np
import pytest
from safetensors.numpy import save_file

from baichuan2_checkpoints import CheckpointSourceError, checkpoint_files, is_split_layout, needs_layout_transform
from baichuan2_cli import UserInputError, fail, read_prompts, run_main
from baichuan2_config import YamlConfig, apply_overrides, read_yaml_config
from baichuan2_names import canonical_lora_name, classify_ms_name, ffn_width
from baichuan2_preflight import (PreflightError, check_checkpoint, check_run_inputs, expected_lora_shapes,
                                 expected_weight_shapes, resolve_resume)

TINY_YAML = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "research", "baichuan2",
                         "run_baichuan2_7b_cpu_tiny.yaml")


def run_args(**flags):
    """A ``run_baichuan2.py`` namespace with every flag unset except ``flags``."""
    names = ("use_parallel", "device_id", "device_target", "mode", "load_checkpoint", "src_strategy",
             "auto_trans_ckpt", "vocab_file", "seq_length", "resume", "output_dir", "dp", "mp", "pp",
             "micro_batch_num", "train_dataset", "eval_dataset", "run_mode", "config")
    values = {name: None for name in names}
    values.update(flags)
    return argparse.Namespace(**values)


def touch(path, text="x"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


# ----- config: plain reader and the one set of overrides -----------------------------------------
def test_overrides_apply_to_the_plain_yaml():
    config = read_yaml_config(TINY_YAML)
    assert isinstance(config, YamlConfig) and config.no_such_key is None
    apply_overrides(config, run_args(seq_length=64, dp=2, mp=1, pp=1, run_mode="finetune", output_dir="out"))
    assert config.model.model_config.seq_length == 64
    assert (config.parallel_config.data_parallel, config.parallel_config.model_parallel) == (2, 1)
    assert config.run_mode == "finetune" and config.output_dir == "out"
    assert config.model.model_config.use_past is False          # no KV cache when training


def test_overrides_take_only_the_flags_a_script_has():
    config = read_yaml_config(TINY_YAML)
    seq_length = config.model.model_config.seq_length
    apply_overrides(config, argparse.Namespace(use_past=True, mp=1))       # e.g. a memory planner's flags
    assert config.model.model_config.use_past is True
    assert config.model.model_config.seq_length == seq_length and config.parallel_config.model_parallel == 1


def test_bad_yaml_is_one_line(tmp_path):
    with pytest.raises(UserInputError, match="not a YAML mapping"):
        read_yaml_config(touch(str(tmp_path / "list.yaml"), "- a\n- b\n"))
    with pytest.raises(UserInputError, match=r"--config must be a \.yaml/\.yml file"):
        read_yaml_config(touch(str(tmp_path / "config.json"), "{}"))
    assert read_yaml_config(touch(str(tmp_path / "child.yaml"), "base_config: other.yaml\n")) is None


# ----- what a checkpoint path names ---------------------------------------------------------------
def test_checkpoint_files_of_each_source(tmp_path):
    single = touch(str(tmp_path / "model.ckpt"))
    assert checkpoint_files(single) == [single]
    folder = tmp_path / "base_and_lora"
    files = [touch(str(folder / "base.ckpt")), touch(str(folder / "lora.safetensors"))]
    assert checkpoint_files(str(folder)) == sorted(files)
    assert not needs_layout_transform(str(folder))               # two complete checkpoints: loaded as is
    dist = tmp_path / "dist"
    touch(str(dist / "rank_0" / "checkpoint_0.ckpt"))
    assert checkpoint_files(str(dist)) == [] and needs_layout_transform(str(dist)) and not is_split_layout(str(dist))
    touch(str(dist / "layout.json"), "{}")
    assert is_split_layout(str(dist))
    with pytest.raises(CheckpointSourceError, match="--lora_ckpt .* holds rank_x/ folders"):
        checkpoint_files(str(dist), "--lora_ckpt", allow_rank_dirs=False)
    with pytest.raises(CheckpointSourceError, match="load_checkpoint not found: .*nope"):
        checkpoint_files(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointSourceError, match="folder .*empty holds no .ckpt file"):
        checkpoint_files(str(tmp_path / "empty"))


# ----- --resume: what to load, without rewriting the config -----------------------------------------
def test_resume_returns_the_checkpoint_and_leaves_the_config(tmp_path):
    ckpt_dir = tmp_path / "output" / "checkpoint"
    older = touch(str(ckpt_dir / "a.ckpt"))
    newer = touch(str(ckpt_dir / "b.ckpt"))
    os.utime(older, (1, 1))
    config = YamlConfig({"resume_training": True, "load_checkpoint": "", "output_dir": str(tmp_path / "output")})
    before = dict(config)
    assert resolve_resume(config, "finetune") == (newer, newer)
    assert dict(config) == before
    touch(str(ckpt_dir / "meta.json"), json.dumps({"last_ckpt_file": "a.ckpt"}))
    assert resolve_resume(config, "finetune") == (older, older)

    ranks = tmp_path / "ranks"
    rank0 = touch(str(ranks / "rank_0" / "x.ckpt"))
    config = YamlConfig({"resume_training": True, "load_checkpoint": str(ranks)})
    assert resolve_resume(config, "train") == (str(ranks), rank0)        # the folder stays: a rank each
    assert resolve_resume(YamlConfig({"resume_training": False}), "train") == (None, None)


def test_resume_errors(tmp_path):
    config = YamlConfig({"resume_training": True, "load_checkpoint": str(tmp_path / "none")})
    with pytest.raises(PreflightError, match="no checkpoint to resume from, .*none does not exist"):
        resolve_resume(config, "finetune")
    with pytest.raises(PreflightError, match="--resume applies to --run_mode train/finetune, not eval"):
        resolve_resume(config, "eval")


# ----- does the checkpoint fit the YAML --------------------------------------------------------------
def tiny_model_config(**changes):
    model_config = YamlConfig(read_yaml_config(TINY_YAML).model.model_config)
    model_config.update(changes)
    return model_config


def write_weights(path, shapes, extra=None):
    tensors = {name: np.zeros(shape, np.float32) for name, shape in shapes.items()}
    tensors.update(extra or {})
    save_file(tensors, path)
    return path


def test_checkpoint_fit_is_checked_from_headers(tmp_path):
    model_config = tiny_model_config()
    shapes = expected_weight_shapes(model_config)
    good = write_weights(str(tmp_path / "good.safetensors"), shapes,
                         {"adam_m.lm_head.weight": np.zeros(shapes["lm_head.weight"], np.float32)})
    found = check_checkpoint(good, model_config, lora=False)
    assert set(shapes) <= set(found)
    wider = dict(shapes, **{"lm_head.weight": (shapes["lm_head.weight"][0] + 1, shapes["lm_head.weight"][1])})
    bad = write_weights(str(tmp_path / "bad.safetensors"), wider)
    with pytest.raises(PreflightError, match="does not fit the network of the yaml .*shape mismatch .*lm_head"):
        check_checkpoint(bad, model_config, lora=False)


def test_lora_names_fit_pet_config(tmp_path):
    pet = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 4, "target_modules": ".*wq|.*wv"}
    model_config = tiny_model_config(pet_config=pet)
    shapes = expected_weight_shapes(model_config)
    lora = expected_lora_shapes(shapes, pet)
    assert sorted({name.split(".")[-2] for name in lora}) == ["wq", "wv"]
    old_spelling = {name.replace("mindpet_delta", "tk_delta"): np.zeros(shape, np.float32)
                    for name, shape in lora.items()}
    folder = tmp_path / "base_and_lora"
    folder.mkdir()
    write_weights(str(folder / "base.safetensors"), shapes)
    write_weights(str(folder / "lora.safetensors"), {}, old_spelling)
    found = check_checkpoint(str(folder), model_config, lora=True)
    assert set(lora) <= set(found)
    with pytest.raises(PreflightError, match="holds LoRA weights .* but the yaml has no"):
        check_checkpoint(str(folder), tiny_model_config(), lora=False)


def test_run_inputs_keep_prompts_apart(tmp_path):
    prompts = touch(str(tmp_path / "prompts.txt"), "first\n\n  \nsecond\n")
    config = read_yaml_config(TINY_YAML)
    apply_overrides(config, run_args(run_mode="predict", device_target="CPU"))
    inputs = check_run_inputs(config, "predict", [prompts])
    assert inputs.prompts == ["first", "second"] and inputs.load_checkpoint == "" and inputs.resume_checkpoint is None
    with pytest.raises(PreflightError, match="--predict_data is required"):
        check_run_inputs(config, "predict", [])


# ----- names -------------------------------------------------------------------------------------------
def test_names_and_ffn_width():
    assert canonical_lora_name("model.layers.0.attention.wq.tk_delta_lora_a") == \
        "model.layers.0.attention.wq.mindpet_delta_lora_a"
    assert [classify_ms_name(n) for n in ("lm_head.weight", "accu_grad.lm_head.weight", "lm_head.inv_norm",
                                          "model.layers.0.attention.wq.mindpet_delta_lora_b")] == \
        ["weight", "train_state", "runtime", "lora"]
    assert ffn_width({"hidden_size": 4096, "multiple_of": 256}) == 11008          # Baichuan2-7B
    assert ffn_width({"hidden_size": 5120, "intermediate_size": 13696}) == 13696  # Baichuan2-13B
    assert ffn_width({"hidden_size": 64, "multiple_of": 16}) == 176
    assert ffn_width({}) is None


# ----- the one CLI error line --------------------------------------------------------------------------
def test_cli_errors_are_one_line(capsys, tmp_path):
    def bad():
        raise UserInputError("--x is wrong\n(second line dropped)")

    assert run_main(bad, "tool.py") == 2
    assert capsys.readouterr().err == "tool.py: error: --x is wrong\n"
    assert run_main(lambda: None, "tool.py") == 0
    assert fail("tool.py", FileNotFoundError("config file not found: a.yaml")) == 2
    assert capsys.readouterr().err == "tool.py: error: config file not found: a.yaml\n"
    empty = touch(str(tmp_path / "empty.txt"), "\n")
    with pytest.raises(UserInputError, match="--inputs file .* has no prompt"):
        read_prompts([empty], "--inputs")
    assert read_prompts(["a", "b"], "--inputs") == ["a", "b"]


def test_device_answers():
    from baichuan2_device import check_device_available, parallel_inference_supported
    check_device_available("CPU")
    check_device_available(None)
    assert not parallel_inference_supported("CPU")
    assert parallel_inference_supported("Ascend") and parallel_inference_supported(None)
