"""Planned against measured host memory on MindSpore's CPU backend (``baichuan2_memory.plan``).

    python benchmarks/bench_memory.py                        # bench shape: finetune, LoRA, predict (+cache)
    python benchmarks/bench_memory.py --hidden 256 --layers 1 --heads 4 --seq 128 --json out.json
    python benchmarks/bench_memory.py measure --case lora ... # one measurement (run in a fresh process)

Every case runs in its own process: MindSpore's memory pool keeps what it grew to, so a process's peak RSS
is the peak of that one case. The process measures its own baseline first (``VmRSS`` after importing
MindSpore, MindFormers and the plugin, setting the context and running the same case once on a toy
network, so that the compiler and runtime's one-time memory is in the baseline), then builds
the network with the project's classes (fp32, portable CPU paths as ``bench_tasks.py``) and runs one
training step (``nn.TrainOneStepCell`` + ``nn.AdamWeightDecay`` in GRAPH mode) or one ``generate()``,
sampling its anonymous memory (``RssAnon`` of /proc/self/status, every 5 ms; see ``AnonSampler``). The plan
is compared with ``peak RssAnon - baseline RssAnon``: the framework baseline is measured, not planned.
``VmHWM`` (peak total RSS) is reported too.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
CASES = ("finetune", "lora", "predict", "predict_cache")
BENCH = {"vocab": 125696, "hidden": 1024, "layers": 4, "heads": 8, "ffn": 2816, "seq": 512, "batch": 1}
LORA = {"pet_type": "lora", "lora_rank": 8, "lora_alpha": 16, "lora_dropout": 0.0,
        "target_modules": ".*wq|.*wk|.*wv"}
TOLERANCE = 0.15       # the bound: plan within 15% of the measured peak above the baseline


def ffn_size(hidden, multiple_of=256):
    width = int(2 * 4 * hidden / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


def proc_status():
    """``VmRSS``, ``VmHWM``, ``RssAnon``, ``RssFile`` of this process in bytes."""
    values = {}
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                values[key] = int(rest.split()[0]) * 1024
    return values


class AnonSampler:
    """Peak ``RssAnon`` of this process, sampled every ``interval`` seconds by a thread.

    Anonymous memory (tensors, the memory pool, Python objects) is what a run allocates; total RSS also
    counts file-backed pages (mapped libraries), which the kernel drops and re-reads under memory pressure
    on a shared machine, so ``VmRSS`` / ``VmHWM`` can move without the run allocating anything.
    """

    def __init__(self, interval=0.005):
        import threading  # pylint: disable=import-outside-toplevel
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, proc_status()["RssAnon"])
            time.sleep(self.interval)

    def __enter__(self):
        self.peak = proc_status()["RssAnon"]
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, proc_status()["RssAnon"])


def model_config(shape, case):
    """The plugin's ``model_config`` keys for ``shape`` (fp32, portable CPU paths)."""
    return {"vocab_size": shape["vocab"], "hidden_size": shape["hidden"], "num_layers": shape["layers"],
            "num_heads": shape["heads"], "intermediate_size": shape["ffn"], "seq_length": shape["seq"],
            "batch_size": shape["batch"], "compute_dtype": "float32", "param_init_type": "float32",
            "embedding_init_type": "float32", "layernorm_compute_type": "float32",
            "softmax_compute_type": "float32", "rotary_dtype": "float32", "use_past": case == "predict_cache",
            "use_flash_attention": False, "fused_rms_norm": False, "rms_norm_eps": 1e-6,
            "pad_token_id": 0, "eos_token_id": 2, "do_sample": False}


def planned(shape, case, framework_bytes=0):
    """``baichuan2_memory.plan`` of one case on CPU (framework part 0: compared above the baseline)."""
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    run_mode = "finetune" if case in ("finetune", "lora") else "predict"
    return baichuan2_memory.plan(model_config(shape, case), {}, run_mode=run_mode, optimizer="AdamWeightDecay",
                                 recompute=False, batch_size=shape["batch"], device="CPU",
                                 pet_config=LORA if case == "lora" else None,
                                 use_past=case == "predict_cache", framework_bytes=framework_bytes,
                                 device_memory_bytes=2 ** 60)


# ----- one measurement (fresh process) -----------------------------------------------------------------

def measure(shape, case):
    """Build the network of ``shape``, run ``case`` once, return baseline / peak figures in bytes."""
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(var, "2")
    os.environ.setdefault("GLOG_v", "3")
    sys.path.insert(0, PLUGIN)
    start = time.perf_counter()
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import nn, Tensor  # pylint: disable=import-outside-toplevel
    import mindformers  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
    from mindformers.models import LlamaConfig  # pylint: disable=import-outside-toplevel
    import baichuan2_7b  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    imported = proc_status()

    def run(run_shape):
        """Build the network of ``run_shape`` and run ``case`` once; returns it."""
        net = baichuan2_7b.Baichuan7BV2ForCausalLM(LlamaConfig(**model_config(run_shape, case)))
        rng = np.random.RandomState(0)
        if case in ("finetune", "lora"):
            if case == "lora":
                from mindformers.pet import get_pet_model  # pylint: disable=import-outside-toplevel
                get_pet_model(net, dict(LORA))
            net.set_train(True)
            step = nn.TrainOneStepCell(net, nn.AdamWeightDecay(net.trainable_params(), learning_rate=1e-5,
                                                               weight_decay=0.0))
            step.set_train(True)
            batch = rng.randint(3, run_shape["vocab"], size=(run_shape["batch"], run_shape["seq"] + 1))
            loss = float(step(Tensor(batch.astype(np.int32))).asnumpy())
            assert np.isfinite(loss), loss
        else:
            net.set_train(False)
            prompt = rng.randint(3, run_shape["vocab"], size=(run_shape["batch"], run_shape["seq"] // 2)).tolist()
            net.generate(prompt, max_new_tokens=2, do_sample=False, eos_token_id=[-1])
        return net

    # Framework baseline: the same case once on a toy network (vocab 512, width 32), so that what any run
    # pays once (graph compiler, actor runtime, kernel libraries, memory pool) is in the baseline.
    run(dict(shape, vocab=512, hidden=32, layers=1, heads=2, ffn=96, seq=16, batch=1))
    baseline = proc_status()
    with AnonSampler() as anon:
        net = run(shape)
    peak = proc_status()
    trainable = int(sum(int(np.prod(p.shape)) for p in net.trainable_params()))
    return {"case": case, "shape": shape, "imported_rss": imported["VmRSS"], "baseline_rss": baseline["VmRSS"],
            "baseline_anon": baseline["RssAnon"], "peak_rss": peak["VmHWM"], "peak_anon": anon.peak,
            "end_anon": peak["RssAnon"], "end_file": peak["RssFile"],
            "measured_bytes": anon.peak - baseline["RssAnon"],
            "trainable_params": trainable, "seconds": time.perf_counter() - start}


def with_plan(result):
    memory_plan = planned(result["shape"], result["case"])
    result["planned_bytes"] = memory_plan.per_device_bytes
    result["plan_parts"] = memory_plan.parts
    result["relative_error"] = memory_plan.per_device_bytes / result["measured_bytes"] - 1.0
    return result


def start_case(shape, case):
    """Start ``measure`` in a fresh process without waiting (the test runs a few side by side)."""
    argv = [sys.executable, os.path.abspath(__file__), "measure", "--case", case]
    for key, value in shape.items():
        argv += [f"--{key}", str(value)]
    workdir = tempfile.mkdtemp(prefix="bench_memory_")         # LoRA writes output/ here
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=workdir,
                            env=dict(os.environ, GLOG_v="3"))
    proc.workdir = workdir
    return proc


def finish_case(proc, case, timeout=600):
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        shutil.rmtree(getattr(proc, "workdir", ""), ignore_errors=True)
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"measurement {case} failed (exit {proc.returncode}): {err[-2000:]}")
    return with_plan(json.loads(lines[-1]))


def run_cases(cases, max_parallel=2, wait_s=900):
    """Measure ``[(shape, case)]`` in fresh processes, at most ``max_parallel`` at a time, each started only
    when the host has the memory the planner expects it to need (the machine may be shared). Results in order."""
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    pending, running, results = list(enumerate(cases)), [], {}
    deadline = time.monotonic() + wait_s
    while pending or running:
        for item in list(running):
            index, proc, case = item
            if proc.poll() is not None:
                results[index] = finish_case(proc, case)
                running.remove(item)
        if pending and len(running) < max_parallel:
            index, (shape, case) = pending[0]
            need = planned(shape, case).per_device_bytes + baichuan2_memory.CPU_FRAMEWORK_BYTES
            if not running or baichuan2_memory.host_available_bytes() > 1.2 * need or time.monotonic() > deadline:
                pending.pop(0)
                running.append((index, start_case(shape, case), case))
                continue
        time.sleep(0.5)
    return [results[i] for i in range(len(cases))]


def table(results):
    mib = 2 ** 20
    rows = ["| case | shape (h / layers / seq / batch) | baseline RssAnon MiB | peak RssAnon MiB | measured "
            "above baseline MiB | planned MiB | plan / measured | biggest planned parts |",
            "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        s = r["shape"]
        parts = sorted(((v, k) for k, v in r["plan_parts"].items() if v), reverse=True)[:3]
        rows.append(f"| {r['case']} | {s['hidden']} / {s['layers']} / {s['seq']} / {s['batch']} | "
                    f"{r['baseline_anon'] / mib:,.0f} | {r['peak_anon'] / mib:,.0f} | "
                    f"{r['measured_bytes'] / mib:,.0f} | "
                    f"{r['planned_bytes'] / mib:,.0f} | {1 + r['relative_error']:.3f} | "
                    + ", ".join(f"{k} {v / mib:,.0f}" for v, k in parts) + " |")
    return "\n".join(rows)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", nargs="?", default="table", choices=("table", "measure"))
    parser.add_argument("--case", choices=CASES, help="measure: the one case to run")
    parser.add_argument("--cases", nargs="+", choices=CASES, default=list(CASES), help="table: cases to run")
    for key, value in BENCH.items():
        parser.add_argument(f"--{key}", type=int, default=None if key == "ffn" else value)
    parser.add_argument("--json", help="table: also write the results to this JSON file")
    args = parser.parse_args(argv)
    shape = {key: getattr(args, key) for key in BENCH}
    if shape["ffn"] is None:
        shape["ffn"] = ffn_size(shape["hidden"])
    return args, shape


def main(argv=None):
    args, shape = parse_args(argv)
    if args.task == "measure":
        print(json.dumps(measure(shape, args.case)), flush=True)
        return 0
    results = run_cases([(shape, case) for case in args.cases], max_parallel=1)
    print(table(results))
    worst = max(abs(r["relative_error"]) for r in results)
    print(f"\nlargest |plan / measured - 1| = {worst:.3f} (bound {TOLERANCE})")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
