"""Entry at the path the original Baichuan2 documentation uses.

    python ./research/baichuan/convert_weight.py --torch_ckpt_path TORCH_CKPT_PATH \\
        --mindspore_ckpt_path MS_CKPT_NAME

Runs ``research/baichuan2/convert_weight.py`` (same options; see ``--help``).
"""
import os
import sys

_PLUGIN = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "baichuan2")
if _PLUGIN not in sys.path:
    sys.path.insert(0, _PLUGIN)

from convert_weight import main  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
    sys.exit(main())
