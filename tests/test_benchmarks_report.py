"""The benchmark report (benchmarks/bench_report.py) from synthetic results: no timing, no MindSpore."""
import os
import sys

import pytest

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

import bench_common as bc  # noqa: E402  pylint: disable=wrong-import-position
import bench_report  # noqa: E402  pylint: disable=wrong-import-position
import run_all  # noqa: E402  pylint: disable=wrong-import-position


def _decode(tok_s, prompt, impl):
    return {"prompt": prompt, "new_tokens": 32, "repetitions": 5, "decode_tok_s": tok_s,
            "decode_tok_s_min": tok_s * 0.95, "decode_tok_s_max": tok_s * 1.05, "ms_per_token": 1000 / tok_s,
            "step_ms_median": 1000 / tok_s, "prefill_s": prompt / 500, "prefill_tok_s": 500.0,
            "peak_rss_mb": 2500.0, "rss_after_build_mb": 2000.0, "impl": impl, "attn_implementation": "sdpa"}


def _profile(phase, wall, cats):
    return {"task": "profile", "phase": phase, "wall_ms": wall, "categories_ms": cats, "ops_ms": sum(cats.values()),
            "by_type_ms": {}, "top_ops": [], "prompt": 1024, "batch": 1, "seq": 512}


def synthetic_data(train_ours=50.0):
    results = {"bandwidth": {"best_gbs": 19.0, "torch_gbs": 18.0, "numpy_gbs": 19.0, "mindspore_gbs": 18.5,
                             "repetitions": 30, "numpy_blas": {"kernel": "Cooperlake", "OPENBLAS_CORETYPE": "(unset)",
                                                               "threads": 2}}}
    for prompt in bc.PROMPTS:
        for impl, tok_s in (("ours7b", 20.0), ("ours13b", 19.0), ("hf", 17.0), ("mf", 2.0)):
            results[f"decode-{impl}-p{prompt}"] = _decode(tok_s, prompt, impl)
    for impl, tok_s in (("ours7b", train_ours), ("mf", 55.0), ("hf", 30.0)):
        results[f"train-{impl}"] = {"tokens_s": tok_s, "step_s": 512 / tok_s, "first_step_s": 30.0,
                                    "losses": [11.9, 11.8], "peak_rss_mb": 10000.0, "rss_after_build_mb": 1900.0,
                                    "batch": 1, "seq": 512, "warmup": 2, "steps": 4}
    results["profile-decode-ours7b"] = _profile("decode", 48.0, {"lm_head MatMul": 26.0, "layer MatMuls": 11.0,
                                                                 "KV cache write (ScatterNdUpdate)": 4.5,
                                                                 "attention BatchMatMul (QK^T, PV over the cache)": 4.0})
    results["profile-train-ours7b"] = _profile("train", 10000.0, {
        "lm_head MatMul": 5000.0, "lm_head non-MatMul ops (NormHead row norms and their gradients)": 300.0,
        "optimizer (AdamWeightDecay)": 1500.0})
    results["profile-train-mf"] = _profile("train", 9300.0, {"lm_head MatMul": 5000.0,
                                                             "optimizer (AdamWeightDecay)": 1500.0})
    results["profile-decode-ours13b"] = {"error": "exit 1: RuntimeError: boom"}
    for result in results.values():
        result.setdefault("loadavg_start", [2.0, 2.0, 2.0])
    return {"date": "2026-01-01 00:00 UTC", "quick": False, "threads": 2, "shape": bc.BENCH_SHAPE,
            "command": "python benchmarks/run_all.py", "results": results,
            "machine": {"cpu_model": "Test CPU", "logical_cpus": 2, "physical_cores": 2, "memory_gb": 24,
                        "python": "3.11", "platform": "Linux", "versions": {"mindspore": "2.7.2"}}}


def test_bytes_per_token_counts_embedding_row_layers_norm_and_head():
    shape = bc.BENCH_SHAPE
    h, f, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    assert f == 2816                                   # int(2 * 4h / 3) rounded up to 256
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    parts = bc.decode_bytes_per_token(context=100)
    assert parts["weights"] == 4 * (h + n * per_layer + h + v * h)
    assert parts["kv"] == 2 * n * 100 * h * 4
    assert bc.decode_bytes_per_token(context=100, cache_slots=2048)["kv"] == 2 * n * 2048 * h * 4


def test_report_tables_statuses_and_chart(tmp_path):
    pytest.importorskip("PIL")
    md, png = tmp_path / "performance.md", tmp_path / "performance.png"
    bench_report.write_report(synthetic_data(), str(md), str(png))
    text = md.read_text(encoding="utf-8")
    for heading in ("## Targets", "## Method", "## Decode", "## Roofline", "## Training", "## Peak memory",
                    "## 13B shape", "## Where the time goes"):
        assert heading in text
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ours")}
    # 20 / 17 = 1.18x < 1.5x; transformers at 17 / 27.7 tok/s roofline -> ceiling 1.63x -> ours' share cited
    assert "missed by 22%" in rows["ours 7B decode >= 1.5x transformers, prompt 64"]
    roof = 19e9 / bc.decode_bytes_per_token()["weights"]
    share = f"{100 * 20 / roof:.0f}%"
    assert share in rows["ours 7B decode >= 70% of roofline, prompt 64"]
    assert "| met |" in rows["ours 7B decode >= 70% of roofline, prompt 64"]
    assert "| met |" in rows["ours 7B ms/token at prompt 1024 <= 1.25x prompt 64"]
    assert "missed by 9%" in rows["ours 7B training tokens/s >= MindFormers Llama"]
    assert "NormHead" in rows["ours 7B training tokens/s >= MindFormers Llama"]
    assert "`profile-decode-ours13b`: exit 1: RuntimeError: boom" in text
    assert "no (Ascend-only in MF 1.8)" in text
    from PIL import Image  # pylint: disable=import-outside-toplevel
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size[0] > 1000


def test_report_survives_failed_measurements(tmp_path):
    data = synthetic_data()
    for name in ("bandwidth", "decode-hf-p64", "train-mf"):
        data["results"][name] = {"error": "exit 1: failed", "loadavg_start": [1.0]}
    md = tmp_path / "performance.md"
    bench_report.write_report(data, str(md), str(tmp_path / "performance.png"))
    text = md.read_text(encoding="utf-8")
    assert "not measured" in text and "failed: exit 1: failed" in text


def test_task_list_covers_every_measurement():
    full, quick = run_all.task_list(False), run_all.task_list(True)
    names = [name for name, _ in full]
    assert names == [name for name, _ in quick]
    assert "bandwidth" in names and "train-mf" in names and "profile-train-ours7b" in names
    for prompt in bc.PROMPTS:
        for impl in ("ours7b", "ours13b", "hf", "mf"):
            assert f"decode-{impl}-p{prompt}" in names
    assert all("--quick" in args for _, args in quick)
    assert not any("--quick" in args for _, args in full)


def test_roofline_uses_the_median_of_all_bandwidth_measurements():
    data = synthetic_data()
    data["results"]["bandwidth"] = dict(data["results"]["bandwidth"], best_gbs=19.0, best_gbs_rounds=[19.0, 30.0, 18.0])
    data["results"]["bandwidth-end"] = dict(data["results"]["bandwidth"], best_gbs=25.0, best_gbs_rounds=None)
    res = bench_report.Results(data)
    assert sorted(res.bandwidth_values()) == [18.0, 19.0, 25.0, 30.0]
    assert res.bandwidth_gbs() == 19.0                                   # lower middle of four
    assert res.roofline() == pytest.approx(19e9 / bc.decode_bytes_per_token()["weights"])
    assert "18.0 to 30.0 GB/s" in bench_report.bandwidth_line(res)
    data["results"]["bandwidth-end"] = {"error": "exit 1"}
    assert bench_report.Results(data).bandwidth_gbs() == 19.0


def test_rounds_are_combined_into_the_median_process_with_its_spread():
    rounds = [{"tokens_s": 90.0, "step_s": 5.7}, {"error": "exit 1: killed"}, {"tokens_s": 70.0, "step_s": 7.3},
              {"tokens_s": 100.0, "step_s": 5.1}]
    combined = run_all.combine_rounds(rounds, "train")
    assert combined["tokens_s"] == 90.0 and combined["step_s"] == 5.7      # the median of the 3 good rounds
    assert combined["tokens_s_rounds"] == [90.0, 70.0, 100.0] and combined["rounds"] == 3
    assert combined["failed_rounds"] == ["exit 1: killed"]
    assert bench_report._spread(combined, "tokens_s", 1) == "[70.0-100.0]"
    assert run_all.combine_rounds([{"error": "exit 2: x"}], "decode") == {"error": "exit 2: x"}
    even = run_all.combine_rounds([{"decode_tok_s": 2.0}, {"decode_tok_s": 1.0}], "decode")
    assert even["decode_tok_s"] == 1.0                                    # lower middle of an even count
