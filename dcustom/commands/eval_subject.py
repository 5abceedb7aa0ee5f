"""`dcustom eval subject`: subject trainers on builtin:toy with their shipped configs, judged by J_eval on
backgrounds the examples never show (see toyworld/subject_eval.py); writes subjects.json and a grid per run.
Torch-free at import."""

from __future__ import annotations

from typing import List

import typer

from dcustom.commands.common import SET_HELP, fail, parse_seeds
from dcustom.commands.eval import app


@app.command("subject")
def subject(
    methods: str = typer.Option("lora,oft,boft", "--methods", help="Comma-separated: lora, oft, boft, "
                                "textual_inversion, pivotal."),
    subjects: str = typer.Option("robot,ladybug,pine", "--subjects", help="Comma-separated toy subjects."),
    seeds: str = typer.Option("0,1,2,3,4,5,6,7", "--seeds", help="Seeds per unseen background (3 backgrounds)."),
    configs: str = typer.Option("configs", "--configs", help="Folder of the shipped configs (configs/<method>.yaml)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP + " Applied to every method's config."),
    output_dir: str = typer.Option("runs/eval_subject", "--output-dir", "-o", help="Writes subjects.json and, per "
                                   "method and subject, figures.json and grid.png here."),
):
    """Train each method on 5 renders of each subject; subject %, background %, unrelated-prompt ratio, CPU s."""
    import json
    from pathlib import Path

    from dcustom.errors import DcustomError
    from dcustom.toyworld.grammar import SUBJECT_NAMES
    from dcustom.toyworld.subject_eval import SUBJECT_METHODS

    chosen = [m.strip() for m in methods.split(",") if m.strip()]
    names = [s.strip() for s in subjects.split(",") if s.strip()]
    if not chosen or any(m not in SUBJECT_METHODS for m in chosen):
        fail(f"--methods {methods!r}: accepted are {', '.join(SUBJECT_METHODS)} (comma-separated).")
    if not names or any(s not in SUBJECT_NAMES for s in names):
        fail(f"--subjects {subjects!r}: accepted are {', '.join(SUBJECT_NAMES)} (comma-separated).")
    seed_list = parse_seeds(seeds)
    try:
        from dcustom.outputs import writable_folder

        out = writable_folder(output_dir, "--output-dir")
        from dcustom.models import load_pipeline
        from dcustom.toyworld.subject_eval import evaluate_subject_method, unrelated_accuracy

        base_accuracy = unrelated_accuracy(load_pipeline("builtin:toy", device="cpu", dtype="fp32"))
        summary_path = Path(out) / "subjects.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        for method in chosen:
            for name in names:
                figures = evaluate_subject_method(method, name, out, configs, overrides=list(set_), seeds=seed_list,
                                                  base_accuracy=base_accuracy, log=lambda m: typer.echo(m, err=True))
                summary[f"{method}/{name}"] = figures
                summary_path.write_text(json.dumps(summary, indent=1))
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(f"{'method':18s} {'subject':8s} {'subj':>5s} {'bg':>5s} {'unrel':>6s} {'step':>5s} {'cpu s':>6s}")
    for key, f in summary.items():
        method, name = key.split("/")
        if method in chosen and name in names:
            s = f[f["chosen"]]
            typer.echo(f"{method:18s} {name:8s} {s['subject']:5.2f} {s['background']:5.2f} {s['unrelated_ratio']:6.2f} "
                       f"{s['step']:5d} {f['train_cpu_seconds']:6.0f}")
    typer.echo(str(summary_path))
