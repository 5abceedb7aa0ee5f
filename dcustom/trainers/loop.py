"""The shared training shell: every trainer (LoRA/OFT/BOFT, textual inversion, ESD, reward) runs here.

How a method plugs in
---------------------
Write a plain class with these methods and call ``run_training(method, loop_cfg, run_config=cfg)``:

    setup(ctx) -> Sequence
        Load models, freeze what is frozen, add adapters. Return the training items: any sized,
        indexable sequence (images, prompts, ``range(n)``). The LOOP owns the order: it draws
        ``batch_size`` items per micro-batch from a seeded per-epoch permutation, so data order is a
        pure function of the step and resume needs no sampler state.
        ``ctx`` (LoopContext) gives: accelerator, device, weight_dtype (dtype for FROZEN weights under
        mixed precision), cfg (LoopConfig), run_dir, rank, num_processes, is_main.
        Honour ``ctx.cfg.gradient_checkpointing`` on your own models.
    trainable_parameters() -> dict[str, torch.nn.Parameter]
        Named trainable parameters (stable names: checkpoints store them by name). The loop casts
        them to fp32, builds the optimizer over them and all-reduces their gradients across ranks.
    training_step(batch: list, step: int) -> torch.Tensor
        One micro-batch (a list of items from setup's sequence); return a scalar loss. It runs under
        ``accelerator.autocast()``; ``step`` is the 0-based optimizer step being accumulated.
        Use torch's global RNG (the loop seeds it and checkpoints its state) for noise/timesteps.
    after_optimizer_step(step: int) -> None
        Called after each optimizer step (``step`` = steps done so far): e.g. re-impose a constraint.
    save(folder: Path) -> list[Path]
        Write the method's deliverable files (adapter, embedding...) into ``folder``; main process only.
        Called for each checkpoint folder and once for the run folder at the end.
Optional:
    sample(step: int, folder: Path) -> list[Path]   validation images every ``sample_every`` steps.
    extra_state() -> dict / load_extra_state(dict)  JSON-able state that is not a parameter.

What the loop does: accelerate (devices, autocast, fp16 grad scaling, process groups), gradient
accumulation, clipping, AdamW (bitsandbytes 8-bit on CUDA when installed), LR schedule with
warmup, seeding, NaN/inf-loss stop, events (``events.jsonl`` + rich bar + ``on_event`` callback),
cancellation (``should_stop`` callable/Event, or a ``STOP`` file in the run folder), atomic
checkpoints ``checkpoints/step-N/`` and exact resume (weights, optimizer, scheduler, step, RNG).

Run folder: config.yaml, events.jsonl, samples/, checkpoints/step-N/, the final files of ``save``.
Torch is imported inside functions so config modules can import LoopConfig cheaply.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dcustom.config import opt, save_yaml
from dcustom.errors import DcustomError

CHECKPOINT_PREFIX = "step-"


@dataclass
class LoopConfig:
    output_dir: str = opt("runs/run", "Run folder: config.yaml, events.jsonl, samples/, checkpoints/, final files.")
    steps: int = opt(800, "Optimizer steps in total (a few-image subject needs 400-1000).")
    batch_size: int = opt(1, "Items per micro-batch (per process).")
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.")
    lr: float = opt(1e-4, "Peak learning rate.")
    lr_scheduler: str = opt("constant_with_warmup", "constant, constant_with_warmup, linear, cosine, polynomial.")
    warmup_steps: int = opt(0, "Linear warm-up steps.")
    optimizer: str = opt("auto", "auto (8-bit AdamW on CUDA when bitsandbytes is installed, else AdamW), adamw, adamw8bit.")
    weight_decay: float = opt(1e-2, "AdamW weight decay.")
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).")
    mixed_precision: str = opt("auto", "auto (bf16 on CUDA if supported, else none), no, fp16, bf16. Trainable weights stay fp32.")
    seed: int = opt(0, "Seed of data order, noise and initialisation.")
    gradient_checkpointing: bool = opt(False, "Trade compute for memory (about half the speed).")
    checkpoint_every: int = opt(250, "Save a resumable checkpoint every N steps (0: only when stopped).")
    keep_checkpoints: int = opt(2, "Checkpoints kept (oldest removed first; 0 keeps all).")
    sample_every: int = opt(0, "Write validation samples every N steps (0: only at the end).")
    resume: Optional[str] = opt(None, "Resume from 'latest', a step number, or a checkpoint folder.")
    device: str = opt("auto", "auto, cpu, cuda.")


@dataclass
class LoopContext:
    accelerator: Any
    device: Any
    weight_dtype: Any
    cfg: LoopConfig
    run_dir: Path
    rank: int
    num_processes: int
    is_main: bool


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    status: str  # "finished" | "cancelled"
    files: list
    last_loss: Optional[float]

    def __str__(self) -> str:
        return f"{self.status} at step {self.step}: {self.run_dir}"


class EventLog:
    """Appends events to events.jsonl (main process) and forwards them to a callback and a bar."""

    def __init__(self, path: Optional[Path], callback=None, bar=None):
        self.path, self.callback, self.bar = path, callback, bar

    def emit(self, event: str, **payload) -> dict:
        record = {"event": event, "time": round(time.time(), 3), **payload}
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")
        if self.bar is not None and event == "step":
            self.bar(payload["step"], payload["total"])
        if self.callback is not None:
            self.callback(record)
        return record


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def find_checkpoint(run_dir: Path, resume: str) -> Path:
    """'latest', a step number or a folder -> the checkpoint folder, or one clear error."""
    existing = checkpoint_dirs(run_dir)
    if resume == "latest":
        if not existing:
            raise DcustomError(f"resume: 'latest' found no checkpoint under {str(Path(run_dir) / 'checkpoints')!r}.")
        return existing[-1]
    if str(resume).isdigit():
        path = Path(run_dir) / "checkpoints" / f"{CHECKPOINT_PREFIX}{int(resume)}"
    else:
        path = Path(resume)
    if not (path / "state.json").is_file():
        names = ", ".join(p.name for p in existing) or "none"
        raise DcustomError(f"resume: {str(path)!r} is not a checkpoint folder; accepted: 'latest', a step number "
                           f"or a checkpoints/step-N folder (this run has: {names}).")
    return path


def _mixed_precision(name: str, device: str) -> str:
    import torch

    if name == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "no"
    if name not in ("no", "fp16", "bf16"):
        raise DcustomError(f"train.mixed_precision: {name!r} is not known; accepted: auto, no, fp16, bf16.")
    return name


def _make_optimizer(cfg: LoopConfig, params: list, device_type: str):
    import torch

    want = cfg.optimizer
    if want not in ("auto", "adamw", "adamw8bit"):
        raise DcustomError(f"train.optimizer: {want!r} is not known; accepted: auto, adamw, adamw8bit.")
    if want in ("auto", "adamw8bit") and device_type == "cuda":
        try:
            import bitsandbytes as bnb

            return bnb.optim.AdamW8bit(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        except ImportError:
            if want == "adamw8bit":
                raise DcustomError("train.optimizer: 'adamw8bit' needs bitsandbytes (pip install 'dcustom[gpu]'); or use 'adamw'.") from None
    elif want == "adamw8bit":
        raise DcustomError("train.optimizer: 'adamw8bit' runs on CUDA only; use 'adamw' on this device.")
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _batch_indices(micro_index: int, batch_size: int, n_items: int, seed: int, rank: int, world: int) -> list[int]:
    """Item indices of one micro-batch: positions in a stream of seeded per-epoch permutations."""
    import torch

    start = (micro_index * world + rank) * batch_size
    out = []
    for pos in range(start, start + batch_size):
        epoch, offset = divmod(pos, n_items)
        perm = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
        out.append(int(perm[offset]))
    return out


def _rng_state() -> dict:
    import random

    import numpy as np
    import torch

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _save_checkpoint(run_dir: Path, step: int, method, params: dict, optimizer, scheduler, keep: int,
                     rng_states: list) -> Path:
    """Write checkpoints/step-N under a temp name, then rename: a crash never leaves half a checkpoint."""
    import pickle

    import torch
    from safetensors.torch import save_file

    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().float().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    # RNG states hold Python tuples that weights_only loading refuses; we wrote them ourselves.
    (tmp / "rng.pkl").write_bytes(pickle.dumps(rng_states))  # one state per rank
    extra = method.extra_state() if hasattr(method, "extra_state") else {}
    (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra}))
    method.save(tmp)
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    if keep > 0:
        for old in checkpoint_dirs(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load_checkpoint(path: Path, method, params: dict, optimizer, scheduler, rank: int = 0) -> int:
    import pickle

    import torch
    from safetensors.torch import load_file

    saved = load_file(str(path / "trainable.safetensors"))
    missing = sorted(set(params) - set(saved))
    if missing:
        raise DcustomError(f"resume: checkpoint {str(path)!r} lacks trainable parameter {missing[0]!r}; it was made by a different method or config.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt_state["optimizer"])
    scheduler.load_state_dict(opt_state["scheduler"])
    state = json.loads((path / "state.json").read_text())
    if hasattr(method, "load_extra_state"):
        method.load_extra_state(state.get("extra", {}))
    states = pickle.loads((path / "rng.pkl").read_bytes())
    _set_rng_state(states[rank] if rank < len(states) else states[0])
    return int(state["step"])


def _all_reduce_grads(accelerator, params: list) -> None:
    """Average gradients over processes in one flat buffer (no DDP wrapper: methods own their models)."""
    import torch

    if accelerator.num_processes == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    flat = accelerator.reduce(flat, reduction="mean")
    offset = 0
    for p, g in zip(params, grads):
        n = g.numel()
        p.grad = flat[offset:offset + n].view_as(p).to(p.dtype)
        offset += n


def run_training(method, cfg: LoopConfig, run_config=None, on_event: Optional[Callable[[dict], None]] = None,
                 should_stop=None, progress: bool = True) -> TrainResult:
    """Train `method` (see module doc) under `cfg`; returns where the run stopped and its files."""
    import contextlib
    import math

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from dcustom.models import resolve_device

    device = resolve_device(cfg.device)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision, device), cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    run_dir = Path(cfg.output_dir)
    is_main = accelerator.is_main_process
    if is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "samples").mkdir(exist_ok=True)
        if run_config is not None:
            save_yaml(run_config, run_dir / "config.yaml")
    accelerator.wait_for_everyone()
    set_seed(cfg.seed)  # same seed on every rank: adapter initialisation must be identical

    ctx = LoopContext(accelerator, accelerator.device, weight_dtype, cfg, run_dir, accelerator.process_index,
                      accelerator.num_processes, is_main)
    items = method.setup(ctx)
    if len(items) == 0:
        raise DcustomError("training data: the method produced no training items.")
    params = dict(method.trainable_parameters())
    if not params:
        raise DcustomError("training: the method has no trainable parameters.")
    for p in params.values():  # fp32 master weights: fp16 params cannot be unscaled and drift in bf16
        p.data = p.data.float()
        p.requires_grad_(True)
    param_list = list(params.values())
    if accelerator.num_processes > 1:
        import torch.distributed as dist

        for p in param_list:  # belt and braces: every rank starts from rank 0's weights
            dist.broadcast(p.data, src=0)
    set_seed(cfg.seed + accelerator.process_index)  # but different noise and augmentation per rank
    optimizer = accelerator.prepare_optimizer(_make_optimizer(cfg, param_list, accelerator.device.type))
    try:
        scheduler = get_scheduler(cfg.lr_scheduler, optimizer.optimizer, num_warmup_steps=cfg.warmup_steps,
                                  num_training_steps=cfg.steps)
    except ValueError:
        raise DcustomError(f"train.lr_scheduler: {cfg.lr_scheduler!r} is not known; accepted: constant, "
                           "constant_with_warmup, linear, cosine, polynomial.") from None

    step = 0
    if cfg.resume:
        step = _load_checkpoint(find_checkpoint(run_dir, cfg.resume), method, params, optimizer.optimizer, scheduler,
                                accelerator.process_index)
    bar_cm = contextlib.nullcontext(None)
    if progress and is_main:
        from dcustom.progress import step_progress

        bar_cm = step_progress(f"training {run_dir.name}", cfg.steps)
    status, last_loss, files = "finished", None, []
    stop_file = run_dir / "STOP"
    with bar_cm as bar:
        events = EventLog(run_dir / "events.jsonl" if is_main else None, on_event if is_main else None, bar)
        if step and bar is not None:
            bar(step, cfg.steps)
        t0 = time.perf_counter()
        while step < cfg.steps:
            if is_main and (stop_file.exists() or _stop_requested(should_stop)):
                accelerator.set_trigger()
            if accelerator.check_trigger():
                status = "cancelled"
                break
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch_ids = _batch_indices(step * cfg.grad_accum + micro, cfg.batch_size, len(items), cfg.seed,
                                           accelerator.process_index, accelerator.num_processes)
                with accelerator.autocast():
                    loss = method.training_step([items[i] for i in batch_ids], step)
                value = float(loss.detach())
                if not math.isfinite(value):
                    events.emit("end", status="failed", step=step, reason=f"loss is {value}")
                    raise DcustomError(
                        f"training stopped at step {step}: the loss became {value}; lower train.lr, use "
                        "train.mixed_precision=bf16 or no instead of fp16, or check the input images.")
                accelerator.backward(loss / cfg.grad_accum)
                total += value / cfg.grad_accum
            _all_reduce_grads(accelerator, param_list)
            if cfg.max_grad_norm > 0:
                accelerator.clip_grad_norm_(param_list, cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            method.after_optimizer_step(step)
            last_loss = total
            events.emit("step", step=step, total=cfg.steps, loss=total, lr=scheduler.get_last_lr()[0],
                        elapsed_s=round(time.perf_counter() - t0, 3))
            if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.steps:
                _sample(method, step, run_dir, events, is_main)
            if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.steps:
                _checkpoint(accelerator, run_dir, step, method, params, optimizer, scheduler, cfg, events)
        if status == "cancelled" or step < cfg.steps:
            _checkpoint(accelerator, run_dir, step, method, params, optimizer, scheduler, cfg, events)
        else:
            if is_main:
                files = [str(p) for p in method.save(run_dir)]
                events.emit("save", step=step, folder=str(run_dir), files=files)
            _sample(method, step, run_dir, events, is_main)
        accelerator.wait_for_everyone()
        events.emit("end", status=status, step=step, loss=last_loss, files=files)
    return TrainResult(run_dir, step, status, files, last_loss)


def _stop_requested(should_stop) -> bool:
    if should_stop is None:
        return False
    return should_stop.is_set() if hasattr(should_stop, "is_set") else bool(should_stop())


def _checkpoint(accelerator, run_dir, step, method, params, optimizer, scheduler, cfg, events) -> None:
    from accelerate.utils import gather_object

    accelerator.wait_for_everyone()
    rng_states = gather_object([_rng_state()]) if accelerator.num_processes > 1 else [_rng_state()]
    if accelerator.is_main_process:
        path = _save_checkpoint(run_dir, step, method, params, optimizer.optimizer, scheduler, cfg.keep_checkpoints,
                                rng_states)
        events.emit("save", step=step, folder=str(path), checkpoint=True)
    accelerator.wait_for_everyone()


def _sample(method, step: int, run_dir: Path, events: EventLog, is_main: bool) -> None:
    """Validation images; forked RNG so sampling never changes the training trajectory."""
    import torch

    if not is_main or not hasattr(method, "sample"):
        return
    folder = run_dir / "samples" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        paths = method.sample(step, folder)
    if paths:
        events.emit("sample", step=step, paths=[str(p) for p in paths])
