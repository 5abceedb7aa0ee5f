"""`dcustom app`: serve the Gradio UI (generate, train, stylize, manage adapters)."""

from __future__ import annotations

from pathlib import Path

import typer

from dcustom.commands.common import fail

app = typer.Typer(help="Serve the web UI.", add_completion=False)


@app.callback(invoke_without_command=True)
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind; 0.0.0.0 exposes the app to your network."),
    port: int = typer.Option(7860, "--port", help="TCP port."),
    data_dir: Path = typer.Option(Path("dcustom-data"), "--data-dir",
                                  help="The app's folder: outputs, uploads, runs, adapter library, local models. "
                                       "Nothing outside it is read or written from the UI."),
    model: str = typer.Option(None, "--model", help="Default base model (builtin:toy when shipped, else tiny:sd15)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps."),
    share: bool = typer.Option(False, "--share", help="Also open a public Gradio share link (off by default)."),
    max_upload_mb: float = typer.Option(20.0, "--max-upload-mb", help="Largest accepted upload per file."),
):
    """Start the app and block until Ctrl+C."""
    try:
        import gradio  # noqa: F401
    except ImportError:
        fail("the app needs the UI extra: pip install 'dcustom[ui]'")
    from dcustom.app.main import launch
    from dcustom.app.uploads import UploadLimits

    typer.echo(f"dcustom app: data folder {data_dir.resolve()}", err=True)
    launch(data_dir, host=host, port=port, share=share, default_model=model, device=device,
           limits=UploadLimits(max_bytes=int(max_upload_mb * 2**20)))
