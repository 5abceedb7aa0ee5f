"""`dcustom toyworld ...`: train the toy base model and the judges, render toy-world images."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from dcustom.commands.common import fail
from dcustom.errors import DcustomError

app = typer.Typer(help="The toy world: procedural images, the toy base model recipe, the judges.",
                  no_args_is_help=True)



@app.command("train-base")
def train_base(
    config: Optional[Path] = typer.Option(None, "--config", help="A toy_base YAML (see configs/toy_base.yaml)."),
    set_: List[str] = typer.Option([], "--set", help="Dotted override, e.g. --set unet.steps=2000 (repeatable)."),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="Stop with a checkpoint after N optimizer "
                                             "steps (all stages counted); run again to resume."),
):
    """Train the toy model (text encoder, VAE, UNet) from a seed; resumable; writes a learning curve."""
    from dcustom.config import load_config
    from dcustom.toyworld.config import ToyBaseConfig

    try:
        cfg = load_config(ToyBaseConfig, config, overrides=set_)
        if cfg.method != "toy_base":
            raise DcustomError(f"{config}: method {cfg.method!r} is not 'toy_base'.")
        from dcustom.toyworld.train_base import run

        out = run(cfg, stop_after=stop_after, log=lambda m: typer.echo(m, err=True))
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(str(out))


@app.command("train-judges")
def train_judges(
    which: str = typer.Option("both", "--which", help="train, eval or both."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", help="Where to write judge_<kind>.safetensors "
                                              "(default: the package's weights folder)."),
    threads: int = typer.Option(0, "--threads", help="torch CPU threads (0 = default)."),
    images: Optional[int] = typer.Option(None, "--images", help="Training renders (default: the recipe's)."),
    epochs: Optional[int] = typer.Option(None, "--epochs", help="Epochs (default: the recipe's)."),
    check_images: int = typer.Option(2000, "--check-images", help="Fresh renders for the accuracy report."),
):
    """Train the judges on CPU from their fixed recipes (a few minutes each) and report fresh-render accuracy."""
    import json

    kinds = {"both": ("train", "eval"), "train": ("train",), "eval": ("eval",)}
    if which not in kinds:
        fail(f"--which {which!r} is not known; accepted: train, eval, both.")
    import torch

    from dcustom.toyworld.judges import train_judge

    if threads:
        torch.set_num_threads(threads)
    for kind in kinds[which]:
        out = Path(output_dir) / f"judge_{kind}.safetensors" if output_dir else None
        result = train_judge(kind, out, images=images, epochs=epochs, check_images=check_images,
                             log=lambda m: typer.echo(m, err=True))
        typer.echo(json.dumps(result))


@app.command("render")
def render(
    output_dir: Path = typer.Option(Path("toyworld_samples"), "--output-dir", "-o"),
    split: str = typer.Option("base", "--split", help="base, heldout_combo, subject, style or judge."),
    count: int = typer.Option(16, "--count", "-c"),
    seed: int = typer.Option(0, "--seed"),
    subject: Optional[str] = typer.Option(None, "--subject", help="Render this held-out subject (robot, ladybug, pine)."),
    style: Optional[str] = typer.Option(None, "--style", help="Render this held-out style (mosaic, sketch, neon)."),
):
    """Write rendered images with their captions (captions.jsonl) and a grid.png."""
    import json

    from dcustom.toyworld.render import grid, render_samples, render_style, render_subject

    try:
        if subject:
            samples = render_subject(subject, count, seed)
        elif style:
            samples = render_style(style, count, seed)
        else:
            samples = render_samples(count, seed, split)
    except ValueError as exc:
        fail(str(exc))
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "captions.jsonl", "w") as f:
        for i, (image, text, scene) in enumerate(samples):
            name = f"{i:05d}.png"
            image.save(output_dir / name)
            f.write(json.dumps({"file": name, "caption": text, "labels": scene.labels()}) + "\n")
    grid([s[0] for s in samples]).save(output_dir / "grid.png")
    typer.echo(str(output_dir))
