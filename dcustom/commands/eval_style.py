"""`dcustom eval style`: every training-free style method on the same content/style pairs of the toy world,
judged by J_eval (content kept, style statistics distance, CPU seconds per pair), plus the DDIM inversion
round trip PSNR; writes style.json and image grids. Torch-free at import."""

from __future__ import annotations

import typer

from dcustom.commands.common import fail
from dcustom.commands.eval import app


@app.command("style")
def style(
    model: str = typer.Option("builtin:toy", "--model", "-m"),
    methods: str = typer.Option("style_id,style_id_tone,attention_injection,adain,style_aligned", "--methods",
                                help="Comma-separated: style_id, style_id_tone, style_id_concat, attention_injection, adain, style_aligned."),
    pairs: int = typer.Option(50, "--pairs", help="Content/style pairs (base-split contents, held-out styles)."),
    steps: int = typer.Option(20, "--steps", help="DDIM steps of inversion and sampling."),
    cached_pairs: int = typer.Option(10, "--cached-pairs", help="Pairs re-run with a warm inversion cache (timing)."),
    psnr_steps: str = typer.Option("10,25,50", "--psnr-steps", help="Step counts of the inversion round trip."),
    grid_contents: int = typer.Option(4, "--grid-contents", help="Rows of the content x style grid (0: none)."),
    output_dir: str = typer.Option("runs/eval_style", "--output-dir", "-o", help="Writes style.json and PNG grids here."),
):
    """Style transfer on builtin:toy: each method's content kept, style distance and CPU seconds per pair."""
    from dcustom.errors import DcustomError
    from dcustom.toyworld.style_eval import METHODS

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    bad = [m for m in chosen if m not in METHODS]
    if bad or not chosen:
        fail(f"--methods {methods!r}: accepted are {', '.join(METHODS)} (comma-separated).")
    if pairs < 1 or not 0 <= cached_pairs <= pairs:
        fail(f"--pairs must be at least 1 and --cached-pairs between 0 and --pairs, got {pairs} and {cached_pairs}.")
    try:
        psnr = [int(s) for s in psnr_steps.split(",") if s.strip()]
    except ValueError:
        psnr = [0]
    if any(s < 1 for s in psnr):
        fail(f"--psnr-steps {psnr_steps!r} must be comma-separated positive integers, e.g. 10,25,50.")
    try:
        from dcustom.outputs import writable_folder

        writable_folder(output_dir, "--output-dir")
        import torch

        torch.set_num_threads(1)  # the published CPU seconds are one thread's
        from pathlib import Path

        from dcustom.models import load_pipeline
        from dcustom.toyworld.style_eval import content_style_grid, evaluate_style

        pipe = load_pipeline(model, device="cpu", dtype="fp32")
        report = evaluate_style(pipe, chosen, pairs=pairs, steps=steps, cached_pairs=cached_pairs, psnr_steps=psnr,
                                out_dir=output_dir, on_stage=lambda msg: typer.echo(msg, err=True))
        if grid_contents:
            content_style_grid(pipe, grid_contents, steps, out=Path(output_dir) / "content_x_style.png")
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(f"{pairs} pairs, {steps} steps, 1 thread; style distance of the content images: "
               f"{report['style_distance_content']:.3f}")
    typer.echo(f"{'method':20s} {'kept':>6s} {'layout':>7s} {'style ratio':>12s} {'named':>6s} {'s/pair':>7s} {'cached':>7s}  bars")
    for name, m in report["methods"].items():
        held = "all" if all(m["bars"].values()) else "missed: " + ", ".join(k for k, ok in m["bars"].items() if not ok)
        cached = "-" if m["cpu_s_per_pair_cached"] is None else f"{m['cpu_s_per_pair_cached']:.2f}"
        typer.echo(f"{name:20s} {m['content_kept']:6.3f} {m['layout_correlation']:7.3f} {m['style_distance_ratio']:12.3f} "
                   f"{m['style_named']:6.3f} {m['cpu_s_per_pair_uncached']:7.2f} {cached:>7s}  {held}")
    for name, m in report["references"].items():
        typer.echo(f"{'(' + name + ')':20s} {m['content_kept']:6.3f} {m['layout_correlation']:7.3f} "
                   f"{m['style_distance_ratio']:12.3f} {m['style_named']:6.3f}")
    typer.echo("DDIM round trip PSNR (dB): " + ", ".join(f"{k} steps {v:.1f}" for k, v in report["inversion_psnr_db"].items()))
    typer.echo(report["files"]["json"])
