"""`dcustom eval erasure`: efficacy, generality, specificity, preservation and a robustness probe of an
erasure, judged in the toy world; writes erasure.json and grid.png. Torch-free at import."""

from __future__ import annotations

from typing import Optional

import typer

from dcustom.commands.common import fail, parse_seeds
from dcustom.commands.eval import app


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


@app.command("erasure")
def erasure(
    erased: str = typer.Option(..., "--erased", "-e", help="The erasure: a run folder / LoRA file from 'dcustom train "
                               "erasure', or an edited model folder."),
    concept: str = typer.Option(..., "--concept", "-c", help="The erased toy-world word (a shape, colour or background)."),
    model: str = typer.Option("builtin:toy", "--model", "-m", help="The base model the erasure was made from."),
    neighbours: str = typer.Option("", "--neighbours", help="Comma-separated neighbour classes (default: the two most alike)."),
    others: str = typer.Option("", "--others", help="Comma-separated other classes (default: the rest of the attribute)."),
    seeds: str = typer.Option("0,1,2,3,4,5,6,7", "--seeds", help="Comma-separated seeds, one image per prompt and seed."),
    per_group: int = typer.Option(8, "--prompts", help="Prompts per group (efficacy, generality, neighbours, others)."),
    preservation: int = typer.Option(24, "--preservation-prompts", help="Random prompts without the concept."),
    steps: int = typer.Option(20, "--steps"),
    guidance: float = typer.Option(5.0, "--guidance"),
    attack_prompts: int = typer.Option(2, "--attack-prompts", help="Efficacy prompts the robustness probe attacks (0: none)."),
    attack_steps: int = typer.Option(50, "--attack-steps", help="Optimisation steps of the prompt-embedding attack."),
    attack_lr: float = typer.Option(1e-2, "--attack-lr"),
    judge: str = typer.Option("eval", "--judge", help="eval (J_eval, default) or train (J_train)."),
    output_dir: str = typer.Option("runs/eval_erasure", "--output-dir", "-o", help="Writes erasure.json and grid.png here."),
    device: str = typer.Option("auto", "--device"),
    dtype: str = typer.Option("auto", "--dtype"),
):
    """What an erasure removed and what it kept, base model vs erased model, judged by J_eval."""
    from dcustom.errors import DcustomError

    seed_list = parse_seeds(seeds)
    try:
        from dcustom.trainers.erasure.evaluate import concept_head, evaluate_erasure, load_pipelines

        concept_head(concept)  # a bad concept fails before any model loads
        from dcustom.outputs import writable_folder

        writable_folder(output_dir, "--output-dir")  # so does a folder that cannot be written
        base, erased_pipe = load_pipelines(model, erased, device=device, dtype=dtype)
        report = evaluate_erasure(base, erased_pipe, concept, seeds=seed_list, steps=steps, guidance=guidance,
                                  per_group=per_group, preservation=preservation, neighbours=_csv(neighbours) or None,
                                  others=_csv(others) or None, attack_prompts=attack_prompts,
                                  attack_steps=attack_steps, attack_lr=attack_lr, judge=judge, out_dir=output_dir,
                                  on_stage=lambda msg: typer.echo(msg, err=True))
    except DcustomError as exc:
        fail(str(exc))
    s = report["summary"]
    typer.echo(f"erased {report['head']} {report['class']!r}  judge J_{judge}  {len(seed_list)} seeds")
    for key in ("efficacy", "generality", "others", "neighbours", "preservation_prompt_accuracy"):
        row = s[key]
        if row.get("base") is None:
            continue
        ratio = f"  ratio {row['ratio']:.3f}" if row.get("ratio") is not None else ""
        typer.echo(f"  {key:30s} base {row['base']:.3f}  erased {row['erased']:.3f}{ratio}")
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    typer.echo(f"  toy-FID erased vs base {s['preservation_toy_fid_vs_base']:.3f}   harmonic mean {fmt(s['harmonic_mean'])}   "
               f"attack success {fmt(s['attack_success_rate'])} (before the attack {fmt(report['robustness']['pre_attack_rate'])})")
    typer.echo(report["files"]["json"])


@app.command("erasure-methods")
def erasure_methods(
    concept: str = typer.Option("purple", "--concept", "-c", help="Toy-world word(s) to erase, comma-separated; several "
                                "are erased at once (one attribute) and each is judged."),
    methods: str = typer.Option("uce,esd_x,esd_u", "--methods", help="Comma-separated: uce, esd_x, esd_u."),
    model: str = typer.Option("builtin:toy", "--model", "-m"),
    seeds: str = typer.Option("0,1,2,3", "--seeds", help="Comma-separated seeds, one image per prompt and seed."),
    per_group: int = typer.Option(8, "--prompts", help="Prompts per group (efficacy, generality, neighbours, others)."),
    preservation: int = typer.Option(16, "--preservation-prompts", help="Random prompts without the concept."),
    attack_prompts: int = typer.Option(2, "--attack-prompts", help="Efficacy prompts the robustness probe attacks (0: none)."),
    attack_steps: int = typer.Option(50, "--attack-steps"),
    esd_steps: Optional[int] = typer.Option(None, "--esd-steps", help="ESD training steps (default: the suite's, 1000)."),
    output_dir: str = typer.Option("runs/eval_erasure_methods", "--output-dir", "-o",
                                   help="Writes methods.json and, per method and concept, erasure.json and grid.png."),
):
    """Erase a concept from the toy model with UCE, ESD-x and ESD-u (grammar templates) and judge each with J_eval:
    the results page's erasure table, with each method's CPU time."""
    from dcustom.errors import DcustomError

    seed_list = parse_seeds(seeds)
    concepts, algorithms = _csv(concept), _csv(methods)
    bad = [m for m in algorithms if m not in ("uce", "esd_x", "esd_u")]
    if bad or not algorithms:
        fail(f"--methods {methods!r}: accepted are uce, esd_x, esd_u (comma-separated).")
    try:
        from dcustom.outputs import writable_folder
        from dcustom.trainers.erasure.evaluate import concept_head

        heads = {concept_head(c)[0] for c in concepts}  # a bad word fails before any model loads
        if len(heads) != 1:
            fail(f"--concept {concept!r}: several concepts are erased at once only within one attribute "
                 "(shape, colour or background).")
        writable_folder(output_dir, "--output-dir")
        import torch

        torch.set_num_threads(1)  # the published CPU seconds are one thread's
        from dcustom.trainers.erasure.suite import format_table, run_suite

        table = run_suite(concepts, algorithms, model=model, seeds=seed_list, per_group=per_group,
                          preservation=preservation, attack_prompts=attack_prompts, attack_steps=attack_steps,
                          out_dir=output_dir, overrides={"train": {"steps": esd_steps}} if esd_steps else None,
                          on_stage=lambda msg: typer.echo(msg, err=True))
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(format_table(table))
    typer.echo(table["file"])
