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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_cli import build_generation_parser, fail, generation_kwargs  # noqa: E402

PROG = "run_baichuan2_generate.py"


def build_parser():
    return build_generation_parser("baichuan2/run_baichuan2_7b.yaml", __doc__, PROG)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from baichuan2_inference import prepare_generation, build_inference_network
    try:
        inputs, config, tokenizer = prepare_generation(args)
    except (ValueError, OSError) as error:
        return fail(PROG, error)
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
