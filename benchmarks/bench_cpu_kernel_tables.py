"""What one CPU kernel keeps for the life of its compiled graph, by operand shape (MindSpore GRAPH mode).

    python benchmarks/bench_cpu_kernel_tables.py [--json out.json]

Each op kind runs as a chain of N ops on a (2, 4, 256, 256) fp32 tensor (524,288 elements, 2 MiB) in its
own process, for N = 10 and N = 40; the difference of the processes' ``RssAnon`` after the first run,
divided by 30, is what one op of that kind keeps. MindSpore's CPU memory pool reuses dead outputs (the
pool's peak stays at a few buffers), so what grows with N is per-kernel state. Reported as MiB per op and
as bytes per output element above the scalar-multiply chain, the cheapest op, measured in the same run.

Why it matters: a kernel with a broadcasting operand (``x * w`` with w of shape (h,), a Select whose mask
or fill is smaller than its output) builds ``size_t`` index tables in its ``Resize()`` (MindSpore's
``mindspore/ops/kernel/cpu/native/select_cpu_kernel.cc``, ``arithmetic_cpu_kernel.cc``: one table per
operand, 8 bytes per output element each) and a Transpose with a constant permutation builds one
(``transpose_cpu_kernel.cc``). They live as long as the graph, once per op, so a model that broadcasts
inside each layer keeps them for every layer of every compiled graph. ``baichuan2_layers._expand_as``
repeats the operand with Tile instead; ``baichuan2_memory`` plans what is left (the Transposes).
"""
import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SHAPE = (2, 4, 256, 256)
ELEMENTS = 2 * 4 * 256 * 256
CHAINS = (10, 40)
# kind -> what the op is; the shape of its second operand is in ``_chain``.
KINDS = {
    "scalar_mul": "x * 1.0001 (scalar operand: the baseline)",
    "same_shape_mul": "x * m, m (2, 4, 256, 256)",
    "broadcast_mul_row": "x * m, m (2, 4, 256, 1) (as x * rsqrt(mean(x^2)))",
    "broadcast_mul_col": "x * m, m (1, 1, 1, 256) (as x * weight)",
    "broadcast_add_lead": "x + m, m (1, 4, 256, 256) (as scores + ALiBi bias)",
    "broadcast_select": "select(k, x, fill), k (2, 1, 256, 256) (as the causal mask)",
    "scalar_select": "select(k, x, -1.0), k (2, 4, 256, 256), scalar fill",
    "expanded_select": "select(broadcast_to(k), x, fill), every operand (2, 4, 256, 256)",
    "expanded_mul_col": "x * broadcast_to(m), m (1, 1, 1, 256)",
    "tiled_mul_col": "x * tile(m), m (1, 1, 1, 256)",
    "tiled_select": "select(tile(k), x, fill), every operand (2, 4, 256, 256)",
    "transpose": "x.transpose(0, 2, 1, 3)",
}


def _chain(kind, length):
    """Run one chain in this process; return the growth of ``RssAnon`` in bytes."""
    os.environ.setdefault("GLOG_v", "3")
    sys.path.insert(0, HERE)
    import numpy as np  # pylint: disable=import-outside-toplevel
    import mindspore as ms  # pylint: disable=import-outside-toplevel
    from mindspore import nn, ops, Tensor, Parameter  # pylint: disable=import-outside-toplevel
    from mindspore import dtype as mstype  # pylint: disable=import-outside-toplevel
    from bench_memory import proc_status  # pylint: disable=import-outside-toplevel
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    batch, heads, seq, keys = SHAPE
    second = {"same_shape_mul": SHAPE, "broadcast_mul_row": (batch, heads, seq, 1),
              "broadcast_mul_col": (1, 1, 1, keys), "expanded_mul_col": (1, 1, 1, keys),
              "tiled_mul_col": (1, 1, 1, keys),
              "broadcast_add_lead": (1, heads, seq, keys)}.get(kind, (1,))
    mask = SHAPE if kind == "scalar_select" else (batch, 1, seq, keys)

    class Chain(nn.Cell):
        def __init__(self):
            super().__init__()
            rng = np.random.RandomState(0)
            self.m = Parameter(Tensor(rng.rand(*second).astype(np.float32) + 0.5), name="m")
            self.k = Parameter(Tensor(rng.rand(*mask) > 0.1), name="k")

        def construct(self, x):
            for _ in range(length):
                if kind == "scalar_mul":
                    x = x * 1.0001
                elif kind in ("same_shape_mul", "broadcast_mul_row", "broadcast_mul_col"):
                    x = x * self.m
                elif kind == "expanded_mul_col":
                    x = x * ops.broadcast_to(self.m, x.shape)
                elif kind == "tiled_mul_col":
                    x = x * ops.tile(self.m, (batch, heads, seq, 1))
                elif kind == "broadcast_add_lead":
                    x = x + self.m
                elif kind == "broadcast_select":
                    x = ops.select(self.k, x, ops.fill(mstype.float32, x.shape, -1.0))
                elif kind == "scalar_select":
                    x = ops.select(self.k, x, -1.0)
                elif kind == "expanded_select":
                    x = ops.select(ops.broadcast_to(self.k, x.shape), x, ops.fill(mstype.float32, x.shape, -1.0))
                elif kind == "tiled_select":
                    x = ops.select(ops.tile(self.k, (1, heads, 1, 1)), x, ops.fill(mstype.float32, x.shape, -1.0))
                elif kind == "transpose":
                    x = x.transpose(0, 2, 1, 3)
            return x

    net = Chain()
    x = Tensor(np.random.RandomState(1).rand(*SHAPE).astype(np.float32))
    before = proc_status()["RssAnon"]
    net(x).asnumpy()
    return proc_status()["RssAnon"] - before


def _run_chain(kind, length):
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--chain", kind, str(length)],
                         capture_output=True, text=True, check=True, timeout=600)
    return int(out.stdout.strip().splitlines()[-1])


def measure():
    """Per-op bytes of every kind, with the machine and its load recorded."""
    rows = {}
    for kind in KINDS:
        short, long_ = (_run_chain(kind, n) for n in CHAINS)
        rows[kind] = (long_ - short) / (CHAINS[1] - CHAINS[0])
        print(f"{kind}: {rows[kind] / 2**20:.2f} MiB/op", file=sys.stderr, flush=True)
    base = rows["scalar_mul"]
    with open("/proc/cpuinfo", encoding="ascii", errors="replace") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), "?")
    return {"machine": cpu, "load_average": os.getloadavg(), "shape": SHAPE,
            "kinds": {kind: {"what": KINDS[kind], "bytes_per_op": rows[kind],
                             "bytes_per_element_above_scalar": (rows[kind] - base) / ELEMENTS} for kind in KINDS}}


def table(result):
    lines = [f"Machine: {result['machine']}; load average {result['load_average'][0]:.1f}; "
             f"output {result['shape']} fp32 ({ELEMENTS * 4 / 2**20:.0f} MiB).", "",
             "| op | MiB kept per op | bytes per output element above x * scalar |", "| --- | --- | --- |"]
    for row in result["kinds"].values():
        lines.append(f"| {row['what']} | {row['bytes_per_op'] / 2**20:.2f} | "
                     f"{row['bytes_per_element_above_scalar']:.1f} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n", maxsplit=1)[0])
    parser.add_argument("--chain", nargs=2, metavar=("KIND", "N"), help="internal: run one chain, print bytes")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.chain:
        print(_chain(args.chain[0], int(args.chain[1])))
        return
    result = measure()
    print(table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)


if __name__ == "__main__":
    main()
