#!/usr/bin/env bash
# The test command the README names: the whole suite, offline, on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec python -m pytest -q "$@"
