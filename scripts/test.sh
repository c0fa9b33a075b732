#!/usr/bin/env bash
# Run the test suite (CPU). Extra arguments go to pytest, e.g. `bash scripts/test.sh -k tokenizer`.
set -euo pipefail
cd "$(dirname "$0")/.."
export GLOG_v=${GLOG_v:-3}          # MindSpore: errors only
export PYTHONUNBUFFERED=1
exec .venv/bin/python -m pytest -q -ra "$@" tests
