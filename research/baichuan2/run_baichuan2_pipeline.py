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
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import run_baichuan2_generate  # noqa: E402
from run_baichuan2_generate import generation_kwargs, prepare_inputs  # noqa: E402


def build_parser():
    return run_baichuan2_generate.build_parser("baichuan2/run_baichuan2_13b.yaml", __doc__)


def main(argv=None):
    args = build_parser().parse_args(argv)
    from mindspore import Model
    from mindformers.pipeline import pipeline
    from baichuan2_inference import build_inference_network
    prepared = prepare_inputs(args)
    if prepared is None:
        return 2
    inputs, config, tokenizer = prepared
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
