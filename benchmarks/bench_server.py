"""Serving benchmark: the real HTTP server at the bench shape vs ``generate()`` in the same run.

``python benchmarks/bench_server.py --out server.json [--quick]``

1. Random weights of the bench shape (``bench_common.BENCH_SHAPE``: vocab 125696, hidden 1024, 4
   layers, 8 heads, seq_length 2048, fp32) are saved as a checkpoint with a YAML.
2. ``generate()`` (batch 1, KV cache, graph mode) decodes ``--new`` tokens after a ``--prompt``-token
   prompt in this process: the direct single-stream tokens/s.
3. ``run_baichuan2_server.py --max_batch_size 4`` serves the same weights; through HTTP (streamed
   ``/v1/completions``, greedy) it measures, with 1, 2 and 4 concurrent streams, the aggregate
   tokens/s (all completion tokens / wall time) and the time to first token (TTFT); then the TTFT
   of a request arriving while 3 others decode, against the idle TTFT.

Prints a markdown table and writes JSON. Targets: 4 streams >= 3x the aggregate tokens/s of 1;
TTFT under load <= 2x idle; HTTP single-stream tokens/s within 5% of ``generate()``.
The bundled tokenizer has 4000 pieces, so ids beyond it stream as U+FFFD; the prompt is text whose
encoding has ``--prompt`` tokens.
"""
import argparse
import http.client
import json
import os
import statistics
import sys
import tempfile
import threading
import time

import bench_common as bc
bc.pin_threads()

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tests"), bc.PLUGIN]


def write_model(folder):
    """Random bench-shape weights -> ``(yaml, ckpt)``."""
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    import yaml  # pylint: disable=import-outside-toplevel
    from bench_tasks import build_ours  # pylint: disable=import-outside-toplevel
    from run_helpers import TINY_YAMLS, TOKENIZER, load_yaml  # pylint: disable=import-outside-toplevel
    net = build_ours("ours7b", use_past=False, batch_size=1, seq_length=bc.BENCH_SHAPE["seq_length"])
    ckpt = os.path.join(folder, "bench.ckpt")
    ms.save_checkpoint(net, ckpt)
    cfg = load_yaml(TINY_YAMLS["7b"])
    shape = bc.BENCH_SHAPE
    cfg["model"]["model_config"].update(
        seq_length=shape["seq_length"], max_decode_length=shape["seq_length"], hidden_size=shape["hidden_size"],
        num_layers=shape["num_layers"], num_heads=shape["num_heads"], vocab_size=shape["vocab_size"],
        intermediate_size=shape["intermediate_size"], rms_norm_eps=shape["rms_norm_eps"], fused_rms_norm=False,
        do_sample=False, repetition_penalty=1.0)
    cfg["processor"]["tokenizer"]["vocab_file"] = TOKENIZER
    for section in ("train_dataset_task", "eval_dataset_task"):
        cfg[section]["dataset_config"] = cfg[section.replace("_task", "")]
    path = os.path.join(folder, "bench.yaml")
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(cfg, handle, sort_keys=False, allow_unicode=True)
    del net
    return path, ckpt


def prompt_text(tokens):
    """Text whose encoding has exactly ``tokens`` ids with the bundled tokenizer."""
    from baichuan2_tokenizer import Baichuan2Tokenizer  # pylint: disable=import-outside-toplevel
    from run_helpers import TOKENIZER  # pylint: disable=import-outside-toplevel
    tok = Baichuan2Tokenizer(vocab_file=TOKENIZER)
    text, word = "", "床前明月光，疑是地上霜。举头望明月，低头思故乡。"
    while len(tok.encode(text)) < tokens:
        text += word
    while len(tok.encode(text)) > tokens:
        text = text[:-1]
    return text, tok


def direct_generate(yaml_path, ckpt, prompt_ids, new_tokens, reps, batch_size=1):
    """Tokens/s of ``generate()`` of one prompt (KV cache, graph mode): new tokens / wall time, median of reps.

    ``batch_size``: the network's cache rows. With 4 (the server's ``--max_batch_size``) every decode step
    computes 4 rows as the server's does, so the comparison isolates what HTTP and the engine add.
    """
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from bench_tasks import build_ours  # pylint: disable=import-outside-toplevel
    net = build_ours("ours7b", use_past=True, batch_size=batch_size, seq_length=bc.BENCH_SHAPE["seq_length"])
    ms.load_param_into_net(net, ms.load_checkpoint(ckpt))
    net.set_train(False)
    kwargs = dict(max_new_tokens=new_tokens, do_sample=False, eos_token_id=[-1])
    net.generate([prompt_ids], **kwargs)                      # compiles
    rates = []
    for _ in range(reps):
        start = time.perf_counter()
        out = net.generate([prompt_ids], **kwargs)[0]
        rates.append((len(out) - len(prompt_ids)) / (time.perf_counter() - start))
    del yaml_path
    return statistics.median(rates)


def stream_once(port, prompt, max_tokens, record, started=None):
    """One streamed completion; appends ``{ttft, seconds, tokens}`` (tokens from the usage chunk)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                       "stream_options": {"include_usage": True}})
    begin = time.perf_counter()
    conn.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
    response = conn.getresponse()
    ttft, tokens = None, 0
    for raw in response:
        line = raw.decode("utf-8").strip()
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk["choices"] and chunk["choices"][0]["text"] and ttft is None:
            ttft = time.perf_counter() - begin
            if started is not None:
                started.set()
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
    conn.close()
    record.append({"ttft": ttft, "seconds": time.perf_counter() - begin, "tokens": tokens})


def concurrent(port, prompt, max_tokens, streams):
    records = []
    threads = [threading.Thread(target=stream_once, args=(port, prompt, max_tokens, records)) for _ in range(streams)]
    begin = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - begin
    return {"streams": streams, "aggregate_tokens_per_s": sum(r["tokens"] for r in records) / wall,
            "ttft_s": statistics.median(r["ttft"] for r in records), "wall_s": wall,
            "tokens": sum(r["tokens"] for r in records)}


def ttft_under_load(port, prompt, max_tokens):
    """TTFT of a request sent once 3 long streams are decoding."""
    records, load = [], []
    events = [threading.Event() for _ in range(3)]
    threads = [threading.Thread(target=stream_once, args=(port, prompt, max_tokens * 3, load, e)) for e in events]
    for thread in threads:
        thread.start()
    for event in events:
        event.wait(600)
    stream_once(port, prompt, 8, records)
    for thread in threads:
        thread.join()
    return records[0]["ttft"]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="bench_server.json")
    parser.add_argument("--prompt", default=64, type=int, help="Prompt tokens.")
    parser.add_argument("--new", default=64, type=int, help="New tokens per stream.")
    parser.add_argument("--reps", default=3, type=int)
    parser.add_argument("--quick", action="store_true", help="Fewer tokens and repetitions (a busy machine).")
    args = parser.parse_args(argv)
    if args.quick:
        args.new, args.reps = 24, 1
    from server_fixtures import launch_server  # pylint: disable=import-outside-toplevel
    with tempfile.TemporaryDirectory() as tmp:
        yaml_path, ckpt = write_model(tmp)
        prompt, tok = prompt_text(args.prompt)
        prompt_ids = tok.encode(prompt)
        bc.setup_mindspore("graph")                               # once per process (threads, graph mode)
        direct = direct_generate(yaml_path, ckpt, prompt_ids, args.new, args.reps)
        direct4 = direct_generate(yaml_path, ckpt, prompt_ids, args.new, args.reps, batch_size=4)
        server = launch_server(["--config", yaml_path, "--load_checkpoint", ckpt, "--max_batch_size", "4",
                                "--warmup", "minimal"], cwd=tmp,
                               env={v: str(bc.THREADS) for v in bc.THREAD_VARS})
        try:
            server.wait_ready(timeout=1800)
            port = int(server.url.rsplit(":", 1)[1])
            concurrent(port, prompt, 8, 4)                        # compiles the prompt's width; warms the batch
            runs = {n: [concurrent(port, prompt, args.new, n) for _ in range(args.reps)] for n in (1, 2, 4)}
            best = {n: max(r, key=lambda x: x["aggregate_tokens_per_s"]) for n, r in runs.items()}
            idle = statistics.median(concurrent(port, prompt, 8, 1)["ttft_s"] for _ in range(args.reps))
            loaded = statistics.median(ttft_under_load(port, prompt, args.new) for _ in range(args.reps))
        finally:
            server.stop()
    one, four = best[1]["aggregate_tokens_per_s"], best[4]["aggregate_tokens_per_s"]
    result = {"task": "server", "shape": bc.BENCH_SHAPE, "prompt_tokens": args.prompt, "new_tokens": args.new,
              "reps": args.reps, "quick": args.quick, "generate_tokens_per_s": direct,
              "generate_batch4_network_tokens_per_s": direct4,
              "streams": {str(n): best[n] for n in best}, "ttft_idle_s": idle, "ttft_under_load_s": loaded,
              "targets": {"4_streams_vs_1": four / one, "4_streams_met": four >= 3 * one,
                          "ttft_load_vs_idle": loaded / idle, "ttft_met": loaded <= 2 * idle,
                          "http_vs_generate": one / direct, "http_overhead_met": one >= 0.95 * direct,
                          "http_vs_generate_same_batch": one / direct4}}
    print("| measurement | value |\n|---|---|")
    print(f"| generate() batch 1, tokens/s | {direct:.1f} |")
    print(f"| generate() of 1 prompt on a batch-4 network (the server's), tokens/s | {direct4:.1f} |")
    for n in (1, 2, 4):
        print(f"| HTTP {n} stream(s): aggregate tokens/s, TTFT | {best[n]['aggregate_tokens_per_s']:.1f}, "
              f"{best[n]['ttft_s'] * 1000:.0f} ms |")
    print(f"| TTFT idle / with 3 streams decoding | {idle * 1000:.0f} ms / {loaded * 1000:.0f} ms |")
    targets = result["targets"]
    print(f"| 4 streams vs 1 (target >= 3x) | {targets['4_streams_vs_1']:.2f}x |")
    print(f"| TTFT under load vs idle (target <= 2x) | {targets['ttft_load_vs_idle']:.2f}x |")
    print(f"| HTTP 1 stream vs generate() (target >= 0.95) | {targets['http_vs_generate']:.3f} |")
    print(f"| HTTP 1 stream vs generate() on the same batch-4 network | {targets['http_vs_generate_same_batch']:.3f} |")
    bc.write_result(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
