#!/usr/bin/env bash
# The test command the README names: sets up the locked environment if needed, then runs the whole
# suite, offline, on CPU. Extra arguments go to pytest (e.g. -m "not slow", -k lora).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "${DCUSTOM_VENV:-.venv}/bin/python" -m pytest -q "$@"
