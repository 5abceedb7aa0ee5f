"""The reward fine-tuning protocol of the results page (`dcustom eval reward`), transposed to the toy world.

DRaFT and AlignProp report the training reward's rise and guard against reward hacking with a
held-out reward; here the task is "make the object red": J_train's log p(colour = red) is the training
reward, J_eval's the report. Per gradient policy, from one config (configs/reward.yaml by default):

- J_eval gain (last evaluation minus the base model's, on the fixed evaluation prompts and seeds);
- best-of-N from the base model at the training's number of reward calls, under J_eval (the
  inference-compute baseline the fine-tune must beat);
- hacking gap: J_train gain minus J_eval gain;
- the share of evaluation images J_eval judges red, and J_eval prompt accuracy on unrelated prompts
  (other colours), LoRA off vs on;
- CPU seconds per update (one thread, evaluations left out) and the run's peak resident memory
  (getrusage in a fresh process per policy, so one policy's allocations never hide another's).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

POLICIES = ("alignprop_step", "alignprop_trajectory", "draft", "draft_k", "draft_lv")
# Prompts the reward never saw, naming colours other than red: a LoRA that paints everything red fails them.
UNRELATED_PROMPTS = ("a blue triangle on a black background", "a green square on a white background",
                     "a yellow circle on a gray background", "a orange cross on a white background",
                     "a purple diamond on a striped background", "a blue star on a dotted background")


def _rss_mb() -> dict:
    """Peak and current resident memory of this process in MiB (stdlib; None where unavailable)."""
    try:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    except ImportError:  # Windows: no resource module
        peak = None
    try:
        import os

        current = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, AttributeError):
        current = None
    return {"peak": peak, "current": current}


class StepClock:
    """CPU seconds per optimizer update, from the loop's step events (an `on_event` callback).

    The interval between two step events holds one update; an interval that also holds an evaluation
    (a `sample` event) is left out, so the figure is the update alone."""

    def __init__(self):
        self.last, self.sampled, self.deltas = None, False, []

    def __call__(self, event: dict) -> None:
        now = time.process_time()
        if event.get("event") == "sample":
            self.sampled = True
        elif event.get("event") == "step":
            if self.last is not None and not self.sampled:
                self.deltas.append(now - self.last)
            self.last, self.sampled = now, False

    def per_update(self) -> float | None:
        import statistics

        return statistics.median(self.deltas) if self.deltas else None


def judge_rates(run_dir: Path, model: str, steps: int, guidance: float, eval_prompts, seeds=(0, 1, 2, 3),
                colour: str = "red", grid_path: Path | None = None) -> dict:
    """J_eval, LoRA off vs on: the share of evaluation images judged `colour`, and prompt accuracy on
    prompts the reward never saw (UNRELATED_PROMPTS; every attribute they name must be right)."""
    import torch

    from dcustom.models import load_pipeline
    from dcustom.toyworld.judges import load_judge
    from dcustom.trainers.reward.lora import lora_scale
    from dcustom.trainers.reward.policies import NoGrad
    from dcustom.trainers.reward.sampler import RewardSampler
    from dcustom.trainers.reward.toy_rewards import prompt_accuracy

    pipe = load_pipeline(model, device="cpu", dtype="fp32")
    pipe.load_lora_weights(str(run_dir))
    judge = load_judge("eval")
    sampler = RewardSampler(pipe, steps=steps, guidance_scale=guidance)

    def draw(prompts):
        with torch.no_grad():
            cond = sampler.encode(list(prompts))
            return torch.cat([sampler.rollout(cond, NoGrad(), generator=torch.Generator().manual_seed(s)).images
                              for s in seeds])

    out = {"target": colour, "seeds": list(seeds), "unrelated_prompts": list(UNRELATED_PROMPTS)}
    drawn = {}
    for label, scale in (("base", 0.0), ("tuned", 1.0)):
        with lora_scale(pipe.unet, scale):
            images = draw(eval_prompts)
            labels = judge.predict(images)["colour"]["labels"]
            out[f"target_rate_{label}"] = sum(x == colour for x in labels) / len(labels)
            unrelated = draw(UNRELATED_PROMPTS)
            out[f"unrelated_{label}"] = prompt_accuracy(judge, unrelated, list(UNRELATED_PROMPTS) * len(seeds))
        drawn[label] = (images, unrelated)
    out["unrelated_ratio"] = out["unrelated_tuned"] / out["unrelated_base"] if out["unrelated_base"] else None
    if grid_path is not None:
        out["grid"] = _save_judged_grid(drawn, len(eval_prompts), len(UNRELATED_PROMPTS), len(seeds), grid_path)
    return out


def _save_judged_grid(drawn: dict, n_eval: int, n_unrelated: int, n_seeds: int, path: Path) -> str:
    """Columns: the evaluation prompts, then the unrelated ones; rows: base then tuned, per seed."""
    import numpy as np
    from PIL import Image

    from dcustom.toyworld.render import grid

    def pil(t):
        return Image.fromarray((t.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy().astype(np.uint8))

    cells = []
    for s in range(n_seeds):
        for label in ("base", "tuned"):
            ev, un = drawn[label]
            cells += [pil(ev[s * n_eval + p]) for p in range(n_eval)] + [pil(un[s * n_unrelated + p]) for p in range(n_unrelated)]
    path.parent.mkdir(parents=True, exist_ok=True)
    grid(cells, columns=n_eval + n_unrelated).save(path)
    return str(path)


def train_policy(config_path, policy: str, out_dir: str, overrides=()) -> dict:
    """One policy's run and its figures; meant to run in a fresh process (see run_policies)."""
    import torch

    from dcustom.config import load_config
    from dcustom.trainers.reward.config import RewardTrainConfig
    from dcustom.trainers.reward.trainer import run

    torch.set_num_threads(1)  # the published CPU seconds are one thread's
    cfg = load_config(RewardTrainConfig, config_path,
                      overrides=list(overrides) + [f"policy.name={policy}", f"train.output_dir={Path(out_dir) / policy}",
                                                   "eval.best_of_n=true"])
    mem0, clock = _rss_mb(), StepClock()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run(cfg, on_event=clock, progress=False)
    cpu, wall, mem1 = time.process_time() - cpu0, time.perf_counter() - wall0, _rss_mb()
    report = json.loads((Path(result.run_dir) / "reward_report.json").read_text())
    evals, gap, bon = report["evaluations"], report["hacking_gap"], report.get("best_of_n") or {}
    row = {"status": result.status, "updates": result.step, "run_dir": str(result.run_dir), "threads": torch.get_num_threads(),
           "reward_eval_base": evals[0]["reward_eval"], "reward_eval_final": evals[-1]["reward_eval"],
           "reward_train_base": evals[0]["reward_train"], "reward_train_final": evals[-1]["reward_train"],
           "j_eval_gain": gap["eval_gain"] if gap else None, "j_train_gain": gap["train_gain"] if gap else None,
           "hacking_gap": gap["gap"] if gap else None, "best_of_n": bon,
           "beats_best_of_n": bon.get("reward_eval") is not None and evals[-1]["reward_eval"] > bon["reward_eval"],
           "cpu_seconds_run": round(cpu, 1), "wall_seconds_run": round(wall, 1),
           "cpu_s_per_update": None if clock.per_update() is None else round(clock.per_update(), 3),
           "peak_rss_mb": None if mem1["peak"] is None else round(mem1["peak"], 1),
           "peak_rss_above_start_mb": None if None in (mem1["peak"], mem0["current"]) else round(mem1["peak"] - mem0["current"], 1),
           "expected_grad_calls_per_trajectory": report.get("expected_grad_calls_per_trajectory")}
    row["judged"] = judge_rates(Path(result.run_dir), cfg.model, cfg.sampler.steps, cfg.sampler.guidance,
                                report["eval_prompts"], colour=(cfg.reward.options or {}).get("value", "red"),
                                grid_path=Path(result.run_dir) / "judged.png")
    return row


def run_policies(config_path, policies=POLICIES, out_dir="runs/eval_reward", overrides=(), on_stage=None) -> dict:
    """Train one LoRA per policy from the same config and seed, each in a fresh process so that its peak
    memory is its own; returns (and writes) reward_policies.json."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    say = on_stage or (lambda _m: None)
    out = Path(out_dir)
    table = {"config": str(config_path), "overrides": list(overrides), "policies": {}}
    ctx = multiprocessing.get_context("spawn")
    for policy in policies:
        say(f"{policy}: training and judging (a fresh process, one thread)")
        with ProcessPoolExecutor(1, mp_context=ctx) as pool:
            table["policies"][policy] = pool.submit(train_policy, str(config_path), policy, str(out),
                                                    list(overrides)).result()
        _write(table, out)  # after each policy: a long run that is stopped keeps what it measured
    table["file"] = str(out / "reward_policies.json")
    return table


def _write(table: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".reward_policies.json.tmp"
    tmp.write_text(json.dumps(table, indent=2, default=str))
    tmp.replace(out / "reward_policies.json")


def format_table(table: dict) -> str:
    lines = [f"{'policy':22s} {'J_eval base→final':>18s} {'gain':>6s} {'best-of-N':>10s} {'hack gap':>9s} "
             f"{'target off→on':>13s} {'unrelated off→on':>17s} {'CPU s/upd':>9s} {'peak MB':>8s}"]
    r = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    for name, row in table["policies"].items():
        j = row["judged"]
        bon = row["best_of_n"].get("reward_eval")
        lines.append(f"{name:22s} {r(row['reward_eval_base']):>8s}→{r(row['reward_eval_final']):<8s} "
                     f"{r(row['j_eval_gain']):>6s} {r(bon):>10s} {r(row['hacking_gap']):>9s} "
                     f"{r(j['target_rate_base'])}→{r(j['target_rate_tuned']):<6s} "
                     f"{r(j['unrelated_base'])}→{r(j['unrelated_tuned']):<11s} {r(row['cpu_s_per_update']):>9s} "
                     f"{r(row['peak_rss_mb']):>8s}")
    return "\n".join(lines)
