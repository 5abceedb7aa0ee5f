#!/usr/bin/env bash
# The demo the README names: sets up the locked environment if needed, then draws a few images with
# the embedded toy model and writes them (plus a grid) to outputs/demo/. Extra arguments go to
# `dcustom generate`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
exec "${DCUSTOM_VENV:-.venv}/bin/dcustom" generate --model tiny:sd15 --prompt "a photo of a cat" --steps 4 --seed 1 \
  -o outputs/demo "$@"
