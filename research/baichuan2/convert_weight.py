"""Convert Baichuan2 weights: Hugging Face -> MindSpore (default) or MindSpore -> HF (--reverse).

HF -> MindSpore (the original documentation's command also works through
``research/baichuan/convert_weight.py``)::

    python research/baichuan2/convert_weight.py --torch_ckpt_path HF_DIR_OR_ANY_WEIGHT_FILE \\
        --mindspore_ckpt_path baichuan2_7b.ckpt [--dtype fp16|bf16|fp32] [--model 7b|13b]

MindSpore -> HF (same as ``convert_reversed.py``)::

    python research/baichuan2/convert_weight.py --reverse --mindspore_ckpt_path X.ckpt \\
        --torch_ckpt_path pytorch_model.bin [--config_json HF_DIR/config.json]

Bad input ends with one line on stderr and exit status 2. The options live in ``baichuan2_convert.py``,
the name mapping in ``baichuan2_names.py``, the conversion in ``baichuan2_weights.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_convert import build_parser, convert_main  # noqa: E402,F401  pylint: disable=unused-import


def main(argv=None):
    """Run the CLI; returns 0 on success, 2 (after one line on stderr) on bad input."""
    return convert_main(argv, prog="convert_weight.py")


if __name__ == "__main__":
    sys.exit(main())
