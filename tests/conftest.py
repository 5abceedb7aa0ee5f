"""Shared test setup: offline, quiet, deterministic, CPU."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from threads, and two threads on a busy 2-core machine made single
    UNet calls 10x slower (oversubscription); every test runs on one thread."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def tiny_pipe():
    """A factory of fresh tiny pipelines: tiny_pipe("sd15" | "sd2" | "sdxl")."""
    from dcustom.models import load_pipeline

    return lambda kind="sd15": load_pipeline(f"tiny:{kind}", device="cpu")


@pytest.fixture
def cli():
    """Run the dcustom CLI in-process; returns (exit_code, stdout, stderr)."""
    from typer.testing import CliRunner

    from dcustom.cli import app

    runner = CliRunner()

    def run(*args):
        result = runner.invoke(app, [str(a) for a in args])
        if result.exception and not isinstance(result.exception, SystemExit):
            raise result.exception
        return result.exit_code, result.stdout, result.stderr

    return run
