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
    add_issue10_results(results)
    for result in results.values():
        result.setdefault("loadavg_start", [2.0, 2.0, 2.0])
    return {"date": "2026-01-01 00:00 UTC", "quick": False, "threads": 2, "shape": bc.BENCH_SHAPE,
            "command": "python benchmarks/run_all.py", "results": results,
            "machine": {"cpu_model": "Test CPU", "logical_cpus": 2, "physical_cores": 2, "memory_gb": 24,
                        "python": "3.11", "platform": "Linux", "versions": {"mindspore": "2.7.2"}}}


def _finetune(kind, seq, per_record, step_s=6.0, records=205):
    flops = bc.train_flops_per_token(seq=seq)
    return {"task": "finetune", "packed": kind == "packed", "available": True, "seq": seq, "records": records,
            "input_tokens_per_record": per_record, "label_tokens_per_record": 0.8 * per_record,
            "fill": per_record / seq, "step_s": step_s, "real_tokens_s": per_record / step_s,
            "label_tokens_s": 0.8 * per_record / step_s, "tokens_s": seq / step_s,
            "train_gflops": seq * flops["total"] / step_s / 1e9,
            "useful_gflops": per_record * flops["total"] / step_s / 1e9, "peak_rss_mb": 12000.0}


def add_issue10_results(results):
    """GEMM peak, fine-tuning (packed not available yet), plain-head training, wide and batched decode."""
    results["gemm"] = {"size": 4096, "repetitions": 5, "mindspore_gflops": 150.0, "numpy_gflops": 160.0,
                       "torch_gflops": 155.0, "best_gflops": 160.0, "numpy_blas": {"kernel": "Cooperlake"}}
    flops = bc.train_flops_per_token(seq=512)
    for impl in ("ours7b", "mf"):
        results[f"train-{impl}"]["train_gflops"] = results[f"train-{impl}"]["tokens_s"] * flops["total"] / 1e9
    results["train-ours7b"]["peak_rss_mb"] = 13700.0
    results["train-mf"]["peak_rss_mb"] = 10400.0
    results["train-ours7b-plainhead"] = dict(results["train-ours7b"], peak_rss_mb=10800.0, variant="plainhead")
    results["finetune-unpacked"] = _finetune("unpacked", 512, 200.0)
    results["finetune-packed"] = {"task": "finetune", "packed": True, "available": False, "seq": 512,
                                  "reason": "belle_preprocess.py has no --pack option yet"}
    results["finetune-unpacked-long"] = _finetune("unpacked", 1024, 300.0, step_s=12.0)
    results["finetune-packed-long"] = _finetune("packed", 1024, 1000.0, step_s=12.0, records=60)
    for prompt in bc.PROMPTS:
        results[f"decode-wide-ours7b-p{prompt}"] = dict(_decode(4.0, prompt, "ours7b"), batch=1,
                                                        aggregate_tok_s=4.0, new_tokens=16)
    results["decode-wide-ours7b-b4-p64"] = dict(_decode(3.5, 64, "ours7b"), batch=4, aggregate_tok_s=14.0,
                                                new_tokens=16)
    results["decode-ours7b-b4-p64"] = dict(_decode(10.0, 64, "ours7b"), batch=4, aggregate_tok_s=40.0)


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


def _rows(text):
    return {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if line.startswith("| ")}


def test_issue10_targets_and_tables(tmp_path):
    md = tmp_path / "performance.md"
    data = synthetic_data()
    bench_report.write_report(data, str(md), str(tmp_path / "performance.png"))
    text = md.read_text(encoding="utf-8")
    for heading in ("## Fine-tuning on the Belle sample", "## Training FLOP/s against the matrix-multiply peak",
                    "## Decode at real width and batched decode"):
        assert heading in text
    rows = _rows(text)
    packed = rows["fine-tuning real tokens/s, packed >= 2x unpacked, seq 512"]          # target at seq 512
    assert "not measured" in packed and "packing not available" in packed
    assert "not available (belle_preprocess.py has no --pack option yet)" in text
    # long point: 1000 vs 300 real tokens per record at the same step time -> 3.33x, met
    long_row = rows["fine-tuning real tokens/s, packed >= 2x unpacked, long sequence (1024)"]
    assert "3.33x" in long_row and "| met |" in long_row
    # training: 50 tokens/s x 1.0837 GFLOP/token = 54 GFLOP/s of a 160 GFLOP/s peak
    flops_row = rows["ours 7B training FLOP/s >= 85% of the fp32 GEMM peak"]
    share = 50 * bc.train_flops_per_token(seq=512)["total"] / 1e9 / 160
    assert f"{100 * share:.0f}%" in flops_row and "missed by" in flops_row
    rss = rows["ours 7B training peak RSS <= MindFormers Llama's"]
    assert "1.32x" in rss and "2,900 MiB" in rss and "10,800 MiB" in rss
    # real width: the roofline uses the wide shape's bytes and the measured bandwidth (19 GB/s)
    wide = bc.WIDE_SHAPE
    parts = bc.decode_bytes_per_token(wide, context=64 + 8, cache_slots=bc.BENCH_SHAPE["seq_length"])
    roof = 19e9 / (parts["weights"] + parts["kv"])
    row = rows[f"real-width decode (h 4096, 2 layers) >= 85% of roofline, prompt 64"]
    assert f"{100 * 4.0 / roof:.0f}%" in row
    bench_b4 = rows["batch-4 decode aggregate tokens/s >= 3x batch 1, bench shape, prompt 64"]
    assert "2.00x" in bench_b4 and "missed by 33%" in bench_b4      # 40 aggregate vs 20 at batch 1
    wide_b4 = rows["batch-4 decode aggregate tokens/s >= 3x batch 1, real-width shape, prompt 64"]
    assert "3.50x" in wide_b4 and "| met |" in wide_b4


def test_in_place_decode_attention_is_held_to_the_context_it_reads(tmp_path):
    """A decode result that attended in place reads each row's context, not the cache window: its roofline
    counts the KV of the mean context: fewer bytes, so a faster roofline than the window's, a stricter bar."""
    data = synthetic_data()
    data["results"]["decode-wide-ours7b-p64"]["decode_attention"] = "in-place kernel"
    md = tmp_path / "performance.md"
    bench_report.write_report(data, str(md), str(tmp_path / "performance.png"))
    parts = bc.decode_bytes_per_token(bc.WIDE_SHAPE, context=64 + 8)
    roof = 19e9 / (parts["weights"] + parts["kv"])
    window = bc.decode_bytes_per_token(bc.WIDE_SHAPE, context=64 + 8, cache_slots=bc.BENCH_SHAPE["seq_length"])
    assert roof > 19e9 / (window["weights"] + window["kv"])
    row = _rows(md.read_text(encoding="utf-8"))["real-width decode (h 4096, 2 layers) >= 85% of roofline, prompt 64"]
    assert f"{100 * 4.0 / roof:.0f}%" in row


def test_batch_bytes_read_weights_once_and_kv_per_row():
    one, four = bc.decode_bytes_per_token(context=100), bc.decode_bytes_per_token(context=100, batch=4)
    h = bc.BENCH_SHAPE["hidden_size"]
    assert four["weights"] - one["weights"] == 3 * h * 4          # three more embedding rows only
    assert four["kv"] == 4 * one["kv"]
    assert bc.total_params() == 308_814_848
    assert 1.4e9 < bc.total_params(bc.WIDE_SHAPE) < 1.45e9        # ~5.7 GB fp32


def test_train_flops_per_token():
    shape = bc.BENCH_SHAPE
    flops = bc.train_flops_per_token(seq=512)
    counts = bc.weight_counts()
    matmul_params = counts["layers"] - shape["num_layers"] * 2 * shape["hidden_size"] + counts["lm_head"]
    assert flops["matmul"] == 6 * matmul_params
    assert flops["attention"] == 12 * 4 * 1024 * 512
    assert flops["total"] == flops["matmul"] + flops["attention"]


def test_disturbed_rounds_are_repeated_then_kept_and_flagged():
    loads = iter([3.0, 1.0, 3.0, 3.0])
    calls = []

    def runner(label, args, log_dir, timeout):
        calls.append(label)
        result = {"wall_s": 1.0, "loadavg_start": [1.0]}
        if args[0] == "train":
            result["tokens_s"] = float(len(calls))
        return result

    tasks = [("train-x", ["train"]), ("decode-wide-ours7b-p1024", ["decode"]), ("profile-y", ["profile"])]
    results, log = run_all.run_tasks(tasks, 2, "/tmp", 10, max_load=2.5, retries=1, wait_s=0.0, runner=runner,
                                     loadavg=lambda: [next(loads)] * 3, sleep=lambda s: None)
    # round 1: attempt 1 at load 3.0 is discarded, attempt 2 at 1.0 kept; round 2: both attempts loaded,
    # the last is kept and flagged. ONCE tasks (the real-width decode at prompt 1024) run in the first round only.
    assert [(e["round"], e["attempt"], e["loaded"], e["kept"]) for e in log] == [
        (1, 1, True, False), (1, 2, False, True), (2, 1, True, False), (2, 2, True, True)]
    assert calls.count("decode-wide-ours7b-p1024-round1") == 1 and "decode-wide-ours7b-p1024-round1-retry1" in calls
    assert not any(c.startswith("decode-wide-ours7b-p1024-round2") for c in calls)
    assert results["train-x"]["rounds"] == 2 and results["profile-y"]["wall_s"] == 1.0
    text = "\n".join(bench_report.rounds_section({"round_log": log, "max_load": 2.5, "round_retries": 1}))
    assert "1 round(s) were kept although the load average exceeded 2.5" in text
    assert "discarded, repeated" in text


def test_task_list_has_the_issue10_measurements():
    names = [name for name, _ in run_all.task_list(False)]
    for name in ("gemm", "finetune-unpacked", "finetune-packed", "finetune-unpacked-long", "finetune-packed-long",
                 "decode-ours7b-b4-p64", "decode-wide-ours7b-p64", "decode-wide-ours7b-p1024",
                 "decode-wide-ours7b-b4-p64", "train-ours7b-plainhead"):
        assert name in names
    assert set(bc.ONCE) <= set(names)
    # The batch-4 ratio's terms are medians over every round, not one process each.
    assert not {"decode-ours7b-p64", "decode-ours7b-b4-p64", "decode-wide-ours7b-p64",
                "decode-wide-ours7b-b4-p64"} & set(bc.ONCE)
    packed = dict(run_all.task_list(False))["finetune-packed"]
    assert "--pack" in packed and packed[packed.index("--seq") + 1] == 512


def test_finetune_not_available_rounds_combine_to_the_last():
    rounds = [{"available": False, "reason": "no flag"}, {"available": False, "reason": "no flag"}]
    assert run_all.combine_rounds(rounds, "finetune") == rounds[-1]


def test_kept_results_name_their_own_run_and_machine(tmp_path):
    """A partial run (``run_all.py --only train``) keeps the other results: the document says which kinds
    come from which earlier run and machine, since they were not measured beside this run's."""
    pytest.importorskip("PIL")
    data = synthetic_data()
    old_machine = dict(data["machine"], cpu_model="Older CPU")
    data["sources"] = {name: {"date": "2025-12-31 00:00 UTC", "machine": old_machine} for name in data["results"]}
    data["sources"].update({name: {"date": data["date"], "machine": data["machine"]}
                            for name in data["results"] if name.startswith("train-")})
    md = tmp_path / "performance.md"
    bench_report.write_report(data, str(md), str(tmp_path / "performance.png"))
    kept = [line for line in md.read_text(encoding="utf-8").splitlines() if line.startswith("- Kept from")]
    assert len(kept) == 1 and "2025-12-31 00:00 UTC" in kept[0] and "Older CPU" in kept[0]
    assert "decode" in kept[0] and "bandwidth" in kept[0] and "train" not in kept[0].split(":")[-1]
    assert bench_report.kept_results_lines(synthetic_data()) == []      # one run: no such line


def test_profile_counts_the_one_pass_decode_kernel_as_a_matmul():
    """A decode profile's Custom ops under DecodeMatMul are the lm_head / layer products and the one under
    decode_attention is attention, not 'other ops'."""
    import bench_tasks  # pylint: disable=import-outside-toplevel
    rows = [("Custom", "Default/lm_head-NormHead/matmul-DecodeMatMul/Custom-op1", 600.0),
            ("Custom", "Default/model/layers-CellList/0-Layer/feed_forward/w1-Linear/matmul-DecodeMatMul/Custom-op0",
             80.0),
            ("BatchMatMul", "Default/model/layers-CellList/0-Layer/attention/BatchMatMul-op3", 5.0),
            ("Custom", "Default/model/layers-CellList/1-Layer/attention/decode_attention-DecodeAttention/Custom-op4",
             3.0),
            ("Mul", "Default/lm_head-NormHead/Mul-op2", 2.0)]
    result = bench_tasks.categorize(rows, 10, "decode")
    assert result["categories_ms"] == {"lm_head MatMul": 60.0, "layer MatMuls": 8.0,
                                       "attention BatchMatMul (QK^T, PV over the cache)": 0.5,
                                       "attention, in-place kernel (scores, softmax, PV over each row's context)": 0.3,
                                       "lm_head non-MatMul ops (NormHead row norms and their gradients)": 0.2}
    assert result["by_type_ms"] == {"Custom": 68.3, "BatchMatMul": 0.5, "Mul": 0.2}


def test_profile_counts_the_fused_loss_kernels_as_the_loss():
    """A training profile's Custom ops of the cross-entropy fused into the head are the loss; the head's own row
    norm kernel and the norm's share of its weight gradient stay under the lm_head, and the fused cell's three
    products are the lm_head MatMuls."""
    import bench_tasks  # pylint: disable=import-outside-toplevel
    head = "Default/network-Net/lm_head-NormHead/"
    rows = [("MatMul", head + "fused_loss-FusedNormHeadCrossEntropy/MatMul-op0", 1800.0),
            ("MatMul", head + "fused_loss-FusedNormHeadCrossEntropy/MatMul-op1", 1900.0),
            ("MatMul", head + "fused_loss-FusedNormHeadCrossEntropy/MatMul-op2", 1750.0),
            ("Custom", head + "fused_loss-FusedNormHeadCrossEntropy/Custom-op1", 80.0),
            ("Custom", head + "fused_loss-FusedNormHeadCrossEntropy/Custom-op2", 90.0),
            ("Custom", head + "fused_loss-FusedNormHeadCrossEntropy/weight_grad-_NormWeightGrad/Custom-op0", 70.0),
            ("Custom", head + "Custom-op0", 20.0),
            ("LogSoftmax", "Default/network-Net/loss-MaskedCrossEntropy/LogSoftmax-op0", 10.0)]
    result = bench_tasks.categorize(rows, 1, "train")
    assert result["categories_ms"] == {"lm_head MatMul": 5450.0, "loss (cross entropy)": 180.0,
                                       "lm_head non-MatMul ops (NormHead row norms and their gradients)": 90.0}


def test_warm_up_goes_on_while_a_step_still_grows_the_process():
    """bench_common.timed_steps: steps that fault in new memory (an allocator still growing) stay warm-up, at most
    MAX_EXTRA_WARMUP beyond the fixed ones; the timed steps follow."""
    import bench_common  # pylint: disable=import-outside-toplevel
    held = []

    def grows_for(count):
        def step(i):
            if i < count:      # bytearray zero-fills: its pages are faulted in during the step
                held.append(bytearray(2 * bench_common.GROWTH_LIMIT_BYTES))
        return step
    times, warmup_used, faulted = bench_common.timed_steps(grows_for(0), 2, 3)
    assert (len(times), warmup_used) == (5, 2)
    times, warmup_used, faulted = bench_common.timed_steps(grows_for(2), 2, 3)     # the 2nd warm-up step grew
    assert (len(times), warmup_used) == (6, 3) and faulted[1] * 2 ** 20 > bench_common.GROWTH_LIMIT_BYTES
    held.clear()
    times, warmup_used, _ = bench_common.timed_steps(grows_for(100), 2, 3)
    assert (len(times), warmup_used) == (2 + bench_common.MAX_EXTRA_WARMUP + 3, 2 + bench_common.MAX_EXTRA_WARMUP)
    held.clear()
