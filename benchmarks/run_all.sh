#!/usr/bin/env bash
# Run every benchmark and write docs/performance.md + docs/performance.png (see benchmarks/run_all.py).
# Usage: bash benchmarks/run_all.sh [--quick] [--out-dir DIR] [--only decode train ...]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" "$ROOT/benchmarks/run_all.py" "$@"
