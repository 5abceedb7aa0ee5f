"""The registry, configs/ and the CLI agree; import and --help stay torch-free."""

import subprocess
import sys
from pathlib import Path

import pytest

from dcustom.config import load_config, read_yaml
from dcustom.registry import METHODS

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_every_method_has_a_config_file_that_loads():
    for method_id, method in METHODS.items():
        path = CONFIGS / f"{method_id}.yaml"
        assert path.is_file(), f"registry id {method_id!r} has no configs/{method_id}.yaml"
        cfg = load_config(method.config_class(), path)
        assert cfg.method == method_id, f"configs/{method_id}.yaml says method {cfg.method!r}"
        method.implementation()  # the implementation is importable


def test_every_config_file_names_a_registered_method():
    for path in CONFIGS.glob("*.yaml"):
        data = read_yaml(path)
        assert data.get("method") in METHODS, f"{path.name}: method {data.get('method')!r} is not in the registry"


def test_cli_prints_and_checks_every_config(cli):
    for method_id in METHODS:
        code, out, err = cli("config", "print", method_id)
        assert code == 0, err
        assert f"method: {method_id}" in out and "# " in out
        code, out, err = cli("config", "check", CONFIGS / f"{method_id}.yaml")
        assert code == 0 and out.strip().endswith(": ok"), err
    code, _, err = cli("config", "print", "nope")
    assert code == 2 and "method 'nope' is not known; accepted: generate" in err


def test_cli_train_lists_registered_methods(cli):
    code, _, err = cli("train", "definitely_not_a_method")
    train_ids = [k for k, m in METHODS.items() if m.kind == "train"]
    assert code == 2 and "train method 'definitely_not_a_method' is not known; accepted: " + ", ".join(train_ids) in err


@pytest.mark.parametrize("code", ["import dcustom, dcustom.cli, dcustom.config, dcustom.registry",
                                  "import sys; sys.argv=['dcustom','--help']\nfrom dcustom.cli import main\ntry:\n  main()\nexcept SystemExit:\n  pass"])
def test_import_and_help_do_not_import_torch(code):
    script = code + "\nimport sys\nassert 'torch' not in sys.modules, 'torch was imported'\n"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_env_reports_versions(cli):
    code, out, _ = cli("env")
    assert code == 0
    for key in ("torch", "diffusers", "peft", "cuda", "attention backend", "extra ui: gradio"):
        assert key in out
