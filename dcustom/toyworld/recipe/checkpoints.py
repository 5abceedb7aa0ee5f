"""The recipe's checkpoints: checkpoints/step-N/ (N counts optimizer steps over all stages), and resume.

A checkpoint holds whole modules, not just what the current stage trains, because the next stage
starts from all of them: text_encoder, vae, unet, text_probe (and ema_unet once the UNet stage has
begun) as safetensors, optimizer.pt (optimizer + LR schedule, loaded with weights_only; absent at a
stage's end, where the next stage builds a new optimizer) and state.json (stage, step, global_step,
curve, the VAE's scaling factor, the architecture, wall time so far). No RNG state: every draw comes
from the step's own generator. These names are what running recipes resume from: keep them.

Written under a temp name and renamed, as `trainers.run_folder` does; old ones are renamed before they
are deleted (run_folder.remove_folder), so a kill never leaves a half checkpoint that resume would pick.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from dcustom.config import to_dict
from dcustom.errors import DcustomError
from dcustom.trainers.run_folder import CHECKPOINT_PREFIX, remove_folder, step_dirs

MODULE_FILES = (("text_encoder", "text_encoder.safetensors"), ("vae", "vae.safetensors"),
                ("unet", "unet.safetensors"), ("probe", "text_probe.safetensors"))
EMA_FILE = "ema_unet.safetensors"
OPTIMIZER_FILE = "optimizer.pt"


def save_state(module: nn.Module, path: Path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_state(module: nn.Module, path: Path):
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


def save(run) -> Path:
    """Write `run`'s checkpoint at its global step, then keep only the newest cfg.keep_checkpoints (at least 1)."""
    ck_root = run.dir / "checkpoints"
    final = ck_root / f"{CHECKPOINT_PREFIX}{run.global_step}"
    tmp = ck_root / f".{final.name}.tmp"  # a leading dot: never listed as a checkpoint
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    for attr, name in MODULE_FILES:
        save_state(getattr(run, attr), tmp / name)
    if run.ema is not None:
        save_state(run.ema, tmp / EMA_FILE)
    if run.optimizer is not None:
        torch.save({"optimizer": run.optimizer.state_dict(), "lr_scheduler": run.lr_sched.state_dict()},
                   tmp / OPTIMIZER_FILE)
    state = {"model": to_dict(run.cfg.model), "stage": run.stage, "step": run.step,
             "global_step": run.global_step, "curve": run.curve,
             "scaling_factor": run.vae.config.scaling_factor, "train_seconds": round(run.elapsed_seconds(), 1)}
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if final.exists():
        remove_folder(final)
    tmp.rename(final)
    for leftover in ck_root.glob(f"{CHECKPOINT_PREFIX}*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a kill during an earlier prune
    for old in step_dirs(run.dir)[:-max(1, run.cfg.keep_checkpoints)]:
        remove_folder(old)
    run.event({"event": "save", "path": str(final)})
    return final


def latest(run_dir: Path) -> Path | None:
    """The newest checkpoint folder of a run (one with its state.json, which is written last), or None."""
    found = [p for p in step_dirs(run_dir) if (p / "state.json").is_file()]
    return found[-1] if found else None


def restore(run, path: Path):
    """Load checkpoint `path` into `run`: weights, stage and step, curve, and the stage's optimizer state."""
    state = json.loads((path / "state.json").read_text())
    _check_same_architecture(run, path, state)
    for attr, name in MODULE_FILES:
        load_state(getattr(run, attr), path / name)
    run.vae.register_to_config(scaling_factor=state["scaling_factor"])
    run.stage, run.step, run.global_step = state["stage"], state["step"], state["global_step"]
    run.curve = state["curve"]
    run.seconds_before, run.started = state.get("train_seconds", 0.0), time.time()
    run.stage_setup(run.stage)  # builds the optimizer (and the EMA copy) the saved states load into
    if (path / EMA_FILE).is_file():
        load_state(run.ema, path / EMA_FILE)
    if (path / OPTIMIZER_FILE).is_file():
        opt = torch.load(path / OPTIMIZER_FILE, map_location=run.device, weights_only=True)
        run.optimizer.load_state_dict(opt["optimizer"])
        run.lr_sched.load_state_dict(opt["lr_scheduler"])
    run.log(f"resumed from {path} (stage {run.stage}, step {run.step})")


def _check_same_architecture(run, path: Path, state: dict):
    """A checkpoint of another architecture cannot continue this run: say so before loading anything."""
    from safetensors import safe_open

    mine = to_dict(run.cfg.model)
    theirs = state.get("model")
    if theirs is not None:
        diff = [k for k in mine if theirs.get(k) != mine[k]]
        if diff:
            k = diff[0]
            raise DcustomError(f"cannot resume from {path}: it was trained with model.{k}={theirs.get(k)!r} but the "
                               f"config says model.{k}={mine[k]!r}; use that value, or a new output_dir to start afresh.")
        return
    # Older checkpoints carry no architecture: compare tensor shapes instead.
    for name, module in (("vae", run.vae), ("unet", run.unet), ("text_encoder", run.text_encoder)):
        with safe_open(str(path / f"{name}.safetensors"), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        for key, tensor in module.state_dict().items():
            if shapes.get(key) != tuple(tensor.shape):
                raise DcustomError(f"cannot resume from {path}: its {name} has another architecture ({key} is "
                                   f"{shapes.get(key)}, the config builds {tuple(tensor.shape)}); use the "
                                   f"config it was trained with, or a new output_dir to start afresh.")
