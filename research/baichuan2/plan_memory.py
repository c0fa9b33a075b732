"""Plan the per-device memory of a Baichuan2 run before starting it.

    python research/baichuan2/plan_memory.py --config research/baichuan2/run_baichuan2_7b_910b.yaml \
        --run_mode finetune [--device_memory 64GB] [--dp 8 --mp 1 --pp 1 --micro_batch_num 1] [--json]

Prints a table of the parts (weights, gradients, optimizer states, activations, logits, KV cache, framework),
whether the total fits the device (``context.max_device_memory`` of the YAML, ``--device_memory``, or on
CPU the host's available RAM), the smallest changes that make it fit, and which figures are judgements.
``--json`` prints one JSON object instead (``fits``, ``per_device_bytes``, ``device_memory_bytes``, ``parts``,
...). Bad input: one line ``plan_memory.py: error: ...`` on stderr, exit status 2.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import baichuan2_memory  # noqa: E402  pylint: disable=wrong-import-position
from baichuan2_cli import str2bool  # noqa: E402  pylint: disable=wrong-import-position
from baichuan2_config import read_yaml_config  # noqa: E402  pylint: disable=wrong-import-position

GIB = baichuan2_memory.GIB


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def size(text):
    try:
        return baichuan2_memory.parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


class OneLineParser(argparse.ArgumentParser):
    """argparse with usage errors on one line (``plan_memory.py: error: ...``), exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())}\n")


def build_parser():
    parser = OneLineParser(prog="plan_memory.py", description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="run_baichuan2_*.yaml")
    parser.add_argument("--run_mode", default=None, choices=baichuan2_memory.RUN_MODES,
                        help="default: the YAML's run_mode")
    parser.add_argument("--device_memory", type=size, default=None,
                        help="memory of one device, e.g. 64GB (default: context.max_device_memory; host RAM on CPU)")
    parser.add_argument("--device_target", default=None, choices=("Ascend", "CPU"),
                        help="default: context.device_target of the YAML")
    parser.add_argument("--seq_length", type=positive_int)
    parser.add_argument("--batch_size", type=positive_int,
                        help="runner_config.batch_size (training) / model_config.batch_size (predict)")
    parser.add_argument("--dp", type=positive_int)
    parser.add_argument("--mp", type=positive_int)
    parser.add_argument("--pp", type=positive_int)
    parser.add_argument("--micro_batch_num", type=positive_int)
    parser.add_argument("--use_past", type=str2bool, default=None)
    parser.add_argument("--recompute", type=str2bool, default=None)
    parser.add_argument("--load_checkpoint", type=checkpoint_loading_flag, default=None,
                        help="a complete checkpoint is loaded first: True/copy (run_baichuan2.py's Trainer path: "
                             "a full copy while loading), stream (chat, generate, pipeline and the server stream a "
                             ".ckpt tensor by tensor) or False (default: copy if the YAML names one)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    return parser


def checkpoint_loading_flag(value):
    """argparse type of ``--load_checkpoint``: True/False, or how it is loaded (``copy`` / ``stream``)."""
    if str(value).lower() in (baichuan2_memory.CHECKPOINT_COPY, baichuan2_memory.CHECKPOINT_STREAM):
        return str(value).lower()
    try:
        return str2bool(value)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected True, False, copy or stream, got {value!r}") from None


def apply_parallel_overrides(config, args):
    """``--dp/--mp/--pp/--micro_batch_num`` into ``config.parallel_config`` (created if missing)."""
    parallel = dict(config.get("parallel_config") or {})
    for flag, key in (("dp", "data_parallel"), ("mp", "model_parallel"), ("pp", "pipeline_stage"),
                      ("micro_batch_num", "micro_batch_num")):
        value = getattr(args, flag)
        if value is not None:
            parallel[key] = value
    config["parallel_config"] = parallel
    return config


def make_plan(args):
    config = read_yaml_config(args.config)
    if config is None:
        raise ValueError(f"{args.config} inherits a base_config; pass a complete YAML")
    apply_parallel_overrides(config, args)
    return baichuan2_memory.plan_from_config(
        config, run_mode=args.run_mode, device_memory_bytes=args.device_memory, device=args.device_target,
        seq_length=args.seq_length, batch_size=args.batch_size, use_past=args.use_past, recompute=args.recompute,
        load_checkpoint=args.load_checkpoint if args.load_checkpoint is not None else bool(
            config.load_checkpoint or (config.model or {}).get("model_config", {}).get("checkpoint_name_or_path")))


def render(memory_plan, config_path):
    layout = memory_plan.layout
    lines = [f"{os.path.basename(config_path)}: {layout['run_mode']} on {layout['device']}, "
             f"dp {layout['dp']} x mp {layout['mp']} x pp {layout['pp']} (micro batches {layout['micro_batch_num']}), "
             f"batch {layout['batch_size']} x seq {layout['seq_length']}, recompute {layout['recompute']}, "
             f"use_past {layout['use_past']}, LoRA {layout['lora']}",
             f"largest pipeline stage: {layout['largest_stage']} ({layout['layers_on_stage']} layers)", "",
             f"{'part (per device)':<38}{'GB':>10}"]
    for name, value in memory_plan.parts.items():
        lines.append(f"{name:<38}{value / GIB:>10.2f}")
    lines.append(f"{'total':<38}{memory_plan.per_device_bytes / GIB:>10.2f}")
    lines.append(f"{'device memory':<38}{memory_plan.device_memory_bytes / GIB:>10.2f}")
    verdict = "fits" if memory_plan.fits else "does not fit"
    lines += ["", f"{verdict} (margin {memory_plan.margin_bytes / GIB:+.2f} GB)"]
    if memory_plan.suggestions:
        lines.append("smallest changes that fit:")
        lines += [f"  - {s}" for s in memory_plan.suggestions]
    lines.append("judgements (not measured on this device):")
    lines += [f"  - {j}" for j in memory_plan.judgements]
    return "\n".join(lines)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        memory_plan = make_plan(args)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if args.json:
        print(json.dumps(memory_plan.as_dict()))
    else:
        print(render(memory_plan, args.config))
    return 0


if __name__ == "__main__":
    sys.exit(main())
