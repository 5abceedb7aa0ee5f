"""The run's report: reward under the training reward and under its held-out counterpart (J_eval
or an analytic oracle) at each evaluation step, as JSON and a plot (`reward_report.{json,png}`)."""

from __future__ import annotations

import json
from pathlib import Path


def hacking_gap(history: list[dict]) -> dict | None:
    """Gain of the training reward minus gain of the evaluation reward, first to last evaluation."""
    if len(history) < 2 or history[0].get("reward_eval") is None:
        return None
    first, last = history[0], history[-1]
    train_gain = last["reward_train"] - first["reward_train"]
    eval_gain = last["reward_eval"] - first["reward_eval"]
    return {"train_gain": train_gain, "eval_gain": eval_gain, "gap": train_gain - eval_gain}


def write_report(run_dir: Path, summary: dict, history: list[dict], scale_curve: list[dict] | None = None) -> list[Path]:
    """Write reward_report.json (always) and reward_report.png (when matplotlib is installed)."""
    run_dir = Path(run_dir)
    data = {**summary, "evaluations": history, "hacking_gap": hacking_gap(history),
            "lora_scale_curve": scale_curve or []}
    path = run_dir / "reward_report.json"
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
    written = [path]
    png = _plot(run_dir / "reward_report.png", summary, history)
    if png is not None:
        written.append(png)
    return written


def _plot(path: Path, summary: dict, history: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the plot is optional ('pip install dcustom[ui]' brings matplotlib)
        return None
    if not history:
        return None
    steps = [h["step"] for h in history]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [h["reward_train"] for h in history], "o-", color="tab:blue", label=summary.get("reward", "train"))
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(f"training reward ({summary.get('reward', '')})", color="tab:blue")
    if any(h.get("reward_eval") is not None for h in history):
        ax2 = ax.twinx()
        ax2.plot(steps, [h.get("reward_eval") for h in history], "s--", color="tab:red")
        ax2.set_ylabel(f"held-out ({summary.get('eval_reward', '')})", color="tab:red")
    ax.set_title(f"{summary.get('policy', '')} on {summary.get('model', '')}")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
    return path
