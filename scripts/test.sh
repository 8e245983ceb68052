#!/usr/bin/env bash
# Sets up everything (see scripts/setup.sh) and runs the whole test suite, slow tests included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$VENV/bin/python" -m ruff check .
exec "$VENV/bin/python" -m pytest "$@"
