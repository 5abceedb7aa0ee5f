#!/usr/bin/env bash
# Re-resolve the dependency set to the newest versions pyproject.toml allows, in a scratch venv; run the
# whole suite there; rewrite requirements.lock only if the suite passes. Extra arguments go to pytest.
#   bash scripts/upgrade-lock.sh            # the whole suite (as CI runs it)
#   bash scripts/upgrade-lock.sh -m "not slow"
# The lock is `pip freeze` of that clean venv (dcustom itself excluded, torch's +cpu build label dropped
# so the same line serves any build of the pinned version). Nothing in .venv is touched.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
torch_pin="$(grep -E '^torch==' requirements.lock)"
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
echo "upgrade-lock: resolving the newest allowed versions in $scratch (keeping $torch_pin)"
python3 -m venv "$scratch/venv"
py="$scratch/venv/bin/python"
"$py" -m pip install -q "$torch_pin"
"$py" -m pip install -q -e ".[test,ui]"
{
  echo "# The dependency set the whole suite passed with: pip freeze of a clean venv, written by"
  echo "# scripts/upgrade-lock.sh on $(date -u +%Y-%m-%d) (Python $("$py" -c 'import platform; print(platform.python_version())')). Do not edit by hand."
  echo "# scripts/setup.sh installs torch first from this pin (the CPU build here), then this file, then dcustom."
  "$py" -m pip freeze --exclude-editable | sed -E 's/^torch==([^+]+)\+.*/torch==\1/' | grep -v '^dcustom'
} > "$scratch/requirements.lock"
if diff -q requirements.lock "$scratch/requirements.lock" >/dev/null 2>&1; then
  echo "upgrade-lock: nothing newer is allowed; the lock is unchanged"; exit 0
fi
diff <(grep -v '^#' requirements.lock) <(grep -v '^#' "$scratch/requirements.lock") || true
echo "upgrade-lock: running the suite against the new set"
if "$py" -m pytest -q "$@"; then
  cp "$scratch/requirements.lock" requirements.lock
  echo "upgrade-lock: suite passed; requirements.lock rewritten (commit it, then 'bash scripts/setup.sh' installs it)"
else
  echo "upgrade-lock: the suite failed with the new set; requirements.lock is unchanged" >&2
  exit 1
fi
