"""HF <-> MindSpore weight conversion (research/baichuan2/convert_weight.py, convert_reversed.py).

Everything runs in-process except one subprocess test of the documented command path.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import mindspore as ms
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import convert_reversed
import convert_weight
from baichuan2_weights import (convert_hf_to_ms, convert_ms_to_hf, expected_ms_shapes,
                               hf_to_ms_name, hf_to_ms_names, hf_to_ms_state_dict,
                               ms_to_hf_name, ms_to_hf_state_dict)
from hf_fixtures import random_hf_state_dict, tiny_hf_config, write_hf_checkpoint

ROOT = Path(__file__).resolve().parents[1]

# The original converter's name mapping (MindFormers r1.0 research/baichuan/convert_weight.py), written out by
# hand for 2 layers.
FACTS_MS_NAMES = ["model.tok_embeddings.embedding_weight", "model.norm_out.weight",
                  "lm_head.weight"]
for _i in range(2):
    FACTS_MS_NAMES += [f"model.layers.{_i}.{s}" for s in (
        "attention.wq.weight", "attention.wk.weight", "attention.wv.weight", "attention.wo.weight",
        "feed_forward.w1.weight", "feed_forward.w2.weight", "feed_forward.w3.weight",
        "attention_norm.weight", "ffn_norm.weight")]
FACTS_PAIRS = {  # HF -> MS, besides W_pack
    "model.embed_tokens.weight": "model.tok_embeddings.embedding_weight",
    "model.layers.1.self_attn.o_proj.weight": "model.layers.1.attention.wo.weight",
    "model.layers.1.mlp.gate_proj.weight": "model.layers.1.feed_forward.w1.weight",
    "model.layers.1.mlp.down_proj.weight": "model.layers.1.feed_forward.w2.weight",
    "model.layers.1.mlp.up_proj.weight": "model.layers.1.feed_forward.w3.weight",
    "model.layers.1.input_layernorm.weight": "model.layers.1.attention_norm.weight",
    "model.layers.1.post_attention_layernorm.weight": "model.layers.1.ffn_norm.weight",
    "model.norm.weight": "model.norm_out.weight",
    "lm_head.weight": "lm_head.weight",
}


def _ms_to_torch(param):
    arr = param.asnumpy()
    if arr.dtype.name == "bfloat16":
        return torch.from_numpy(arr.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(arr)


def _expected_ms(sd, cfg, dtype):
    return {k: v.to(dtype) for k, v in hf_to_ms_state_dict(sd, cfg).items()}


def _assert_same(actual, expected):
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        assert actual[name].dtype == value.dtype, name
        assert torch.equal(actual[name], value), name


def _cli(capsys, argv, reverse=False):
    rc = convert_reversed.main(argv) if reverse else convert_weight.main(argv)
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_refused(rc, err, out_dir, *fragments):
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    prog, _, message = lines[0].partition(": error: ")
    assert prog in ("convert_weight.py", "convert_reversed.py") and message[:1] not in "'\"", err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    assert not out_dir.exists() or not any(out_dir.iterdir()), list(out_dir.iterdir())


@pytest.fixture
def tiny7b():
    cfg = tiny_hf_config("7b")
    return cfg, random_hf_state_dict(cfg)


# ------------------------------------------------------------------------------------------
def test_ms_names_and_split_follow_facts_sheet(tiny7b):
    cfg, sd = tiny7b
    ms_sd = hf_to_ms_state_dict(sd, cfg)
    assert sorted(ms_sd) == sorted(FACTS_MS_NAMES)
    assert sorted(expected_ms_shapes(cfg)) == sorted(FACTS_MS_NAMES)
    for hf_name, ms_name in FACTS_PAIRS.items():
        assert hf_to_ms_name(hf_name) == ms_name and ms_to_hf_name(ms_name) == hf_name
        assert torch.equal(ms_sd[ms_name], sd[hf_name])
    h = cfg["hidden_size"]
    w_pack = sd["model.layers.1.self_attn.W_pack.weight"]
    qkv = hf_to_ms_names("model.layers.1.self_attn.W_pack.weight")
    assert qkv == [f"model.layers.1.attention.{w}.weight" for w in ("wq", "wk", "wv")]
    for k, name in enumerate(qkv):
        assert tuple(ms_sd[name].shape) == (h, h)
        assert torch.equal(ms_sd[name], w_pack[k * h:(k + 1) * h])
        assert ms_to_hf_name(name) == "model.layers.1.self_attn.W_pack.weight"
    back = ms_to_hf_state_dict(ms_sd, cfg)
    assert list(back) == list(sd)
    _assert_same(back, sd)


@pytest.mark.parametrize("kind", ["7b", "13b"])
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("shards", [1, 2])
def test_roundtrip_bit_exact_fp32(tmp_path, kind, fmt, shards):
    cfg = tiny_hf_config(kind)
    sd = random_hf_state_dict(cfg, seed=shards)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt=fmt, num_shards=shards)
    logs = []
    ms_path = tmp_path / "ms.ckpt"
    convert_hf_to_ms(str(hf_dir), str(ms_path), dtype="fp32", log=logs.append)
    assert any(("Baichuan2-7B (RoPE)" if kind == "7b" else "Baichuan2-13B (ALiBi)") in m
               for m in logs)
    assert sum(m.startswith("[shard ") for m in logs) == shards

    loaded = ms.load_checkpoint(str(ms_path))
    _assert_same({k: _ms_to_torch(v) for k, v in loaded.items()},
                 _expected_ms(sd, cfg, torch.float32))

    out = tmp_path / ("back.bin" if fmt == "bin" else "back.safetensors")
    convert_ms_to_hf(str(ms_path), str(out), log=logs.append)
    back = torch.load(out, weights_only=True) if fmt == "bin" else load_file(str(out))
    _assert_same(back, sd)


def test_default_fp16_progress_and_reverse_cli(tmp_path, capsys):
    cfg = tiny_hf_config("13b")
    sd = random_hf_state_dict(cfg)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="safetensors", num_shards=2)
    ms_path = tmp_path / "out" / "b2.ckpt"
    rc, out, err = _cli(capsys, ["--torch_ckpt_dir", str(hf_dir),
                                 "--mindspore_ckpt_path", str(ms_path)])
    assert rc == 0, err
    assert "detected Baichuan2-13B (ALiBi)" in out
    assert "[shard 1/2] model-00001-of-00002.safetensors" in out and "[shard 2/2]" in out
    loaded = ms.load_checkpoint(str(ms_path))
    assert {str(v.dtype) for v in loaded.values()} == {"Float16"}
    _assert_same({k: _ms_to_torch(v) for k, v in loaded.items()},
                 _expected_ms(sd, cfg, torch.float16))

    # reverse, original CLI; dtype kept (fp16); config.json written beside the output
    hf_out = tmp_path / "hf_out" / "pytorch_model.bin"
    rc, out, err = _cli(capsys, ["--mindspore_ckpt_path", str(ms_path), "--torch_ckpt_path",
                                 str(hf_out), "--config_json", str(hf_dir / "config.json")],
                        reverse=True)
    assert rc == 0, err
    _assert_same(torch.load(hf_out, weights_only=True), {k: v.half() for k, v in sd.items()})
    assert (hf_out.parent / "config.json").read_text() == (hf_dir / "config.json").read_text()


def test_bf16_and_model_override(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="bin")
    ms_path = tmp_path / "b2.ckpt"
    rc, out, err = _cli(capsys, ["--torch_ckpt_path", str(hf_dir / "pytorch_model.bin"),
                                 "--mindspore_ckpt_path", str(ms_path), "--dtype", "bf16",
                                 "--model", "13b"])
    assert rc == 0, err
    assert "--model 13b: overriding detected Baichuan2-7B (RoPE)" in out
    loaded = ms.load_checkpoint(str(ms_path))
    _assert_same({k: _ms_to_torch(v) for k, v in loaded.items()},
                 _expected_ms(sd, cfg, torch.bfloat16))
    out_path = tmp_path / "back.safetensors"
    rc, out, err = _cli(capsys, ["--reverse", "--mindspore_ckpt_path", str(ms_path),
                                 "--torch_ckpt_path", str(out_path), "--dtype", "fp32"])
    assert rc == 0, err
    _assert_same(load_file(str(out_path)), {k: v.bfloat16().float() for k, v in sd.items()})


def test_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    """Each MindSpore write holds tensors of one shard only, never the whole model."""
    cfg = tiny_hf_config("13b", num_hidden_layers=4)
    sd = random_hf_state_dict(cfg)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="safetensors", num_shards=3)
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())["weight_map"]
    shard_of = {}
    for hf_name, file in index.items():
        for ms_name in hf_to_ms_names(hf_name):
            shard_of[ms_name] = file
    calls = []
    real_save = ms.save_checkpoint

    def spy(items, path, *args, **kwargs):
        calls.append(([i["name"] for i in items], sum(i["data"].nbytes for i in items)))
        return real_save(items, path, *args, **kwargs)

    monkeypatch.setattr(ms, "save_checkpoint", spy)
    convert_hf_to_ms(str(hf_dir), str(tmp_path / "a.ckpt"), log=lambda m: None)
    assert len(calls) == 3
    assert all(len({shard_of[n] for n in names}) == 1 for names, _ in calls)
    total = sum(v.numel() * 2 for v in sd.values())
    assert max(size for _, size in calls) < 0.5 * total

    calls.clear()  # with a small budget a shard is written in several pieces
    convert_hf_to_ms(str(hf_dir), str(tmp_path / "b.ckpt"), log=lambda m: None,
                     flush_bytes=200_000)
    assert len(calls) > 3 and max(size for _, size in calls) < 200_000 + 4000 * 80 * 2
    loaded = ms.load_checkpoint(str(tmp_path / "b.ckpt"))
    _assert_same({k: _ms_to_torch(v) for k, v in loaded.items()},
                 _expected_ms(sd, cfg, torch.float16))


def test_documented_command_path(tmp_path, tiny7b):
    """The original docs: research/baichuan/convert_weight.py with any bin file of the HF dir."""
    cfg, sd = tiny7b
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="bin", num_shards=2)
    work = tmp_path / "work"
    work.mkdir()
    env = dict(os.environ, GLOG_v="3")
    proc = subprocess.run(
        [sys.executable, str(ROOT / "research" / "baichuan" / "convert_weight.py"),
         "--torch_ckpt_path", str(hf_dir / "pytorch_model-00001-of-00002.bin"),
         "--mindspore_ckpt_path", "rel.ckpt"],
        cwd=work, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "[shard 1/2]" in proc.stdout and "[shard 2/2]" in proc.stdout
    loaded = ms.load_checkpoint(str(work / "rel.ckpt"))  # relative to the current directory
    _assert_same({k: _ms_to_torch(v) for k, v in loaded.items()},
                 _expected_ms(sd, cfg, torch.float16))


# ------------------------------------------------------------------------------------------
# Refusals: exit 2, one line on stderr, nothing written.
def _refuse(capsys, tmp_path, hf_dir, *fragments, extra=()):
    out_dir = tmp_path / "out"
    rc, _, err = _cli(capsys, ["--torch_ckpt_path", str(hf_dir),
                               "--mindspore_ckpt_path", str(out_dir / "x.ckpt"), *extra])
    _assert_refused(rc, err, out_dir, *fragments)
    return err


def test_refuses_baichuan1_vocab(tmp_path, capsys):
    cfg = tiny_hf_config("7b", vocab_size=64000, hidden_size=16, intermediate_size=32,
                         num_attention_heads=2, num_hidden_layers=1)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", random_hf_state_dict(cfg), cfg)
    _refuse(capsys, tmp_path, hf_dir, "vocab_size 64000", "Baichuan-1", "config.json")


def test_refuses_missing_tensor(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    del sd["model.layers.1.mlp.up_proj.weight"]
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="safetensors", num_shards=2)
    _refuse(capsys, tmp_path, hf_dir, "missing tensors (1): model.layers.1.mlp.up_proj.weight")


def test_refuses_unexpected_tensor(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 64)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="bin", num_shards=2)
    _refuse(capsys, tmp_path, hf_dir,
            "unexpected tensors (1): model.layers.0.self_attn.q_proj.weight")


def test_refuses_shape_mismatch(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(175, 64)
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="bin", num_shards=2)
    _refuse(capsys, tmp_path, hf_dir, "shape mismatch: model.layers.1.mlp.up_proj.weight is "
            "[175, 64] in pytorch_model-00002-of-00002.bin, config expects [176, 64]")


@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
def test_refuses_unreadable_shard(tmp_path, capsys, tiny7b, fmt):
    cfg, sd = tiny7b
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt=fmt, num_shards=2)
    shard = sorted(hf_dir.glob("*-00002-of-00002.*"))[0]
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated download
    _refuse(capsys, tmp_path, hf_dir, f"cannot read shard {shard}")


def test_refuses_shard_missing_from_index(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg, fmt="bin", num_shards=2)
    (hf_dir / "pytorch_model-00002-of-00002.bin").unlink()
    _refuse(capsys, tmp_path, hf_dir, "pytorch_model-00002-of-00002.bin", "does not exist")


def test_refuses_existing_output_unless_overwrite(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    hf_dir = write_hf_checkpoint(tmp_path / "hf", sd, cfg)
    target = tmp_path / "x.ckpt"
    target.write_bytes(b"keep me")
    argv = ["--torch_ckpt_path", str(hf_dir), "--mindspore_ckpt_path", str(target)]
    rc, _, err = _cli(capsys, argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert f"output {target} exists; pass --overwrite" in err
    assert target.read_bytes() == b"keep me"
    rc, _, err = _cli(capsys, argv + ["--overwrite"])
    assert rc == 0, err
    assert len(ms.load_checkpoint(str(target))) == len(FACTS_MS_NAMES)
    assert sorted(os.listdir(tmp_path)) == ["hf", "x.ckpt"]  # no temp files left


def test_reverse_refuses_lora_ignores_runtime_and_lists_missing(tmp_path, capsys, tiny7b):
    cfg, sd = tiny7b
    ms_sd = hf_to_ms_state_dict(sd, cfg)
    items = [{"name": k, "data": ms.Tensor(v.contiguous().numpy())} for k, v in ms_sd.items()]
    runtime = [{"name": n, "data": ms.Tensor(np.zeros((1, 4, 8, 16), np.float16))} for n in (
        "model.layers.0.attention.kvcache_mgr.key_past", "model.layers.0.attention.value_past")]
    runtime.append({"name": "lm_head.inv_norm", "data": ms.Tensor(np.ones(4000, np.float32))})
    optimizer = [{"name": "adam_m.lm_head.weight",
                  "data": ms.Tensor(np.zeros((4000, 64), np.float32))},
                 {"name": "global_step", "data": ms.Tensor(np.array([7], np.int32))}]
    lora = [{"name": "model.layers.0.attention.wq.mindpet_delta_lora_a",
             "data": ms.Tensor(np.zeros((8, 64), np.float32))}]
    ms_path = tmp_path / "lora.ckpt"
    ms.save_checkpoint(items + runtime + optimizer + lora, str(ms_path))
    out_dir = tmp_path / "out"
    argv = ["--mindspore_ckpt_path", str(ms_path), "--torch_ckpt_path", str(out_dir / "t.bin")]

    rc, _, err = _cli(capsys, argv, reverse=True)
    _assert_refused(rc, err, out_dir, "1 LoRA parameters",
                    "model.layers.0.attention.wq.mindpet_delta_lora_a", "merge_lora.py",
                    "--drop_lora")

    rc, out, err = _cli(capsys, argv + ["--drop_lora"], reverse=True)
    assert rc == 0, err
    assert "ignoring 3 runtime-only entries" in out
    assert "ignoring 2 optimizer/training-state entries" in out
    _assert_same(torch.load(out_dir / "t.bin", weights_only=True), sd)

    partial = tmp_path / "partial.ckpt"
    ms.save_checkpoint([i for i in items if i["name"] != "model.layers.1.attention.wk.weight"],
                       str(partial))
    out_dir2 = tmp_path / "out2"
    rc, _, err = _cli(capsys, ["--mindspore_ckpt_path", str(partial), "--torch_ckpt_path",
                               str(out_dir2 / "t.bin")], reverse=True)
    _assert_refused(rc, err, out_dir2, "missing tensors (1): model.layers.1.attention.wk.weight")
