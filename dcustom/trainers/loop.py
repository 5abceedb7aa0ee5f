"""The shared training shell: every trainer (LoRA/OFT/BOFT, textual inversion, ESD, reward) runs here.

A method plugs in by subclassing `TrainingMethod` (the contract, below) and calling
``run_training(method, loop_cfg, run_config=cfg)``. What the loop does: accelerate (devices, autocast,
fp16 grad scaling, process groups), gradient accumulation, clipping, AdamW (bitsandbytes 8-bit on CUDA
when installed), LR schedule with warmup, seeding, NaN/inf-loss stop, events (``events.jsonl`` + rich
bar + ``on_event`` callback), cancellation (``should_stop`` callable/Event, or a ``STOP`` file in the
run folder), atomic checkpoints ``checkpoints/step-N/`` and exact resume (weights, optimizer,
scheduler, step, RNG). Where a run writes and how checkpoints are kept (never a pickle, never over a
finished run) is `dcustom.trainers.run_folder`.

Run folder: config.yaml, events.jsonl, samples/, checkpoints/step-N/, the final files of ``save``.
Torch is imported inside functions so config modules can import LoopConfig cheaply.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from dcustom.config import check_values, opt, save_yaml
from dcustom.errors import DcustomError
from dcustom.outputs import writable_folder
from dcustom.trainers.run_folder import (check_outside_inputs, choose_run_dir, find_checkpoint, load_checkpoint,
                                         rng_state, save_checkpoint)

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"


@dataclass
class LoopConfig:
    output_dir: str = opt("runs/run", "Run folder: config.yaml, events.jsonl, samples/, checkpoints/, final files. "
                                      "If it holds a finished run, a new run goes to <output_dir>-2 (-3, ...) instead.")
    steps: int = opt(800, "Optimizer steps in total (a few-image subject needs 400-1000).", ge=1)
    batch_size: int = opt(1, "Items per micro-batch (per process).", ge=1)
    grad_accum: int = opt(1, "Micro-batches accumulated per optimizer step.", ge=1)
    lr: float = opt(1e-4, "Peak learning rate.", gt=0)
    lr_scheduler: str = opt("constant_with_warmup", ", ".join(LR_SCHEDULERS) + ".", choices=LR_SCHEDULERS)
    warmup_steps: int = opt(0, "Linear warm-up steps.", ge=0)
    optimizer: str = opt("auto", "auto (8-bit AdamW on CUDA when bitsandbytes is installed, else AdamW), adamw, adamw8bit.",
                         choices=("auto", "adamw", "adamw8bit"))
    weight_decay: float = opt(1e-2, "AdamW weight decay.", ge=0)
    max_grad_norm: float = opt(1.0, "Gradient clipping norm (0 disables).", ge=0)
    mixed_precision: str = opt("auto", "auto (bf16 on CUDA if supported, else none), no, fp16, bf16. Trainable weights stay fp32.",
                               choices=("auto", "no", "fp16", "bf16"))
    seed: int = opt(0, "Seed of data order, noise and initialisation.", ge=0, le=2**31 - 1)
    gradient_checkpointing: bool = opt(False, "Trade compute for memory (about half the speed).")
    checkpoint_every: int = opt(250, "Save a resumable checkpoint every N steps (0: only when stopped).", ge=0)
    keep_checkpoints: int = opt(2, "Checkpoints kept (oldest removed first; 0 keeps all).", ge=0)
    sample_every: int = opt(0, "Write validation samples every N steps (0: only at the end).", ge=0)
    resume: Optional[str] = opt(None, "Resume from 'latest', a step number, or a checkpoint folder.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N, mps.")

    def __post_init__(self):
        if not re.fullmatch(DEVICE_PATTERN, str(self.device)):
            raise ValueError(f"device {self.device!r} is not known; accepted: auto, cpu, cuda, cuda:N, mps")


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


class TrainingMethod:
    """What a method supplies to `run_training`: subclass it and override the first four; the rest have defaults.

    The loop calls, in order: `setup` once, then per optimizer step `training_step` for each micro-batch and
    `after_optimizer_step`; `sample` every ``sample_every`` steps and at the end; `save` for each checkpoint
    folder and once for the run folder at the end; `extra_state` / `load_extra_state` with each checkpoint.
    A class that does not subclass it works too, as long as it has the four required methods.
    """

    def setup(self, ctx: LoopContext) -> Sequence:
        """Load models, freeze what is frozen, add adapters; return the training items: any sized, indexable
        sequence (images, prompts, ``range(n)``). The LOOP owns the order: it draws ``batch_size`` items per
        micro-batch from a seeded per-epoch permutation, so data order is a pure function of the step and resume
        needs no sampler state. Honour ``ctx.cfg.gradient_checkpointing`` on your own models."""
        raise NotImplementedError

    def trainable_parameters(self) -> dict:
        """{stable name: torch.nn.Parameter} (checkpoints store them by name). The loop casts them to fp32,
        builds the optimizer over them and all-reduces their gradients across ranks."""
        raise NotImplementedError

    def training_step(self, batch: list, step: int):
        """One micro-batch (a list of items from `setup`'s sequence) -> a scalar loss tensor. Runs under
        ``accelerator.autocast()``; ``step`` is the 0-based optimizer step being accumulated. Draw noise and
        timesteps from torch's global RNG: the loop seeds it and checkpoints its state."""
        raise NotImplementedError

    def save(self, folder: Path) -> list:
        """Write the method's deliverable files (adapter, embedding...) into ``folder``; main process only."""
        raise NotImplementedError

    def after_optimizer_step(self, step: int) -> None:
        """After each optimizer step (``step`` = steps done so far): e.g. re-impose a constraint."""

    def sample(self, step: int, folder: Path) -> list:
        """Validation images into ``folder`` (main process, no grad, forked RNG); returns their paths."""
        return []

    def validate(self, step: int, run_dir: Path) -> Optional[dict]:
        """Right after `sample`, same conditions: scores of the model at ``step`` (JSON-able), emitted as a
        "validation" event; None when the method measures nothing."""
        return None

    def extra_state(self) -> dict:
        """JSON-able state that is not a parameter, stored with each checkpoint."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what `extra_state` returned, on resume."""


REQUIRED = ("setup", "trainable_parameters", "training_step", "save")


def _hook(method, name: str) -> Callable:
    """`method.<name>`, or TrainingMethod's default when a method that does not subclass it leaves it out."""
    own = getattr(method, name, None)
    return own if own is not None else functools.partial(getattr(TrainingMethod, name), method)


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
    """Train `method` (a TrainingMethod) under `cfg`; returns where the run stopped and its files."""
    import contextlib
    import math

    import torch
    from accelerate import Accelerator
    from accelerate.utils import set_seed
    from diffusers.optimization import get_scheduler

    from dcustom.models import resolve_device

    missing = [name for name in REQUIRED if not callable(getattr(method, name, None))]
    if missing:
        raise TypeError(f"{type(method).__name__} has no {missing[0]}(); a training method needs "
                        f"{', '.join(REQUIRED)} (see dcustom.trainers.loop.TrainingMethod).")
    if dataclasses.is_dataclass(run_config):  # the Python API gets the checks a YAML file gets
        check_values(run_config, "")
    check_values(cfg, "train")
    device = resolve_device(cfg.device)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision, device), cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    run_dir = choose_run_dir(cfg.output_dir, cfg.resume)
    check_outside_inputs(run_dir, run_config)
    if str(run_dir) != cfg.output_dir:
        old, cfg = cfg, dataclasses.replace(cfg, output_dir=str(run_dir))
        if run_config is not None and getattr(run_config, "train", None) is old:
            run_config = dataclasses.replace(run_config, train=cfg)  # config.yaml records where the run went
    accelerator.wait_for_everyone()  # every rank has chosen the folder before any creates it
    is_main = accelerator.is_main_process
    if is_main:
        writable_folder(run_dir, "train.output_dir")  # before any model loads: a bad folder costs nothing
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
        step, extra = load_checkpoint(find_checkpoint(run_dir, cfg.resume), params, optimizer.optimizer, scheduler,
                                      accelerator.process_index)
        _hook(method, "load_extra_state")(extra)
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
            _hook(method, "after_optimizer_step")(step)
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
    rng_states = gather_object([rng_state()]) if accelerator.num_processes > 1 else [rng_state()]
    if accelerator.is_main_process:
        path = save_checkpoint(run_dir, step, params, optimizer.optimizer, scheduler, cfg.keep_checkpoints, rng_states,
                               _hook(method, "extra_state")(), method.save)
        events.emit("save", step=step, folder=str(path), checkpoint=True)
    accelerator.wait_for_everyone()


def _sample(method, step: int, run_dir: Path, events: EventLog, is_main: bool) -> None:
    """Validation images; forked RNG so sampling never changes the training trajectory."""
    import torch

    sample = getattr(method, "sample", None)
    if not is_main or sample is None:  # a method that does not subclass TrainingMethod may have no samples
        return
    folder = run_dir / "samples" / f"step-{step}"
    folder.mkdir(parents=True, exist_ok=True)
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        paths = sample(step, folder)
        scores = _hook(method, "validate")(step, run_dir)
    if paths:
        events.emit("sample", step=step, paths=[str(p) for p in paths])
    if scores:
        events.emit("validation", step=step, **scores)
