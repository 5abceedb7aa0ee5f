#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment and install the locked dependency set into it.
# Idempotent: when requirements.lock and pyproject.toml are unchanged since the last install it only
# checks and returns (about a second). The venv is .venv, or $DCUSTOM_VENV.
#
# torch is installed first, alone and pinned (torch==2.13.0, the CPU build on this kind of machine), so
# that no dependency can pull a multi-GB CUDA build onto a CPU machine; then the lock, then dcustom
# itself (editable, without dependencies: the lock already holds them all).
set -euo pipefail
cd "$(dirname "$0")/.."
venv="${DCUSTOM_VENV:-.venv}"
export PIP_DISABLE_PIP_VERSION_CHECK=1
if [ ! -x "$venv/bin/python" ]; then
  echo "setup: creating $venv"
  python3 -m venv "$venv"
fi
stamp="$venv/.dcustom-setup"
want="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$venv/bin/python" -c "import dcustom" 2>/dev/null; then
  exit 0
fi
torch_pin="$(grep -E '^torch==' requirements.lock)"
echo "setup: installing $torch_pin, then requirements.lock into $venv (a few minutes the first time)"
log="$venv/.dcustom-setup.log"
quiet() { "$@" >"$log" 2>&1 || { cat "$log" >&2; echo "setup: failed: $*" >&2; exit 1; }; }
quiet "$venv/bin/python" -m pip install -q "$torch_pin"
quiet "$venv/bin/python" -m pip install -q -r requirements.lock
quiet "$venv/bin/python" -m pip install -q --no-deps -e .
echo "$want" > "$stamp"
echo "setup: done ($("$venv/bin/python" -c 'import torch, diffusers, transformers, peft; print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
