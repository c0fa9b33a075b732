"""One benchmark measurement per process: ``python benchmarks/bench_tasks.py TASK --out result.json ...``.

``run_all.py`` starts each task in its own subprocess (MindSpore's context is process-global, and the
peak RSS of a process is then the peak of that one measurement). Tasks:

* ``bandwidth``: fp32 matrix-vector product (the lm_head's shape) in torch, NumPy and MindSpore.
* ``gemm``: fp32 square matrix product (``--size``, 4096 by default) in MindSpore, NumPy and torch,
  best of several: the machine's matrix-multiply peak that training FLOP/s are judged against.
* ``decode --impl {ours7b,ours13b,hf,mf}``: greedy decoding of ``--new`` tokens after a
  ``--prompt``-token prompt (``--batch`` equal prompts; ``--shape bench|wide``), ``--reps`` times
  after a warm-up; decode excludes the prefill.
* ``train --impl {ours7b,mf,hf} [--variant plainhead] [--optimizer nn|project]``: forward + backward +
  AdamW step, ``--steps`` timed steps after ``--warmup`` steps; ``plainhead`` swaps our NormHead for a
  plain head in that process (memory attribution against MindFormers' Llama). ``--optimizer``: see
  ``make_optimizer``.
* ``optimizer --optimizer {nn,mindformers,project}``: one optimizer step alone over the bench-shape
  model's weights, with fixed random gradients.
* ``finetune [--pack]``: ours 7B fine-tuned on the bundled Belle sample, tokenised by
  ``belle_preprocess.py`` at ``--seq`` (``--pack True`` when it has that flag); real tokens
  (non-padding inputs, label-bearing targets) per second.
* ``profile --impl {ours7b,ours13b,mf} --phase {decode,train}``: MindSpore profiler, per-step
  kernel time by category (decode steps of our model, ``--batch`` rows at ``--shape``; training
  steps of ours or MindFormers' Llama).
"""
import argparse
import time

import bench_common as bc
bc.pin_threads()   # before numpy/torch/mindspore load their thread pools

import numpy as np  # noqa: E402  pylint: disable=wrong-import-position


# ----------------------------------------------------------------------------------------------------
# network builders

def ms_config(use_past, batch_size, seq_length, shape=None, **extra):
    """MindFormers ``LlamaConfig`` of the bench shape (or ``shape``), fp32, portable CPU paths."""
    from mindformers.models import LlamaConfig  # pylint: disable=import-outside-toplevel
    shape = shape or bc.BENCH_SHAPE
    kwargs = dict(batch_size=batch_size, seq_length=seq_length, hidden_size=shape["hidden_size"],
                  num_layers=shape["num_layers"], num_heads=shape["num_heads"],
                  intermediate_size=shape["intermediate_size"], vocab_size=shape["vocab_size"],
                  rms_norm_eps=shape["rms_norm_eps"], compute_dtype="float32", param_init_type="float32",
                  embedding_init_type="float32", layernorm_compute_type="float32",
                  softmax_compute_type="float32", rotary_dtype="float32", use_past=use_past,
                  fused_rms_norm=False, use_flash_attention=False, do_sample=False,
                  pad_token_id=0, eos_token_id=2)
    kwargs.update(extra)
    return LlamaConfig(**kwargs)


def build_ours(kind, use_past, batch_size, seq_length, shape=None):
    import baichuan2_7b  # pylint: disable=import-outside-toplevel
    import baichuan2_13b  # pylint: disable=import-outside-toplevel
    cls = {"ours7b": baichuan2_7b.Baichuan7BV2ForCausalLM, "ours13b": baichuan2_13b.Baichuan13BV2ForCausalLM}[kind]
    return cls(ms_config(use_past, batch_size, seq_length, shape))


OPTIMIZERS = {
    "nn": "mindspore.nn.AdamWeightDecay",
    "mindformers": "mindformers AdamW",
    "project": "FP32StateAdamWeightDecay (the YAMLs' optimizer; FusedAdamW on CPU)",
}


def make_optimizer(params, which):
    """The AdamW of a training measurement, learning rate 1e-5, no weight decay: ``nn`` is MindSpore's
    ``nn.AdamWeightDecay`` (the baselines'), ``mindformers`` MindFormers' ``AdamW`` (what the Trainer ran
    before this plugin fused it), ``project`` the optimizer the plugin's YAMLs name, as ``run_baichuan2.py``
    builds it (on CPU ``baichuan2_optim.FusedAdamW``)."""
    if which == "nn":
        from mindspore import nn  # pylint: disable=import-outside-toplevel
        return nn.AdamWeightDecay(params, learning_rate=1e-5, weight_decay=0.0)
    if which == "mindformers":
        from mindformers.core.optim.adamw import AdamW  # pylint: disable=import-outside-toplevel
        return AdamW(params, learning_rate=1e-5, weight_decay=0.0)
    from baichuan2_trainer_setup import FP32StateAdamWeightDecay  # pylint: disable=import-outside-toplevel
    return FP32StateAdamWeightDecay(params, learning_rate=1e-5, weight_decay=0.0)


def decode_window(length, seq_length):
    """Cache slots our decode step reads at a context of ``length`` tokens (the plugin's rule)."""
    from baichuan2_generation import decode_window as window  # pylint: disable=import-outside-toplevel
    return window(length, seq_length)


def build_mf_llama(batch_size, seq_length):
    """MindFormers' own LlamaForCausalLM (legacy path), with the CPU settings it needs."""
    from mindformers.models import LlamaForCausalLM  # pylint: disable=import-outside-toplevel
    config = ms_config(False, batch_size, seq_length, use_rope_slice=True, qkv_concat=False)
    return LlamaForCausalLM(config=config)


def build_hf_llama(torch):
    from transformers import LlamaConfig, LlamaForCausalLM  # pylint: disable=import-outside-toplevel
    shape = bc.BENCH_SHAPE
    config = LlamaConfig(vocab_size=shape["vocab_size"], hidden_size=shape["hidden_size"],
                         intermediate_size=shape["intermediate_size"], num_hidden_layers=shape["num_layers"],
                         num_attention_heads=shape["num_heads"], num_key_value_heads=shape["num_heads"],
                         max_position_embeddings=4096, rms_norm_eps=shape["rms_norm_eps"], rope_theta=10000.0,
                         tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config).to(torch.float32)
    return model


def prompt_ids(length, seed=0):
    return np.random.RandomState(seed).randint(3, bc.BENCH_SHAPE["vocab_size"], size=length).astype(np.int64)


def count_params_ms(net):
    return int(sum(int(np.prod(p.shape)) for p in net.trainable_params()))


# ----------------------------------------------------------------------------------------------------
# bandwidth

def task_bandwidth(args):
    torch = bc.setup_torch()
    bc.setup_mindspore("graph")
    from mindspore import nn, ops, Parameter, Tensor  # pylint: disable=import-outside-toplevel
    rows, cols = bc.BENCH_SHAPE["vocab_size"], bc.BENCH_SHAPE["hidden_size"]
    weight = np.random.RandomState(0).standard_normal((rows, cols)).astype(np.float32)
    vector = np.random.RandomState(1).standard_normal((1, cols)).astype(np.float32)
    reps = 5 if args.quick else 30
    result = {"task": "bandwidth", "matrix": [rows, cols], "bytes": weight.nbytes, "repetitions": reps}

    def timed(fn):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return weight.nbytes / bc.median(times) / 1e9

    w_t, x_t = torch.from_numpy(weight), torch.from_numpy(vector)
    with torch.inference_mode():
        result["torch_gbs"] = timed(lambda: torch.nn.functional.linear(x_t, w_t))
        result["torch_sum_gbs"] = timed(w_t.sum)          # plain streaming read, for reference
        torch.set_num_threads(1)
        result["torch_1thread_gbs"] = timed(lambda: torch.nn.functional.linear(x_t, w_t))
        torch.set_num_threads(bc.THREADS)
    result["numpy_gbs"] = timed(lambda: weight @ vector[0])
    result["numpy_blas"] = numpy_blas_info()

    class MatVec(nn.Cell):
        def __init__(self):
            super().__init__()
            self.weight = Parameter(Tensor(weight), name="w")
            self.matmul = ops.MatMul(transpose_b=True)

        def construct(self, x):
            return self.matmul(x, self.weight)

    net, x_ms = MatVec(), Tensor(vector)
    net.set_train(False)
    result["mindspore_gbs"] = timed(lambda: net(x_ms).asnumpy())
    # The decode steps' own kernel (baichuan2_rows_matmul) on the same matrix: the roofline is the fastest
    # matrix-vector product this machine ran, and a decode step must never beat it.
    import baichuan2_rows_matmul as rows  # pylint: disable=import-outside-toplevel
    library = rows.build_library()
    kernels = ["torch_gbs", "numpy_gbs", "mindspore_gbs"]
    if library:
        rows.install_decode_matmul(net, library)
        result["rows_kernel_gbs"] = timed(lambda: net(x_ms).asnumpy())
        kernels.append("rows_kernel_gbs")
    result["torch_threads"] = torch.get_num_threads()
    result["best_gbs"] = max(result[key] for key in kernels)
    return result


def numpy_blas_info():
    """NumPy's OpenBLAS build and the kernel it selected (``openblas_get_corename``)."""
    import ctypes  # pylint: disable=import-outside-toplevel
    import glob  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "libopenblas*"))
    info = {"OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset)")}
    for path in libs:
        lib = ctypes.CDLL(path)
        for suffix in ("64_", ""):
            name = getattr(lib, "openblas_get_corename" + suffix, None)
            if name is not None:
                name.restype = ctypes.c_char_p
                info["library"] = os.path.basename(path)
                info["kernel"] = name().decode()
                info["threads"] = getattr(lib, "openblas_get_num_threads" + suffix)()
                return info
    info["kernel"] = "unknown"
    return info


# ----------------------------------------------------------------------------------------------------
# matrix-multiply peak

def task_gemm(args):
    """fp32 (n x n) @ (n x n) in MindSpore (GRAPH mode MatMul), NumPy and torch: best of ``reps``."""
    torch = bc.setup_torch()
    bc.setup_mindspore("graph")
    from mindspore import nn, ops, Tensor  # pylint: disable=import-outside-toplevel
    n = args.size
    reps = 2 if args.quick else 5
    a = np.random.RandomState(0).standard_normal((n, n)).astype(np.float32)
    b = np.random.RandomState(1).standard_normal((n, n)).astype(np.float32)
    flops = 2.0 * n ** 3
    result = {"task": "gemm", "size": n, "flops": flops, "repetitions": reps}

    def best(fn):
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return flops / min(times) / 1e9

    class Gemm(nn.Cell):
        def __init__(self):
            super().__init__()
            self.matmul = ops.MatMul()

        def construct(self, x, y):
            return self.matmul(x, y)

    net, a_ms, b_ms = Gemm(), Tensor(a), Tensor(b)
    result["mindspore_gflops"] = best(lambda: net(a_ms, b_ms).asnumpy())
    result["numpy_gflops"] = best(lambda: a @ b)
    a_t, b_t = torch.from_numpy(a), torch.from_numpy(b)
    with torch.inference_mode():
        result["torch_gflops"] = best(lambda: torch.mm(a_t, b_t))
    result["numpy_blas"] = numpy_blas_info()
    result["torch_threads"] = torch.get_num_threads()
    result["best_gflops"] = max(result["mindspore_gflops"], result["numpy_gflops"], result["torch_gflops"])
    return result


# ----------------------------------------------------------------------------------------------------
# decode

def decode_ours(args, ms):
    shape = bc.SHAPES[args.shape]
    net = build_ours(args.impl, True, args.batch, shape["seq_length"], shape)
    net.set_train(False)
    built_rss = bc.current_rss_mb()
    # Batch B: B different prompts of the same length (B = 1: the prompt of every other task).
    rows = [prompt_ids(args.prompt, seed=row).tolist() for row in range(args.batch)]
    ids = rows[0] if args.batch == 1 else rows
    kwargs = dict(do_sample=False, eos_token_id=[-1], repetition_penalty=1.0)   # never stops early
    start = time.perf_counter()
    net.generate(ids, max_new_tokens=3, **kwargs)                                # compiles prefill + decode
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(args.reps):
        streamer = bc.TimingStreamer()
        out = net.generate(ids, max_new_tokens=args.new, streamer=streamer, **kwargs)
        assert len(out) == args.batch and all(len(o) == args.prompt + args.new for o in out), [len(o) for o in out]
        runs.append((streamer.prefill_s(), streamer.step_times()))
    result = bc.summarize_decode(runs, args.prompt, args.new)
    result.update(warmup_s=warmup_s, rss_after_build_mb=built_rss, params=count_params_ms(net),
                  kv_cache_slots=shape["seq_length"],
                  kv_window_slots=decode_window(args.prompt + args.new, shape["seq_length"]),
                  decode_attention=decode_attention_kind(net), mode=ms.get_context("mode"))
    return result


def decode_attention_kind(net):
    """"in-place kernel" (``baichuan2_decode_attention``: each row's context read from the cache) or
    "portable" (attention over a copy of the cache window), as the network's layers took it."""
    return "in-place kernel" if net.model.layers[0].attention.decode_attention is not None else "portable"


def decode_mf(args, ms):
    """MindFormers' LlamaForCausalLM without KV cache (its cache path needs Ascend-only kernels).

    As MindFormers' own no-cache generation: the input is padded to a fixed width (prompt + new
    tokens, one graph), every step runs the full forward and reads the logits of the last valid token.
    """
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel
    from mindspore import dtype as mstype  # pylint: disable=import-outside-toplevel
    width = args.prompt + args.new
    net = build_mf_llama(1, width)
    net.set_train(False)
    built_rss = bc.current_rss_mb()
    prompt = prompt_ids(args.prompt)

    def generate(new_tokens):
        tokens = np.zeros((1, width), dtype=np.int32)
        tokens[0, :args.prompt] = prompt
        length = args.prompt
        stamps = [time.perf_counter()]
        for _ in range(new_tokens):
            out = net(Tensor(tokens), None, None, None, None, None, None, Tensor([length], mstype.int32))
            logits = out[0].asnumpy().reshape(-1, bc.BENCH_SHAPE["vocab_size"])[-1]
            tokens[0, length] = int(np.argmax(logits))
            length += 1
            stamps.append(time.perf_counter())
        return stamps

    start = time.perf_counter()
    generate(1)
    warmup_s = time.perf_counter() - start
    runs = []
    for _ in range(args.reps):
        stamps = generate(args.new)
        runs.append((stamps[1] - stamps[0], [b - a for a, b in zip(stamps[1:], stamps[2:])]))
    result = bc.summarize_decode(runs, args.prompt, args.new)
    result.update(warmup_s=warmup_s, rss_after_build_mb=built_rss, params=count_params_ms(net),
                  kv_cache_slots=0, mode=ms.get_context("mode"))
    return result


def decode_hf(args, torch):
    model = build_hf_llama(torch).eval()
    built_rss = bc.current_rss_mb()
    ids = torch.tensor(prompt_ids(args.prompt)).reshape(1, -1)
    mask = torch.ones_like(ids)
    kwargs = dict(attention_mask=mask, do_sample=False, use_cache=True, eos_token_id=None, pad_token_id=0,
                  num_beams=1)
    with torch.inference_mode():
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=3, **kwargs)
        warmup_s = time.perf_counter() - start
        runs = []
        for _ in range(args.reps):
            streamer = bc.TimingStreamer()
            out = model.generate(ids, max_new_tokens=args.new, streamer=streamer, **kwargs)
            assert out.shape[1] == args.prompt + args.new, out.shape
            runs.append((streamer.prefill_s(), streamer.step_times()))
    result = bc.summarize_decode(runs, args.prompt, args.new)
    result.update(warmup_s=warmup_s, rss_after_build_mb=built_rss,
                  params=int(sum(p.numel() for p in model.parameters())),
                  attn_implementation=model.config._attn_implementation)  # pylint: disable=protected-access
    return result


def task_decode(args):
    if (args.batch != 1 or args.shape != "bench") and not args.impl.startswith("ours"):
        raise SystemExit("--batch > 1 and --shape wide: ours only")
    if args.impl == "hf":
        result = decode_hf(args, bc.setup_torch())
    else:
        ms = bc.setup_mindspore(args.mode)
        result = decode_ours(args, ms) if args.impl.startswith("ours") else decode_mf(args, ms)
    # decode_tok_s: decode steps per second (tokens/s of each sequence); aggregate: of the batch.
    result.update(task="decode", impl=args.impl, batch=args.batch, shape_name=args.shape,
                  shape=bc.SHAPES[args.shape], aggregate_tok_s=args.batch * result["decode_tok_s"])
    result["prefill_tok_s"] *= args.batch          # the batch's prompts are prefilled together
    return result


# ----------------------------------------------------------------------------------------------------
# training

def use_plain_head():
    """Memory attribution only: our NormHead replaced by a plain ``x @ W.T`` head (MindFormers
    Llama's), in this process; the model files are untouched."""
    import baichuan2_layers  # pylint: disable=import-outside-toplevel

    def construct(self, x):
        shape = x.shape
        logits = self.matmul(x.reshape(-1, shape[-1]), self.weight)      # fp32 bench: no casts
        return logits.reshape(shape[:-1] + (logits.shape[-1],))
    baichuan2_layers.NormHead.construct = construct


def train_ms(args, ms):
    from mindspore import nn, Tensor  # pylint: disable=import-outside-toplevel
    if args.variant == "plainhead":
        use_plain_head()
    if args.impl == "mf":
        net = build_mf_llama(args.batch, args.seq)
    else:
        net = build_ours(args.impl, False, args.batch, args.seq)
    net.set_train(True)
    built_rss = bc.current_rss_mb()
    optimizer = make_optimizer(net.trainable_params(), args.optimizer)
    step = nn.TrainOneStepCell(net, optimizer)
    step.set_train(True)
    rng = np.random.RandomState(0)
    batches = [Tensor(rng.randint(3, bc.BENCH_SHAPE["vocab_size"], size=(args.batch, args.seq + 1)).astype(np.int32))
               for _ in range(2)]
    losses = []
    times, warmup_used, faulted = bc.timed_steps(lambda i: losses.append(float(step(batches[i % 2]).asnumpy())),
                                                 args.warmup, args.steps)
    return {"params": count_params_ms(net), "step_times": times, "losses": losses, "rss_after_build_mb": built_rss,
            "mode": ms.get_context("mode"), "optimizer": OPTIMIZERS[args.optimizer], "variant": args.variant,
            "warmup_used": warmup_used, "faulted_mb": faulted}


def train_hf(args, torch):
    model = build_hf_llama(torch).train()
    built_rss = bc.current_rss_mb()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)
    rng = np.random.RandomState(0)
    batches = [torch.tensor(rng.randint(3, bc.BENCH_SHAPE["vocab_size"], size=(args.batch, args.seq + 1)))
               for _ in range(2)]
    losses = []

    def train_step(i):
        ids = batches[i % 2]
        logits = model(input_ids=ids[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    times, warmup_used, faulted = bc.timed_steps(train_step, args.warmup, args.steps)
    return {"params": int(sum(p.numel() for p in model.parameters())), "step_times": times, "losses": losses,
            "rss_after_build_mb": built_rss, "mode": "eager", "optimizer": "torch.optim.AdamW (foreach)",
            "warmup_used": warmup_used, "faulted_mb": faulted}


def task_train(args):
    if args.impl == "hf":
        result = train_hf(args, bc.setup_torch())
    else:
        result = train_ms(args, bc.setup_mindspore("graph"))
    timed = result["step_times"][result["warmup_used"]:]
    flops = bc.train_flops_per_token(seq=args.seq)
    tokens_s = args.batch * args.seq / bc.median(timed)
    result.update(task="train", impl=args.impl, batch=args.batch, seq=args.seq, warmup=args.warmup,
                  steps=args.steps, step_s=bc.median(timed), first_step_s=result["step_times"][0],
                  tokens_s=tokens_s, flops_per_token=flops, train_gflops=tokens_s * flops["total"] / 1e9)
    return result


# ----------------------------------------------------------------------------------------------------
# fine-tuning on the Belle sample: real tokens/s, packed and unpacked

BELLE = "assets/belle_sample.json"
TOKENIZER = "assets/tokenizer.model"


def pack_flag_available():
    """True when ``belle_preprocess.py`` has a ``--pack`` option (packing is being added)."""
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    import os  # pylint: disable=import-outside-toplevel
    out = subprocess.run([sys.executable, os.path.join(bc.PLUGIN, "belle_preprocess.py"), "--help"],
                         capture_output=True, text=True, check=False)
    return "--pack" in out.stdout


def belle_records(seq, pack, work_dir):
    """Records of the bundled Belle sample from ``belle_preprocess.py`` (``--pack True`` if ``pack``):
    a list of {column: int32 array of seq + 1}."""
    import os  # pylint: disable=import-outside-toplevel
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    from mindspore.mindrecord import FileReader  # pylint: disable=import-outside-toplevel
    out = os.path.join(work_dir, f"belle_{seq}_{'packed' if pack else 'unpacked'}.mindrecord")
    cmd = [sys.executable, os.path.join(bc.PLUGIN, "belle_preprocess.py"),
           "--input_glob", os.path.join(bc.PLUGIN, BELLE), "--model_file", os.path.join(bc.PLUGIN, TOKENIZER),
           "--output_file", out, "--seq_length", str(seq), "--overwrite"] + (["--pack", "True"] if pack else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([bc.PLUGIN, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"belle_preprocess failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}")
    reader = FileReader(out)
    records = [{k: np.asarray(v, dtype=np.int32) for k, v in row.items()} for row in reader.get_next()]
    reader.close()
    return records, proc.stdout.strip()


def real_tokens(record, pad_token_id=0, ignore=-100):
    """(inputs that are not padding, targets that carry a label) of one record of seq + 1 ids: the
    model reads ``input_ids[:seq]`` and predicts ``labels[1:]``."""
    inputs = int(np.sum(record["input_ids"][:-1] != pad_token_id))
    labelled = int(np.sum(record["labels"][1:] != ignore))
    return inputs, labelled


def task_finetune(args):
    """Ours 7B shape, batch 1 x ``--seq``, GRAPH mode, ``--optimizer``, on the Belle records in order."""
    import shutil  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    result = {"task": "finetune", "impl": "ours7b", "seq": args.seq, "batch": 1, "packed": bool(args.pack),
              "warmup": args.warmup, "steps": args.steps, "optimizer": OPTIMIZERS[args.optimizer]}
    if args.pack and not pack_flag_available():
        result.update(available=False, reason="belle_preprocess.py has no --pack option yet")
        return result
    ms = bc.setup_mindspore("graph")
    from mindspore import nn, Tensor  # pylint: disable=import-outside-toplevel
    work = tempfile.mkdtemp(prefix="bench_belle_")
    try:
        records, summary = belle_records(args.seq, args.pack, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = [real_tokens(r) for r in records]
    columns = sorted(records[0])
    use_positions = args.pack and "position_ids" in records[0]

    net = build_ours("ours7b", False, 1, args.seq)
    net.set_train(True)
    built_rss = bc.current_rss_mb()

    class WithLabels(nn.Cell):
        """The loss of ``net`` on (input_ids, labels[, position_ids]); positions by keyword."""

        def __init__(self, network):
            super().__init__(auto_prefix=False)
            self.network = network

        def construct(self, input_ids, labels, position_ids=None):
            if position_ids is None:
                return self.network(input_ids, labels)
            return self.network(input_ids, labels, position_ids=position_ids)

    optimizer = make_optimizer(net.trainable_params(), args.optimizer)
    step = nn.TrainOneStepCell(WithLabels(net), optimizer)
    step.set_train(True)
    losses, used = [], []

    def train_step(i):
        index = i % len(records)
        record = records[index]
        inputs = [Tensor(record["input_ids"].reshape(1, -1)), Tensor(record["labels"].reshape(1, -1))]
        if use_positions:
            inputs.append(Tensor(record["position_ids"].reshape(1, -1)))
        losses.append(float(step(*inputs).asnumpy()))
        used.append(index)
    times, warmup_used, faulted = bc.timed_steps(train_step, args.warmup, args.steps)
    timed, timed_idx = times[warmup_used:], used[warmup_used:]
    step_s = bc.median(timed)
    mean_in = float(np.mean([c[0] for c in counts]))
    mean_lab = float(np.mean([c[1] for c in counts]))
    flops = bc.train_flops_per_token(seq=args.seq)
    result.update(
        available=True, records=len(records), columns=columns, position_ids_passed=bool(use_positions),
        preprocess_summary=summary, params=count_params_ms(net), rss_after_build_mb=built_rss,
        step_times=times, losses=losses, step_s=step_s, first_step_s=times[0], warmup_used=warmup_used,
        faulted_mb=faulted,
        input_tokens_total=int(sum(c[0] for c in counts)), label_tokens_total=int(sum(c[1] for c in counts)),
        input_tokens_per_record=mean_in, label_tokens_per_record=mean_lab,
        fill=mean_in / args.seq,
        # Headline: a whole epoch's real tokens over the time its records take at the median step.
        real_tokens_s=mean_in / step_s, label_tokens_s=mean_lab / step_s,
        # The same over the timed steps' own records only.
        real_tokens_s_timed=sum(counts[i][0] for i in timed_idx) / sum(timed),
        tokens_s=args.seq / step_s, epoch_s=len(records) * step_s,
        flops_per_token=flops, train_gflops=args.seq * flops["total"] / step_s / 1e9,
        useful_gflops=mean_in * flops["total"] / step_s / 1e9, mode=ms.get_context("mode"))
    return result


# ----------------------------------------------------------------------------------------------------
# profile (MindSpore's profiler: host CPU kernel times per op)

def _read_op_times(profile_dir):
    """Rows (op_type, full_op_name, total_ms) from the profiler's cpu_op_detail_info csv."""
    import csv  # pylint: disable=import-outside-toplevel
    import glob  # pylint: disable=import-outside-toplevel
    rows = []
    for path in glob.glob(f"{profile_dir}/**/cpu_op_detail_info_*.csv", recursive=True):
        with open(path, encoding="utf-8") as handle:
            for row in csv.DictReader(handle):
                rows.append((row["op_type"], row["full_op_name"], float(row["op_total_time(ms)"])))
    return rows


def _kernel_timeline(profile_dir, steps):
    """Kernels per step and the median idle gap between consecutive kernels (microseconds)."""
    import glob  # pylint: disable=import-outside-toplevel
    events = []
    for path in glob.glob(f"{profile_dir}/**/cpu_op_execute_timestamp_*.txt", recursive=True):
        with open(path, encoding="utf-8") as handle:
            for line in handle:
                parts = line.strip().split(";", 2)
                if len(parts) < 3:
                    continue
                for item in parts[2].split():
                    start, duration = item.split(",")[:2]
                    events.append((int(start) / 1000.0, float(duration) * 1000.0))    # ns -> us, ms -> us
    if len(events) < 2:
        return {}
    events.sort()
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(events, events[1:])]
    return {"kernels_per_step": len(events) / steps, "median_gap_us": bc.median(gaps)}


def categorize(rows, steps, phase):
    """Per-step milliseconds by category, plus the top ops.

    The profiler puts some layer-weight gradient MatMuls under the lm_head scope, so the lm_head's
    MatMuls are: the forward MatMul(s) in its scope and, in training, the two largest gradient
    MatMuls in its scope (input and weight gradients of the (tokens x h) @ (h x V) product).
    The one-pass decode kernel (a ``Custom`` op under a ``DecodeMatMul`` scope) counts as a MatMul, the
    in-place decode attention (a ``Custom`` op under a ``decode_attention`` scope) as attention; the
    cross-entropy kernels fused into the head (``fused_loss`` scope) count as the loss, except the norm's share
    of the head's weight gradient (``NormWeightGrad`` scope), which is NormHead's.
    """
    by_type = {}
    for op_type, _, total in rows:
        by_type[op_type] = by_type.get(op_type, 0.0) + total / steps
    top = sorted(rows, key=lambda r: -r[2])[:8]
    rows = [("MatMul" if t == "Custom" and "DecodeMatMul" in n else t, n, ms) for t, n, ms in rows]
    head_fwd = [r for r in rows if r[0] == "MatMul" and "lm_head" in r[1] and not r[1].startswith("Gradients")]
    head_bwd = sorted([r for r in rows if r[0] == "MatMul" and "lm_head" in r[1] and r[1].startswith("Gradients")],
                      key=lambda r: -r[2])[:2 if phase == "train" else 0]
    head = {id(r) for r in head_fwd + head_bwd}
    cats = {}

    def add(name, ms_total):
        cats[name] = cats.get(name, 0.0) + ms_total / steps

    for row in rows:
        op_type, name, total = row
        if id(row) in head:
            add("lm_head MatMul", total)
        elif op_type in ("MatMul", "BatchMatMul") and phase == "decode" and op_type == "BatchMatMul":
            add("attention BatchMatMul (QK^T, PV over the cache)", total)
        elif op_type == "Custom" and "decode_attention" in name:
            add("attention, in-place kernel (scores, softmax, PV over each row's context)", total)
        elif op_type in ("MatMul", "BatchMatMul"):
            add("layer MatMuls" if phase == "decode" else "other MatMuls (layers, attention)", total)
        elif op_type in ("ScatterNdUpdate", "ScatterUpdate", "TensorScatterUpdate", "IndexAdd", "TensorMove"):
            add("KV cache write (" + op_type + ")", total)
        elif "optimizer" in name or op_type.startswith("Adam"):
            add("optimizer (AdamW)", total)
        elif "loss" in name.replace("lm_head", "") and "NormWeightGrad" not in name:   # also fused into the head
            add("loss (cross entropy)", total)
        elif "lm_head" in name:
            add("lm_head non-MatMul ops (NormHead row norms and their gradients)", total)
        elif "tok_embeddings" in name:
            add("embedding (gather / its gradient)", total)
        else:
            add("other ops", total)
    return {"categories_ms": cats, "ops_ms": sum(cats.values()), "by_type_ms": by_type,
            "top_ops": [{"type": t, "name": n, "ms_per_step": ms / steps} for t, n, ms in top]}


def task_profile(args):
    import shutil  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    bc.setup_mindspore("graph")
    from mindspore import nn, Tensor, Profiler  # pylint: disable=import-outside-toplevel
    from mindspore import dtype as mstype  # pylint: disable=import-outside-toplevel
    from mindspore.profiler import ProfilerLevel  # pylint: disable=import-outside-toplevel
    if args.phase == "decode":
        shape = bc.SHAPES[args.shape]
        seq_length = shape["seq_length"]
        net = build_ours(args.impl, True, args.batch, seq_length, shape)
        net.set_train(False)
        ids = [prompt_ids(args.prompt, seed=row).tolist() for row in range(args.batch)]
        net.generate(ids if args.batch > 1 else ids[0], max_new_tokens=3, do_sample=False,
                     eos_token_id=[-1])                                                 # compile both graphs
        net.set_decode_phase(False)
        token = Tensor(np.full((args.batch, 1), 5, np.int32))
        position = [args.prompt]

        def run():      # as generate(): the cache window that holds the context
            position[0] += 1
            window = Tensor(np.arange(decode_window(position[0], seq_length), dtype=np.int32))
            return net(token, None, None, None, None, None, None,
                       Tensor([position[0]] * args.batch, mstype.int32), window).asnumpy()
        steps = 5 if args.quick else 20
    else:
        net = build_mf_llama(args.batch, args.seq) if args.impl == "mf" else build_ours(args.impl, False, args.batch,
                                                                                           args.seq)
        net.set_train(True)
        step = nn.TrainOneStepCell(net, make_optimizer(net.trainable_params(), args.optimizer))
        step.set_train(True)
        batch = Tensor(np.random.RandomState(0).randint(3, bc.BENCH_SHAPE["vocab_size"],
                                                        size=(args.batch, args.seq + 1)).astype(np.int32))

        def run():
            return step(batch).asnumpy()
        steps = 1 if args.quick else 2
    if args.phase == "train":     # as the train task: warm-up goes on while a step still grows the process
        times, warmup_used, _ = bc.timed_steps(lambda i: run(), 2, steps)
        wall = times[warmup_used:]
    else:
        run()
        wall = []
        for _ in range(steps):
            start = time.perf_counter()
            run()
            wall.append(time.perf_counter() - start)
    out_dir = tempfile.mkdtemp(prefix="bench_profile_")
    try:
        profiler = Profiler(output_path=out_dir, profiler_level=ProfilerLevel.Level1)
        for _ in range(steps):
            run()
        profiler.analyse()
        result = categorize(_read_op_times(out_dir), steps, args.phase)
        result.update(_kernel_timeline(out_dir, steps))
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    if args.phase == "decode":
        result["kv_window_slots"] = decode_window(position[0], seq_length)
        result["decode_attention"] = decode_attention_kind(net)
        result["shape_name"] = args.shape
    result.update(task="profile", impl=args.impl, phase=args.phase, steps=steps, wall_ms=1000 * bc.median(wall),
                  optimizer=OPTIMIZERS[args.optimizer] if args.phase == "train" else None,
                  prompt=args.prompt if args.phase == "decode" else None,
                  batch=args.batch, seq=args.seq if args.phase == "train" else None)
    return result


def task_optimizer(args):
    """One ``--optimizer`` step alone over the trainable weights of ours 7B at the bench shape (fixed random
    gradients of the weights' scale), ``--steps`` timed steps after ``--warmup``; the step is synchronised by
    reading one updated element back."""
    ms = bc.setup_mindspore("graph")
    from mindspore import Tensor  # pylint: disable=import-outside-toplevel
    net = build_ours("ours7b", False, 1, 64)
    params = net.trainable_params()
    optimizer = make_optimizer(params, args.optimizer)
    rng = np.random.RandomState(0)
    grads = tuple(Tensor((rng.standard_normal(p.shape) * 1e-3).astype(np.float32)) for p in params)
    times = []
    for _ in range(args.warmup + args.steps):
        start = time.perf_counter()
        optimizer(grads)
        params[0][0].asnumpy()
        times.append(time.perf_counter() - start)
    elements = sum(int(np.prod(p.shape)) for p in params)
    timed = times[args.warmup:]
    return {"task": "optimizer", "optimizer": OPTIMIZERS[args.optimizer], "kind": args.optimizer,
            "params": elements, "step_times": times, "step_s": bc.median(timed), "steps_s": 1 / bc.median(timed),
            "first_step_s": times[0],
            # weight, gradient, m, v read and weight, m, v written once: the least an AdamW step moves
            "min_bytes": elements * 4 * 7, "mode": ms.get_context("mode")}


# ----------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=("bandwidth", "gemm", "decode", "train", "finetune", "profile", "optimizer"))
    parser.add_argument("--out", required=True, help="JSON file for the result")
    parser.add_argument("--impl", default="ours7b", choices=("ours7b", "ours13b", "mf", "hf"))
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative"), help="MindSpore mode (decode)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=32, help="new tokens per decode repetition")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--phase", default="decode", choices=("decode", "train"), help="what to profile")
    parser.add_argument("--shape", default="bench", choices=tuple(bc.SHAPES), help="decode: network shape")
    parser.add_argument("--size", type=int, default=4096, help="gemm: matrix size")
    parser.add_argument("--pack", action="store_true", help="finetune: belle_preprocess.py --pack True")
    parser.add_argument("--variant", default="", choices=("", "plainhead"),
                        help="train (ours): plainhead = NormHead replaced by a plain head (memory attribution)")
    parser.add_argument("--optimizer", default="nn", choices=tuple(OPTIMIZERS),
                        help="train, finetune, profile, optimizer: which AdamW (see make_optimizer)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    tasks = {"bandwidth": task_bandwidth, "gemm": task_gemm, "decode": task_decode, "train": task_train,
             "finetune": task_finetune, "profile": task_profile, "optimizer": task_optimizer}
    result = tasks[args.task](args)
    result["threads"] = bc.THREADS
    bc.write_result(args.out, result)


if __name__ == "__main__":
    main()
