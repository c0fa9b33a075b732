"""Convert a MindSpore Baichuan2 checkpoint back to a Hugging Face state dict (with ``W_pack``).

    python research/baichuan2/convert_reversed.py --mindspore_ckpt_path transform.ckpt \\
        --torch_ckpt_path torch.bin [--config_json HF_DIR/config.json] [--dtype fp16|bf16|fp32]

Same as ``convert_weight.py --reverse``; see ``--help``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from baichuan2_convert import convert_main  # noqa: E402


def main(argv=None):
    return convert_main(argv, reverse=True, prog="convert_reversed.py")


if __name__ == "__main__":
    sys.exit(main())
