"""Entry at the path the original Baichuan2 documentation uses.

    python ./research/baichuan/convert_weight.py --torch_ckpt_path TORCH_CKPT_PATH \\
        --mindspore_ckpt_path MS_CKPT_NAME

Runs ``research/baichuan2/convert_weight.py`` (same options; see ``--help``).
"""
import os
import runpy
import sys

_TARGET = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       "baichuan2", "convert_weight.py")

if __name__ == "__main__":
    sys.argv[0] = _TARGET
    runpy.run_path(_TARGET, run_name="__main__")
