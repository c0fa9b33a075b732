"""Real-size weights: synthesise released-layout Hugging Face checkpoints, convert and load them, and measure.

    python benchmarks/bench_real_weights.py --work_dir /big/disk/rw --out real_weights.json         # ~30 GB
    python benchmarks/bench_real_weights.py --work_dir /tmp/rw --scale 8 --out /tmp/rw.json         # check

For Baichuan2-7B (one ``pytorch_model.bin``, bf16) and Baichuan2-13B (three ``.bin`` shards plus
``pytorch_model.bin.index.json``), with the released shapes (vocab 125696; 7B hidden 4096, 32 layers, 32 heads,
FFN 11008, ``W_pack`` [12288, 4096]; 13B hidden 5120, 40 layers, 40 heads, FFN 13696) and a ``config.json``
like the released one, this script

1. writes the checkpoint tensor by tensor (bf16 ``torch.empty`` + a cheap fill; a single 15 GB file needs
   the whole dict, so the generator is its own process and its memory is freed when it ends);
2. converts it with the documented command ``python research/baichuan/convert_weight.py --torch_ckpt_path
   DIR --mindspore_ckpt_path OUT.ckpt`` (fp16 output);
3. loads the fp16 checkpoint into a network with the inference scripts' path
   (``baichuan2_inference.load_weights``, which streams a complete ``.ckpt`` tensor by tensor) when the memory
   planner's pre-flight for that path says it fits this host, and prints the pre-flight's refusal where it
   does not (also for 7B in fp32, the precision of Baichuan's own CPU example).

Every step runs in a child process whose ``/proc/<pid>/status`` is sampled every 0.2 s: wall time, peak
``RssAnon`` (anonymous: tensors, buffers) and ``RssFile`` (file-backed: mapped libraries and files), and the
kernel's ``VmHWM``. ``--scale N`` divides hidden size, heads, layers and FFN width by N (vocabulary kept) to
check the script end to end in minutes. A markdown section is printed; ``--out`` receives the JSON.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PLUGIN = os.path.join(ROOT, "research", "baichuan2")
CONVERTER = os.path.join(ROOT, "research", "baichuan", "convert_weight.py")
GIB = 2 ** 30

RELEASED = {
    "7b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "intermediate_size": 11008,
           "max_position_embeddings": 4096, "shards": 1},
    "13b": {"hidden_size": 5120, "num_hidden_layers": 40, "num_attention_heads": 40, "intermediate_size": 13696,
            "shards": 3},
}


def hf_config(kind, scale=1):
    """``config.json`` of the released Baichuan2 model (``scale`` > 1 divides width, heads, depth, FFN)."""
    sizes = RELEASED[kind]
    config = {"architectures": ["BaichuanForCausalLM"],
              "auto_map": {"AutoConfig": "configuration_baichuan.BaichuanConfig",
                           "AutoModelForCausalLM": "modeling_baichuan.BaichuanForCausalLM"},
              "tokenizer_class": "BaichuanTokenizer", "model_type": "baichuan", "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu",
              "hidden_size": sizes["hidden_size"] // scale, "initializer_range": 0.02,
              "intermediate_size": sizes["intermediate_size"] // scale, "model_max_length": 4096,
              "num_attention_heads": max(sizes["num_attention_heads"] // scale, 1),
              "num_hidden_layers": max(sizes["num_hidden_layers"] // scale, 1), "rms_norm_eps": 1e-6,
              "tie_word_embeddings": False, "torch_dtype": "bfloat16", "transformers_version": "4.29.2",
              "use_cache": True, "vocab_size": 125696, "z_loss_weight": 0, "_from_model_config": True}
    if "max_position_embeddings" in sizes:
        config["max_position_embeddings"] = sizes["max_position_embeddings"]
    return config


def tensor_shapes(config):
    """``[(HF name, shape)]`` in the released order (embedding, layers, final norm, lm_head)."""
    h, f, v = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    shapes = [("model.embed_tokens.weight", (v, h))]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes += [(p + "self_attn.W_pack.weight", (3 * h, h)), (p + "self_attn.o_proj.weight", (h, h)),
                   (p + "mlp.gate_proj.weight", (f, h)), (p + "mlp.down_proj.weight", (h, f)),
                   (p + "mlp.up_proj.weight", (f, h)), (p + "input_layernorm.weight", (h,)),
                   (p + "post_attention_layernorm.weight", (h,))]
    shapes += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return shapes


def shard_groups(shapes, num_shards):
    """Contiguous groups of about equal bytes (one per ``.bin`` file)."""
    sizes = [_numel(s) for _, s in shapes]
    total, groups, current, acc = sum(sizes), [], [], 0
    for (name, shape), size in zip(shapes, sizes):
        current.append((name, shape))
        acc += size
        if acc >= total * (len(groups) + 1) / num_shards and len(groups) < num_shards - 1:
            groups.append(current)
            current = []
    groups.append(current)
    return groups


def _numel(shape):
    count = 1
    for dim in shape:
        count *= dim
    return count


# ----- child tasks (each runs in its own process) ------------------------------------------------------

def task_generate(kind, scale, directory):
    """Write ``config.json`` and the bf16 ``.bin`` file(s) of ``kind`` into ``directory``."""
    import torch  # pylint: disable=import-outside-toplevel
    config = hf_config(kind, scale)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    groups = shard_groups(tensor_shapes(config), RELEASED[kind]["shards"])
    generator = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    for index, group in enumerate(groups):
        state = {}
        for name, shape in group:
            tensor = torch.empty(shape, dtype=torch.bfloat16)
            if len(shape) == 1:
                tensor.fill_(1.0)
            else:      # cheap fill, different per tensor; in place, no fp32 temporary
                tensor.uniform_(-0.02, 0.02, generator=generator)
            state[name] = tensor
        file = "pytorch_model.bin" if len(groups) == 1 else \
            f"pytorch_model-{index + 1:05d}-of-{len(groups):05d}.bin"
        torch.save(state, os.path.join(directory, file))
        for name, tensor in state.items():
            weight_map[name] = file
            total += tensor.numel() * tensor.element_size()
        del state
    if len(groups) > 1:
        with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w", encoding="utf-8") as handle:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, handle, indent=2)


def load_model_config(kind, scale, param_dtype):
    """The plugin's model_config of the (scaled) released shape, for the planner and the network."""
    config = hf_config(kind, scale)
    return {"vocab_size": config["vocab_size"], "hidden_size": config["hidden_size"],
            "num_layers": config["num_hidden_layers"], "num_heads": config["num_attention_heads"],
            "intermediate_size": config["intermediate_size"], "seq_length": 512, "batch_size": 1,
            "param_init_type": param_dtype, "embedding_init_type": param_dtype, "compute_dtype": param_dtype,
            "layernorm_compute_type": "float32", "softmax_compute_type": "float32", "rotary_dtype": "float32",
            "use_past": False, "use_flash_attention": False, "fused_rms_norm": False, "rms_norm_eps": 1e-6,
            "pad_token_id": 0, "eos_token_id": 2}


def task_load(kind, scale, ckpt):
    """Build the fp16 network of ``kind`` and load ``ckpt`` into it with the inference scripts' path
    (``baichuan2_inference.load_weights``: the ``.ckpt`` streamed tensor by tensor, every weight required)."""
    sys.path.insert(0, PLUGIN)
    from types import SimpleNamespace  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindformers.models import LlamaConfig  # pylint: disable=import-outside-toplevel
    import baichuan2_7b  # pylint: disable=import-outside-toplevel
    import baichuan2_13b  # pylint: disable=import-outside-toplevel
    from baichuan2_ckpt_loader import streams_checkpoint  # pylint: disable=import-outside-toplevel
    from baichuan2_inference import load_weights  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    cls = baichuan2_7b.Baichuan7BV2ForCausalLM if kind == "7b" else baichuan2_13b.Baichuan13BV2ForCausalLM
    net = cls(LlamaConfig(**load_model_config(kind, scale, "float16")))
    if not streams_checkpoint(ckpt):
        raise SystemExit(f"{ckpt} is not a complete .ckpt file: load_weights would not stream it")
    load_weights(SimpleNamespace(load_checkpoint=ckpt, auto_trans_ckpt=False), net)


# ----- the parent: run children and sample their memory ---------------------------------------------

def sample_status(pid):
    values = {}
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmHWM"):
                    values[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return values


def run_sampled(argv, label, interval=0.2):
    """Run ``argv``; return wall seconds and the peaks of ``RssAnon`` / ``RssFile`` / ``VmHWM`` (bytes)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env=dict(os.environ, GLOG_v="3"))
    peaks = {"RssAnon": 0, "RssFile": 0, "VmHWM": 0}
    output = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        for key, value in sample_status(proc.pid).items():
            peaks[key] = max(peaks[key], value)
        time.sleep(interval)
    reader.join()
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {proc.returncode}):\n{''.join(output)[-3000:]}")
    return {"step": label, "seconds": seconds, "peak_anon_bytes": peaks["RssAnon"],
            "peak_file_bytes": peaks["RssFile"], "peak_rss_bytes": peaks["VmHWM"]}


def dir_bytes(path):
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))


def loading_preflight(kind, scale, param_dtype, available):
    """The planner's pre-flight for streaming a ``.ckpt`` into ``kind`` with ``param_dtype`` weights and
    predicting, on this host (``load_weights``' path: one tensor in flight, ``CHECKPOINT_STREAM``)."""
    sys.path.insert(0, PLUGIN)
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    config = {"model": {"model_config": load_model_config(kind, scale, param_dtype)},
              "context": {"device_target": "CPU"}}
    return baichuan2_memory.preflight(config, "predict", available_bytes=available,
                                      load_checkpoint=baichuan2_memory.CHECKPOINT_STREAM)


def bench_model(kind, args):
    directory = os.path.join(args.work_dir, f"hf_{kind}")
    ckpt = os.path.join(args.work_dir, f"baichuan2_{kind}_fp16.ckpt")
    me = os.path.abspath(__file__)
    scale = ["--scale", str(args.scale)]
    steps = [run_sampled([sys.executable, me, "generate", "--kind", kind, "--dir", directory] + scale,
                         f"{kind}: synthesise HF checkpoint")]
    hf_bytes = dir_bytes(directory)
    steps.append(run_sampled([sys.executable, CONVERTER, "--torch_ckpt_path", directory,
                              "--mindspore_ckpt_path", ckpt], f"{kind}: convert_weight.py (fp16)"))
    result = {"kind": kind, "scale": args.scale, "hf_files": sorted(os.listdir(directory)), "hf_bytes": hf_bytes,
              "ckpt_bytes": os.path.getsize(ckpt), "steps": steps}
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    available = baichuan2_memory.host_available_bytes()
    ok, message = loading_preflight(kind, args.scale, "float16", available)
    result["load_preflight"] = {"ok": ok, "message": message}
    if ok:
        steps.append(run_sampled([sys.executable, me, "load", "--kind", kind, "--ckpt", ckpt] + scale,
                                 f"{kind}: load_weights (streamed .ckpt) fp16 into the network"))
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)
        os.remove(ckpt)
    return result


def markdown(results, fp32_refusal, host):
    lines = [f"### Real-size weights (host: {host})", "",
             "| step | wall s | peak RssAnon GB | peak RssFile GB | peak RSS (VmHWM) GB |",
             "| --- | --- | --- | --- | --- |"]
    for result in results:
        for step in result["steps"]:
            lines.append(f"| {step['step']} | {step['seconds']:.1f} | {step['peak_anon_bytes'] / GIB:.2f} | "
                         f"{step['peak_file_bytes'] / GIB:.2f} | {step['peak_rss_bytes'] / GIB:.2f} |")
    lines.append("")
    for result in results:
        lines.append(f"- {result['kind']} (scale 1/{result['scale']}): HF files {', '.join(result['hf_files'])} "
                     f"= {result['hf_bytes'] / GIB:.2f} GB; "
                     f"MindSpore fp16 checkpoint {result['ckpt_bytes'] / GIB:.2f} GB; "
                     f"load pre-flight: {'ok' if result['load_preflight']['ok'] else 'refused'} "
                     f"({result['load_preflight']['message']})")
    lines.append(f"- 7B in fp32 on this host (released shapes): pre-flight "
                 f"{'ok' if fp32_refusal['ok'] else 'refused'}: {fp32_refusal['message']}")
    return "\n".join(lines)


def host_name():
    model = "unknown CPU"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    sys.path.insert(0, PLUGIN)
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    return f"{model}, {os.cpu_count()} CPUs, {baichuan2_memory.host_available_bytes() / GIB:.1f} GB available"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("task", nargs="?", default="bench", choices=("bench", "generate", "load"))
    parser.add_argument("--work_dir", help="bench: folder for the synthetic and converted checkpoints")
    parser.add_argument("--models", nargs="+", default=["7b", "13b"], choices=sorted(RELEASED))
    parser.add_argument("--scale", type=int, default=1, help="divide width, heads, depth and FFN by this")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints (default: deleted)")
    parser.add_argument("--out", help="bench: JSON result file")
    parser.add_argument("--kind", choices=sorted(RELEASED))
    parser.add_argument("--dir")
    parser.add_argument("--ckpt")
    args = parser.parse_args(argv)
    if args.scale < 1:
        parser.error("--scale must be >= 1")
    if args.task == "generate":
        task_generate(args.kind, args.scale, args.dir)
        return 0
    if args.task == "load":
        task_load(args.kind, args.scale, args.ckpt)
        return 0
    if not args.work_dir:
        parser.error("--work_dir is required")
    os.makedirs(args.work_dir, exist_ok=True)
    sys.path.insert(0, PLUGIN)
    import baichuan2_memory  # pylint: disable=import-outside-toplevel
    results = [bench_model(kind, args) for kind in args.models]
    ok, message = loading_preflight("7b", 1, "float32", baichuan2_memory.host_available_bytes())
    fp32 = {"ok": ok, "message": message}
    host = host_name()
    print(markdown(results, fp32, host))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as handle:
            json.dump({"host": host, "results": results, "fp32_7b_preflight": fp32}, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
