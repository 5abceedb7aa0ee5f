"""`dcustom adapters inspect|convert|merge|extract` (heavy imports inside the commands)."""

from __future__ import annotations

from typing import List

import typer

from dcustom.commands.common import fail
from dcustom.errors import DcustomError

app = typer.Typer(help="Inspect, convert, merge and extract adapter files.", no_args_is_help=True)



def _check_out(out: str) -> None:
    """Before any work: --out must be new (a finished file is never overwritten) and its folder writable."""
    from pathlib import Path

    from dcustom.outputs import writable_folder

    if Path(out).exists():
        raise DcustomError(f"--out {out!r} already exists, and dcustom never overwrites a finished file or folder; "
                           "accepted: a new name (or remove the old one first).")
    writable_folder(Path(out).parent, "--out")


@app.command()
def inspect(path: str = typer.Argument(..., help="Adapter file or folder (a run folder works too).")):
    """Format, method, base family, rank/alpha and size of an adapter."""
    from dcustom.adapters.load import adapter_summary

    try:
        info = adapter_summary(path)
    except DcustomError as exc:
        fail(str(exc))
    for key, value in info.items():
        typer.echo(f"{key:18s} {value}")


@app.command()
def convert(path: str = typer.Argument(..., help="An adapter file or run folder."),
            to: str = typer.Option(..., "--to", help="kohya (ComfyUI/Forge/A1111/InvokeAI, and diffusers), diffusers, "
                                                     "or full (exact weight differences of any adapter, OFT/BOFT/DoRA included)."),
            out: str = typer.Option(..., "--out", "-o", help="Output .safetensors file."),
            model: str = typer.Option(None, "--model", "-m", help="Base model, when the export needs the base weights "
                                                                  "(DoRA to kohya, anything to full); default: the one the file records.")):
    """Convert an adapter to the form another tool reads, keeping each module's true alpha."""
    from dcustom.adapters.convert import convert_lora

    try:
        _check_out(out)
        typer.echo(str(convert_lora(path, to, out, model=model)))
    except DcustomError as exc:
        fail(str(exc))


@app.command()
def merge(model: str = typer.Option(..., "--model", "-m", help="Base model spec."),
          adapter: List[str] = typer.Option(..., "--adapter", "-a", help="'path' or 'path:weight' (repeatable)."),
          out: str = typer.Option(..., "--out", "-o", help="Output diffusers folder, or a .safetensors file for one A1111/ComfyUI checkpoint."),
          dtype: str = typer.Option("fp32", "--dtype")):
    """Bake adapters into the base weights and save a full model: a diffusers folder or one checkpoint file."""
    from dcustom.adapters.merge import merge_into_model

    try:
        _check_out(out)
        typer.echo(str(merge_into_model(model, list(adapter), out, dtype)))
    except DcustomError as exc:
        fail(str(exc))


@app.command()
def extract(model: str = typer.Option(..., "--model", "-m", help="Base model the adapter was trained on."),
            adapter: str = typer.Option(..., "--adapter", "-a", help="Adapter file or folder (OFT/BOFT/LoRA)."),
            rank: int = typer.Option(32, "--rank", "-r"),
            out: str = typer.Option(..., "--out", "-o", help="Output kohya .safetensors file.")):
    """SVD-extract a LoRA (kohya keys) approximating any adapter, for tools that only read LoRA."""
    from dcustom.adapters.merge import extract_lora

    from dcustom.adapters.files import read_metadata

    try:
        _check_out(out)
        path, rel = extract_lora(model, adapter, rank, out)
    except DcustomError as exc:
        fail(str(exc))
    meta = read_metadata(path)
    typer.echo(f"{path}\nrelative error of the weight deltas (Frobenius): {rel:.4f}\n"
               f"worst module: {meta['dcustom.extraction_worst_module']} "
               f"({float(meta['dcustom.extraction_worst_rel_error']):.4f} of its change)")
