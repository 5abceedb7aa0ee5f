"""The learning curve: how well the UNet binds the grammar, measured while it trains.

Every cfg.curve.every UNet steps (and at step 0, the untrained baseline at chance) the EMA model samples
the fixed held-out prompts and a judge reads shape, colour and background off the images. The points
go into learning_curve.json (also kept in each checkpoint's state.json, so resume continues the curve),
learning_curve.png and events.jsonl; install compares the last point's prompt accuracy.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dcustom.toyworld.grammar import BACKGROUNDS, COLOURS, SHAPES


def measure(run, loss: float | None):
    """Sample, judge and record one curve point for `run` at its current UNet step."""
    from dcustom.toyworld.evaluate import generate_images, heldout_prompts, judge_generated
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.render import grid

    c = run.cfg.curve
    pipe = run.pipeline()
    for m in (run.vae, run.text_encoder, run.unet, run.ema):
        if m is not None:
            m.eval()
    prompts = heldout_prompts(n_base=c.prompts)[: c.prompts]
    t0 = time.time()
    with run.autocast():
        images = generate_images(pipe, prompts, [0], c.sampling_steps, c.guidance, batch_size=64)
    report = judge_generated(images, prompts, [0], load_judge(c.judge))
    point = {"step": run.step, "loss": loss, **{k: round(v, 4) for k, v in report["accuracy"].items()},
             "toy_fid": round(report["toy_fid"], 3), "seconds": round(time.time() - t0, 1),
             "minutes": round(run.elapsed_seconds() / 60, 2)}
    run.curve.append(point)
    run.event({"event": "curve", **point})
    run.log("curve " + json.dumps(point))
    (run.dir / "samples").mkdir(exist_ok=True)
    grid(images, columns=8).save(run.dir / "samples" / f"unet-{run.step:06d}.png")
    write_curve(run.curve, run.dir)


def write_curve(curve: list[dict], run_dir: Path):
    tmp = run_dir / ".learning_curve.json.tmp"
    tmp.write_text(json.dumps(curve, indent=1))
    tmp.replace(run_dir / "learning_curve.json")
    plot_curve(curve, run_dir / "learning_curve.png")


def plot_curve(curve: list[dict], path: Path):
    """Per-attribute J_eval accuracy vs UNet step and vs wall-clock minutes (matplotlib, imported lazily;
    skipped if absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not curve:
        return None
    axes_x = [("step", "UNet step")]
    if all("minutes" in p for p in curve):  # older curves have no wall time
        axes_x.append(("minutes", "minutes since the run started (all stages)"))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4), dpi=100, squeeze=False)
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "background": 1 / len(BACKGROUNDS)}
    for ax, (x_key, x_label) in zip(axes[0], axes_x):
        xs = [p[x_key] for p in curve]
        for key, colour in (("background", "tab:gray"), ("colour", "tab:red"), ("shape", "tab:blue"), ("prompt", "k")):
            if key in curve[0]:
                ax.plot(xs, [p[key] for p in curve], marker="o", color=colour, label=key)
            if key in chance:
                ax.axhline(chance[key], color=colour, ls=":", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel("J_eval accuracy on held-out prompts")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path

