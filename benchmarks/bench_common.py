"""Shared settings and helpers of the benchmarks (``benchmarks/run_all.py`` is the entry point).

The bench shape keeps Baichuan2's real vocabulary (125696) and scales width and depth down so that
fp32 weights, an AdamW training step and a 2048-slot KV cache fit a 2-core / 24 GB machine. Every
network (ours, MindFormers' Llama, ``transformers`` Llama) is built from ``BENCH_SHAPE``.

A measurement process calls ``pin_threads()`` before importing numpy/torch/mindspore, then
``setup_torch()`` / ``setup_mindspore()``: every runtime (OpenMP, OpenBLAS, MKL, torch, MindSpore's
CPU kernel pool) uses ``THREADS`` threads.
"""
import json
import os
import resource
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(ROOT, "research", "baichuan2")

THREADS = 2
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads():
    """Pin OpenMP/OpenBLAS/MKL to ``THREADS``; call before importing numpy, torch or mindspore."""
    for var in THREAD_VARS:
        os.environ[var] = str(THREADS)
    os.environ.setdefault("GLOG_v", "3")           # MindSpore: errors only
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def ffn_size(hidden, multiple_of=256):
    """Llama/Baichuan2 SwiGLU width: int(2 * 4h / 3) rounded up to ``multiple_of`` (11008 for h=4096)."""
    width = int(2 * 4 * hidden / 3)
    return multiple_of * ((width + multiple_of - 1) // multiple_of)


BENCH_SHAPE = {
    "vocab_size": 125696,      # Baichuan2's real vocabulary
    "hidden_size": 1024,
    "num_layers": 4,
    "num_heads": 8,
    "intermediate_size": ffn_size(1024),   # 2816
    "seq_length": 2048,        # KV cache slots: a 1024-token prompt plus new tokens fit
    "rms_norm_eps": 1e-6,
}
PROMPTS = (64, 1024)

# Run in the first round only (each costs minutes; see run_all.py). The batch-4 decode tasks and
# the batch-1 points they are compared with run in every round: their ratio is a target, and with one
# process each the real-width ratio of the same code read 2.97x and 3.33x three hours apart (docs/serving.md).
ONCE = ("decode-wide-ours7b-p1024",
        "finetune-unpacked-long", "finetune-packed-long",
        "train-ours7b-plainhead", "train-ours7b-nnadam")

# A real-width shape: Baichuan2-7B's hidden size, SwiGLU width, heads and vocabulary, 2 layers only
# (1.43 G parameters, 5.7 GB fp32). Its kernels are as large as the real model's, so per-kernel
# launch gaps weigh about as little in a decode step as they do in the real 7B/13B.
WIDE_SHAPE = dict(BENCH_SHAPE, hidden_size=4096, num_layers=2, num_heads=32, intermediate_size=ffn_size(4096))
SHAPES = {"bench": BENCH_SHAPE, "wide": WIDE_SHAPE}
DECODE_BATCH = 4          # batched decode: aggregate tokens/s against batch 1 at the same prompt
MAX_LOAD = 2.5            # 1-minute load average above which a round counts as disturbed


def weight_counts(shape=BENCH_SHAPE):
    """Parameter counts by part (elements): embedding table, decoder layers, final norm, lm_head."""
    h, f, v, n = shape["hidden_size"], shape["intermediate_size"], shape["vocab_size"], shape["num_layers"]
    per_layer = 4 * h * h + 3 * h * f + 2 * h
    return {"embedding": v * h, "layers": n * per_layer, "per_layer": per_layer, "norm": h, "lm_head": v * h}


def total_params(shape=BENCH_SHAPE):
    counts = weight_counts(shape)
    return counts["embedding"] + counts["layers"] + counts["norm"] + counts["lm_head"]


def decode_bytes_per_token(shape=BENCH_SHAPE, context=0, cache_slots=None, bytes_per=4, batch=1):
    """Bytes one decode step must read.

    weights: one embedding row per sequence, every layer weight, the final norm and the whole
    lm_head (read once for the whole batch).
    kv: keys and values of ``context`` positions (``cache_slots`` if the step reads the whole cache),
    per sequence of the batch.
    """
    counts = weight_counts(shape)
    weights = (batch * shape["hidden_size"] + counts["layers"] + counts["norm"] + counts["lm_head"]) * bytes_per
    slots = context if cache_slots is None else cache_slots
    kv = batch * 2 * shape["num_layers"] * slots * shape["hidden_size"] * bytes_per
    return {"weights": weights, "kv": kv}


def train_flops_per_token(shape=BENCH_SHAPE, seq=512):
    """Training FLOPs per token (forward + backward = 3 x forward).

    matmul: 6 x the parameters that enter a matrix product (decoder layers and lm_head; the
    embedding is a gather and the norms are elementwise, so neither counts).
    attention: 12 x layers x hidden x seq: the score (Q K^T) and context (P V) products, 2 x 2 x
    seq x hidden FLOPs per token and layer forward, times 3 for training, counted over the full
    seq x seq square, which is what the kernels compute (no causal skipping); the causally useful
    half is ``attention / 2``.
    """
    counts = weight_counts(shape)
    matmul = 6 * (counts["layers"] - shape["num_layers"] * 2 * shape["hidden_size"] + counts["lm_head"])
    attention = 12 * shape["num_layers"] * shape["hidden_size"] * seq
    return {"matmul": matmul, "attention": attention, "total": matmul + attention, "causal_factor": 1.0}


def peak_rss_mb():
    """Peak resident set size of this process so far, in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# A training step that still faults in new memory is not the steady state a run spends its time in: MindSpore's
# CPU memory pool can take new blocks in the first steps after compiling, and the kernels then fault their pages
# in (measured 2026-12-07 at the bench shape: 1 GiB and about 1.2 s more in each of steps 2 and 3). Warm-up goes
# on while a step faults in more than this, at most MAX_EXTRA_WARMUP steps beyond the fixed warm-up.
GROWTH_LIMIT_BYTES = 64 * 2 ** 20
MAX_EXTRA_WARMUP = 3


def timed_steps(call, warmup, steps):
    """Run ``call(i)`` for i = 0, 1, ...: ``warmup`` warm-up steps, more (at most ``MAX_EXTRA_WARMUP``) while the
    last one faulted in more than ``GROWTH_LIMIT_BYTES`` of new pages, then ``steps`` timed ones.

    Returns ``(times, warmup_used, faulted_mb)``: wall seconds and MiB of pages faulted in by every step (warm-up
    included), and how many leading steps were warm-up.
    """
    page = resource.getpagesize()
    times, faulted = [], []
    warmup_used = warmup
    i = 0
    while i < warmup_used + steps:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        call(i)
        times.append(time.perf_counter() - start)
        faulted.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) * page / 2 ** 20)
        still_growing = faulted[-1] * 2 ** 20 > GROWTH_LIMIT_BYTES
        if i == warmup_used - 1 and still_growing and warmup_used < warmup + MAX_EXTRA_WARMUP:
            warmup_used += 1
        i += 1
    return times, warmup_used, faulted


def current_rss_mb():
    import psutil  # pylint: disable=import-outside-toplevel
    return psutil.Process().memory_info().rss / 2 ** 20


def median(values):
    return float(statistics.median(values))


def setup_torch():
    import torch  # pylint: disable=import-outside-toplevel
    torch.set_num_threads(THREADS)
    torch.manual_seed(0)
    return torch


def setup_mindspore(mode="graph"):
    """MindSpore on CPU with ``THREADS`` kernel threads; ``mode`` 'graph' or 'pynative'."""
    if PLUGIN not in sys.path:
        sys.path.insert(0, PLUGIN)
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE, device_target="CPU")
    ms.device_context.cpu.op_tuning.threads_num(THREADS)
    ms.set_seed(0)
    return ms


class TimingStreamer:
    """Streamer for ``generate()`` (ours and ``transformers``): a timestamp at every ``put``.

    The first ``put`` (the prompt) comes before the prefill; each later one right after a token was
    chosen. So ``stamps[1] - stamps[0]`` is prefill + first token and the later gaps are decode steps.
    """

    def __init__(self):
        self.stamps = []

    def put(self, _value):
        self.stamps.append(time.perf_counter())

    def end(self):
        pass

    def prefill_s(self):
        return self.stamps[1] - self.stamps[0]

    def step_times(self):
        return [b - a for a, b in zip(self.stamps[1:], self.stamps[2:])]


def summarize_decode(runs, prompt, new_tokens):
    """Result dict from per-repetition (prefill seconds, [decode step seconds]) pairs."""
    decode_rates = [len(steps) / sum(steps) for _, steps in runs]
    all_steps = [s for _, steps in runs for s in steps]
    return {
        "prompt": prompt,
        "new_tokens": new_tokens,
        "repetitions": len(runs),
        "decode_tok_s": median(decode_rates),
        "decode_tok_s_min": min(decode_rates),
        "decode_tok_s_max": max(decode_rates),
        "ms_per_token": 1000.0 / median(decode_rates),
        "step_ms_median": 1000.0 * median(all_steps),
        "prefill_s": median([p for p, _ in runs]),
        "prefill_tok_s": prompt / median([p for p, _ in runs]),
    }


def write_result(path, result):
    result.setdefault("peak_rss_mb", peak_rss_mb())
    result["loadavg_end"] = list(os.getloadavg())
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=1)
