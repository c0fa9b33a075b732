"""The documentation's ``run_baichuan2_pipeline.py``: MindFormers ``pipeline("text_generation")``.

Builds the network of the YAML (batch size 1, LoRA from a ``*_lora`` YAML), loads the checkpoint as
the predict CLI does, wraps it in a MindSpore ``Model`` and runs
``pipeline(task="text_generation", model=..., tokenizer=...)`` on the prompts with the arguments of
the docs (``do_sample=False, top_k=1, top_p=1.0, temperature=1.0, max_length=64``;
``repetition_penalty`` defaults to the YAML's). Each result is printed as
``{'text_generation_text': [...]}``. Example (from ``research/``)::

    python baichuan2/run_baichuan2_pipeline.py --config baichuan2/run_baichuan2_13b.yaml \\
        --load_checkpoint path/to/Baichuan2-13B-Chat.ckpt --vocab_file path/to/tokenizer.model \\
        --use_parallel False --device_target CPU
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_cli import build_generation_parser, fail, generation_kwargs  # noqa: E402

PROG = "run_baichuan2_pipeline.py"
build_parser = functools.partial(build_generation_parser, "baichuan2/run_baichuan2_13b.yaml", __doc__, PROG)


def main(argv=None):
    """Parse, prepare (one error line on bad input), then run MindFormers' text-generation pipeline."""
    from baichuan2_inference import build_inference_network, prepare_generation
    args = build_parser().parse_args(argv)
    try:
        inputs, config, tokenizer = prepare_generation(args, batch_size=1)
    except (ValueError, OSError) as error:
        return fail(PROG, error)
    from mindspore import Model
    from mindformers.pipeline import pipeline
    network = build_inference_network(config, batch_size=1, use_past=args.use_past)
    baichuan2_model = Model(network)

    # init and run pipeline
    pipeline_task = pipeline(task="text_generation", model=baichuan2_model, tokenizer=tokenizer)
    outputs = pipeline_task(inputs, **generation_kwargs(args, config))
    for output in outputs:
        print(output, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
