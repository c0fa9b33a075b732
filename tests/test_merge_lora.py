"""merge_lora.py: the math, the command line, and logits of merged weights == base + LoRA network."""
import os

import numpy as np
import pytest

import mindspore as ms

import merge_lora
from merge_lora import MergeError, merge_lora_weights
from run_helpers import MERGE_SCRIPT, load_params, network_logits, run_cli, write_config
from hf_fixtures import tiny_hf_config
from baichuan2_weights import expected_ms_shapes

TARGETS = ("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")


def _random_model(kind, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    params = {}
    for name, shape in expected_ms_shapes(tiny_hf_config(kind)).items():
        if name.endswith("norm.weight") or name.endswith("norm_out.weight"):
            params[name] = (1 + 0.1 * rng.standard_normal(shape)).astype(dtype)
        else:
            params[name] = (0.05 * rng.standard_normal(shape)).astype(dtype)
    return params


def _random_lora(base, rank, seed=1, targets=TARGETS, dtype=np.float32):
    rng = np.random.default_rng(seed)
    lora = {}
    for name, value in base.items():
        if name.endswith(targets):
            prefix = name[: -len("weight")]
            lora[prefix + "mindpet_delta_lora_a"] = (0.1 * rng.standard_normal((rank, value.shape[1]))).astype(dtype)
            lora[prefix + "mindpet_delta_lora_b"] = (0.1 * rng.standard_normal((value.shape[0], rank))).astype(dtype)
    return lora


def _save(params, path):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], os.fspath(path))
    return os.fspath(path)


# ----- the math ------------------------------------------------------------------------------------
def test_merge_formula_and_dropped_entries():
    base = _random_model("7b")
    lora = _random_lora(base, rank=4)
    extra = {"adam_m.model.layers.0.attention.wq.mindpet_delta_lora_a": np.ones((4, 64), np.float32),
             "adam_m.model.layers.0.attention.wq.weight": np.ones((64, 64), np.float32),
             "global_step": np.array([7], np.int32), "step_num": np.array(7), "global_batch_size": np.array(4),
             "model.layers.0.attention.kvcache_mgr.key_past": np.zeros((1, 4, 8, 16), np.float32)}
    merged = merge_lora_weights({**base, **lora, **extra}, lora_alpha=32, lora_rank=4)
    assert set(merged) == set(base)
    for name, weight in base.items():
        prefix = name[: -len("weight")]
        if name.endswith(TARGETS):
            a = lora[prefix + "mindpet_delta_lora_a"].astype(np.float64)
            b = lora[prefix + "mindpet_delta_lora_b"].astype(np.float64)
            # merged in float64 and cast once to float32: |error| <= 2^-24 |W'| = 6e-8 relative
            np.testing.assert_allclose(merged[name], weight + 8.0 * (b @ a), rtol=1e-6, atol=1e-7)
        else:
            np.testing.assert_array_equal(merged[name], weight)
        assert merged[name].dtype == weight.dtype


def test_merge_keeps_fp16_and_reads_old_tk_delta_names():
    base = _random_model("13b", dtype=np.float16)
    lora = _random_lora(base, rank=1, dtype=np.float16)
    old = {k.replace("mindpet_delta", "tk_delta"): v for k, v in lora.items()}
    merged = merge_lora_weights({**base, **old}, lora_alpha=32)
    name = "model.layers.1.attention.wv.weight"
    a = lora["model.layers.1.attention.wv.mindpet_delta_lora_a"].astype(np.float64)
    b = lora["model.layers.1.attention.wv.mindpet_delta_lora_b"].astype(np.float64)
    assert merged[name].dtype == np.float16
    # one fp16 rounding of the float64 sum: <= 2^-11 = 4.9e-4 relative, |W'| < 1
    np.testing.assert_allclose(merged[name].astype(np.float64), base[name].astype(np.float64) + 32 * b @ a,
                               rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("case, message", [
    ("no_lora", "no LoRA parameters"),
    ("unpaired", "has no"),
    ("no_base", "is missing"),
    ("rank", "lora_rank is 3"),
    ("shape", "shapes do not fit"),
    ("alpha", "lora_alpha is needed"),
])
def test_merge_errors(case, message):
    base = _random_model("7b")
    lora = _random_lora(base, rank=2)
    alpha, rank = 16, None
    if case == "no_lora":
        lora = {}
    elif case == "unpaired":
        del lora["model.layers.0.attention.wq.mindpet_delta_lora_b"]
    elif case == "no_base":
        del base["model.layers.1.attention.wk.weight"]
    elif case == "rank":
        rank = 3
    elif case == "shape":
        lora["model.layers.0.attention.wq.mindpet_delta_lora_a"] = np.zeros((2, 63), np.float32)
    elif case == "alpha":
        alpha = None
    with pytest.raises(MergeError, match=message):
        merge_lora_weights({**base, **lora}, lora_alpha=alpha, lora_rank=rank)


# ----- the command line ----------------------------------------------------------------------------
def test_cli_merges_and_refuses_to_overwrite(tmp_path, capsys):
    base = _random_model("7b")
    lora = _random_lora(base, rank=2)
    base_file = _save(base, tmp_path / "base.ckpt")
    lora_file = _save(lora, tmp_path / "lora.ckpt")
    cfg = write_config(tmp_path / "lora.yaml", "7b", pet_config={"pet_type": "lora", "lora_rank": 2,
                                                                "lora_alpha": 16, "target_modules": ".*wq|.*wk|.*wv"})
    out = tmp_path / "merged.ckpt"
    res = run_cli(["--base_ckpt", base_file, "--lora_ckpt", lora_file, "--output", out, "--config", cfg],
                  script=MERGE_SCRIPT, cwd=tmp_path)
    assert res.returncode == 0, res.tail()
    expected = merge_lora_weights({**base, **lora}, lora_alpha=16)
    got = load_params(out)
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value)

    # one folder holding both (--lora_ckpt alone), and the same result
    both = tmp_path / "both"
    both.mkdir()
    os.symlink(base_file, both / "base.ckpt")
    os.symlink(lora_file, both / "lora.ckpt")
    assert merge_lora.main(["--lora_ckpt", os.fspath(both), "--output", os.fspath(tmp_path / "m2.ckpt"),
                            "--lora_alpha", "16", "--lora_rank", "2"]) == 0
    got2 = load_params(tmp_path / "m2.ckpt")
    for name, value in expected.items():
        np.testing.assert_array_equal(got2[name], value)
    capsys.readouterr()

    before = os.path.getmtime(out)
    for argv, message in [
        (["--base_ckpt", base_file, "--lora_ckpt", lora_file, "--output", os.fspath(out), "--lora_alpha", "16"],
         "exists"),
        (["--base_ckpt", base_file, "--lora_ckpt", lora_file, "--output", os.fspath(tmp_path / "x.ckpt")],
         "lora_alpha is needed"),
        (["--lora_ckpt", lora_file, "--output", os.fspath(tmp_path / "x.ckpt"), "--lora_alpha", "16"],
         "pass the base checkpoint"),
        (["--base_ckpt", base_file, "--lora_ckpt", os.fspath(tmp_path / "nope.ckpt"),
          "--output", os.fspath(tmp_path / "x.ckpt"), "--lora_alpha", "16"], "not found"),
    ]:
        assert merge_lora.main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("merge_lora.py: error:") and message in err[0], err
    assert os.path.getmtime(out) == before
    assert not os.path.exists(tmp_path / "x.ckpt")


# ----- merged weights behave as base + LoRA --------------------------------------------------------
@pytest.mark.parametrize("kind", ["7b", "13b"])
def test_merged_logits_equal_base_plus_lora(kind, tmp_path):
    base = _random_model(kind, seed=3)
    targets = TARGETS + ("attention.wo.weight", "feed_forward.w2.weight")
    lora = _random_lora(base, rank=4, seed=4, targets=targets)
    pet = {"pet_type": "lora", "lora_rank": 4, "lora_alpha": 8, "lora_dropout": 0.0,
           "target_modules": ".*wq|.*wk|.*wv|.*wo|.*w2"}
    cfg = write_config(tmp_path / "plain.yaml", kind, seq_length=16)
    ids = np.random.default_rng(5).integers(3, 4000, size=(2, 16))
    with_lora = network_logits(cfg, {**base, **lora}, ids, lora=pet)
    merged = network_logits(cfg, merge_lora_weights({**base, **lora}, lora_alpha=8), ids)
    plain = network_logits(cfg, base, ids)
    assert np.abs(with_lora - plain).max() > 1e-3
    # two fp32 evaluations of one function (W' rounded once vs W x + s*B(A x)): contractions of K <= 216 terms
    # round differently, ~sqrt(K)*2^-24 = 9e-7 relative each; measured max 2.4e-6 (7b), 3.1e-6 (13b) at |z| <= 4.6
    np.testing.assert_allclose(merged, with_lora, rtol=1e-5, atol=1e-5)
