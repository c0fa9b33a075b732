"""Markdown report and PNG chart from the results of ``run_all.py`` (no MindSpore/torch import)."""
import bench_common as bc

MIB = 2 ** 20
TARGET_SPEEDUP = 1.5          # decode vs transformers
TARGET_ROOFLINE = 0.70        # decode vs bandwidth roofline
TARGET_LONG_PROMPT = 1.25     # ms/token at prompt 1024 vs 64
TARGET_PACKED = 2.0           # fine-tuning real tokens/s, packed vs unpacked, seq 512
TARGET_GEMM_SHARE = 0.85      # training FLOP/s vs the measured fp32 GEMM peak
TARGET_WIDE_ROOFLINE = 0.85   # real-width decode vs its roofline
TARGET_BATCH = 3.0            # batch-4 aggregate decode tokens/s vs batch 1
PLAIN_HEAD = "lm_head non-MatMul ops (NormHead row norms and their gradients)"
LABELS = {"ours7b": "Baichuan2 7B-shape (RoPE), ours", "ours13b": "Baichuan2 13B-shape (ALiBi), ours",
          "hf": "transformers LlamaForCausalLM", "mf": "MindFormers LlamaForCausalLM"}
SHORT = {"ours7b": "ours 7B", "ours13b": "ours 13B", "hf": "transformers", "mf": "MF Llama (no cache)"}


class Results:
    """Access to the raw results; ``get`` returns None for a missing or failed task."""

    def __init__(self, data):
        self.data = data
        self.results = data.get("results", {})

    def get(self, name):
        result = self.results.get(name)
        return None if result is None or "error" in result else result

    def error(self, name):
        result = self.results.get(name)
        if result is None:
            return "not run"
        return result.get("error")

    def decode(self, impl, prompt):
        return self.get(f"decode-{impl}-p{prompt}")

    def bandwidth_runs(self):
        return [(name, self.get(name)) for name in ("bandwidth", "bandwidth-end") if self.get(name)]

    def bandwidth_values(self):
        """Every matrix-vector bandwidth measurement of the run (GB/s): each round's and the end's."""
        values = []
        for _, result in self.bandwidth_runs():
            values += result.get("best_gbs_rounds") or [result["best_gbs"]]
        return values

    def bandwidth_gbs(self):
        """The machine's matrix-vector bandwidth: the median of the measurements spread over the run
        (the host's bandwidth moves by tens of percent; the highest one is reported beside it)."""
        values = sorted(self.bandwidth_values())
        return values[(len(values) - 1) // 2] if values else None

    def gemm_gflops(self):
        """The machine's fp32 matrix-multiply peak: the median round's best kernel (GFLOP/s)."""
        gemm = self.get("gemm")
        return gemm["best_gflops"] if gemm else None

    def step_roofline(self, shape, prompt, new, window=None, batch=1):
        """Decode steps/s the bandwidth allows at ``shape`` for a batch (weights read once, KV per row)."""
        bandwidth = self.bandwidth_gbs()
        if not bandwidth:
            return None
        parts = bc.decode_bytes_per_token(shape, context=prompt + new / 2, cache_slots=window, batch=batch)
        return bandwidth * 1e9 / (parts["weights"] + parts["kv"])

    def roofline(self, prompt=None, new=0, kv_slots=None, bandwidth=None):
        """Tokens/s the bandwidth (GB/s; default the machine's) allows: weights only, or weights + KV at
        the mean decode context."""
        bandwidth = bandwidth or self.bandwidth_gbs()
        if not bandwidth:
            return None
        if prompt is None:
            need = bc.decode_bytes_per_token()["weights"]
        else:
            parts = bc.decode_bytes_per_token(context=prompt + new / 2, cache_slots=kv_slots)
            need = parts["weights"] + parts["kv"]
        return bandwidth * 1e9 / need


def _fmt(value, digits=2, unit=""):
    if value is None:
        return "n/a"
    return f"{value:,.{digits}f}{unit}"


def _status(measured, target, higher_is_better=True):
    if measured is None:
        return "not measured"
    if higher_is_better:
        return "met" if measured >= target else f"missed by {100 * (target - measured) / target:.0f}%"
    return "met" if measured <= target else f"missed by {100 * (measured - target) / target:.0f}%"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# targets

def targets(res):
    """Rows (target, measured, status, why) of the targets table."""
    rows = []
    roof = res.roofline()
    for impl in ("ours7b", "ours13b"):
        for prompt in bc.PROMPTS:
            ours, hf = res.decode(impl, prompt), res.decode("hf", prompt)
            ratio = ours["decode_tok_s"] / hf["decode_tok_s"] if ours and hf else None
            status = _status(ratio, TARGET_SPEEDUP)
            why = ""
            if status.startswith("missed") and roof and hf:
                ceiling = roof / hf["decode_tok_s"]
                why = (f"transformers already runs at {100 / ceiling:.0f}% of the roofline: no implementation can "
                       f"beat it by more than {ceiling:.2f}x here" if ceiling < TARGET_SPEEDUP * 1.05 else
                       f"ours at {100 * ours['decode_tok_s'] / roof:.0f}% of the roofline (profile below)")
            rows.append((f"{SHORT[impl]} decode >= {TARGET_SPEEDUP}x transformers, prompt {prompt}",
                         _fmt(ratio, 2, "x"), status, why))
    for impl in ("ours7b", "ours13b"):
        for prompt in bc.PROMPTS:
            ours = res.decode(impl, prompt)
            share = ours["decode_tok_s"] / roof if ours and roof else None
            status = _status(share, TARGET_ROOFLINE)
            rows.append((f"{SHORT[impl]} decode >= {TARGET_ROOFLINE:.0%} of roofline, prompt {prompt}",
                         _fmt(None if share is None else 100 * share, 0, "%"), status,
                         decode_why(res, impl) if status.startswith("missed") else ""))
    for impl in ("ours7b", "ours13b"):
        short, long = res.decode(impl, bc.PROMPTS[0]), res.decode(impl, bc.PROMPTS[-1])
        ratio = long["ms_per_token"] / short["ms_per_token"] if short and long else None
        status = _status(ratio, TARGET_LONG_PROMPT, False)
        why = ""
        if ratio is not None:
            why = f"{short['ms_per_token']:.1f} -> {long['ms_per_token']:.1f} ms/token; a decode step reads "
            why += ("each row's context in place (the in-place decode attention)" if _in_place(long) else
                    f"the cache window that holds the context ({_window(short)} slots at prompt {bc.PROMPTS[0]}, "
                    f"{_window(long)} at {bc.PROMPTS[-1]})")
        rows.append((f"{SHORT[impl]} ms/token at prompt {bc.PROMPTS[-1]} <= {TARGET_LONG_PROMPT}x prompt "
                     f"{bc.PROMPTS[0]}", _fmt(ratio, 2, "x"), status, why))
    ours, mf = res.get("train-ours7b"), res.get("train-mf")
    ratio = ours["tokens_s"] / mf["tokens_s"] if ours and mf else None
    status = _status(ratio, 1.0)
    rows.append(("ours 7B training tokens/s >= MindFormers Llama", _fmt(ratio, 2, "x"), status,
                 train_why(res) if status.startswith("missed") else ""))
    rows += new_targets(res)
    return rows


def packed_ratio(res, suffix=""):
    """(packed / unpacked real tokens/s, why-not) of the fine-tuning measurements."""
    packed, unpacked = res.get(f"finetune-packed{suffix}"), res.get(f"finetune-unpacked{suffix}")
    if packed and packed.get("available") is False:
        return None, f"packing not available: {packed.get('reason', '?')}"
    if not packed or not unpacked:
        return None, f"failed: {res.error(f'finetune-packed{suffix}') or res.error(f'finetune-unpacked{suffix}')}"
    return packed["real_tokens_s"] / unpacked["real_tokens_s"], ""


def train_share(res, name="train-ours7b"):
    """(training GFLOP/s, share of the GEMM peak) of a training measurement."""
    train, peak = res.get(name), res.gemm_gflops()
    if not train or "train_gflops" not in train or not peak:
        return None, None
    return train["train_gflops"], train["train_gflops"] / peak


def matmul_share_note(res):
    """Why training stays below the GEMM peak: the profile's non-MatMul time."""
    prof = res.get("profile-train-ours7b")
    if not prof:
        return "no training profile"
    cats = prof["categories_ms"]
    matmul = sum(v for k, v in cats.items() if "MatMul" in k and "non-MatMul" not in k)
    others = sorted(((k, v) for k, v in cats.items() if not ("MatMul" in k and "non-MatMul" not in k)),
                    key=lambda kv: -kv[1])[:3]
    wall = prof["wall_ms"]
    return (f"MatMul kernels are {100 * matmul / wall:.0f}% of a profiled step ({matmul / 1000:.2f} of "
            f"{wall / 1000:.2f} s); the rest is " + ", ".join(f"{k} {v / 1000:.2f} s" for k, v in others)
            + ", which run at memory speed, not at the GEMM peak")


def wide_decode(res, prompt, batch=1):
    name = f"decode-wide-ours7b-p{prompt}" if batch == 1 else f"decode-wide-ours7b-b{batch}-p{prompt}"
    return res.get(name), name


def bench_batch_decode(res, batch):
    name = f"decode-ours7b-b{batch}-p{bc.PROMPTS[0]}"
    return res.get(name), name


def decode_share(res, result, shape):
    """Share of the roofline (bandwidth / bytes of a step: the weights, and the KV slots it reads) of a decode
    result."""
    if not result:
        return None
    roof = res.step_roofline(shape, result["prompt"], result["new_tokens"], _kv_read_slots(result),
                             result.get("batch", 1))
    return result["decode_tok_s"] / roof if roof else None


def new_targets(res):
    """Targets of issue #10: packing, training FLOP/s, training memory, real-width and batched decode."""
    rows = []
    for suffix, label in (("", "seq"), ("-long", "long sequence")):
        ratio, why = packed_ratio(res, suffix)
        seq = (res.get(f"finetune-unpacked{suffix}") or res.get(f"finetune-packed{suffix}") or {}).get("seq")
        label = f"seq {seq or '?'}" if not suffix else f"long sequence ({seq or '?'})"
        rows.append((f"fine-tuning real tokens/s, packed >= {TARGET_PACKED:.0f}x unpacked, {label}",
                     _fmt(ratio, 2, "x"), _status(ratio, TARGET_PACKED), why or packing_why(res, suffix, ratio)))
    gflops, share = train_share(res)
    status = _status(share, TARGET_GEMM_SHARE)
    rows.append((f"ours 7B training FLOP/s >= {TARGET_GEMM_SHARE:.0%} of the fp32 GEMM peak",
                 "n/a" if share is None else f"{100 * share:.0f}% ({gflops:.0f} of {res.gemm_gflops():.0f} GFLOP/s)",
                 status, matmul_share_note(res) if status.startswith("missed") else ""))
    ours, mf = res.get("train-ours7b"), res.get("train-mf")
    ratio = ours["peak_rss_mb"] / mf["peak_rss_mb"] if ours and mf else None
    rows.append(("ours 7B training peak RSS <= MindFormers Llama's",
                 "n/a" if ratio is None else f"{ours['peak_rss_mb']:,.0f} vs {mf['peak_rss_mb']:,.0f} MiB ({ratio:.2f}x)",
                 _status(ratio, 1.0, False), memory_why(res) if ratio and ratio > 1 else ""))
    wide = bc.WIDE_SHAPE
    for prompt in bc.PROMPTS:
        result, name = wide_decode(res, prompt)
        share = decode_share(res, result, wide)
        why = "" if result else f"failed: {res.error(name)}"
        if result and share is not None and share < TARGET_WIDE_ROOFLINE:
            why = (f"{result['ms_per_token']:.0f} ms/step vs {1000 * share / result['decode_tok_s']:.0f} ms "
                   "roofline (bandwidth / bytes a step reads)")
        rows.append((f"real-width decode (h {wide['hidden_size']}, 2 layers) >= {TARGET_WIDE_ROOFLINE:.0%} of roofline, "
                     f"prompt {prompt}", _fmt(None if share is None else 100 * share, 0, "%"),
                     _status(share, TARGET_WIDE_ROOFLINE), why))
    batch = bc.DECODE_BATCH
    for label, (one, many, name) in (("bench shape", (res.decode("ours7b", bc.PROMPTS[0]),) + bench_batch_decode(res, batch)),
                                      ("real-width shape", (wide_decode(res, bc.PROMPTS[0])[0],)
                                       + wide_decode(res, bc.PROMPTS[0], batch))):
        ratio = many["aggregate_tok_s"] / one["decode_tok_s"] if one and many else None
        why = "" if many else f"failed: {res.error(name)}"
        if ratio is not None and ratio < TARGET_BATCH:
            why = (f"{one['ms_per_token']:.1f} -> {1000 / many['decode_tok_s']:.1f} ms per step from batch 1 to "
                   f"{batch}: the one-pass kernel (baichuan2_rows_matmul, fp32 cached decode on CPU) reads each "
                   "weight once for all rows, but with more rows it computes more per byte and reads slower where "
                   "the FMA units are narrow (AVX2)" + ("" if _in_place(many) else
                                                        "; the copies of each layer's cache window and the per-head "
                                                        "attention products grow with the rows") + " (docs/serving.md)")
        rows.append((f"batch-{batch} decode aggregate tokens/s >= {TARGET_BATCH:.0f}x batch 1, {label}, prompt "
                     f"{bc.PROMPTS[0]}", _fmt(ratio, 2, "x"), _status(ratio, TARGET_BATCH), why))
    return rows


def packing_why(res, suffix, ratio):
    packed, unpacked = res.get(f"finetune-packed{suffix}"), res.get(f"finetune-unpacked{suffix}")
    if ratio is None or not packed or not unpacked:
        return ""
    return (f"records {unpacked['records']} -> {packed['records']}; real tokens per record "
            f"{unpacked['input_tokens_per_record']:.0f} -> {packed['input_tokens_per_record']:.0f} of "
            f"{packed['seq']} ({unpacked['fill']:.0%} -> {packed['fill']:.0%} filled); step "
            f"{unpacked['step_s']:.2f} -> {packed['step_s']:.2f} s")


def memory_why(res):
    ours, mf, plain = res.get("train-ours7b"), res.get("train-mf"), res.get("train-ours7b-plainhead")
    if not plain:
        return "no plain-head measurement"
    head = ours["peak_rss_mb"] - plain["peak_rss_mb"]
    rest = plain["peak_rss_mb"] - mf["peak_rss_mb"]
    return (f"NormHead's training path (row norms of the {bc.BENCH_SHAPE['vocab_size']} x "
            f"{bc.BENCH_SHAPE['hidden_size']} head and their gradient; on CPU fp32 the one-pass kernels of "
            f"baichuan2_norm_head) accounts for {head:,.0f} MiB "
            f"(ours with a plain head: {plain['peak_rss_mb']:,.0f} MiB); "
            f"the rest of the model {rest:+,.0f} MiB (memory section)")


def _window(result):
    """Cache window of the (last) decode step of a result; results from before windows read all the slots."""
    return result.get("kv_window_slots", bc.BENCH_SHAPE["seq_length"])


def _in_place(result):
    """Whether the result's decode steps attended with the in-place kernel (``baichuan2_decode_attention``)."""
    return result.get("decode_attention") == "in-place kernel"


def _kv_read_slots(result):
    """Cache slots per row a decode step of the result reads: None for each row's context (the in-place
    kernel reads only that, the least any step can), else the window the portable attention copies."""
    return None if _in_place(result) else _window(result)


def _kv_read_note(result):
    if _in_place(result):
        return "each row's context, read in place (the in-place decode attention)"
    return f"the first {_window(result)} cache slots (the window that holds the context)"


def decode_why(res, impl):
    """One line: the largest avoidable parts of a decode step, from the profile."""
    prof = res.get(f"profile-decode-{impl}")
    if prof is None:
        return "no profile"
    cats = prof["categories_ms"]
    parts = [f"{prof['wall_ms']:.1f} ms/step vs {1000 / res.roofline():.1f} ms roofline"]
    for key, label in (("KV cache write", "KV-cache write (copies the cache)"),
                       ("attention", "attention over each row's context in place" if _in_place(prof)
                        else f"attention over a {_window(prof)}-slot cache window")):
        value = sum(v for k, v in cats.items() if k.startswith(key))
        if value >= 0.5:
            parts.append(f"{label} {value:.1f} ms")
    gap = prof["wall_ms"] - prof["ops_ms"]
    if gap >= 1:
        parts.append(f"outside kernels {gap:.1f} ms")
    return "; ".join(parts) + " (profile below)"


def train_why(res):
    ours, mf = res.get("profile-train-ours7b"), res.get("profile-train-mf")
    if not ours or not mf:
        return "no profile"
    norm = ours["categories_ms"].get("lm_head non-MatMul ops (NormHead row norms and their gradients)", 0.0)
    other = ours["ops_ms"] - norm - mf["ops_ms"]
    return (f"Baichuan2's NormHead (row norms of the {bc.BENCH_SHAPE['vocab_size']} x "
            f"{bc.BENCH_SHAPE['hidden_size']} head and their gradient, which Llama's plain head does not have) costs "
            f"{norm / 1000:.2f} s per step ({100 * norm / ours['wall_ms']:.0f}% of a profiled step); all other "
            f"kernels together differ by {other / 1000:+.2f} s (profile below)")


# ----------------------------------------------------------------------------------------------------
# explanations from the profiles

def _profile_lines(profile):
    cats = sorted(profile["categories_ms"].items(), key=lambda kv: -kv[1])
    return [(name, value) for name, value in cats if value >= 0.05]


def explain_decode(res):
    prof = res.get("profile-decode-ours7b")
    lines = []
    roof = res.roofline()
    bandwidth = res.bandwidth_gbs()
    if prof is None:
        return ["No decode profile (profile-decode-ours7b: %s)." % res.error("profile-decode-ours7b")]
    wall, ops = prof["wall_ms"], prof["ops_ms"]
    lines.append(f"A decode step of the 7B shape (network call only, prompt {prof['prompt']}) took "
                 f"{wall:.1f} ms of wall time; the roofline allows {1000 / roof:.1f} ms."
                 if roof else f"A decode step took {wall:.1f} ms.")
    lines.append("")
    rows = []
    head_bytes = bc.BENCH_SHAPE["vocab_size"] * bc.BENCH_SHAPE["hidden_size"] * 4
    layer_bytes = bc.weight_counts()["layers"] * 4
    for name, value in _profile_lines(prof):
        note = ""
        if name == "lm_head MatMul":
            note = f"reads {head_bytes / MIB:.0f} MiB: {head_bytes / value / 1e6:.1f} GB/s"
        elif name == "layer MatMuls":
            note = f"reads {layer_bytes / MIB:.0f} MiB: {layer_bytes / value / 1e6:.1f} GB/s"
        elif name.startswith("KV cache write"):
            note = ("in place (IndexAdd)" if "IndexAdd" in name
                    else "copies each layer's whole K and V cache (see below)")
        elif name.startswith("attention"):
            note = (f"reads K and V of {_kv_read_note(prof)}, of {bc.BENCH_SHAPE['seq_length']} cache slots")
        rows.append((name, f"{value:.2f}", f"{100 * value / wall:.0f}%", note))
    gap = wall - ops
    launch = ""
    if prof.get("kernels_per_step"):
        launch = (f"; {prof['kernels_per_step']:.0f} kernels per step, median idle gap between kernels "
                  f"{prof['median_gap_us']:.0f} us")
    rows.append(("outside the kernels (launch, host scheduling)", f"{gap:.2f}", f"{100 * gap / wall:.0f}%",
                 "wall time minus the sum of kernel times" + (" (negative: kernels overlapped)" if gap < 0 else "")
                 + launch))
    lines.append(_table(["part of a decode step", "ms", "share", "note"], rows))
    lines.append("")
    cats = prof["categories_ms"]
    write = sum(v for k, v in cats.items() if k.startswith("KV cache write"))
    attention = sum(v for k, v in cats.items() if k.startswith("attention"))
    if bandwidth:
        lines.append(f"Best measured matrix-vector bandwidth: {bandwidth:.1f} GB/s.")
    if write > 0.5 and any(k.startswith("KV cache write (ScatterNdUpdate") for k in cats):
        cache_mib = 2 * bc.BENCH_SHAPE["seq_length"] * bc.BENCH_SHAPE["hidden_size"] * 4 / MIB
        lines.append(f"- KV-cache write, {write:.1f} ms per step: MindSpore's CPU `ScatterNdUpdate` kernel "
                     f"copies its whole input on every call, so writing one column costs a copy of the layer's "
                     f"{cache_mib / 2:.0f} MiB K (and V) cache; the time grows with `seq_length`, not with the "
                     f"data written (`baichuan2_layers.KVCache.update`).")
    if attention > 0.5 and _in_place(prof):
        lines.append(f"- Attention, {attention:.1f} ms per step: one kernel per layer reads each row's keys and "
                     "values up to its position where they lie in the cache (`baichuan2_decode_attention`), so its "
                     "cost grows with the context token by token.")
    elif attention > 0.5:
        lines.append(f"- Attention, {attention:.1f} ms per step: a decode step attends over the first "
                     f"{_window(prof)} cache slots (the smallest window, in steps of max(128, seq_length / 8), "
                     "that holds the context; masked beyond it), so its cost grows with the context in steps.")
    gap = wall - ops
    if gap > 1 and prof.get("kernels_per_step"):
        lines.append(f"- Outside the kernels, {gap:.1f} ms per step: the step runs {prof['kernels_per_step']:.0f} "
                     f"kernels and MindSpore's CPU runtime leaves a median {prof['median_gap_us']:.0f} us between "
                     "two of them (launch and thread hand-over), plus the host side of the call (inputs, "
                     "`asnumpy`). Fewer, larger kernels per step (one fused QKV and one fused gate/up projection "
                     "per layer, fewer RoPE/mask/norm ops) would shrink it.")
    head = cats.get("lm_head MatMul")
    if head and bandwidth:
        achieved = head_bytes / head / 1e6
        verdict = ("at the machine's bandwidth" if achieved >= 0.9 * bandwidth
                   else "below the best matrix-vector kernel: MindSpore's CPU MatMul costs the difference")
        lines.append(f"- lm_head: {head:.1f} ms for {head_bytes / MIB:.0f} MiB, i.e. {achieved:.1f} GB/s against "
                     f"{bandwidth:.1f} GB/s measured for the best matrix-vector kernel ({verdict}). The lm_head is "
                     f"{100 * head_bytes / bc.decode_bytes_per_token()['weights']:.0f}% of the bytes of a step "
                     "at this shape (real vocabulary, reduced width).")
    lines += ["", "**Against transformers.** " + ceiling_text(res)]
    return lines


def ceiling_text(res):
    """How much faster than transformers any implementation could be: roofline / transformers."""
    roof = res.roofline()
    parts = []
    for prompt in bc.PROMPTS:
        hf = res.decode("hf", prompt)
        if hf and roof:
            parts.append(f"prompt {prompt}: transformers reaches {100 * hf['decode_tok_s'] / roof:.0f}% of the "
                         f"roofline, so the ceiling is {roof / hf['decode_tok_s']:.2f}x")
    if not parts:
        return "No transformers measurement."
    hf_shares = [res.decode("hf", p)["decode_tok_s"] / roof for p in bc.PROMPTS if res.decode("hf", p) and roof]
    close = min(hf_shares) >= 0.6 if hf_shares else False
    runs = res.bandwidth_runs()
    if not close and torch_thread_note(runs):
        torch_bw = max(r["torch_gbs"] for _, r in runs)
        return ("No implementation can decode faster than the roofline, so the speed-up over transformers is "
                "capped at roofline / transformers: " + "; ".join(parts) + ". transformers is held back by torch's "
                f"fp32 matrix-vector kernel, which reads at one core's speed ({torch_bw:.1f} GB/s against "
                f"{res.bandwidth_gbs():.1f} GB/s for the best kernel): a MindSpore implementation at the roofline "
                "would be that ceiling faster.")
    return ("No implementation can decode faster than the roofline, so the speed-up over transformers is capped "
            "at roofline / transformers: " + "; ".join(parts) + ". " +
            ("transformers is itself close to the bandwidth limit here (its matrix-vector products run at "
             "memory speed), so a 1.5x target is out of reach wherever that ceiling is below 1.5x."
             if close else
             "transformers stays well below the bandwidth limit in this run (per-op overhead of eager PyTorch, "
             "or cores shared with other work: see the load average above)."))


def explain_train(res):
    ours, mf = res.get("profile-train-ours7b"), res.get("profile-train-mf")
    if not ours or not mf:
        return ["No training profiles (%s / %s)." % (res.error("profile-train-ours7b"), res.error("profile-train-mf"))]
    names = sorted(set(ours["categories_ms"]) | set(mf["categories_ms"]),
                   key=lambda n: -max(ours["categories_ms"].get(n, 0), mf["categories_ms"].get(n, 0)))
    rows = []
    for name in names:
        a, b = ours["categories_ms"].get(name, 0.0), mf["categories_ms"].get(name, 0.0)
        if max(a, b) < 1:
            continue
        rows.append((name, f"{a / 1000:.3f}", f"{b / 1000:.3f}", f"{(a - b) / 1000:+.3f}"))
    gap_a, gap_b = ours["wall_ms"] - ours["ops_ms"], mf["wall_ms"] - mf["ops_ms"]
    rows.append(("outside the kernels (negative: overlap)", f"{gap_a / 1000:.3f}", f"{gap_b / 1000:.3f}", f"{(gap_a - gap_b) / 1000:+.3f}"))
    rows.append(("**step (wall)**", f"{ours['wall_ms'] / 1000:.3f}", f"{mf['wall_ms'] / 1000:.3f}",
                 f"{(ours['wall_ms'] - mf['wall_ms']) / 1000:+.3f}"))
    lines = [f"Training step, batch {ours['batch']} x {ours['seq']} tokens, seconds per step by category:", "",
             _table(["category", "ours 7B (s)", "MF Llama (s)", "difference (s)"], rows), ""]
    norm = ours["categories_ms"].get("lm_head non-MatMul ops (NormHead row norms and their gradients)", 0.0)
    if norm > 1:
        lines.append(f"- NormHead: Baichuan2's lm_head divides every logit by the norm of its weight row. On CPU "
                     f"(fp32) the row norms and the norm's share of the gradient are one-pass kernels "
                     f"(`baichuan2_norm_head`): one pass over the {bc.BENCH_SHAPE['vocab_size']} x "
                     f"{bc.BENCH_SHAPE['hidden_size']} weight for the norms and one for the norm's share of "
                     f"its gradient ({norm / 1000:.3f} s here). The column scaling is fused into the loss's two "
                     "kernels (one pass over the tokens x vocab raw product each way), counted as the loss. "
                     "MindFormers' Llama has a plain linear head, so this cost is inherent to the model, not to "
                     "the port; it shrinks relative to the MatMuls as the number of tokens per step grows.")
    return lines


# ----------------------------------------------------------------------------------------------------
# the document

def _machine_name(machine):
    return f"{machine['cpu_model']} ({machine.get('cpu_family_model', '')}; {machine.get('simd', '')})"


def kept_results_lines(data):
    """One line per earlier run whose results this document keeps (``run_all.py --only/--tasks``): which
    kinds of task, when and on which machine. Ratios are only ever taken within one run's results."""
    groups = {}
    for name, source in data.get("sources", {}).items():
        if name in data["results"] and source["date"] != data["date"]:
            groups.setdefault((source["date"], _machine_name(source["machine"])), set()).add(name.split("-")[0])
    return [f"- Kept from the run of {date} on {machine} (not re-measured here): {', '.join(sorted(kinds))}."
            for (date, machine), kinds in sorted(groups.items())]


def write_report(data, md_path, png_path):
    res = Results(data)
    machine = data["machine"]
    lines = ["# Performance", ""]
    if data.get("quick"):
        lines += ["> **Quick smoke run** (`--quick`): few tokens and steps, numbers are not meaningful.", ""]
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
    loads = [r.get("loadavg_start", [0])[0] for r in data["results"].values()]
    lines += [f"Generated by `{data['command']}` on {data['date']}.", "",
              f"- Machine: {machine['cpu_model']} ({machine.get('cpu_family_model', '')}; "
              f"{machine.get('simd', '')}), {machine.get('physical_cores', '?')} cores / "
              f"{machine['logical_cpus']} logical CPUs, {machine.get('memory_gb', '?')} GB RAM; "
              f"Python {machine['python']}; {machine['platform']}.",
              f"- Versions: {versions}.",
              f"- Threads: {data['threads']} everywhere (torch.set_num_threads, "
              "`mindspore.device_context.cpu.op_tuning.threads_num`, OMP/OpenBLAS/MKL_NUM_THREADS).",
              f"- 1-minute load average when each measurement started: {min(loads):.1f} to {max(loads):.1f} "
              "(the benchmark itself keeps ~2 runnable threads; much more means other work shared the cores)"
              + (f"; rounds repeated above {data['max_load']} (see Rounds and host load)" if data.get("round_log") else "")
              + ".",
              ""]
    if data.get("total_s"):
        lines.insert(-1, f"- Whole run: {data['total_s'] / 60:.0f} min.")
    for line in kept_results_lines(data):
        lines.insert(-1, line)
    lines += ["![decode and training throughput](performance.png)", ""]

    lines += ["## Targets", "", _table(["target", "measured", "status", "why / note"], targets(res)), ""]

    lines += method_section(data, res)
    lines += decode_section(res)
    lines += roofline_section(res)
    lines += train_section(res)
    lines += optimizer_section(res)
    lines += finetune_section(res)
    lines += flops_section(res)
    lines += wide_section(res)
    lines += memory_section(res)
    lines += alibi_section(res)
    lines += ["## Where the time goes (MindSpore profiler)", "",
              "Kernel times from `mindspore.Profiler` (host CPU ops), per step; wall time measured "
              "without the profiler in the same process.", "", "### Decode step", ""]
    lines += explain_decode(res)
    prof13 = res.get("profile-decode-ours13b")
    if prof13:
        lines += ["", f"13B shape (ALiBi): {prof13['wall_ms']:.1f} ms per step; by category: " +
                  ", ".join(f"{k} {v:.1f} ms" for k, v in _profile_lines(prof13)) + "."]
    lines += ["", "### Training step", ""]
    lines += explain_train(res)
    lines += [""] + rounds_section(data)
    lines += ["## Failed or missing measurements", ""]
    failed = [(n, r["error"]) for n, r in sorted(data["results"].items()) if "error" in r]
    lines += [f"- `{n}`: {e}" for n, e in failed] or ["None."]
    lines.append("")
    with open(md_path, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines))
    try:
        draw_chart(res, png_path)
    except Exception as exc:  # pylint: disable=broad-except
        print(f"chart not written: {exc}")


def method_section(data, res):
    shape = data["shape"]
    counts = bc.weight_counts(shape)
    total = counts["embedding"] + counts["layers"] + counts["norm"] + counts["lm_head"]
    band = res.get("bandwidth") or res.get("bandwidth-end") or {}
    blas = band.get("numpy_blas", {})
    train = res.get("train-ours7b") or res.get("train-mf") or {}
    decode = res.decode("ours7b", bc.PROMPTS[0]) or {}
    hf_attn = (res.decode("hf", bc.PROMPTS[0]) or {}).get("attn_implementation", "?")
    return [
        "## Method", "",
        f"- **Bench shape** (all models): vocab {shape['vocab_size']} (Baichuan2's real one), hidden "
        f"{shape['hidden_size']}, {shape['num_layers']} layers, {shape['num_heads']} heads, SwiGLU width "
        f"{shape['intermediate_size']} (Llama rule, multiple_of 256), {total / 1e6:.1f} M parameters "
        f"({total * 4 / 2 ** 30:.2f} GiB fp32; {100 * 2 * counts['embedding'] / total:.0f}% in the embedding and "
        f"lm_head), fp32 everywhere, random weights. Our models are built with `seq_length` "
        f"{shape['seq_length']} (KV cache slots) and `use_past=True` for decoding.",
        "- **Decode**: batch 1, greedy, no early stop (eos disabled), prompts of "
        f"{' and '.join(map(str, bc.PROMPTS))} random tokens. Ours: `generate()` in MindSpore GRAPH mode "
        "(bucketed prefill graph + one decode graph, NumPy token choice). transformers: "
        f"`LlamaForCausalLM.generate(use_cache=True)` (attention `{hf_attn}`, `torch.inference_mode`). "
        "MindFormers: `LlamaForCausalLM` in GRAPH mode **without KV cache** (its cache path needs Ascend-only "
        "kernels): each step is a full forward over the prompt padded to prompt + new tokens, logits of "
        "the last valid token (as MindFormers' own no-cache generation). Timing: a streamer stamps every "
        "token; decode tokens/s = (new tokens - 1) / time from the first to the last new token, i.e. "
        "prefill excluded (reported separately). One warm-up call (compiles), then "
        f"{decode.get('repetitions', '?')} repetitions of {decode.get('new_tokens', '?')} new tokens in a "
        "process; its median repetition is that process's figure.",
        "- **Training**: forward + backward + optimizer, batch "
        f"{train.get('batch', '?')} x {train.get('seq', '?')} tokens (sequence of seq + 1 ids, next-token loss). "
        "MindSpore: GRAPH mode, `nn.TrainOneStepCell`; ours with the optimizer its YAMLs name "
        "(`FP32StateAdamWeightDecay`, built as `run_baichuan2.py` builds it: on CPU the fused AdamW of "
        "`baichuan2_optim`), MindFormers' Llama with `nn.AdamWeightDecay` (MindSpore's fastest stock AdamW on "
        "CPU, see Optimizer step), and ours once more with `nn.AdamWeightDecay` to tell the model from the "
        "optimizer; transformers: eager, `torch.optim.AdamW`. "
        f"{train.get('warmup', '?')} warm-up steps (the first one compiles), more (at most "
        f"{bc.MAX_EXTRA_WARMUP}) while a step still faults in over {bc.GROWTH_LIMIT_BYTES // 2 ** 20} MiB of new "
        "memory (the allocator still growing: not the steady state of a run; `bench_common.timed_steps`), then the "
        f"median of {train.get('steps', '?')} steps; tokens/s = batch x seq / step time. Warm-up steps used: "
        + ", ".join(f"{name} {res.get(name).get('warmup_used', res.get(name).get('warmup', '?'))}"
                    for name in sorted(res.results) if name.startswith(("train-", "finetune-")) and res.get(name))
        + ".",
        (f"- **Rounds**: every decode and training measurement ran in {data['rounds']} separate "
         "processes, interleaved (all tasks once, then all again, ...), so that ours and its baselines share the "
         "host's slow and fast phases; the tables give the median process and, in brackets, the lowest and "
         "highest process. Ratios are between medians. The costliest tasks ran in the first round only ("
         + ", ".join(f"`{name}`" for name in bc.ONCE) + "), and results kept from an earlier run have "
         "that run's rounds." if data.get("rounds", 1) > 1 else
         "- **Rounds**: one: every decode and training measurement ran once, in its own process (the brackets "
         "repeat that one figure; `--rounds N` interleaves N processes per measurement and reports their "
         "median). Ratios are between processes of the same run."),
        "- **Peak memory**: `ru_maxrss` of the measurement's own process (model build, warm-up and all "
        "repetitions included).",
        "- **Bandwidth and roofline**: fp32 matrix-vector product with the lm_head's shape "
        f"({shape['vocab_size']} x {shape['hidden_size']}, {shape['vocab_size'] * shape['hidden_size'] * 4 / MIB:.0f} "
        "MiB) in torch (`F.linear`), NumPy (OpenBLAS kernel "
        f"`{blas.get('kernel', '?')}`, OPENBLAS_CORETYPE {blas.get('OPENBLAS_CORETYPE', '?')}, "
        f"{blas.get('threads', '?')} threads), MindSpore (`MatMul(transpose_b=True)`) and the decode steps' "
        "own one-pass kernel (`baichuan2_rows_matmul`; a decode step cannot beat the fastest of them), median of "
        f"{band.get('repetitions', '?')} per measurement, measured at the start of every round and at the end "
        "of the run; the best kernel's figure of each measurement, and the median over the measurements is "
        "the machine's bandwidth. Roofline tokens/s "
        "= bandwidth / bytes a batch-1 decode step must read: one embedding row, every layer weight, the "
        "final norm and the whole lm_head. The KV cache adds `2 x layers x context x hidden x 4` bytes and is "
        "given separately.",
        "- Each measurement runs in its own process, one after the other.", ""]


def decode_section(res):
    roof = res.roofline()
    rows = []
    for prompt in bc.PROMPTS:
        hf = res.decode("hf", prompt)
        for impl in ("ours7b", "ours13b", "hf", "mf"):
            r = res.decode(impl, prompt)
            if r is None:
                rows.append((LABELS[impl], prompt, "", f"failed: {res.error(f'decode-{impl}-p{prompt}')}",
                             "", "", "", "", ""))
                continue
            cache = "no (Ascend-only in MF 1.8)" if impl == "mf" else "yes"
            rows.append((LABELS[impl], prompt, cache,
                         f"{r['decode_tok_s']:.2f} {_spread(r, 'decode_tok_s', 2)}",
                         f"{r['ms_per_token']:.1f}", f"{r['prefill_s']:.2f} ({r['prefill_tok_s']:.0f} tok/s)",
                         _fmt(r["decode_tok_s"] / hf["decode_tok_s"], 2, "x") if hf else "n/a",
                         _fmt(100 * r["decode_tok_s"] / roof, 0, "%") if roof else "n/a",
                         f"{r['peak_rss_mb']:.0f}"))
    return ["## Decode (batch 1, greedy, fp32)", "",
            _table(["model", "prompt", "KV cache", "decode tok/s", "ms/token", "prefill s", "vs transformers",
                    "of roofline", "peak RSS MiB"], rows), ""]


def roofline_section(res):
    runs = res.bandwidth_runs()
    if not runs:
        return ["## Roofline", "", f"Bandwidth measurement failed: {res.error('bandwidth')}", ""]
    counts = bc.weight_counts()
    parts = bc.decode_bytes_per_token()
    h = bc.BENCH_SHAPE["hidden_size"]
    rows = [("embedding row", f"{h * 4 / MIB:.3f}"),
            (f"{bc.BENCH_SHAPE['num_layers']} decoder layers", f"{counts['layers'] * 4 / MIB:.1f}"),
            ("final norm", f"{counts['norm'] * 4 / MIB:.3f}"),
            ("lm_head", f"{counts['lm_head'] * 4 / MIB:.1f}"),
            ("**weights per token**", f"**{parts['weights'] / MIB:.1f}**")]
    roof = res.roofline()
    kv_rows = []
    for prompt in bc.PROMPTS:
        new = (res.decode("ours7b", prompt) or {}).get("new_tokens", 0)
        ideal = bc.decode_bytes_per_token(context=prompt + new / 2)["kv"]
        slots = _kv_read_slots(res.decode("ours7b", prompt) or {})
        read = bc.decode_bytes_per_token(context=prompt + new, cache_slots=slots)["kv"]
        kv_rows.append((prompt, f"{ideal / MIB:.1f}", _fmt(res.roofline(prompt, new), 2),
                        f"{read / MIB:.1f}", _fmt(res.roofline(prompt, new, slots), 2)))
    labels = {"bandwidth": "median round (start of a round)", "bandwidth-end": "end of run"}
    kernel = runs[0][1]["numpy_blas"].get("kernel", "?")
    bw_rows = []
    for key, label in (("torch_gbs", "torch F.linear"), ("torch_1thread_gbs", "torch F.linear, 1 thread"),
                       ("numpy_gbs", f"NumPy (OpenBLAS {kernel})"),
                       ("mindspore_gbs", "MindSpore MatMul(transpose_b=True)"),
                       ("rows_kernel_gbs", "ours: one-pass decode kernel (`baichuan2_rows_matmul`)"),
                       ("best_gbs", "**best matrix-vector**"),
                       ("torch_sum_gbs", "(reference, not a matvec: torch `W.sum()`)")):
        bw_rows.append((label,) + tuple(_fmt(r.get(key), 1) for _, r in runs))
    return ["## Roofline", "",
            _table(["matrix-vector fp32, 125696 x 1024, GB/s"] + [labels[n] for n, _ in runs], bw_rows), "",
            bandwidth_line(res) + torch_thread_note(runs), "",
            _table(["bytes read per decode step", "MiB"], rows), "",
            f"Roofline (weights only): **{_fmt(roof, 2)} tokens/s** "
            f"({_fmt(1000 / roof if roof else None, 1)} ms/token). With the KV cache read as well:", "",
            _table(["prompt", "KV MiB at mean context", "roofline tok/s", "KV MiB ours reads, last step",
                    "roofline tok/s, as ours reads"], kv_rows),
            "", "Ours reads each row's context in place where the in-place decode attention runs (CPU fp32), "
            "else the cache window that holds it.", ""]


def bandwidth_line(res):
    values = res.bandwidth_values()
    line = f"Machine bandwidth = median of the {len(values)} best-kernel figures: **{res.bandwidth_gbs():.1f} GB/s**"
    if len(values) > 1:
        best = max(values)
        roof = res.roofline(bandwidth=best)
        ours = res.decode("ours7b", bc.PROMPTS[0])
        share = f"; ours 7B at prompt {bc.PROMPTS[0]} would be at {ours['decode_tok_s'] / roof:.0%} of it" if ours else ""
        line += (f" (measurements {min(values):.1f} to {best:.1f} GB/s; at the highest the roofline is "
                 f"{roof:.2f} tokens/s{share})")
    return line + "."


def _bandwidth_spread_note(res):
    """Why a step can show more than 100% of the roofline: the roofline uses the median bandwidth."""
    values = res.bandwidth_values()
    if len(values) < 2:
        return ""
    return (f" The roofline uses the median bandwidth ({res.bandwidth_gbs():.1f} GB/s); the host's own "
            f"measurements spread from {min(values):.1f} to {max(values):.1f} GB/s during the run, so a step "
            f"that ran in a fast phase can show up to {max(values) / res.bandwidth_gbs():.0%} of it.")


def torch_thread_note(runs):
    one = [r["torch_1thread_gbs"] / r["torch_gbs"] for _, r in runs if r.get("torch_1thread_gbs")]
    if one and max(one) >= 0.9:
        return (" torch's F.linear is as fast with 1 thread as with 2: its fp32 matrix-vector kernel uses one "
                "core's bandwidth only, which also bounds the transformers baseline.")
    return ""


def _spread(result, key, digits):
    """``[lowest-highest]`` over the rounds (processes) of a measurement; within one process for
    results from before rounds."""
    values = result.get(key + "_rounds") or [result.get(key + "_min"), result.get(key + "_max")]
    values = [v for v in values if v is not None]
    if not values:
        return ""
    return f"[{min(values):.{digits}f}-{max(values):.{digits}f}]"


def train_section(res):
    rows = []
    mf = res.get("train-mf")
    for impl in ("ours7b", "mf", "hf"):
        r = res.get(f"train-{impl}")
        if r is None:
            rows.append((LABELS[impl], f"failed: {res.error(f'train-{impl}')}", "", "", "", "", ""))
            continue
        rows.append((LABELS[impl] + ("" if impl != "hf" else " (eager, AdamW)"),
                     f"{r['tokens_s']:.1f} {_spread(r, 'tokens_s', 1)}",
                     f"{r['step_s']:.2f}", f"{r['first_step_s']:.1f}",
                     f"{r['losses'][0]:.2f} -> {r['losses'][-1]:.2f}",
                     _fmt(r["tokens_s"] / mf["tokens_s"], 2, "x") if mf else "n/a", f"{r['peak_rss_mb']:.0f}"))
    same = res.get("train-ours7b-nnadam")
    if same:
        rows.insert(1, (LABELS["ours7b"] + " with nn.AdamWeightDecay (attribution, one round)",
                        f"{same['tokens_s']:.1f}", f"{same['step_s']:.2f}", f"{same['first_step_s']:.1f}",
                        f"{same['losses'][0]:.2f} -> {same['losses'][-1]:.2f}",
                        _fmt(same["tokens_s"] / mf["tokens_s"], 2, "x") if mf else "n/a",
                        f"{same['peak_rss_mb']:.0f}"))
    optimizers = {impl: (res.get(f"train-{impl}") or {}).get("optimizer", "?") for impl in ("ours7b", "mf")}
    return ["## Training (forward + backward + optimizer)", "",
            f"Optimizers: ours {optimizers['ours7b']}; MF Llama {optimizers['mf']}. The losses of the two "
            "optimizers part after the first step because `nn.AdamWeightDecay` has no bias correction: its "
            "early steps are up to (1 - b1) / sqrt(1 - b2) times the bias-corrected ones (3.2x at step 1 with its "
            "default betas), so at the same learning rate its loss falls faster at first.", "",
            _table(["model", "tokens/s", "step s (median)", "first step s (compile)", "loss first -> last",
                    "vs MF Llama", "peak RSS MiB"], rows), ""]


OPTIMIZER_LABELS = {"nn": "MindSpore nn.AdamWeightDecay", "mindformers": "MindFormers AdamW",
                    "project": "ours: FP32StateAdamWeightDecay = baichuan2_optim.FusedAdamW on CPU"}


def optimizer_section(res):
    """One AdamW step alone over the bench-shape weights, per optimizer."""
    fused = res.get("optimizer-project")
    band = res.bandwidth_gbs()
    rows = []
    for kind, label in OPTIMIZER_LABELS.items():
        r = res.get(f"optimizer-{kind}")
        if r is None:
            rows.append((label, f"failed: {res.error(f'optimizer-{kind}')}", "", "", ""))
            continue
        spread = [1 / v for v in r.get("steps_s_rounds", [])]
        rows.append((label, f"{r['step_s']:.3f}" + (f" [{min(spread):.3f}-{max(spread):.3f}]" if spread else ""),
                     f"{r['min_bytes'] / r['step_s'] / 1e9:.1f}",
                     _fmt(r["step_s"] / fused["step_s"], 1, "x") if fused else "n/a", f"{r['peak_rss_mb']:,.0f}"))
    params = next((r["params"] for r in (res.get(f"optimizer-{k}") for k in OPTIMIZER_LABELS) if r), None)
    return ["## Optimizer step", "",
            f"One AdamW step alone over ours 7B's {_fmt(params and params / 1e6, 1)} M fp32 trainable weights "
            "(bench shape), fixed random gradients, GRAPH mode, median of the timed steps. "
            "Effective GB/s = the 28 bytes per weight an AdamW step must move (weight, gradient, m, v read; "
            "weight, m, v written) / step time"
            + (f"; the machine's matrix-vector bandwidth is {band:.1f} GB/s" if band else "") + ". "
            "MindFormers' AdamW is a dozen elementwise kernels per weight; `FusedAdamW` is the same update as "
            "one `ops.Adam` kernel per weight (equal in exact arithmetic, `tests/test_baichuan2_optim.py`).", "",
            _table(["optimizer", "step s", "effective GB/s", "vs ours", "peak RSS MiB"], rows), ""]


def memory_section(res):
    params = sum(bc.weight_counts()[k] for k in ("embedding", "layers", "norm", "lm_head"))
    rows = []
    for name, label in [("decode-ours7b-p64", "decode, ours 7B, prompt 64"),
                        ("decode-ours7b-p1024", "decode, ours 7B, prompt 1024"),
                        ("decode-ours13b-p1024", "decode, ours 13B, prompt 1024"),
                        ("decode-hf-p1024", "decode, transformers, prompt 1024"),
                        ("decode-mf-p1024", "decode, MF Llama (no cache), prompt 1024"),
                        ("train-ours7b", "training step, ours 7B"),
                        ("train-ours7b-plainhead", "training step, ours 7B with a plain head (attribution)"),
                        ("train-mf", "training step, MF Llama"),
                        ("train-hf", "training step, transformers"),
                        ("finetune-unpacked-long", "fine-tuning step, ours 7B, long sequence"),
                        ("decode-wide-ours7b-p1024", "decode, real-width shape, prompt 1024"),
                        ("decode-wide-ours7b-b4-p64", "decode, real-width shape, batch 4")]:
        r = res.get(name)
        built = r.get("rss_after_build_mb") if r else None
        rows.append((label, _fmt(r["peak_rss_mb"] if r else None, 0), _fmt(built, 0)))
    return ["## Peak memory (RSS)", "",
            f"fp32 weights: {params * 4 / MIB:.0f} MiB; weights + gradients + two Adam moments: "
            f"{params * 16 / MIB:.0f} MiB. Our KV cache: "
            f"{2 * bc.BENCH_SHAPE['num_layers'] * bc.BENCH_SHAPE['seq_length'] * bc.BENCH_SHAPE['hidden_size'] * 4 / MIB:.0f}"
            " MiB. Process peaks include the Python runtime and framework (about 0.6 GB for MindSpore).", "",
            _table(["process", "peak RSS MiB", "RSS after building the model MiB"], rows), ""] + (
                ["Training, ours against MindFormers Llama: " + memory_why(res) + ".", ""]
                if res.get("train-ours7b") and res.get("train-mf") else [])


def finetune_section(res):
    """Real tokens/s of fine-tuning on the Belle sample, packed against unpacked."""
    rows = []
    for suffix in ("", "-long"):
        unpacked = res.get(f"finetune-unpacked{suffix}")
        for kind in ("unpacked", "packed"):
            name = f"finetune-{kind}{suffix}"
            r = res.get(name)
            seq = (r or unpacked or {}).get("seq", "?")
            if r is None:
                rows.append((seq, kind, f"failed: {res.error(name)}", "", "", "", "", "", "", ""))
                continue
            if r.get("available") is False:
                rows.append((seq, kind, f"not available ({r.get('reason', '?')})", "", "", "", "", "", "", ""))
                continue
            ratio = (r["real_tokens_s"] / unpacked["real_tokens_s"]
                     if unpacked and unpacked.get("real_tokens_s") else None)
            rows.append((r["seq"], kind + (" (position_ids passed)" if r.get("position_ids_passed") else ""),
                         r["records"], f"{r['input_tokens_per_record']:.0f} ({r['fill']:.0%})",
                         f"{r['label_tokens_per_record']:.0f}", f"{r['step_s']:.2f}",
                         f"{r['real_tokens_s']:.1f} {_spread(r, 'real_tokens_s', 1)}", f"{r['label_tokens_s']:.1f}",
                         _fmt(ratio, 2, "x"), f"{r['peak_rss_mb']:,.0f}"))
    return ["## Fine-tuning on the Belle sample: real tokens/s, packed vs unpacked", "",
            "Ours 7B shape, batch 1, GRAPH mode, `nn.TrainOneStepCell` + "
            f"{(res.get('finetune-unpacked') or {}).get('optimizer', 'nn.AdamWeightDecay')}, on the bundled "
            "Belle sample (`research/baichuan2/assets/belle_sample.json`, 205 conversations) tokenised with the "
            "bundled tokenizer by `belle_preprocess.py` (packed: `--pack True`, records carry `position_ids` "
            "restarting at 0 per conversation, passed to the model as `position_ids=`). Real tokens are the "
            "inputs that are not padding (label-bearing targets given beside them). Real tokens/s = real tokens "
            "per record (mean over all records, i.e. one epoch) / median step time; a step costs the same "
            "whatever its padding, so packing gains exactly its fill.", "",
            _table(["seq", "data", "records", "real tokens / record (fill)", "label tokens / record", "step s",
                    "real tokens/s", "label tokens/s", "vs unpacked", "peak RSS MiB"], rows), ""]


def flops_section(res):
    """Training FLOP/s against the fp32 matrix-multiply peak measured in the same run."""
    gemm = res.get("gemm")
    if not gemm:
        return ["## Training FLOP/s against the matrix-multiply peak", "",
                f"GEMM measurement failed: {res.error('gemm')}", ""]
    n = gemm["size"]
    rows = [(f"MindSpore MatMul ({n}^3, GRAPH mode)", _fmt(gemm["mindspore_gflops"], 1)),
            (f"NumPy (OpenBLAS {gemm.get('numpy_blas', {}).get('kernel', '?')})", _fmt(gemm["numpy_gflops"], 1)),
            ("torch.mm", _fmt(gemm["torch_gflops"], 1)),
            ("**peak (best kernel)**", f"**{gemm['best_gflops']:.1f}** {_spread(gemm, 'best_gflops', 1)}")]
    flops = bc.train_flops_per_token(seq=512)
    train_rows = []
    peak = gemm["best_gflops"]
    for name, label in (("train-ours7b", "ours 7B, random tokens"),
                        ("train-ours7b-nnadam", "ours 7B, random tokens, nn.AdamWeightDecay"),
                        ("train-mf", "MindFormers Llama"),
                        ("finetune-unpacked", "ours 7B, Belle unpacked"), ("finetune-packed", "ours 7B, Belle packed"),
                        ("finetune-unpacked-long", "ours 7B, Belle unpacked, long"),
                        ("finetune-packed-long", "ours 7B, Belle packed, long")):
        r = res.get(name)
        if not r or "train_gflops" not in r:
            continue
        useful = r.get("useful_gflops")
        train_rows.append((label, r["seq"], f"{r['tokens_s']:.1f}", f"{r['train_gflops']:.1f}",
                           f"{100 * r['train_gflops'] / peak:.0f}%",
                           "" if useful is None else f"{useful:.1f} ({100 * useful / peak:.0f}%)"))
    return ["## Training FLOP/s against the matrix-multiply peak", "",
            f"Peak: fp32 ({n} x {n}) @ ({n} x {n}), best of {gemm['repetitions']} per kernel, "
            f"{gemm.get('threads', 2)} threads, measured in every round of this run (GFLOP/s):", "",
            _table(["kernel", "GFLOP/s"], rows), "",
            "Training FLOPs per token = 6 x the parameters that enter a matrix product (decoder layers + lm_head, "
            f"{flops['matmul'] / 6e6:.1f} M; the embedding is a gather) + 12 x layers x hidden x seq for the score "
            "(Q K^T) and context (P V) products, counted over the full seq x seq square because that is what "
            "the kernels compute (causal factor 1; the causally useful half is 6 x layers x hidden x seq): "
            f"{flops['total'] / 1e9:.3f} GFLOP per token at seq 512 ({flops['attention'] / flops['total']:.1%} "
            "attention). Training FLOP/s counts every position of a step (padding included: the hardware "
            "computes it); useful FLOP/s counts real tokens only.", "",
            _table(["measurement", "seq", "tokens/s (all positions)", "training GFLOP/s", "of GEMM peak",
                    "useful GFLOP/s (of peak)"], train_rows), ""]


def wide_section(res):
    """Decode at the real-width shape and batched decode, against their rooflines."""
    wide = bc.WIDE_SHAPE
    counts = bc.weight_counts(wide)
    weights = bc.decode_bytes_per_token(wide)["weights"]
    rows = []
    batch = bc.DECODE_BATCH
    entries = [("bench", bc.BENCH_SHAPE, 1, p, res.decode("ours7b", p), f"decode-ours7b-p{p}") for p in bc.PROMPTS]
    entries.append(("bench", bc.BENCH_SHAPE, batch, bc.PROMPTS[0]) + bench_batch_decode(res, batch))
    entries += [("real width", wide, 1, p) + wide_decode(res, p) for p in bc.PROMPTS]
    entries.append(("real width", wide, batch, bc.PROMPTS[0]) + wide_decode(res, bc.PROMPTS[0], batch))
    for label, shape, b, prompt, r, name in entries:
        if r is None:
            rows.append((label, b, prompt, f"failed: {res.error(name)}", "", "", "", "", ""))
            continue
        roof = res.step_roofline(shape, prompt, r["new_tokens"], _kv_read_slots(r), b)
        rows.append((label, b, prompt, f"{r['decode_tok_s']:.2f} {_spread(r, 'decode_tok_s', 2)}",
                     f"{r.get('aggregate_tok_s', r['decode_tok_s']):.2f}", f"{r['ms_per_token']:.1f}",
                     _fmt(roof, 2), _fmt(100 * r["decode_tok_s"] / roof if roof else None, 0, "%"),
                     f"{r['peak_rss_mb']:,.0f}"))
    return ["## Decode at real width and batched decode", "",
            f"Real-width shape: hidden {wide['hidden_size']}, SwiGLU {wide['intermediate_size']}, "
            f"{wide['num_heads']} heads, vocab {wide['vocab_size']}, {wide['num_layers']} layers: "
            f"{bc.total_params(wide) / 1e9:.2f} G parameters ({bc.total_params(wide) * 4 / 2 ** 30:.1f} GiB fp32); a "
            f"decode step reads {weights / MIB:,.0f} MiB of weights ({counts['lm_head'] * 4 / MIB:,.0f} MiB lm_head), "
            "so per-kernel launch gaps weigh about as little as in the real 7B/13B. Batch "
            f"{batch}: {batch} different random prompts of the same length decoded together (ours' "
            "`generate()` with a batch-4 KV cache). Roofline steps/s = the machine's matrix-vector bandwidth "
            "/ bytes a step reads: the weights once for the whole batch, plus each row's KV cache as the step reads "
            "it (its context in place with the in-place decode attention, else the cache window). "
            "Aggregate tokens/s = batch x steps/s." + _bandwidth_spread_note(res), "",
            _table(["shape", "batch", "prompt", "steps/s (tok/s per sequence)", "aggregate tok/s", "ms/step",
                    "roofline steps/s", "of roofline", "peak RSS MiB"], rows), ""]


def rounds_section(data):
    log = data.get("round_log") or []
    if not log:
        return []
    rows = [(e["round"], e["attempt"], f"{e['loadavg_start']:.2f}", _fmt(e.get("max_task_loadavg"), 2),
             ("disturbed, " if e["loaded"] else "") + ("kept" if e["kept"] else "discarded, repeated"))
            for e in log]
    flagged = [e for e in log if e["loaded"] and e["kept"]]
    note = (f"**{len(flagged)} round(s) were kept although the load average exceeded {data.get('max_load')}** "
            "after the retries: their figures may be low." if flagged else
            f"Every kept round started at a load average <= {data.get('max_load')}.")
    return ["## Rounds and host load", "",
            f"A round is repeated (at most {data.get('round_retries', '?')} times) when the 1-minute load average "
            f"at its start exceeds {data.get('max_load')} (the benchmark itself keeps ~2 threads busy). " + note, "",
            _table(["round", "attempt", "load average at start", "highest at a task start", "outcome"], rows), ""]


def alibi_section(res):
    rows = []
    for prompt in bc.PROMPTS:
        a, b = res.decode("ours7b", prompt), res.decode("ours13b", prompt)
        rows.append((prompt, _fmt(a and a["decode_tok_s"]), _fmt(b and b["decode_tok_s"]),
                     _fmt(b["decode_tok_s"] / a["decode_tok_s"] if a and b else None, 2, "x"),
                     _fmt(a and a["prefill_s"]), _fmt(b and b["prefill_s"])))
    return ["## 13B shape (ALiBi) against 7B shape (RoPE), equal dimensions", "",
            _table(["prompt", "7B decode tok/s", "13B decode tok/s", "13B / 7B", "7B prefill s", "13B prefill s"],
                   rows), ""]


# ----------------------------------------------------------------------------------------------------
# chart (Pillow: already installed as a MindSpore dependency)

def draw_chart(res, path):
    from PIL import Image, ImageDraw, ImageFont  # pylint: disable=import-outside-toplevel

    def font(size):
        try:
            return ImageFont.load_default(size=size)
        except TypeError:
            return ImageFont.load_default()

    width, height = 1400, 620
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    colors = {"ours7b": (31, 119, 180), "ours13b": (23, 190, 207), "hf": (255, 127, 14), "mf": (148, 103, 189)}
    title, small = font(20), font(14)
    draw.text((20, 10), "Baichuan2 bench shape on CPU (fp32, 2 threads): higher is better", fill="black", font=title)

    def panel(x0, y0, x1, y1, heading, groups, limit_line=None, limit_label=""):
        """groups: [(group label, [(impl, value)])]."""
        draw.text((x0, y0 - 30), heading, fill="black", font=font(17))
        values = [v for _, bars in groups for _, v in bars if v] + ([limit_line] if limit_line else [])
        top = max(values) * 1.15 if values else 1.0
        draw.line((x0, y1, x1, y1), fill="black")
        draw.line((x0, y0, x0, y1), fill="black")
        for i in range(5):
            value = top * i / 4
            y = y1 - (y1 - y0) * i / 4
            draw.line((x0 - 4, y, x0, y), fill="black")
            draw.text((x0 - 60, y - 8), f"{value:.1f}", fill="black", font=small)
        group_w = (x1 - x0) / max(len(groups), 1)
        for g, (label, bars) in enumerate(groups):
            bar_w = group_w * 0.8 / max(len(bars), 1)
            for b, (impl, value) in enumerate(bars):
                left = x0 + g * group_w + group_w * 0.1 + b * bar_w
                if value:
                    y = y1 - (y1 - y0) * value / top
                    draw.rectangle((left + 2, y, left + bar_w - 2, y1), fill=colors[impl])
                    text = f"{value:.1f}" if value >= 10 else f"{value:.2f}"
                    draw.text((left + 4, y - 18), text, fill="black", font=small)
                else:
                    draw.text((left + 4, y1 - 18), "n/a", fill="gray", font=small)
            draw.text((x0 + g * group_w + group_w * 0.35, y1 + 8), label, fill="black", font=small)
        if limit_line:
            y = y1 - (y1 - y0) * limit_line / top
            for x in range(int(x0), int(x1), 12):
                draw.line((x, y, min(x + 6, x1), y), fill=(200, 0, 0), width=2)
            draw.text((x1 - 230, y - 20), limit_label, fill=(200, 0, 0), font=small)

    decode_groups = []
    for prompt in bc.PROMPTS:
        bars = []
        for impl in ("ours7b", "ours13b", "hf", "mf"):
            r = res.decode(impl, prompt)
            bars.append((impl, r["decode_tok_s"] if r else None))
        decode_groups.append((f"prompt {prompt}", bars))
    roof = res.roofline()
    panel(90, 90, 820, 520, "Decode tokens/s (batch 1, greedy)", decode_groups, roof,
          f"roofline (weights) {roof:.1f} tok/s" if roof else "")
    train_bars = []
    for impl in ("ours7b", "mf", "hf"):
        r = res.get(f"train-{impl}")
        train_bars.append((impl, r["tokens_s"] if r else None))
    panel(960, 90, 1360, 520, "Training tokens/s (fwd+bwd+AdamW)", [("", train_bars)])
    x = 90
    for impl in ("ours7b", "ours13b", "hf", "mf"):
        draw.rectangle((x, 575, x + 18, 593), fill=colors[impl])
        label = LABELS[impl] + (" (no KV cache)" if impl == "mf" else "")
        draw.text((x + 24, 576), label, fill="black", font=small)
        x += 24 + draw.textlength(label, font=small) + 30
    image.save(path)
