"""diffusers with transformers 4 (issue 19): the same files, loaded with the same diffusers APIs in a scratch venv.

Skipped unless DCUSTOM_T4_PYTHON names a Python with transformers<5 (for example /tmp/t4venv/bin/python, built
outside the repo: `python3 -m venv /tmp/t4venv && /tmp/t4venv/bin/pip install torch==2.13.0 &&
/tmp/t4venv/bin/pip install 'transformers<5' 'diffusers==0.35.*' peft safetensors accelerate`).
scripts/interop/t4_check.py prepares the files here and checks them there; see its docstring for the cases.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

T4 = os.environ.get("DCUSTOM_T4_PYTHON")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "interop" / "t4_check.py"


@pytest.mark.skipif(not T4, reason="set DCUSTOM_T4_PYTHON to a Python with transformers<5 to run")
def test_every_file_computes_the_same_in_diffusers_with_transformers_4(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, str(SCRIPT), "prepare", str(tmp_path)], check=True, env=env, capture_output=True)
    version = subprocess.run([T4, "-c", "import transformers; print(transformers.__version__)"], env=env,
                             capture_output=True, text=True, check=True).stdout.strip()
    assert version.startswith("4."), version
    check = subprocess.run([T4, str(SCRIPT), "check", str(tmp_path)], env=env, capture_output=True, text=True)
    print(check.stdout)
    assert check.returncode == 0, check.stdout[-3000:] + check.stderr[-2000:]
