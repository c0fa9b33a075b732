#!/usr/bin/env bash
# Create ./.venv (Python 3.11) and install the pinned dependencies and this project into it.
# Safe to rerun: pip skips what is already installed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q 'pip==26.3' 'setuptools==78.1.1' 'wheel==0.48.0'
.venv/bin/python -m pip install -q -r requirements.txt
.venv/bin/python -m pip install -q --no-deps --no-build-isolation -e .
.venv/bin/python -m pip check   # fail here, not in a user's run, if the pins conflict
.venv/bin/python -c "import mindspore, mindformers, torch, transformers, sentencepiece; \
print('setup ok: mindspore', mindspore.__version__, '| mindformers', mindformers.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
