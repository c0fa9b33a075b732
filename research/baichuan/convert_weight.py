"""Entry at the path the original Baichuan2 documentation uses.

    python ./research/baichuan/convert_weight.py --torch_ckpt_path TORCH_CKPT_PATH \\
        --mindspore_ckpt_path MS_CKPT_NAME

Runs ``research/baichuan2/convert_weight.py`` (same options; see ``--help``).
"""
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
_PLUGIN = os.path.join(os.path.dirname(_HERE), "baichuan2")
_TARGET = os.path.join(_PLUGIN, "convert_weight.py")

# This file has the same module name as its target, so `import convert_weight` could find
# this file again (its folder is sys.path[0] when run as a script). Load the target by path,
# under its own name, with the plugin folder first for its sibling imports.
sys.path[:] = [_PLUGIN] + [p for p in sys.path
                           if os.path.abspath(p or os.curdir) not in (_HERE, _PLUGIN)]
_SPEC = importlib.util.spec_from_file_location("baichuan2_convert_weight", _TARGET)
_MODULE = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = _MODULE
_SPEC.loader.exec_module(_MODULE)
main = _MODULE.main

if __name__ == "__main__":
    sys.exit(main())
