"""`dcustom app` serves the UI on 127.0.0.1 with the options given (a real server process)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

pytest.importorskip("gradio", reason="the UI extra is not installed: pip install 'dcustom[ui]'")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dcustom_app_serves_on_localhost(tmp_path):
    import httpx
    from gradio_client import Client

    port = free_port()
    data = tmp_path / "data"
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "dcustom.cli", "app", "--port", str(port), "--data-dir", str(data),
                             "--model", "tiny:sd15", "--device", "cpu"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(url, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            raise AssertionError("dcustom app did not answer within 120 s")
        client = Client(url, verbose=False)
        text = client.predict("lora", "tiny:sd15", "sks", "toy", 5, None, 0, None, 0, 0, "", "", "", api_name="/train_yaml")
        assert "model: tiny:sd15" in text and str(data.resolve() / "runs") in text
        assert {p.name for p in data.iterdir()} >= {"outputs", "uploads", "adapters", "runs", "models", "style"}
        # Bound to loopback only: the machine's other addresses do not answer.
        other = socket.gethostbyname(socket.gethostname())
        if not other.startswith("127."):
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)
