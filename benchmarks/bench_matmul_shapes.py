"""Time per call of MindSpore CPU fp32 matmul formulations at decode/prefill row counts.

Question: why does a batch-4 decode step cost ~1.7x a batch-1 step although decode is bound by reading
the weights? Each formulation of ``y = x @ W^T`` (x (M, in), W (out, in) fp32) runs in its own tiny
GRAPH_MODE Cell holding the weight as a Parameter. For every shape and M the variants are called
interleaved (A, B, C, A, B, C, ...), with a >L3 cache flush between calls, and the median per variant is
reported as ms per call and effective GB/s (weight bytes / time).

MindSpore 2.7's CPU MatMul / BatchMatMul (fp32) is oneDNN 2.2's ``matmul`` primitive
(ops/kernel/cpu/mkldnn/matmul_cpu_kernel_func.cc); the weight layout is passed by strides. With
``--kernel-times`` (default) each child runs with ``DNNL_VERBOSE=1``, so the table also shows the oneDNN
implementation and the kernel-only time of every call, next to the wall time of the graph call.

Each shape runs in its own child process (one at a time) so memory is returned between shapes.

    .venv/bin/python benchmarks/bench_matmul_shapes.py --out /tmp/matmul.json
    .venv/bin/python benchmarks/bench_matmul_shapes.py --shapes 4096x4096 --ms 1,4 --variants tb,nt,swap
    .venv/bin/python benchmarks/bench_matmul_shapes.py --mode pynative --variants tb
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from bench_common import pin_threads  # noqa: E402  pylint: disable=wrong-import-position

DEFAULT_SHAPES = "1024x2816,1024x125696,4096x4096,4096x11008"   # (in, out)
DEFAULT_MS = "1,2,4,8,16"

VARIANTS = {
    "tb": "(a) ops.MatMul(transpose_b=True), W (out,in)  [model: Linear, NormHead]",
    "nt": "(b) ops.MatMul(), W pre-transposed (in,out)",
    "bmm_tb": "(c) ops.BatchMatMul(transpose_b=True), x (1,M,in), W (1,out,in)",
    "bmm_nt": "(c) ops.BatchMatMul(), x (1,M,in), W^T (1,in,out)",
    "swap": "(f) (W @ x^T)^T: MatMul(transpose_b=True)(W, x) then transpose (M,out)",
    "mint_nt": "(d) mint.matmul(x, W^T (in,out) parameter)",
    "mint_linear": "(d) mint.nn.functional.linear(x, W (out,in))",
    "ops_matmul_nt": "(d) ops.matmul(x, W^T (in,out) parameter)",
    "dense": "(d) nn.Dense(in, out, has_bias=False)",
    "mf_linear": "(d) mindformers Linear(in, out, has_bias=False) as in the model",
    "split": "(e) M separate M=1 transpose_b matmuls, concatenated (M<=8)",
    "chunk2m": "(f) W stored as out-row chunks of ~2 MiB (separate Parameters), one transpose_b MatMul each, concat",
    "chunk8m": "(f) as chunk2m with ~8 MiB chunks",
    "slice2m": "(f) one W Parameter sliced in the graph into ~2 MiB out-row chunks, transpose_b MatMul each, concat",
    "rows": "(g) the project's DecodeMatMul (baichuan2_rows_matmul: one pass over W for M<=8) [model: decode]",
    "numpy": "reference: numpy x @ W.T (OpenBLAS), not MindSpore",
    "launch": "reference: MatMul(transpose_b=True) against a (16,in) weight = per-call graph overhead",
}
DEFAULT_VARIANTS = "tb,nt,bmm_tb,bmm_nt,swap,mint_nt,mint_linear,dense,mf_linear,split,rows,numpy,launch"


def cpu_name():
    """Model name and flags of interest from /proc/cpuinfo."""
    name, flags = "unknown", []
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and name == "unknown":
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    have = line.split(":", 1)[1].split()
                    flags = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in have]
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus; {' '.join(flags)})"


# ----------------------------------------------------------------------------------------------- child

_CHUNK_CACHE = {}


def _build(variant, ms, w_param, wt_param, k_in, n_out, m_rows):
    """A Cell computing x @ W^T for ``variant``, or None if it does not apply at this M."""
    from mindspore import nn, ops, mint, Parameter, ParameterTuple, Tensor  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel

    class Mm(nn.Cell):
        def __init__(self, weight, transpose_b):
            super().__init__()
            self.weight = weight
            self.mm = ops.MatMul(transpose_b=transpose_b)

        def construct(self, x):
            return self.mm(x, self.weight)

    class Bmm(nn.Cell):
        def __init__(self, weight, transpose_b, wshape):
            super().__init__()
            self.weight = weight
            self.wshape = wshape
            self.mm = ops.BatchMatMul(transpose_b=transpose_b)

        def construct(self, x):
            return self.mm(x.reshape((1,) + x.shape), self.weight.reshape(self.wshape)).reshape(x.shape[0], -1)

    class Swap(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            return self.mm(self.weight, x).transpose(1, 0)

    class MintNt(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def construct(self, x):
            return mint.matmul(x, self.weight)

    class OpsNt(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def construct(self, x):
            return ops.matmul(x, self.weight)

    class MintLinear(nn.Cell):
        def __init__(self, weight):
            super().__init__()
            self.weight = weight

        def construct(self, x):
            return mint.nn.functional.linear(x, self.weight)

    class Split(nn.Cell):
        def __init__(self, weight, rows):
            super().__init__()
            self.weight = weight
            self.rows = rows
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            outs = ()
            for i in range(self.rows):
                outs = outs + (self.mm(x[i:i + 1], self.weight),)
            return ops.concat(outs, 0)

    class Chunked(nn.Cell):
        def __init__(self, chunks):
            super().__init__()
            self.chunks = ParameterTuple(chunks)
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            outs = ()
            for chunk in self.chunks:
                outs = outs + (self.mm(x, chunk),)
            return ops.concat(outs, 1)

    class Sliced(nn.Cell):
        def __init__(self, weight, bounds):
            super().__init__()
            self.weight = weight
            self.bounds = bounds
            self.mm = ops.MatMul(transpose_b=True)

        def construct(self, x):
            outs = ()
            for start, end in self.bounds:
                outs = outs + (self.mm(x, self.weight[start:end]),)
            return ops.concat(outs, 1)

    if variant == "tb":
        return Mm(w_param, True)
    if variant == "nt":
        return Mm(wt_param, False)
    if variant == "bmm_tb":
        return Bmm(w_param, True, (1, n_out, k_in))
    if variant == "bmm_nt":
        return Bmm(wt_param, False, (1, k_in, n_out))
    if variant == "swap":
        return Swap(w_param)
    if variant == "mint_nt":
        return MintNt(wt_param)
    if variant == "ops_matmul_nt":
        return OpsNt(wt_param)
    if variant == "mint_linear":
        return MintLinear(w_param)
    if variant == "dense":
        cell = nn.Dense(k_in, n_out, has_bias=False, weight_init="zeros")
        cell.weight = w_param
        return cell
    if variant == "mf_linear":
        from mindformers.modules.layers import Linear  # pylint: disable=import-outside-toplevel
        cell = Linear(k_in, n_out, has_bias=False, compute_dtype=ms.float32, param_init_type=ms.float32,
                      weight_init="zeros")
        cell.weight = w_param
        return cell
    if variant == "split":
        return Split(w_param, m_rows) if 2 <= m_rows <= 8 else None
    if variant == "rows":
        from bench_common import PLUGIN  # pylint: disable=import-outside-toplevel
        if PLUGIN not in sys.path:
            sys.path.insert(0, PLUGIN)
        import baichuan2_rows_matmul as rows  # pylint: disable=import-outside-toplevel
        library = rows.build_library()
        if not library or m_rows > rows.MAX_ROWS:
            return None
        cell = Mm(w_param, True)
        cell.mm = rows.DecodeMatMul(library)
        cell.set_train(False)
        return cell
    if variant in ("chunk2m", "chunk8m", "slice2m"):
        rows = max(16, (int(variant[5:-1]) * 2 ** 20) // (k_in * 4) // 16 * 16)
        bounds = [(s, min(s + rows, n_out)) for s in range(0, n_out, rows)]
        if variant == "slice2m":
            return Sliced(w_param, bounds)
        key = (variant, id(w_param))
        if key not in _CHUNK_CACHE:     # one set of chunk Parameters per weight, shared by every M
            w_np = w_param.asnumpy()
            _CHUNK_CACHE[key] = [Parameter(Tensor(np.ascontiguousarray(w_np[s:e])), name=f"{variant}_{i}")
                                 for i, (s, e) in enumerate(bounds)]
        return Chunked(_CHUNK_CACHE[key])
    if variant == "launch":
        return Mm(Parameter(Tensor(np.zeros((16, k_in), np.float32)), name="w_tiny"), True)
    raise ValueError(variant)


def _marker(text):
    """A line in fd 1, in order with oneDNN's verbose lines (which also go to fd 1)."""
    os.write(1, f"@@ {text}\n".encode())


def child(args):
    """Time the variants at one shape; writes a JSON list of rows to args.child_out."""
    pin_threads()
    if args.kernel_times:
        os.environ["DNNL_VERBOSE"] = "1"
    import numpy as np  # pylint: disable=import-outside-toplevel
    from bench_common import setup_mindspore  # pylint: disable=import-outside-toplevel
    ms = setup_mindspore(args.mode)
    from mindspore import Parameter, Tensor  # pylint: disable=import-outside-toplevel

    k_in, n_out = (int(v) for v in args.child_shape.split("x"))
    rng = np.random.default_rng(0)
    w_np = (rng.standard_normal((n_out, k_in), dtype=np.float32) * 0.02)
    variants = args.variants.split(",")
    need_wt = any(v in variants for v in ("nt", "bmm_nt", "mint_nt", "ops_matmul_nt"))
    w_param = Parameter(Tensor(w_np), name="w")
    wt_param = Parameter(Tensor(np.ascontiguousarray(w_np.T)), name="wt") if need_wt else None
    flush = np.ones(12 * 1024 * 1024, np.float32) if args.flush else None     # 48 MiB > 32 MiB L3
    weight_bytes = w_np.nbytes
    rows = []
    for m_rows in (int(v) for v in args.ms.split(",")):
        x_np = rng.standard_normal((m_rows, k_in), dtype=np.float32)
        x = Tensor(x_np)
        ref = x_np @ w_np.T
        calls = {}
        for variant in variants:
            if variant == "numpy":
                calls[variant] = lambda x_np=x_np: x_np @ w_np.T
                continue
            cell = _build(variant, ms, w_param, wt_param, k_in, n_out, m_rows)
            if cell is None:
                continue
            if args.mode == "graph":
                cell.set_inputs(Tensor(shape=[m_rows, k_in], dtype=ms.float32))
            try:
                out = cell(x).asnumpy()
            except Exception as exc:  # pylint: disable=broad-except
                print(f"  {variant} M={m_rows}: failed: {str(exc).splitlines()[0][:160]}", file=sys.stderr)
                continue
            if variant != "launch":
                err = float(np.abs(out - ref).max())
                if err > 1e-3 * max(1.0, float(np.abs(ref).max())):
                    print(f"  {variant} M={m_rows}: wrong result (max err {err})", file=sys.stderr)
            calls[variant] = lambda cell=cell: cell(x).asnumpy()
        for _ in range(args.warmup):
            for fn in calls.values():
                fn()
        times = {v: [] for v in calls}
        for rep in range(args.reps):
            order = list(calls) if rep % 2 == 0 else list(reversed(calls))
            for variant in order:
                if flush is not None:
                    flush += 1.0
                _marker(f"call {variant} {m_rows} {rep}")
                start = time.perf_counter()
                calls[variant]()
                times[variant].append(time.perf_counter() - start)
                _marker("end")
        for variant, samples in times.items():
            med = statistics.median(samples)
            rows.append({"shape": args.child_shape, "in": k_in, "out": n_out, "M": m_rows, "variant": variant,
                         "mode": args.mode, "ms": med * 1e3, "min_ms": min(samples) * 1e3,
                         "gbps": weight_bytes / med / 1e9 if variant != "launch" else None,
                         "n": len(samples), "weight_mib": weight_bytes / 2 ** 20})
    with open(args.child_out, "w", encoding="utf-8") as fh:
        json.dump(rows, fh)


# ---------------------------------------------------------------------------------------------- parent


def parse_verbose(path):
    """{(variant, M): (impls, [kernel ms per call])} from a child's fd-1 log (DNNL_VERBOSE lines)."""
    out = {}
    current = None
    acc = []
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("@@ call "):
                _, _, variant, m_rows, _ = line.split()
                current, acc = (variant, int(m_rows)), []
            elif line.startswith("@@ end") and current is not None:
                impls, kms = out.setdefault(current, (set(), []))
                impls.update(i for i, _ in acc)
                kms.append(sum(t for _, t in acc))
                current = None
            elif line.startswith("dnnl_verbose,exec") and current is not None:
                parts = line.strip().split(",")
                # dnnl_verbose,exec,cpu,<prim>,<impl>,<prop>,<mds>,<attr>,<aux>,<problem>,<ms>
                acc.append((f"{parts[3]}:{parts[4]}", float(parts[-1])))
    return out


def run_shape(args, shape, mode):
    """Run one child for ``shape``/``mode``; returns its rows with kernel times merged in."""
    with tempfile.TemporaryDirectory(prefix="mmx_") as tmp:
        rows_path = os.path.join(tmp, "rows.json")
        log_path = os.path.join(tmp, "fd1.log")
        cmd = [sys.executable, os.path.abspath(__file__), "--child-shape", shape, "--child-out", rows_path,
               "--mode", mode, "--ms", args.ms, "--variants", args.variants, "--reps", str(args.reps),
               "--warmup", str(args.warmup)]
        if not args.flush:
            cmd.append("--no-flush")
        if not args.kernel_times:
            cmd.append("--no-kernel-times")
        with open(log_path, "w", encoding="utf-8") as log:
            proc = subprocess.run(cmd, stdout=log, check=False)
        if proc.returncode != 0:
            print(f"child for {shape} ({mode}) failed with rc {proc.returncode}", file=sys.stderr)
            return []
        with open(rows_path, encoding="utf-8") as fh:
            rows = json.load(fh)
        verbose = parse_verbose(log_path) if args.kernel_times else {}
        for row in rows:
            impls, kms = verbose.get((row["variant"], row["M"]), (set(), []))
            row["onednn"] = "+".join(sorted(impls)) if impls else ""
            row["kernel_ms"] = statistics.median(kms) if kms and impls else None
        return rows


def print_table(rows):
    """One block per shape: rows = variants, columns = M (ms per call and GB/s)."""
    for shape in dict.fromkeys((r["shape"], r["mode"]) for r in rows):
        block = [r for r in rows if (r["shape"], r["mode"]) == shape]
        m_list = sorted({r["M"] for r in block})
        weight_mib = block[0]["weight_mib"]
        print(f"\n(in, out) = ({shape[0].replace('x', ', ')}), weight {weight_mib:.1f} MiB fp32, mode {shape[1]}: "
              "median wall ms per call [GB/s]; kernel = oneDNN exec ms")
        head = f"{'variant':14s} " + " ".join(f"{'M=' + str(m):>18s}" for m in m_list) + "  oneDNN impl"
        print(head)
        by_variant = {}
        for r in block:
            by_variant.setdefault(r["variant"], {})[r["M"]] = r
        base1 = by_variant.get("tb", {}).get(1)
        for variant, cells in by_variant.items():
            parts = []
            impls = set()
            for m in m_list:
                r = cells.get(m)
                if r is None:
                    parts.append(f"{'-':>18s}")
                    continue
                gb = f"[{r['gbps']:.1f}]" if r["gbps"] else ""
                parts.append(f"{r['ms']:9.2f} {gb:>8s}")
                if r.get("onednn"):
                    impls.add(r["onednn"])
            print(f"{variant:14s} " + " ".join(parts) + "  " + ",".join(sorted(impls)))
            kparts = []
            for m in m_list:
                r = cells.get(m)
                kparts.append(f"{r['kernel_ms']:9.2f} {'':8s}" if r and r.get("kernel_ms") else f"{'':18s}")
            if any(p.strip() for p in kparts):
                print(f"{'  kernel':14s} " + " ".join(kparts))
        if base1:
            print(f"  (M=1 tb = {base1['ms']:.2f} ms; ratio of tb at M=4 to M=1: "
                  f"{by_variant['tb'].get(4, base1)['ms'] / base1['ms']:.2f}x)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma list of INxOUT")
    parser.add_argument("--ms", default=DEFAULT_MS, help="comma list of row counts M")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                        help="comma list from: " + ", ".join(VARIANTS))
    parser.add_argument("--mode", default="graph", choices=("graph", "pynative", "both"))
    parser.add_argument("--reps", type=int, default=21, help="timed calls per variant (median)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--no-flush", dest="flush", action="store_false",
                        help="do not write a 48 MiB buffer between calls (weights may then sit in L3)")
    parser.add_argument("--no-kernel-times", dest="kernel_times", action="store_false",
                        help="do not run with DNNL_VERBOSE=1 (no oneDNN impl / kernel-only times)")
    parser.add_argument("--out", help="write the rows as JSON here")
    parser.add_argument("--child-shape", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_shape:
        child(args)
        return
    unknown = [v for v in args.variants.split(",") if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}")
    machine = cpu_name()
    print(f"machine: {machine}")
    for v in args.variants.split(","):
        print(f"  {v:14s} {VARIANTS[v]}")
    modes = ("graph", "pynative") if args.mode == "both" else (args.mode,)
    rows = []
    start = time.time()
    for mode in modes:
        for shape in args.shapes.split(","):
            shape_rows = run_shape(args, shape, mode)
            rows.extend(shape_rows)
            print_table(shape_rows)
            sys.stdout.flush()
    print(f"\ntotal {time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"machine": machine, "variants": VARIANTS, "args": vars(args), "rows": rows}, fh, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
