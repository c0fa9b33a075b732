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
# Headless Chromium + ChromeDriver (Debian packages) for the browser test of the server's chat page.
if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null
  else
    echo "setup: install Debian's chromium and chromium-driver (as root) for the browser test" >&2
  fi
fi
.venv/bin/python -m pip check   # fail here, not in a user's run, if the pins conflict
.venv/bin/python -c "import mindspore, mindformers, torch, transformers, sentencepiece; \
print('setup ok: mindspore', mindspore.__version__, '| mindformers', mindformers.__version__, \
'| torch', torch.__version__, '| transformers', transformers.__version__)" 2>&1 | tail -1
