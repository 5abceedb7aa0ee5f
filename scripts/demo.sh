#!/usr/bin/env bash
# The demo the README names: sets up the locked environment if needed, then teaches the embedded toy
# model a subject it has never seen from 5 renders (a LoRA) and draws it on backgrounds it never saw:
# outputs/demo/before_after.png (top row: base model, bottom row: with the LoRA) and demo.json (J_eval).
# Extra arguments go to `dcustom demo` (e.g. --subject ladybug, --set train.steps=200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
venv="${DCUSTOM_VENV:-.venv}"
exec "$venv/bin/dcustom" demo -o outputs/demo "$@"
