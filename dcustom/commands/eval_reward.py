"""`dcustom eval reward`: one reward LoRA per gradient policy from the same config (the "make it red" task on
builtin:toy by default), judged by J_eval; writes reward_policies.json. Torch-free at import."""

from __future__ import annotations

from typing import List

import typer

from dcustom.commands.common import SET_HELP, fail
from dcustom.commands.eval import app


@app.command("reward")
def reward(
    config: str = typer.Option("configs/reward.yaml", "--config", help="The reward YAML every policy starts from."),
    policies: str = typer.Option("alignprop_step,alignprop_trajectory,draft,draft_k,draft_lv", "--policies",
                                 help="Comma-separated gradient policies."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    output_dir: str = typer.Option("runs/eval_reward", "--output-dir", "-o",
                                   help="One run folder per policy and reward_policies.json here."),
):
    """Per policy: J_eval gain, best-of-N at equal reward calls, hacking gap, unrelated prompts, CPU s/update, memory."""
    from pathlib import Path

    from dcustom.errors import DcustomError
    from dcustom.trainers.reward.config import POLICIES

    chosen = [p.strip() for p in policies.split(",") if p.strip()]
    bad = [p for p in chosen if p not in POLICIES]
    if bad or not chosen:
        fail(f"--policies {policies!r}: accepted are {', '.join(POLICIES)} (comma-separated).")
    if not Path(config).is_file():
        fail(f"--config {config!r} does not exist; give a reward YAML such as configs/reward.yaml.")
    try:
        from dcustom.outputs import writable_folder

        writable_folder(output_dir, "--output-dir")
        import torch

        torch.set_num_threads(1)  # the published CPU seconds are one thread's
        from dcustom.trainers.reward.suite import format_table, run_policies

        table = run_policies(config, chosen, output_dir, list(set_), on_stage=lambda m: typer.echo(m, err=True))
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(format_table(table))
    typer.echo(table["file"])
