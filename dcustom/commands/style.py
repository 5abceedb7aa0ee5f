"""`dcustom style --content c.png --style s.png [--method ...]`: training-free style transfer.

Torch-free at import time; the work happens in the method's `run(cfg)` from the registry.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer


def style(
    content: str = typer.Option(None, "--content", "-c", help="Content image file (any size or mode)."),
    style_image: str = typer.Option(None, "--style", "-s", help="Style image file (any size or mode)."),
    method: str = typer.Option("style_injection", "--method", help="style_injection (StyleID) or attention_injection (MasaCtrl-style)."),
    model: str = typer.Option(None, "--model", "-m", help="builtin:toy, tiny:sd15|sd2|sdxl, a folder, a checkpoint file or a hub id."),
    output: str = typer.Option(None, "--output", "-o", help="Result PNG; the content | style | result grid goes next to it."),
    gamma: float = typer.Option(None, "--gamma", help="Query preservation γ in [0, 1] (StyleID 0.75)."),
    temperature: float = typer.Option(None, "--temperature", "-T", help="Attention temperature T (StyleID 1.5)."),
    steps: int = typer.Option(None, "--steps", help="DDIM steps for inversion and sampling (50)."),
    seed: int = typer.Option(None, "--seed", help="Seed of the sampling noise (only matters with eta > 0)."),
    layers: str = typer.Option(None, "--layers", help="Layer preset or regex over attention layer names."),
    cache_dir: str = typer.Option(None, "--cache-dir", help="Folder caching inversions between runs."),
    device: str = typer.Option(None, "--device"),
    dtype: str = typer.Option(None, "--dtype"),
    config: Optional[Path] = typer.Option(None, "--config", help="A style YAML (see `dcustom config print style_injection`)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set init_adain=false (repeatable)."),
):
    """Stylize a content image with a style image; writes the result and a content | style | result grid."""
    from dcustom.commands.common import fail, overrides_as_yaml_strings
    from dcustom.config import load_config
    from dcustom.errors import DcustomError
    from dcustom.registry import get_method

    flags = dict(content=content, style=style_image, model=model, output=output, gamma=gamma,
                 temperature=temperature, steps=steps, seed=seed, layers=layers, cache_dir=cache_dir,
                 device=device, dtype=dtype)
    try:
        spec = get_method(method, kind="style")
        cfg = load_config(spec.config_class(), config, overrides=list(set_) + overrides_as_yaml_strings(flags))
        if cfg.method != method:
            raise DcustomError(f"{config}: method {cfg.method!r} does not match --method {method!r}.")
        cfg.output = str(_free_output(cfg.output))
    except DcustomError as exc:
        fail(str(exc))
    from dcustom.progress import step_progress

    try:
        with step_progress(f"{method}: invert content, invert style, sample", 3 * cfg.steps) as on_step:
            path = spec.implementation()(cfg, on_step=on_step)
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(path)
    typer.echo(str(Path(path).with_name(Path(path).stem + "-grid.png")))


def _free_output(output: str) -> Path:
    """Before any work: the result's folder must be writable, and an earlier result is never overwritten
    (the next free name, result-2.png, is used instead, as generate numbers its images)."""
    from dcustom.errors import DcustomError
    from dcustom.outputs import writable_folder

    out = Path(output)
    if out.is_dir():
        raise DcustomError(f"output: {output!r} is a folder; accepted: a .png file path such as {str(out / 'result.png')!r}.")
    writable_folder(out.parent, "output")
    free, n = out, 2
    while free.exists() or free.with_name(free.stem + "-grid.png").exists():  # the grid beside it must be free too
        free, n = out.with_name(f"{out.stem}-{n}{out.suffix}"), n + 1
    if free != out:
        typer.echo(f"{output} exists; writing {free} (results are never overwritten)", err=True)
    return free
