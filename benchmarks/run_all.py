"""Run every benchmark and write ``docs/performance.md`` + ``docs/performance.png``.

    .venv/bin/python benchmarks/run_all.py            # full run (about 15-25 min on 2 cores)
    .venv/bin/python benchmarks/run_all.py --quick    # smoke run (a few minutes), writes to a temp dir
    .venv/bin/python benchmarks/run_all.py --report-only --out-dir docs   # rebuild doc from performance.json

Each measurement runs in its own subprocess (``bench_tasks.py``), one after the other: MindSpore's
context is process-global, and the peak RSS of a process is then that of one measurement. Decode and
training measurements run ``--rounds`` times, interleaved (every task once, then every task again),
so that ours and its baselines see the same slow and fast phases of a shared host; the median round
is reported with the spread over rounds. The matrix-vector bandwidth is measured at the start of
every round and at the end.
Raw results go to ``<out-dir>/performance.json``; subprocess logs to a temporary folder (printed).
"""
import argparse
import datetime
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


def task_list(quick):
    """(name, bench_tasks.py arguments) in the order they run."""
    new, reps = (4, 1) if quick else (32, 5)
    tasks = [("bandwidth", ["bandwidth"])]
    for prompt in bc.PROMPTS:
        for impl in ("ours7b", "ours13b", "hf"):
            tasks.append((f"decode-{impl}-p{prompt}", ["decode", "--impl", impl, "--prompt", prompt,
                                                       "--new", new, "--reps", reps]))
        # MindFormers' Llama has no CPU KV cache: every step is a full forward, so fewer steps.
        mf_new, mf_reps = (2, 1) if quick else ((12, 3) if prompt < 512 else (5, 2))
        tasks.append((f"decode-mf-p{prompt}", ["decode", "--impl", "mf", "--prompt", prompt,
                                               "--new", mf_new, "--reps", mf_reps]))
    seq, warmup, steps = (64, 1, 1) if quick else (512, 2, 4)
    for impl in ("ours7b", "mf", "hf"):
        tasks.append((f"train-{impl}", ["train", "--impl", impl, "--batch", 1, "--seq", seq,
                                        "--warmup", warmup, "--steps", steps]))
    for impl in ("ours7b", "ours13b"):
        tasks.append((f"profile-decode-{impl}", ["profile", "--phase", "decode", "--impl", impl, "--prompt", 1024]))
    for impl in ("ours7b", "mf"):
        tasks.append((f"profile-train-{impl}", ["profile", "--phase", "train", "--impl", impl, "--batch", 1,
                                                "--seq", seq]))
    # Bandwidth again at the end (it also starts every round): the machine's memory bandwidth varies
    # with what else runs on the host, so the roofline uses the median of all measurements.
    tasks.append(("bandwidth-end", ["bandwidth"]))
    if quick:
        tasks = [(name, args + ["--quick"]) for name, args in tasks]
    return tasks


# The figure a round of each kind of task is judged by (higher is better).
HEADLINE = {"bandwidth": "best_gbs", "decode": "decode_tok_s", "train": "tokens_s"}


def combine_rounds(rounds, kind):
    """One result from the rounds of a task: the median round by its headline figure, with
    ``<headline>_rounds`` (every round's figure) and ``rounds``; failed rounds are dropped."""
    good = [r for r in rounds if "error" not in r]
    if not good:
        return rounds[-1]
    key = HEADLINE[kind]
    good.sort(key=lambda r: r[key])
    result = dict(good[(len(good) - 1) // 2])
    result[key + "_rounds"] = [r[key] for r in rounds if "error" not in r]
    result["rounds"] = len(good)
    result["failed_rounds"] = [r["error"] for r in rounds if "error" in r]
    return result


def run_tasks(tasks, rounds, log_dir, timeout):
    """Run ``tasks``: the bandwidth (start of each round), decode and train tasks ``rounds`` times,
    interleaved; then the profiles and the end-of-run bandwidth once. Returns {name: result}."""
    repeated = [(name, args) for name, args in tasks if args[0] in HEADLINE and name != "bandwidth-end"]
    collected = {name: [] for name, _ in repeated}
    results = {}

    def run(name, task_args, label):
        print(f"[{datetime.datetime.now():%H:%M:%S}] {label} ...", end=" ", flush=True)
        result = run_task(label, task_args, log_dir, timeout)
        print(f"{result['wall_s']:.0f} s" + (f"  ERROR {result['error']}" if "error" in result else ""), flush=True)
        return result

    for round_index in range(rounds):
        for name, task_args in repeated:
            label = name if rounds == 1 else f"{name}-round{round_index + 1}"
            collected[name].append(run(name, task_args, label))
    for name, task_args in repeated:
        results[name] = combine_rounds(collected[name], task_args[0])
    for name, task_args in tasks:
        if task_args[0] == "profile" or name == "bandwidth-end":
            results[name] = run(name, task_args, name)
    return results


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
    parser.add_argument("--only", nargs="*", choices=("bandwidth", "decode", "train", "profile"),
                        help="run only these kinds of task (others are kept from an existing performance.json)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the doc from <out-dir>/performance.json")
    parser.add_argument("--timeout", type=int, default=1800, help="seconds per subprocess")
    parser.add_argument("--rounds", type=int, default=None,
                        help="processes per decode/training measurement, interleaved (default 3; 1 with --quick)")
    args = parser.parse_args(argv)

    out_dir = args.out_dir or (os.path.join(tempfile.gettempdir(), "baichuan2-bench-quick") if args.quick
                               else os.path.join(bc.ROOT, "docs"))
    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "performance.json")
    previous = {}
    if os.path.exists(json_path) and (args.report_only or args.only):
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
        tasks = [(name, task_args) for name, task_args in task_list(args.quick)
                 if not args.only or task_args[0] in args.only]
        results.update(run_tasks(tasks, rounds, log_dir, args.timeout))
        data = {"date": started.strftime("%Y-%m-%d %H:%M UTC"), "quick": args.quick, "machine": machine_info(),
                "threads": bc.THREADS, "shape": bc.BENCH_SHAPE, "results": results, "rounds": rounds,
                "command": "python benchmarks/run_all.py" + (" --quick" if args.quick else "")}
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(data, handle, indent=1)
    md_path = os.path.join(out_dir, "performance.md")
    png_path = os.path.join(out_dir, "performance.png")
    bench_report.write_report(data, md_path, png_path)
    print(f"wrote {md_path}, {png_path}, {json_path}")


if __name__ == "__main__":
    main()
