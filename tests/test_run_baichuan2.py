"""run_baichuan2.py end to end on CPU with the tiny yamls: finetune, LoRA, resume, eval, bad input.

Every run is a real ``run_baichuan2.py`` process (MindSpore's context is process-global) on
MindRecords made by belle_preprocess.py from the bundled Belle sample, seq_length 32, 40 records
(10 batches of 4 per epoch). Graph mode (the yamls' ``context.mode: 0``).

Test configs: the training yaml keeps ``shuffle: True`` (MindFormers seeds the shuffle, so the
order is reproducible and resume must skip exactly the batches already seen); the LoRA run uses
``shuffle: False`` (its first loss is compared with a reference on the first four records) and
``lora_dropout: 0`` (so that loss is deterministic).
"""
import os

import numpy as np
import pytest
import torch

import mindspore as ms

from run_helpers import (make_dataset, write_config, run_baichuan2, run_cli, parse_steps, parse_losses,
                         parse_perplexity, last_checkpoint, load_params, read_records, network_logits, MERGE_SCRIPT)
from hf_fixtures import tiny_hf_config
from reference.torch_baichuan2 import TorchBaichuan2
from baichuan2_weights import ms_to_hf_state_dict, expected_ms_shapes

SEQ = 32
RECORDS = 40
EPOCHS = 3
STEPS = EPOCHS * RECORDS // 4          # 30 optimizer steps
HALF = 15                               # stop the first leg of the resume test mid-epoch (epoch 2, step 5)
LORA = {"pet_type": "lora", "lora_rank": 2, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ".*wq|.*wk|.*wv"}
REF_CONFIG = {"7b": dict(hidden_size=64, num_attention_heads=4, num_hidden_layers=2, rms_norm_eps=1e-6),
              "13b": dict(hidden_size=80, num_attention_heads=5, num_hidden_layers=2, rms_norm_eps=1e-6)}
POSITION = {"7b": "rope", "13b": "alibi"}


# ----- fixtures: one run each, shared by the tests --------------------------------------------------
@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("run_baichuan2")


@pytest.fixture(scope="module")
def data(work):
    return make_dataset(work / "data", seq_length=SEQ, num_records=RECORDS)


def _finetune(work, data, kind, name, **config):
    cfg = write_config(work / f"{name}.yaml", kind, seq_length=SEQ, epochs=EPOCHS, **config)
    out = work / name
    res = run_baichuan2(["--config", cfg, "--run_mode", "finetune", "--train_data", data, "--output_dir", out],
                        cwd=work)
    assert res.returncode == 0, res.tail()
    return res, out, cfg


@pytest.fixture(scope="module")
def full7b(work, data):
    return _finetune(work, data, "7b", "full7b")


@pytest.fixture(scope="module")
def run13b(work, data):
    return _finetune(work, data, "13b", "full13b")


def _weights_only(params):
    return {k: v for k, v in params.items() if k.startswith(("model.", "lm_head."))}


def _reference(params, kind):
    """Independent PyTorch model (float64) on the network weights of a MindSpore checkpoint dict.

    The whole training checkpoint goes through the MS -> HF conversion (optimizer and step entries
    must be recognised and skipped).
    """
    state = ms_to_hf_state_dict(params)
    return TorchBaichuan2(state, REF_CONFIG[kind], POSITION[kind])


def _reference_perplexity(ref, ids, labels):
    """exp(mean NLL) of tokens[1:] where the token is not pad and its label is not -100 (TokenPerplexityMetric)."""
    with torch.no_grad():
        logp = torch.log_softmax(ref.logits(torch.as_tensor(ids, dtype=torch.long)), dim=-1)
    targets = torch.as_tensor(ids[:, 1:], dtype=torch.long)
    keep = (targets != 0) & (torch.as_tensor(labels[:, 1:]) != -100)
    nll = -logp[:, :-1].gather(-1, targets[..., None])[..., 0]
    mean = float((nll * keep).sum() / keep.sum())
    return mean, int(keep.sum())


def _save(params, path):
    ms.save_checkpoint([{"name": k, "data": ms.Tensor(v)} for k, v in params.items()], os.fspath(path))
    return os.fspath(path)


# ----- full finetune -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["7b", "13b"])
def test_finetune_loss_falls(kind, request):
    res, out, _ = request.getfixturevalue("full7b" if kind == "7b" else "run13b")
    assert "MindSpore context: graph mode on CPU" in res.stdout
    losses = parse_losses(res.output)
    assert len(losses) == STEPS, res.tail()
    assert all(np.isfinite(losses))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < first - 1.0, f"loss did not fall enough: first 5 {first:.3f}, last 5 {last:.3f}"
    params = load_params(last_checkpoint(out))
    assert int(params["global_step"][0]) == STEPS and int(params["step_num"]) == STEPS


# ----- resume --------------------------------------------------------------------------------------
def test_resume_equals_straight_run(work, data, full7b):
    straight_res, straight_out, cfg = full7b
    out = work / "resumed7b"
    first_cfg = write_config(work / "first_leg.yaml", "7b", seq_length=SEQ, epochs=EPOCHS, stop_step=HALF)
    first = run_baichuan2(["--config", first_cfg, "--run_mode", "finetune", "--train_data", data,
                           "--output_dir", out], cwd=work)
    assert first.returncode == 0, first.tail()
    assert len(parse_losses(first.output)) == HALF, first.tail()
    # no --load_checkpoint: --resume continues from output_dir/checkpoint
    second = run_baichuan2(["--config", cfg, "--run_mode", "finetune", "--train_data", data, "--output_dir", out,
                            "--resume", "True"], cwd=work)
    assert second.returncode == 0, second.tail()

    straight = parse_steps(straight_res.output)
    resumed = parse_steps(first.output) + parse_steps(second.output)
    assert [s[:2] for s in resumed] == [s[:2] for s in straight], "epoch/step numbering differs"
    # A replay (same kernels, batch and data order), so bitwise equal: the slack is only the 6 printed decimals.
    np.testing.assert_allclose([s[2] for s in resumed], [s[2] for s in straight], rtol=1e-5, atol=1e-5)

    expected = load_params(last_checkpoint(straight_out))
    got = load_params(last_checkpoint(out))
    assert int(got["global_step"][0]) == STEPS and int(got["step_num"]) == STEPS
    weights_and_moments = [k for k in expected if k.startswith(("model.", "lm_head.", "adam_m.", "adam_v."))]
    assert len(weights_and_moments) > 3 * 20
    for name in weights_and_moments:
        # Replay: bitwise equal (max diff 0.0 measured). Not a rounding bound: if kernels became nondeterministic,
        # Adam would move rounding-level elements by O(lr) and this would need test_data_parallel.py's bounds.
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)


# ----- LoRA ----------------------------------------------------------------------------------------
def _lora_init(base, rank, seed=0):
    """Random, non-zero LoRA A/B for wq/wk/wv of every layer (what a previous LoRA run would have saved)."""
    rng = np.random.default_rng(seed)
    lora = {}
    for name, value in base.items():
        if name.endswith(("attention.wq.weight", "attention.wk.weight", "attention.wv.weight")):
            prefix = name[: -len("weight")]
            lora[prefix + "mindpet_delta_lora_a"] = (rng.standard_normal((rank, value.shape[1])) * 0.05).astype(np.float32)
            lora[prefix + "mindpet_delta_lora_b"] = (rng.standard_normal((value.shape[0], rank)) * 0.05).astype(np.float32)
    return lora


def _merge_by_hand(base, lora, alpha):
    """W + (alpha / r) * B @ A, written out independently of merge_lora.py."""
    merged = {k: v.astype(np.float64) for k, v in base.items()}
    for name, a in lora.items():
        if name.endswith("mindpet_delta_lora_a"):
            prefix = name[: -len("mindpet_delta_lora_a")]
            b = lora[prefix + "mindpet_delta_lora_b"].astype(np.float64)
            merged[prefix + "weight"] += (alpha / a.shape[0]) * b @ a.astype(np.float64)
    return merged


@pytest.fixture(scope="module")
def lora_run(work, data, full7b):
    """LoRA finetune (10 steps) from a folder holding a base checkpoint and a LoRA checkpoint."""
    base = _weights_only(load_params(last_checkpoint(full7b[1])))
    lora0 = _lora_init(base, LORA["lora_rank"])
    folder = work / "base_plus_lora0"
    folder.mkdir()
    _save(base, folder / "base.ckpt")
    _save(lora0, folder / "lora.ckpt")
    cfg = write_config(work / "lora.yaml", "7b", seq_length=SEQ, epochs=1, shuffle=False, pet_config=LORA,
                       save_trainable_params=True)
    out = work / "lora"
    res = run_baichuan2(["--config", cfg, "--run_mode", "finetune", "--train_data", data, "--output_dir", out,
                         "--load_checkpoint", folder], cwd=work)
    assert res.returncode == 0, res.tail()
    return dict(res=res, out=out, cfg=cfg, base=base, lora0=lora0, base_file=os.fspath(folder / "base.ckpt"))


def test_lora_finetune_from_folder_changes_only_lora(data, lora_run):
    res, base, lora0 = lora_run["res"], lora_run["base"], lora_run["lora0"]
    losses = parse_losses(res.output)
    assert len(losses) == RECORDS // 4, res.tail()
    # Step 1 is computed before any update: it must be the loss of base + the LoRA of the folder.
    ids, labels = read_records(data)
    ref = TorchBaichuan2(ms_to_hf_state_dict(_merge_by_hand(base, lora0, LORA["lora_alpha"])), REF_CONFIG["7b"], "rope")
    expected_first = float(ref.loss(ids[:4], labels[:4]))
    assert losses[0] == pytest.approx(expected_first, rel=1e-4), "the folder's base + LoRA weights were not loaded"

    full = load_params(last_checkpoint(lora_run["out"]))
    for name, value in base.items():
        np.testing.assert_array_equal(full[name], value, err_msg=f"frozen weight {name} changed")
    for name, value in lora0.items():
        assert np.abs(full[name] - value).max() > 1e-6, f"LoRA parameter {name} did not train"
    moments = {k.split(".", 1)[1] for k in full if k.startswith("adam_m.")}
    assert moments == set(lora0), "the optimizer should hold the LoRA parameters only"

    trainable = load_params(last_checkpoint(lora_run["out"], kind="checkpoint_trainable"))
    assert set(trainable) == set(lora0), "save_trainable_params should save exactly the LoRA weights"
    for name in trainable:
        np.testing.assert_array_equal(trainable[name], full[name])


@pytest.fixture(scope="module")
def merged_lora(work, lora_run):
    """merge_lora.py on the base checkpoint + the LoRA-only (save_trainable_params) checkpoint of the LoRA run."""
    trainable = last_checkpoint(lora_run["out"], kind="checkpoint_trainable")
    merged_file = work / "merged.ckpt"
    res = run_cli(["--base_ckpt", lora_run["base_file"], "--lora_ckpt", trainable, "--output", merged_file,
                   "--config", lora_run["cfg"]], script=MERGE_SCRIPT, cwd=work)
    assert res.returncode == 0, res.tail()
    return os.fspath(merged_file)


@pytest.fixture(scope="module")
def trained_lora_folder(work, lora_run):
    """One folder holding the base checkpoint and the trained LoRA-only checkpoint."""
    folder = work / "base_plus_trained_lora"
    folder.mkdir()
    os.symlink(lora_run["base_file"], folder / "base.ckpt")
    os.symlink(last_checkpoint(lora_run["out"], kind="checkpoint_trainable"), folder / "lora.ckpt")
    return folder


def test_merged_lora_gives_the_same_logits(work, data, lora_run, merged_lora):
    trainable = last_checkpoint(lora_run["out"], kind="checkpoint_trainable")
    merged = load_params(merged_lora)
    assert set(merged) == set(lora_run["base"]), "the merged checkpoint must hold the plain network weights"

    ids = read_records(data)[0][:4, :SEQ]
    plain_cfg = write_config(work / "plain_for_logits.yaml", "7b", seq_length=SEQ)
    with_lora = network_logits(plain_cfg, {**lora_run["base"], **load_params(trainable)}, ids, lora=LORA)
    from_merged = network_logits(plain_cfg, merged, ids)
    base_only = network_logits(plain_cfg, lora_run["base"], ids)
    assert np.abs(with_lora - base_only).max() > 1e-3, "the trained LoRA should change the logits"
    # Two fp32 evaluations of one function (W' rounded once vs W x + s*B(A x)): contractions of K <= 176 terms
    # round differently, ~sqrt(K)*2^-24 = 8e-7 relative each, a few 1e-6 at logits |z| < 5 (test_merge_lora: 3e-6).
    np.testing.assert_allclose(from_merged, with_lora, rtol=1e-5, atol=1e-5)

    again = run_cli(["--base_ckpt", lora_run["base_file"], "--lora_ckpt", trainable, "--output", merged_lora,
                     "--lora_alpha", "16"], script=MERGE_SCRIPT, cwd=work)
    assert again.returncode == 2 and "exists" in again.stderr


def test_predict_from_base_plus_lora_folder_equals_merged(work, lora_run, merged_lora, trained_lora_folder):
    prompt = ["--predict_data", "<reserved_106>你好<reserved_107>", "--max_new_tokens", "8"]
    with_lora = run_baichuan2(["--config", lora_run["cfg"], "--run_mode", "predict", "--load_checkpoint",
                               trained_lora_folder, "--output_dir", work / "predict_lora"] + prompt, cwd=work)
    assert with_lora.returncode == 0, with_lora.tail()
    plain_cfg = write_config(work / "plain_for_predict.yaml", "7b", seq_length=SEQ)
    merged = run_baichuan2(["--config", plain_cfg, "--run_mode", "predict", "--load_checkpoint", merged_lora,
                            "--output_dir", work / "predict_merged"] + prompt, cwd=work)
    assert merged.returncode == 0, merged.tail()
    texts = [[line for line in r.stdout.splitlines() if "text_generation_text" in line] for r in (with_lora, merged)]
    assert texts[0] and texts[0][-1] == texts[1][-1], texts


# ----- eval ----------------------------------------------------------------------------------------
def test_eval_perplexity_matches_reference(work, data, full7b):
    _, out, cfg = full7b
    ckpt = last_checkpoint(out)
    res = run_baichuan2(["--config", cfg, "--run_mode", "eval", "--eval_dataset", data, "--load_checkpoint", ckpt,
                         "--output_dir", work / "eval7b"], cwd=work)
    assert res.returncode == 0, res.tail()
    got = parse_perplexity(res.output)
    assert got is not None, res.tail()
    ids, labels = read_records(data)
    mean_nll, count = _reference_perplexity(_reference(load_params(ckpt), "7b"), ids, labels)
    assert got["tokens"] == count
    # fp32 network vs float64 reference: per-token NLL errors ~1e-6, random-signed, averaged over ~860 tokens
    # (measured 4e-9 relative); PPL = e^loss, so its relative error is the loss's absolute error (2e-8 measured).
    assert got["loss"] == pytest.approx(mean_nll, rel=1e-5)
    assert got["PPL"] == pytest.approx(np.exp(mean_nll), rel=1e-5)


def test_eval_lora_from_base_plus_lora_folder(work, data, lora_run, trained_lora_folder):
    res = run_baichuan2(["--config", lora_run["cfg"], "--run_mode", "eval", "--eval_dataset", data,
                         "--load_checkpoint", trained_lora_folder, "--output_dir", work / "eval_lora"], cwd=work)
    assert res.returncode == 0, res.tail()
    got = parse_perplexity(res.output)
    ids, labels = read_records(data)
    trainable = load_params(last_checkpoint(lora_run["out"], kind="checkpoint_trainable"))
    merged = _merge_by_hand(lora_run["base"], trainable, LORA["lora_alpha"])
    ref = TorchBaichuan2(ms_to_hf_state_dict(merged), REF_CONFIG["7b"], "rope")
    mean_nll, count = _reference_perplexity(ref, ids, labels)
    assert got["tokens"] == count
    assert got["PPL"] == pytest.approx(np.exp(mean_nll), rel=1e-5)


# ----- bad input: one error line, exit status 2, nothing built -------------------------------------
@pytest.fixture(scope="module")
def ckpt_13b_shape(work):
    """A checkpoint with the tiny 13B shapes (hidden 80, 5 heads): does not fit the 7B yaml."""
    shapes = expected_ms_shapes(tiny_hf_config("13b"))
    return _save({k: np.zeros(v, np.float32) for k, v in shapes.items()}, work / "tiny13b.ckpt")


@pytest.mark.parametrize("case", ["record_length", "missing_dataset", "checkpoint_13b_in_7b", "missing_checkpoint",
                                  "resume_without_checkpoint", "lora_without_base", "missing_src_strategy",
                                  "not_a_checkpoint", "empty_prompt_file"])
def test_bad_input_fails_fast(case, work, data, ckpt_13b_shape):
    cfg = write_config(work / f"bad_{case}.yaml", "7b", seq_length=SEQ, epochs=1,
                       pet_config=LORA if case == "lora_without_base" else None)
    args = ["--config", cfg, "--run_mode", "finetune", "--train_data", data, "--output_dir", work / f"bad_{case}"]
    expect = {"record_length": ["33 tokens", "seq_length"],
              "missing_dataset": ["train_dataset not found", "nowhere"],
              "checkpoint_13b_in_7b": ["does not fit", "shape mismatch", "(4000, 80) vs (4000, 64)"],
              "missing_checkpoint": ["load_checkpoint not found", "nope.ckpt"],
              "resume_without_checkpoint": ["--resume", "no checkpoint to resume from"],
              "lora_without_base": ["LoRA weights only", "one folder"],
              "missing_src_strategy": ["--src_strategy", "no_strategy.ckpt", "does not exist"],
              "not_a_checkpoint": ["cannot read checkpoint", "notes.ckpt", "convert_weight.py"],
              "empty_prompt_file": ["--predict_data file", "prompts.txt", "has no prompt"]}[case]
    if case == "record_length":
        args += ["--seq_length", "64"]
    elif case == "missing_dataset":
        args[args.index(data)] = os.fspath(work / "nowhere")
    elif case == "checkpoint_13b_in_7b":
        args += ["--load_checkpoint", ckpt_13b_shape]
    elif case == "missing_checkpoint":
        args += ["--load_checkpoint", work / "nope.ckpt"]
    elif case == "resume_without_checkpoint":
        args += ["--resume", "True"]
    elif case == "lora_without_base":
        base = {k: np.zeros(v, np.float32) for k, v in expected_ms_shapes(tiny_hf_config("7b")).items()}
        args += ["--load_checkpoint", _save(_lora_init(base, LORA["lora_rank"]), work / "lora_only.ckpt")]
    elif case == "missing_src_strategy":
        args += ["--src_strategy", work / "no_strategy.ckpt"]
    elif case == "not_a_checkpoint":
        (work / "notes.ckpt").write_text("not a checkpoint\n")
        args += ["--load_checkpoint", work / "notes.ckpt"]
    elif case == "empty_prompt_file":
        (work / "prompts.txt").write_text("\n  \n")
        args[args.index("finetune")] = "predict"
        args += ["--predict_data", work / "prompts.txt"]
    res = run_baichuan2(args, cwd=work)
    assert res.returncode == 2, res.tail()
    errors = res.error_lines()
    assert len(errors) == 1, res.stderr[-2000:]
    for words in expect:
        assert words in errors[0], errors[0]
    assert res.seconds < 20, f"took {res.seconds:.1f} s to fail"
    assert "Build Net" not in res.output and "Compiling" not in res.output
