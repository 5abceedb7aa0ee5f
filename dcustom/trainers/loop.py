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
A finished run is never overwritten: a new run (without ``resume``) whose output folder holds one
writes to the next free ``<output_dir>-2``, ``-3``, ... and says so. Checkpoints hold only
safetensors, JSON and a ``weights_only`` optimizer file: nothing a checkpoint holds is unpickled.
Torch is imported inside functions so config modules can import LoopConfig cheaply.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from dcustom.config import check_values, opt, save_yaml
from dcustom.errors import DcustomError
from dcustom.outputs import writable_folder

log = logging.getLogger("dcustom.train")
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.pt")
RNG_FILE = "rng.json"
OLD_RNG_FILE = "rng.pkl"  # written by dcustom before RNG state became JSON; never read
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
DEVICE_PATTERN = r"auto|cpu|mps|cuda(:\d+)?"
# Files that runs not ending through this loop write last (UCE erasure, an early-stopped reward run).
FINISHED_MARKERS = ("report.json", "reward_report.json")


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


def _step_dirs(run_dir: Path) -> list[Path]:
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def is_complete_checkpoint(path: Path) -> bool:
    """All files a checkpoint is written with (old pickle-RNG ones count, so resume can refuse them by name)."""
    path = Path(path)
    return all((path / n).is_file() for n in CHECKPOINT_FILES) and any((path / n).is_file() for n in (RNG_FILE, OLD_RNG_FILE))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a folder a kill left half-deleted is not one)."""
    return [p for p in _step_dirs(run_dir) if is_complete_checkpoint(p)]


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
    if not is_complete_checkpoint(path):
        names = ", ".join(p.name for p in existing) or "none"
        raise DcustomError(f"resume: {str(path)!r} is not a checkpoint folder; accepted: 'latest', a step number "
                           f"or a checkpoints/step-N folder (this run has: {names}).")
    return path


def finished_run(run_dir: Path) -> bool:
    """True when `run_dir` holds a run that ended with its final files written."""
    run_dir = Path(run_dir)
    if any((run_dir / name).is_file() for name in FINISHED_MARKERS):
        return True
    events = run_dir / "events.jsonl"
    if not events.is_file():
        return False
    for line in events.read_text(errors="replace").splitlines():
        try:
            e = json.loads(line)
        except ValueError:
            continue  # a line cut by a kill
        if not isinstance(e, dict):
            continue
        # The final save comes before the end event: a kill between them still leaves a finished run.
        if (e.get("event") == "end" and e.get("status") == "finished") or (e.get("event") == "save" and not e.get("checkpoint")):
            return True
    return False


def choose_run_dir(output_dir: str, resume: Optional[str], key: str = "train.output_dir") -> Path:
    """The folder a run writes to: `output_dir`, or the next free `<output_dir>-N` when it holds a finished run
    and this is no resume. Writes nothing (every rank decides before any rank creates a folder)."""
    if Path(output_dir).is_file():
        raise DcustomError(f"{key}: {output_dir!r} is a file, not a folder; accepted: a folder path (created if missing).")
    run_dir = Path(output_dir)
    if not resume and finished_run(run_dir):
        base = run_dir if run_dir.name else run_dir.resolve()
        n = 2
        while base.with_name(f"{base.name}-{n}").exists():
            n += 1
        fresh = base.with_name(f"{base.name}-{n}")
        log.warning("%s %r holds a finished run, which is never overwritten; this run writes to %r "
                    "(set train.resume to continue that run instead).", key, str(run_dir), str(fresh))
        run_dir = fresh
    return run_dir


def _check_outside_inputs(run_dir: Path, run_config) -> None:
    """The image folder is only ever read: a run folder inside it would write into it."""
    images = getattr(getattr(run_config, "data", None), "images", None)
    if not images:
        return
    inputs, out = Path(images).resolve(), run_dir.resolve()
    if out == inputs or inputs in out.parents:
        raise DcustomError(f"train.output_dir: {str(run_dir)!r} is inside data.images {str(images)!r}, which dcustom never "
                           "writes to; accepted: a run folder outside the image folder.")


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
    """Every RNG the loop seeds, as JSON values: a checkpoint must never need unpickling."""
    import base64
    import random

    import numpy as np
    import torch

    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
             "python": {"version": version, "internal": list(internal), "gauss_next": gauss},
             "numpy": {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                       "cached_gaussian": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode("ascii") for s in torch.cuda.get_rng_state_all()]
    return state


def _parse_rng_state(state: dict) -> dict:
    """JSON RNG state -> the objects torch, random and numpy take; KeyError/ValueError/TypeError on damage."""
    import base64

    import numpy as np
    import torch

    def tensor(text):
        return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)

    py, npy = state["python"], state["numpy"]
    out = {"torch": tensor(state["torch"]),
           "python": (int(py["version"]), tuple(int(v) for v in py["internal"]), py["gauss_next"]),
           "numpy": (str(npy["name"]), np.array(npy["keys"], dtype=np.uint32), int(npy["pos"]), int(npy["has_gauss"]),
                     float(npy["cached_gaussian"]))}
    if "cuda" in state:
        out["cuda"] = [tensor(t) for t in state["cuda"]]
    return out


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np
    import torch

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _remove_folder(path: Path) -> None:
    """Rename, then delete: a kill while deleting leaves a `.deleting` folder that is never listed as a checkpoint."""
    trash = path.with_name(path.name + ".deleting")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def _save_checkpoint(run_dir: Path, step: int, method, params: dict, optimizer, scheduler, keep: int,
                     rng_states: list) -> Path:
    """Write checkpoints/step-N under a temp name, then rename: a crash never leaves half a checkpoint."""
    import torch
    from safetensors.torch import save_file

    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().float().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / RNG_FILE).write_text(json.dumps({"format": 1, "ranks": rng_states}))  # one state per rank
    extra = method.extra_state() if hasattr(method, "extra_state") else {}
    (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra}))
    method.save(tmp)
    if final.exists():
        _remove_folder(final)
    tmp.rename(final)
    for leftover in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a kill during an earlier prune
    complete = checkpoint_dirs(run_dir)
    stale = [p for p in _step_dirs(run_dir) if p not in complete]  # half-deleted by an older dcustom
    if keep > 0:
        stale += complete[:-keep]
    for old in stale:
        _remove_folder(old)
    return final


def _load_checkpoint(path: Path, method, params: dict, optimizer, scheduler, rank: int = 0) -> int:
    """Restore everything from checkpoint `path` (read and checked in full before anything changes)."""
    import pickle

    import torch
    from safetensors.torch import load_file

    where = f"resume: checkpoint {str(path)!r}"
    if not (path / RNG_FILE).is_file():
        raise DcustomError(f"{where} was written by an older dcustom that kept its RNG state as a pickle ({OLD_RNG_FILE}), "
                           "which is never loaded because unpickling can run code; resume from a checkpoint written by "
                           "this version or start the run again.")
    try:
        saved = load_file(str(path / "trainable.safetensors"))
    except Exception as exc:  # safetensors raises its own error types for every kind of damage
        raise DcustomError(f"{where}: trainable.safetensors is damaged ({_first_line(exc)}); resume from another checkpoint.") from None
    try:
        state = json.loads((path / "state.json").read_text())
        step = int(state["step"])
        rng_file = json.loads((path / RNG_FILE).read_text())
        states = [_parse_rng_state(s) for s in rng_file["ranks"]]
        rng = states[rank] if rank < len(states) else states[0]
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError) as exc:
        raise DcustomError(f"{where}: state.json or {RNG_FILE} is damaged ({_first_line(exc)}); resume from another checkpoint.") from None
    try:
        opt_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise DcustomError(f"{where}: optimizer.pt holds Python objects other than tensors, which dcustom never unpickles; "
                           "resume from a checkpoint dcustom wrote.") from None
    except Exception as exc:
        raise DcustomError(f"{where}: optimizer.pt is damaged ({_first_line(exc)}); resume from another checkpoint.") from None
    missing = sorted(set(params) - set(saved))
    if missing:
        raise DcustomError(f"resume: checkpoint {str(path)!r} lacks trainable parameter {missing[0]!r}; it was made by a different method or config.")
    wrong = [k for k, p in params.items() if tuple(saved[k].shape) != tuple(p.shape)]
    if wrong:
        raise DcustomError(f"{where}: trainable parameter {wrong[0]!r} has shape {list(saved[wrong[0]].shape)} there but "
                           f"{list(params[wrong[0]].shape)} here; it was made by a different method or config.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(saved[name].to(p.device, p.dtype))
    try:
        optimizer.load_state_dict(opt_state["optimizer"])
        scheduler.load_state_dict(opt_state["scheduler"])
        _set_rng_state(rng)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        raise DcustomError(f"{where}: its optimizer or RNG state does not fit this run ({_first_line(exc)}); it was "
                           "made by a different method or config.") from None
    if hasattr(method, "load_extra_state"):
        method.load_extra_state(state.get("extra", {}))
    return step


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


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

    if dataclasses.is_dataclass(run_config):  # the Python API gets the checks a YAML file gets
        check_values(run_config, "")
    check_values(cfg, "train")
    device = resolve_device(cfg.device)
    accelerator = Accelerator(mixed_precision=_mixed_precision(cfg.mixed_precision, device), cpu=device == "cpu")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    run_dir = choose_run_dir(cfg.output_dir, cfg.resume)
    _check_outside_inputs(run_dir, run_config)
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
