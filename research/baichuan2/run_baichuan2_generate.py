"""The documentation's ``run_baichuan2_generate.py``: batch inference with ``network.generate``.

As in the docs, the prompts are tokenized to ``max_length`` with ``padding="max_length"`` and
generated greedily (``do_sample=False, top_k=1, top_p=1.0, temperature=1.0, max_length=64``); each
output is printed with ``tokenizer.decode`` (so a final ``</s>`` shows). ``repetition_penalty``
defaults to the YAML's (1.05 for 7B, 1.0 for 13B, as in the two examples of the docs). Checkpoints
load as in the predict CLI (file, folder, base + LoRA with a ``*_lora`` YAML, ``rank_x/`` folders,
``--auto_trans_ckpt``). Example (from ``research/``)::

    python baichuan2/run_baichuan2_generate.py --config baichuan2/run_baichuan2_7b.yaml \\
        --load_checkpoint path/to/Baichuan2_7B_Chat.ckpt --vocab_file path/to/tokenizer.model \\
        --use_parallel False --device_target CPU
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_inference import add_model_arguments, read_prompts, str2bool  # noqa: E402

DEFAULT_INPUTS = ["<reserved_106>你是谁？<reserved_107>",
                  "<reserved_106>《静夜思》作者是？<reserved_107>",
                  "<reserved_106>白日依山尽，下一句是？<reserved_107>"]


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


def read_inputs(inputs):
    """The prompts: the arguments, the lines of a single existing file, or the docs' three prompts."""
    return read_prompts(inputs, "--inputs") if inputs else list(DEFAULT_INPUTS)


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


def build_parser(default_config="baichuan2/run_baichuan2_7b.yaml", description=__doc__):
    """The generate/pipeline scripts' command line: model flags plus generation flags."""
    parser = argparse.ArgumentParser(description=description.split("\n")[0])
    add_model_arguments(parser, default_config=default_config)
    return add_generation_arguments(parser)


def prepare_inputs(args):
    """``(prompts, config, tokenizer)``, or None after printing one error line for bad input."""
    from baichuan2_inference import prepare_config, build_tokenizer  # pylint: disable=import-outside-toplevel
    try:
        inputs = read_inputs(args.inputs)
        config = prepare_config(args)
        return inputs, config, build_tokenizer(config)
    except (ValueError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return None


def main(argv=None):
    args = build_parser().parse_args(argv)
    from baichuan2_inference import build_inference_network
    prepared = prepare_inputs(args)
    if prepared is None:
        return 2
    inputs, config, tokenizer = prepared
    batch_size = len(inputs)
    network = build_inference_network(config, batch_size=batch_size, use_past=args.use_past)

    # predict using generate
    kwargs = generation_kwargs(args, config)
    inputs_ids = tokenizer(inputs, max_length=max(args.max_length, max(len(tokenizer.encode(p)) for p in inputs)),
                           padding="max_length")["input_ids"]
    outputs = network.generate(inputs_ids, **kwargs)
    for output in outputs:
        print(tokenizer.decode(output), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
