"""Offline checkpoint transform between a complete checkpoint and per-rank (``rank_x/``) checkpoints.

Two modes (run from the repository root: ``python ./mindformers/tools/transform_ckpt.py ...``):

* Strategy mode, the original command line: ``--src_ckpt_strategy``/``--dst_ckpt_strategy`` name
  MindSpore strategy files (or folders of them, merged first); empty or "None" means a complete
  checkpoint. Calls ``mindspore.transform_checkpoints``. Strategy files only come from a semi-auto
  parallel compile on Ascend/GPU, so this mode cannot be exercised on a CPU machine.
* Layout mode (no strategy files needed; runs anywhere): ``--dst_dp/--dst_mp/--dst_pp`` split a
  complete checkpoint into ``rank_x/`` checkpoints for that layout (pipeline stages by the original
  layer assignment, column/row-parallel weights split for mp, copies for dp), with a ``layout.json``;
  ``--merge`` (= 1/1/1) merges such a folder back into ``<dst>/rank_0/<prefix>0.ckpt``, bit-exact.

Examples::

    python ./mindformers/tools/transform_ckpt.py --src_ckpt_dir model_dir/xxx.ckpt \\
        --dst_ckpt_dir dist_ckpt --dst_dp 2 --dst_mp 4 --dst_pp 2
    python ./mindformers/tools/transform_ckpt.py --src_ckpt_dir dist_ckpt --dst_ckpt_dir full --merge
"""
import argparse
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_PLUGIN = os.path.normpath(os.path.join(_HERE, "..", "..", "research", "baichuan2"))
if os.path.isdir(_PLUGIN) and _PLUGIN not in sys.path:
    sys.path.insert(0, _PLUGIN)

from baichuan2_cli import run_main, str2bool  # noqa: E402  pylint: disable=wrong-import-position


def _positive(value):
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n", 1)[1])
    parser.add_argument("--src_ckpt_strategy", default="",
                        help="strategy file/folder of the source (strategy mode, Ascend/GPU only; not testable on CPU)")
    parser.add_argument("--dst_ckpt_strategy", default="",
                        help="strategy file/folder of the destination (strategy mode, Ascend/GPU only)")
    parser.add_argument("--src_ckpt_dir", default="", help="source: a .ckpt file, a folder with one .ckpt, "
                        "or a rank_x/ folder (with layout.json, or with --src_dp/--src_mp/--src_pp)")
    parser.add_argument("--dst_ckpt_dir", default="", help="where rank_x/<prefix>x.ckpt are written")
    parser.add_argument("--prefix", default="checkpoint_", help="file name prefix of the written checkpoints")
    layout = parser.add_argument_group("layout mode (no strategy files)")
    layout.add_argument("--dst_dp", type=_positive, help="data_parallel of the destination")
    layout.add_argument("--dst_mp", type=_positive, help="model_parallel of the destination")
    layout.add_argument("--dst_pp", type=_positive, help="pipeline_stage of the destination")
    layout.add_argument("--merge", action="store_true", help="destination = one complete checkpoint (1/1/1)")
    layout.add_argument("--src_dp", type=_positive, help="layout of a rank_x/ source without layout.json")
    layout.add_argument("--src_mp", type=_positive)
    layout.add_argument("--src_pp", type=_positive)
    layout.add_argument("--num_layers", type=_positive, help="default: from the checkpoint's parameter names")
    layout.add_argument("--offset", type=int, default=0, help="model_config.offset (pipeline layer shift)")
    layout.add_argument("--vocab_emb_dp", type=str2bool, default=True,
                        help="True (the yamls' default): embedding replicated; False: split along the vocabulary")
    return parser


def _has_strategy(value):
    return bool(value) and value != "None"


def run(args):
    """Do the transform; returns the written files (layout mode) or None (strategy mode)."""
    import baichuan2_ckpt_layout as layout_mod  # pylint: disable=import-outside-toplevel
    if not args.src_ckpt_dir or not args.dst_ckpt_dir:
        raise ValueError("--src_ckpt_dir and --dst_ckpt_dir are required")
    if _has_strategy(args.src_ckpt_strategy) or _has_strategy(args.dst_ckpt_strategy):
        if args.merge or args.dst_dp or args.dst_mp or args.dst_pp:
            raise ValueError("give either strategy files (--src/--dst_ckpt_strategy) or a layout "
                             "(--dst_dp/--dst_mp/--dst_pp/--merge), not both")
        print(f"strategy transform: {args.src_ckpt_dir} -> {args.dst_ckpt_dir}", flush=True)
        layout_mod.strategy_transform(args.src_ckpt_dir, args.dst_ckpt_dir, args.prefix,
                                      args.src_ckpt_strategy, args.dst_ckpt_strategy)
        print("......Transform succeed!......", flush=True)
        return None
    if args.merge:
        if args.dst_dp or args.dst_mp or args.dst_pp:
            raise ValueError("--merge means dp=mp=pp=1; do not combine it with --dst_dp/--dst_mp/--dst_pp")
        dst = (1, 1, 1)
    elif args.dst_dp or args.dst_mp or args.dst_pp:
        dst = (args.dst_dp or 1, args.dst_mp or 1, args.dst_pp or 1)
    else:
        raise ValueError("no destination layout: give --dst_dp/--dst_mp/--dst_pp (or --merge), or strategy "
                         "files with --dst_ckpt_strategy (Ascend/GPU)")
    src_layout = None
    if args.src_dp or args.src_mp or args.src_pp:
        num_layers = args.num_layers
        if num_layers is None:
            if (args.src_pp or 1) > 1:
                raise ValueError("--src_pp > 1 without layout.json: pass --num_layers (rank_0 holds only stage 0)")
            first = os.path.join(args.src_ckpt_dir, "rank_0")
            probe = layout_mod.load_ckpt(layout_mod._single_ckpt(first))  # pylint: disable=protected-access
            num_layers = layout_mod.infer_num_layers(probe)
            del probe
        src_layout = layout_mod.Layout(args.src_dp or 1, args.src_mp or 1, args.src_pp or 1, num_layers,
                                       args.offset, args.vocab_emb_dp)
    files = layout_mod.transform(args.src_ckpt_dir, args.dst_ckpt_dir, *dst, prefix=args.prefix,
                                 src_layout=src_layout, offset=args.offset, vocab_emb_dp=args.vocab_emb_dp,
                                 num_layers=args.num_layers)
    print(f"wrote {len(files)} checkpoint(s) for dp {dst[0]} x mp {dst[1]} x pp {dst[2]} under "
          f"{args.dst_ckpt_dir}", flush=True)
    return files


def main(argv=None):
    args = build_parser().parse_args(argv)
    return run_main(run, "transform_ckpt.py", args)


if __name__ == "__main__":
    sys.exit(main())
