"""Command-line pieces every script shares: flag types, the model and generation flags, prompts, errors.

One error path for all CLIs: bad user input raises ``UserInputError`` (or ``ValueError`` /
``OSError`` from a library check) with one line naming the file, the field and the fix;
``run_main`` prints it as ``prog: error: message`` on stderr and returns exit status 2, as
argparse does for a bad flag.

Only the standard library here: the chat script imports this before MindSpore loads.
"""
import argparse
import os
import sys


class UserInputError(ValueError):
    """Bad input from the user (flags, YAML, files), found before any work; the message is one line."""


def fail(prog, message):
    """Print ``prog: error: message`` (its first line) on stderr; returns exit status 2."""
    lines = str(message).strip().splitlines()
    print(f"{prog}: error: {lines[0] if lines else type(message).__name__}", file=sys.stderr, flush=True)
    return 2


def run_main(work, prog, *args, **kwargs):
    """Exit status of ``work(*args, **kwargs)``: 0, or 2 after ``fail`` for bad user input.

    Bad user input is ``ValueError`` (``UserInputError`` and the library checks) or ``OSError``
    (a missing or unreadable file); anything else is a bug and keeps its traceback.
    """
    try:
        work(*args, **kwargs)
    except (ValueError, OSError) as error:
        return fail(prog, error)
    return 0


def str2bool(value):
    """argparse type for True/False flags, as in the original scripts."""
    if isinstance(value, bool):
        return value
    lowered = str(value).lower()
    if lowered in ("true", "1", "yes"):
        return True
    if lowered in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {value!r}")


def add_model_arguments(parser, default_config):
    """The model/checkpoint flags of the original scripts, plus ``--device_target`` and ``--mode``."""
    parser.add_argument("--config", default=default_config, type=str, help="YAML config (run_baichuan2_*.yaml).")
    parser.add_argument("--use_parallel", default=None, type=str2bool, help="Overrides use_parallel.")
    parser.add_argument("--device_id", default=None, type=int, help="Overrides context.device_id.")
    parser.add_argument("--device_target", default=None, choices=("CPU", "Ascend", "GPU"),
                        help="Overrides context.device_target (CPU on machines without Ascend).")
    parser.add_argument("--mode", default=None, type=int,
                        help="context.mode: 0 graph (default of the yaml), 1 PyNative (also turns off recompute).")
    parser.add_argument("--load_checkpoint", default=None, type=str,
                        help="Checkpoint file, or folder (a complete ckpt, base + lora ckpts, or rank_x/ folders).")
    parser.add_argument("--src_strategy", default=None, type=str, help="Strategy of a distributed checkpoint.")
    parser.add_argument("--auto_trans_ckpt", default=None, type=str2bool, help="Transform checkpoints to the layout.")
    parser.add_argument("--vocab_file", default=None, type=str, help="Overrides processor.tokenizer.vocab_file.")
    parser.add_argument("--skip_memory_check", default=False, type=str2bool,
                        help="Run even if the memory plan (plan_memory.py) exceeds the available host memory.")
    return parser


# ----- prompts and generation (run_baichuan2_generate.py / run_baichuan2_pipeline.py) ---------------
DEFAULT_INPUTS = ["<reserved_106>你是谁？<reserved_107>",
                  "<reserved_106>《静夜思》作者是？<reserved_107>",
                  "<reserved_106>白日依山尽，下一句是？<reserved_107>"]


def read_prompts(values, flag):
    """Prompts from a command line: the values themselves, or the non-empty lines of the one existing
    text file they name. ``flag`` names the option in the error for a file without a prompt."""
    if len(values) == 1 and os.path.isfile(values[0]):
        with open(values[0], encoding="utf-8") as handle:
            prompts = [line.rstrip("\n") for line in handle if line.strip()]
        if not prompts:
            raise UserInputError(f"{flag} file {values[0]} has no prompt (one prompt per line).")
        return prompts
    return list(values)


def read_inputs(inputs):
    """The prompts of ``--inputs``: the arguments, the lines of a single existing file, or the docs' three prompts."""
    return read_prompts(inputs, "--inputs") if inputs else list(DEFAULT_INPUTS)


def add_generation_arguments(parser):
    """Prompts and the generation arguments of the documentation's examples."""
    parser.add_argument("--inputs", nargs="+", default=None,
                        help="Prompts (default: the three prompts of the docs); one text file = one prompt a line.")
    parser.add_argument("--do_sample", default=False, type=str2bool)
    parser.add_argument("--top_k", default=1, type=int)
    parser.add_argument("--top_p", default=1.0, type=float)
    parser.add_argument("--temperature", default=1.0, type=float)
    parser.add_argument("--repetition_penalty", default=None, type=float,
                        help="Default: model_config.repetition_penalty of the YAML.")
    parser.add_argument("--max_length", default=64, type=int, help="Total length (prompt + answer).")
    parser.add_argument("--max_new_tokens", default=None, type=int, help="Overrides --max_length when set.")
    parser.add_argument("--use_past", default=None, type=str2bool, help="Default: the YAML's use_past.")
    parser.add_argument("--seed", default=0, type=int, help="Sampling seed.")
    return parser


def build_generation_parser(default_config, description, prog):
    """The generate/pipeline scripts' command line: model flags plus generation flags."""
    parser = argparse.ArgumentParser(prog=prog, description=description.split("\n")[0])
    add_model_arguments(parser, default_config=default_config)
    return add_generation_arguments(parser)


def generation_kwargs(args, config):
    """Keyword arguments of ``generate``/``pipeline`` from the command line (and the YAML's penalty)."""
    penalty = args.repetition_penalty
    if penalty is None:
        penalty = config.model.model_config.repetition_penalty or 1.0
    kwargs = dict(do_sample=args.do_sample, top_k=args.top_k, top_p=args.top_p, temperature=args.temperature,
                  repetition_penalty=float(penalty), max_length=args.max_length, seed=args.seed)
    if args.max_new_tokens is not None:
        kwargs["max_new_tokens"] = args.max_new_tokens
    return kwargs
