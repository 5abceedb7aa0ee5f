"""`dcustom eval ...`: measurements of base models and of what a method changed."""

from __future__ import annotations

import typer

from dcustom.commands.common import fail, parse_seeds

app = typer.Typer(help="Evaluate models with the toy-world judges (JSON + image grids).", no_args_is_help=True)


@app.command("base")
def base(
    model: str = typer.Option(..., "--model", "-m", help="builtin:toy, tiny:sd15, a diffusers folder, ..."),
    prompts: int = typer.Option(24, "--prompts", help="Held-out prompts over trained shape x colour pairs "
                                "(the held-out compositional pairs are always added)."),
    prompt: list[str] = typer.Option([], "--prompt", help="Judge these prompts instead (repeatable; grammar words)."),
    seeds: str = typer.Option("0,1,2,3", "--seeds", help="Comma-separated seeds, one image per prompt and seed."),
    steps: int = typer.Option(20, "--steps"),
    guidance: float = typer.Option(5.0, "--guidance"),
    judge: str = typer.Option("eval", "--judge", help="eval (J_eval, default) or train (J_train)."),
    output_dir: str = typer.Option("runs/eval_base", "--output-dir", "-o", help="Writes eval.json and grid.png here."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
    bars: bool = typer.Option(False, "--bars", help="Check the bars builtin:toy must reach (every base prompt and "
                              "held-out pair, or the --prompt list, x --seeds at the generate defaults, VAE PSNR, "
                              "CPU time for 4 images); writes bars.json; exit code 1 if a bar does not hold."),
):
    """Prompt accuracy, per-attribute accuracy, toy-FID and diversity of a base model on held-out prompts."""
    from dcustom.errors import DcustomError

    seed_list = parse_seeds(seeds)
    from dcustom.outputs import writable_folder

    try:
        writable_folder(output_dir, "--output-dir")  # before any model loads
    except DcustomError as exc:
        fail(str(exc))
    if bars:
        _check_bars(model, seed_list, device, dtype, output_dir, list(prompt) or None)
        return
    try:
        from dcustom.models import load_pipeline
        from dcustom.toyworld.evaluate import evaluate_pipeline, heldout_prompts

        prompt_list = list(prompt) or heldout_prompts(prompts)  # before the model loads: a bad count fails at once
        pipe = load_pipeline(model, dtype=dtype, device=device)
        report = evaluate_pipeline(pipe, prompt_list, seed_list, judge=judge,
                                   steps=steps, guidance=guidance, out_dir=output_dir)
    except DcustomError as exc:
        fail(str(exc))
    acc = report["accuracy"]
    typer.echo(f"model {model}  judge J_{judge}  {report['prompts']} prompts x {len(seed_list)} seeds")
    typer.echo("accuracy  " + "  ".join(f"{k} {v:.3f}" for k, v in acc.items()))
    for name, group in report["groups"].items():
        typer.echo(f"  {name:14s}" + "  ".join(f"{k} {v:.3f}" for k, v in group.items() if k != "images"))
    typer.echo(f"toy-FID {report['toy_fid']:.3f}  diversity {report['diversity']:.4f} "
               f"(renders {report['reference_diversity']:.4f})")
    typer.echo(report["files"]["json"])


def _check_bars(model: str, seeds: list[int], device: str, dtype: str, output_dir: str, prompts) -> None:
    import json
    from pathlib import Path

    from dcustom.errors import DcustomError
    from dcustom.toyworld.bars import format_bars, measure_bars

    try:
        result = measure_bars(model, seeds, device=device, dtype=dtype, out_dir=output_dir, prompts=prompts)
    except DcustomError as exc:
        fail(str(exc))
    out = Path(output_dir) / "bars.json"
    tmp = out.with_name(".bars.json.tmp")
    tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "report"}, indent=2))
    tmp.replace(out)
    typer.echo(format_bars(result))
    typer.echo(str(out))
    if not result["all_passed"]:
        raise typer.Exit(1)
