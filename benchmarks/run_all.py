"""Run every benchmark and write ``docs/performance.md`` + ``docs/performance.png``.

    .venv/bin/python benchmarks/run_all.py            # full run (about 40 min on a quiet 2-core host)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run (a few minutes), writes to a temp dir
    .venv/bin/python benchmarks/run_all.py --report-only --out-dir docs   # rebuild doc from performance.json
    .venv/bin/python benchmarks/run_all.py --quick --tasks 'decode-wide-*' 'finetune-*'   # some tasks only

Each measurement runs in its own subprocess (``bench_tasks.py``), one after the other: MindSpore's
context is process-global, and the peak RSS of a process is then that of one measurement. Decode and
training measurements run ``--rounds`` times, interleaved (every task once, then every task again),
so that ours and its baselines see the same slow and fast phases of a shared host; the median round
is reported with the spread over rounds. The matrix-vector bandwidth and the matrix-multiply peak are
measured in every round, the bandwidth also at the end. The most expensive measurements (the
real-width decode at prompt 1024, the long-sequence fine-tuning point) run in the first round only.

A round starts only when the host is quiet enough: the 1-minute load average is recorded at each
round's start; above ``--max-load`` (2.5) the round is repeated, at most ``--round-retries`` times
(2), after waiting up to a minute for the load to drop; then it is kept and flagged in the report.
Raw results go to ``<out-dir>/performance.json``; subprocess logs to a temporary folder (printed).
"""
import argparse
import datetime
import fnmatch
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_common as bc  # noqa: E402  pylint: disable=wrong-import-position
import bench_report  # noqa: E402  pylint: disable=wrong-import-position

PACKAGES = ("mindspore", "mindformers", "torch", "transformers", "numpy")


# The long-sequence fine-tuning point. Before the attention's softmax and the optimizer were reworked a
# training step of ours at batch 1 grew ~12.5 MiB per token (13.7 GB at 512), so 1024 was what 24 GB held;
# now 7.7 GB at 512 and 8.8 GB at 1024 (2026-12-03), so 2048 would fit too but doubles the run time of
# these tasks. ``--long-seq`` overrides it.
LONG_SEQ = 1024


def task_list(quick, long_seq=None):
    """(name, bench_tasks.py arguments) in the order they run."""
    new, reps = (4, 1) if quick else (32, 5)
    tasks = [("bandwidth", ["bandwidth"]), ("gemm", ["gemm", "--size", 1024 if quick else 4096])]
    for prompt in bc.PROMPTS:
        for impl in ("ours7b", "ours13b", "hf"):
            tasks.append((f"decode-{impl}-p{prompt}", ["decode", "--impl", impl, "--prompt", prompt,
                                                       "--new", new, "--reps", reps]))
        # MindFormers' Llama has no CPU KV cache: every step is a full forward, so fewer steps.
        mf_new, mf_reps = (2, 1) if quick else ((12, 3) if prompt < 512 else (5, 2))
        tasks.append((f"decode-mf-p{prompt}", ["decode", "--impl", "mf", "--prompt", prompt,
                                               "--new", mf_new, "--reps", mf_reps]))
    batch = bc.DECODE_BATCH
    tasks.append((f"decode-ours7b-b{batch}-p{bc.PROMPTS[0]}",
                  ["decode", "--impl", "ours7b", "--prompt", bc.PROMPTS[0], "--batch", batch, "--new", new,
                   "--reps", reps]))
    # Real-width shape: a decode step reads 5.7 GB, so fewer tokens (the prefill of 1024 tokens
    # alone takes ~20 s).
    wide_new, wide_reps = (3, 1) if quick else (16, 3)
    for prompt in bc.PROMPTS:
        tasks.append((f"decode-wide-ours7b-p{prompt}", ["decode", "--shape", "wide", "--impl", "ours7b",
                                                        "--prompt", prompt, "--new", wide_new,
                                                        "--reps", wide_reps if prompt < 512 else 2]))
    tasks.append((f"decode-wide-ours7b-b{batch}-p{bc.PROMPTS[0]}",
                  ["decode", "--shape", "wide", "--impl", "ours7b", "--prompt", bc.PROMPTS[0], "--batch", batch,
                   "--new", wide_new, "--reps", wide_reps]))
    seq, warmup, steps = (64, 1, 1) if quick else (512, 2, 4)
    # Ours trains with the optimizer its YAMLs name, as run_baichuan2.py builds it (on CPU the fused AdamW);
    # the baselines with the fastest stock AdamW of their framework (MindSpore: nn.AdamWeightDecay, which
    # beats MindFormers' AdamW on CPU, see the optimizer tasks).
    for impl in ("ours7b", "mf", "hf"):
        tasks.append((f"train-{impl}", ["train", "--impl", impl, "--batch", 1, "--seq", seq,
                                        "--warmup", warmup, "--steps", steps]
                      + (["--optimizer", "project"] if impl == "ours7b" else [])))
    # Attribution: ours with the baselines' optimizer (first round only).
    tasks.append(("train-ours7b-nnadam", ["train", "--impl", "ours7b", "--batch", 1, "--seq", seq,
                                          "--warmup", warmup, "--steps", steps, "--optimizer", "nn"]))
    for kind in ("nn", "mindformers", "project"):
        tasks.append((f"optimizer-{kind}", ["optimizer", "--optimizer", kind, "--warmup", 1 if quick else 2,
                                            "--steps", 1 if quick else 5]))
    # Memory attribution: ours with a plain head in place of NormHead (first round only).
    tasks.append(("train-ours7b-plainhead", ["train", "--impl", "ours7b", "--variant", "plainhead", "--batch", 1,
                                             "--seq", seq, "--warmup", warmup, "--steps", steps,
                                             "--optimizer", "project"]))
    long_seq = long_seq or (128 if quick else LONG_SEQ)
    # The first step compiles; one more warm-up step is enough for these one-round measurements.
    ft_warmup = 1 if quick else 2
    for suffix, task_seq, task_steps in (("", seq, steps), ("-long", long_seq, 1 if quick else 2)):
        for kind in ("unpacked", "packed"):
            tasks.append((f"finetune-{kind}{suffix}", ["finetune", "--seq", task_seq, "--warmup", ft_warmup,
                                                       "--steps", task_steps, "--optimizer", "project"]
                           + (["--pack"] if kind == "packed" else [])))
    for impl in ("ours7b", "ours13b"):
        tasks.append((f"profile-decode-{impl}", ["profile", "--phase", "decode", "--impl", impl, "--prompt", 1024]))
    for impl in ("ours7b", "mf"):
        tasks.append((f"profile-train-{impl}", ["profile", "--phase", "train", "--impl", impl, "--batch", 1,
                                                "--seq", seq] + (["--optimizer", "project"] if impl == "ours7b" else [])))
    # Bandwidth again at the end (it also starts every round): the machine's memory bandwidth varies
    # with what else runs on the host, so the roofline uses the median of all measurements.
    tasks.append(("bandwidth-end", ["bandwidth"]))
    if quick:
        tasks = [(name, args + ["--quick"]) for name, args in tasks]
    return tasks


# The figure a round of each kind of task is judged by (higher is better).
HEADLINE = {"bandwidth": "best_gbs", "gemm": "best_gflops", "decode": "decode_tok_s", "train": "tokens_s",
            "finetune": "real_tokens_s", "optimizer": "steps_s"}


def combine_rounds(rounds, kind):
    """One result from the rounds of a task: the median round by its headline figure, with
    ``<headline>_rounds`` (every round's figure) and ``rounds``; failed rounds are dropped."""
    key = HEADLINE[kind]
    good = [r for r in rounds if "error" not in r]
    if not good or not all(key in r for r in good):      # failed, or not available (finetune --pack)
        return rounds[-1]
    good.sort(key=lambda r: r[key])
    result = dict(good[(len(good) - 1) // 2])
    result[key + "_rounds"] = [r[key] for r in rounds if "error" not in r]
    result["rounds"] = len(good)
    result["failed_rounds"] = [r["error"] for r in rounds if "error" in r]
    return result


def wait_for_quiet(max_load, wait_s, poll_s=10.0, sleep=time.sleep, loadavg=os.getloadavg):
    """Wait up to ``wait_s`` seconds for the 1-minute load average to fall to ``max_load``; return it."""
    waited = 0.0
    load = loadavg()[0]
    while load > max_load and waited < wait_s:
        sleep(poll_s)
        waited += poll_s
        load = loadavg()[0]
    return load


def run_tasks(tasks, rounds, log_dir, timeout, max_load=bc.MAX_LOAD, retries=2, wait_s=60.0, runner=None,
              loadavg=os.getloadavg, sleep=time.sleep):
    """Run ``tasks``: the bandwidth, gemm, decode, train and finetune tasks ``rounds`` times, interleaved
    (``bench_common.ONCE`` tasks in the first round only); then the profiles and the end-of-run bandwidth once.

    A round whose start load average exceeds ``max_load`` is repeated (at most ``retries`` times);
    the last attempt is kept and flagged. Returns ({name: result}, round log)."""
    repeated = [(name, args) for name, args in tasks if args[0] in HEADLINE and name != "bandwidth-end"]
    collected = {name: [] for name, _ in repeated}
    results = {}
    round_log = []

    def run(name, task_args, label):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {label} ...", end=" ", flush=True)
        result = (runner or run_task)(label, task_args, log_dir, timeout)
        print(f"{result['wall_s']:.0f} s" + (f"  ERROR {result['error']}" if "error" in result else ""), flush=True)
        return result

    for round_index in range(rounds):
        for attempt in range(retries + 1):
            load = wait_for_quiet(max_load, wait_s if attempt or round_index else 0.0, sleep=sleep, loadavg=loadavg)
            loaded = load > max_load
            print(f"round {round_index + 1}, attempt {attempt + 1}: load average {load:.2f}"
                  + (f" > {max_load} (disturbed)" if loaded else ""), flush=True)
            outcome = {}
            for name, task_args in repeated:
                if round_index > 0 and name in bc.ONCE:
                    continue
                label = name if rounds == 1 else f"{name}-round{round_index + 1}"
                if attempt:
                    label += f"-retry{attempt}"
                outcome[name] = run(name, task_args, label)
            task_loads = [r["loadavg_start"][0] for r in outcome.values() if r.get("loadavg_start")]
            kept = not loaded or attempt == retries
            round_log.append({"round": round_index + 1, "attempt": attempt + 1, "loadavg_start": load,
                              "max_task_loadavg": max(task_loads) if task_loads else None,
                              "loaded": loaded, "kept": kept})
            if kept:
                for name, result in outcome.items():
                    result.update(round_loadavg=load, round_loaded=loaded)
                    collected[name].append(result)
                break
    for name, task_args in repeated:
        results[name] = combine_rounds(collected[name], task_args[0])
    for name, task_args in tasks:
        if task_args[0] == "profile" or name == "bandwidth-end":
            results[name] = run(name, task_args, name)
    return results, round_log


def run_task(name, args, log_dir, timeout):
    """Run one ``bench_tasks.py`` subprocess; return its result dict (or one with ``error``)."""
    out = os.path.join(log_dir, f"{name}.json")
    log = os.path.join(log_dir, f"{name}.log")
    cmd = [sys.executable, os.path.join(HERE, "bench_tasks.py")] + [str(a) for a in args] + ["--out", out]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, bc.PLUGIN, os.environ.get("PYTHONPATH", "")]))
    unset = {}
    if args[0] == "bandwidth":
        # These slow a current NumPy on some processors (see the environment notes): the bandwidth
        # measurement runs without them and reports the OpenBLAS kernel actually used.
        unset = {var: env.pop(var) for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if var in env}
    load_start = os.getloadavg()
    start = time.time()
    with open(log, "w", encoding="utf-8") as handle:
        try:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, cwd=log_dir, env=env,
                                  timeout=timeout, check=False)
            code = proc.returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    elapsed = time.time() - start
    if code == 0 and os.path.exists(out):
        with open(out, encoding="utf-8") as handle:
            result = json.load(handle)
    else:
        result = {"error": f"exit {code}: {_last_error_line(log)}"}
    result.update(name=name, wall_s=elapsed, loadavg_start=list(load_start), command=" ".join(cmd[1:-2]))
    if unset:
        result["unset_env"] = unset
    return result


def _last_error_line(log):
    with open(log, encoding="utf-8", errors="replace") as handle:
        lines = [l.strip() for l in handle if l.strip() and "WARNING" not in l]
    errors = [l for l in lines if "Error" in l or "error" in l]
    return (errors or lines or ["(no output)"])[-1][:300]


def machine_info():
    info = {"python": platform.python_version(), "platform": platform.platform()}
    model = "unknown"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            fields = dict(l.split(":", 1) for l in handle if ":" in l)
        fields = {k.strip(): v.strip() for k, v in fields.items()}
        model = fields.get("model name", model)
        info["cpu_family_model"] = f"family {fields.get('cpu family', '?')}, model {fields.get('model', '?')}"
        flags = fields.get("flags", "").split()
        info["simd"] = ", ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in flags)
    except OSError:
        pass
    info["cpu_model"] = model
    info["logical_cpus"] = os.cpu_count()
    try:
        import psutil  # pylint: disable=import-outside-toplevel
        info["physical_cores"] = psutil.cpu_count(logical=False)
        info["memory_gb"] = round(psutil.virtual_memory().total / 2 ** 30, 1)
    except ImportError:
        pass
    from importlib import metadata  # pylint: disable=import-outside-toplevel
    info["versions"] = {}
    for name in PACKAGES:
        try:
            info["versions"][name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            info["versions"][name] = "not installed"
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--quick", action="store_true", help="short smoke run (numbers not meaningful)")
    parser.add_argument("--out-dir", help="where performance.md/.png/.json go "
                                          "(default: docs/, or a temp dir with --quick)")
    parser.add_argument("--only", nargs="*", choices=("bandwidth", "gemm", "decode", "train", "finetune", "profile",
                                                         "optimizer"),
                        help="run only these kinds of task (others are kept from an existing performance.json)")
    parser.add_argument("--tasks", nargs="*", metavar="PATTERN",
                        help="run only the tasks whose names match these shell patterns, e.g. 'decode-wide-*' "
                             "(others are kept from an existing performance.json)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the doc from <out-dir>/performance.json")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--rounds", type=int, default=None,
                        help="processes per decode/training measurement, interleaved (default 3; 1 with --quick)")
    parser.add_argument("--long-seq", type=int, default=None,
                        help=f"sequence length of the long fine-tuning point (default {LONG_SEQ}; 128 with --quick)")
    parser.add_argument("--max-load", type=float, default=bc.MAX_LOAD,
                        help="1-minute load average above which a round is repeated")
    parser.add_argument("--round-retries", type=int, default=None,
                        help="repeats of a disturbed round before it is kept and flagged (default 2; 0 with --quick)")
    args = parser.parse_args(argv)

    out_dir = args.out_dir or (os.path.join(tempfile.gettempdir(), "baichuan2-bench-quick") if args.quick
                               else os.path.join(bc.ROOT, "docs"))
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "performance.json")
    previous = {}
    if os.path.exists(json_path) and (args.report_only or args.only or args.tasks):
        with open(json_path, encoding="utf-8") as handle:
            previous = json.load(handle)
    if args.report_only:
        if not previous:
            raise SystemExit(f"--report-only: {json_path} not found")
        data = previous
    else:
        log_dir = tempfile.mkdtemp(prefix="baichuan2-bench-logs-")
        print(f"logs: {log_dir}", flush=True)
        results = dict(previous.get("results", {}))
        started = datetime.datetime.now(datetime.timezone.utc)
        rounds = args.rounds or (1 if args.quick else 3)
        tasks = [(name, task_args) for name, task_args in task_list(args.quick, args.long_seq)
                 if (not args.only or task_args[0] in args.only)
                 and (not args.tasks or any(fnmatch.fnmatch(name, pattern) for pattern in args.tasks))]
        retries = args.round_retries if args.round_retries is not None else (0 if args.quick else 2)
        new_results, round_log = run_tasks(tasks, rounds, log_dir, args.timeout, args.max_load, retries)
        results.update(new_results)
        finished = datetime.datetime.now(datetime.timezone.utc)
        machine, date = machine_info(), started.strftime("%Y-%m-%d %H:%M UTC")
        # Where each result was measured: kept results keep their own run's date and machine.
        sources = previous.get("sources") or {name: {"date": previous["date"], "machine": previous["machine"]}
                                              for name in previous.get("results", {})}
        sources.update({name: {"date": date, "machine": machine} for name in new_results})
        data = {"date": date, "quick": args.quick, "machine": machine, "sources": sources,
                "threads": bc.THREADS, "shape": bc.BENCH_SHAPE, "wide_shape": bc.WIDE_SHAPE, "results": results,
                "rounds": rounds, "round_log": round_log, "max_load": args.max_load, "round_retries": retries,
                "total_s": (finished - started).total_seconds(),
                "command": "python benchmarks/run_all.py" + (" --quick" if args.quick else "")}
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
    md_path = os.path.join(out_dir, "performance.md")
    png_path = os.path.join(out_dir, "performance.png")
    bench_report.write_report(data, md_path, png_path)
    print(f"wrote {md_path}, {png_path}, {json_path}")


if __name__ == "__main__":
    main()
