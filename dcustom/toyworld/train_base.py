"""`dcustom toyworld train-base`: the reproducible recipe that trains the toy model from a seed.

Three stages, each resumable at any step:
1. text: the CLIPTextModel learns the grammar — each attribute word's token state is classified as its
   attribute value (synonyms become one concept) and the end-of-text/padding states as the whole
   caption's attributes. Then it is frozen: the UNet gets a fixed, clean conditioning from step 0.
2. vae: AutoencoderKL 64x64 <-> 16x16x4 with an object-weighted reconstruction loss; the pool is then
   encoded once and the latent scaling factor set from the latents' std (as SD does).
3. unet: epsilon-prediction on cached latents with an object-weighted, min-SNR-weighted loss,
   condition dropout for classifier-free guidance, warmup + cosine LR, EMA weights.

Every random draw of step s comes from a generator seeded by (seed, stage, s), so resume is exact:
checkpoints hold the weights, the optimizer and LR-scheduler states and the step.

This module is the driver: `run` walks the stages and owns the step loop, the time budget and the
export. The parts live in `toyworld/recipe/` (text objective, `Run` and its stage steps, checkpoints,
learning curve, install); the names scripts import from here are re-exported below.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from dcustom.config import save_yaml, to_dict
from dcustom.toyworld.config import ToyBaseConfig
from dcustom.toyworld.recipe import checkpoints
from dcustom.toyworld.recipe.curve import measure, plot_curve
from dcustom.toyworld.recipe.install import SCORE_FILE, install, install_folder
from dcustom.toyworld.recipe.stages import STAGES, Run, step_generator, unwrap
from dcustom.toyworld.recipe.text import CaptionEncoder

# Imported from here by scripts/toy/vae_ablation.py, scripts/device/toy_base.sh, tests and ship scripts.
__all__ = ["run", "Run", "STAGES", "step_generator", "CaptionEncoder", "install", "install_folder", "SCORE_FILE",
           "plot_curve"]


def run(cfg: ToyBaseConfig, stop_after: int | None = None, log=print, on_step=None) -> Path:
    """Train (or resume) the toy model; returns the exported model folder (run_dir/model).

    stop_after: stop (with a checkpoint) once this many optimizer steps, all stages counted, are done.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg, stop_after, log, on_step)
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only


def _run(cfg: ToyBaseConfig, stop_after, log, on_step) -> Path:
    deadline = time.time() + cfg.time_budget_minutes * 60 if cfg.time_budget_minutes > 0 else None
    run_ = Run(cfg, log=log, on_step=on_step)
    resumed = False
    latest = checkpoints.latest(run_.dir) if cfg.resume else None
    if latest is not None:
        checkpoints.restore(run_, latest)
        resumed = True
    save_yaml(cfg, run_.dir / "config.yaml")
    run_.build_pool()
    run_.event({"event": "start", "resumed": resumed, "config": to_dict(cfg)})
    start_stage = STAGES.index(run_.stage)
    for stage in STAGES[start_stage:]:
        if stage != run_.stage:  # entering a new stage from the previous one's end
            run_.stage, run_.step = stage, 0
            run_.stage_setup(stage)
        elif run_.optimizer is None:
            run_.stage_setup(stage)
        if stage == "unet":
            if cfg.text.freeze_after:
                run_.text_encoder.requires_grad_(False).eval()
            run_.encode_pool()
            if cfg.compile and run_.device.type == "cuda":
                run_.unet = torch.compile(run_.unet)
        total = run_.stage_steps(stage)
        if stage == "unet" and run_.step == 0 and total > 0 and not any(p["step"] == 0 for p in run_.curve):
            measure(run_, None)  # the untrained baseline: the curve starts at chance
        step_fn = {"text": run_.text_step, "vae": run_.vae_step, "unet": run_.unet_step}[stage]
        t0, loss_avg = time.time(), None
        while run_.step < total:
            if stop_after is not None and run_.global_step >= stop_after:
                checkpoints.save(run_)
                log(f"stopped after {run_.global_step} steps (checkpoint saved)")
                return run_.dir
            if deadline is not None and time.time() >= deadline:
                return out_of_time(run_, stage, round(loss_avg, 5) if loss_avg is not None else None)
            loss = step_fn(step_generator(cfg.seed, stage, run_.step, run_.device))
            _optimizer_step(run_, stage, loss)
            run_.step += 1
            run_.global_step += 1
            value = float(loss.detach())
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            if run_.step % 50 == 0 or run_.step == total:
                run_.event({"event": "step", "stage": stage, "step": run_.step, "loss": value,
                            "lr": run_.lr_sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2)})
                log(f"[{stage}] step {run_.step}/{total} loss {loss_avg:.4f} ({time.time() - t0:.0f}s)")
            if on_step:
                on_step(stage, run_.step, total, value)
            if stage == "unet" and (run_.step % cfg.curve.every == 0 or run_.step == total):
                measure(run_, round(loss_avg, 5))
            if run_.global_step % cfg.checkpoint_every == 0:
                checkpoints.save(run_)
        run_.optimizer = None
        if run_.step == total and stage != "unet":
            checkpoints.save(run_)  # stage boundary: resume never redoes a finished stage
    return finish(run_)


def _optimizer_step(run_: Run, stage: str, loss):
    """Backward, clip, step the optimizer and LR schedule, then move the UNet's EMA (UNet stage)."""
    cfg = run_.cfg
    run_.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for g in run_.optimizer.param_groups for p in g["params"]]
    torch.nn.utils.clip_grad_norm_(params, cfg.unet.grad_clip if stage == "unet" else 1.0)
    run_.optimizer.step()
    run_.lr_sched.step()
    if stage == "unet" and run_.ema is not None:
        with torch.no_grad():
            # EMA warmup: early on the average follows the weights (else a short run evaluates its init)
            decay = min(cfg.unet.ema_decay, (1 + run_.step) / (10 + run_.step))
            torch._foreach_lerp_(list(run_.ema.parameters()), list(unwrap(run_.unet).parameters()), 1 - decay)


def out_of_time(run_: Run, stage: str, loss: float | None) -> Path:
    """The time budget ran out: keep everything resumable; inside the UNet stage also export the
    current EMA model (measured first, so its curve point is the one install checks)."""
    run_.log(f"time budget of {run_.cfg.time_budget_minutes} min used up at {stage} step {run_.step}")
    run_.event({"event": "budget", "stage": stage, "step": run_.step})
    if stage != "unet" or run_.step == 0:
        checkpoints.save(run_)
        return run_.dir
    if not run_.curve or run_.curve[-1]["step"] != run_.step:
        measure(run_, loss)
    return finish(run_, partial=True)


def finish(run_: Run, partial: bool = False) -> Path:
    from dcustom.toyworld.model import save_model_folder

    cfg = run_.cfg
    run_.unet = unwrap(run_.unet)
    pipe = run_.pipeline(use_ema=True)  # export the EMA weights; the checkpoint keeps both, so a run can be extended
    out = save_model_folder(pipe, run_.dir / "model")
    checkpoints.save(run_)
    run_.event({"event": "end", "model": str(out), "partial": partial, "unet_step": run_.step})
    run_.log(f"model written to {out}" + (f" (partial: UNet step {run_.step} of {cfg.unet.steps})" if partial else ""))
    if cfg.install:
        install(run_.curve, out, cfg.install_min_shape_accuracy, run_.log)
    return out
