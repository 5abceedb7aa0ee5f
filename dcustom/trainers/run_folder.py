"""The run folder on disk: where a run writes, and its checkpoints (atomic save, exact resume).

A finished run is never overwritten: a new run (without ``resume``) whose output folder holds one
writes to the next free ``<output_dir>-2``, ``-3``, ... and says so. ``checkpoints/step-N/`` is written
under a temp name, then renamed; it holds only safetensors, JSON and a ``weights_only`` optimizer file
(RNG state as JSON), so nothing a checkpoint holds is ever unpickled. Pruning renames before it
deletes, and only complete checkpoints are listed for resume. Torch is imported inside functions.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Callable, Optional

from dcustom.errors import DcustomError

log = logging.getLogger("dcustom.train")
CHECKPOINT_PREFIX = "step-"
CHECKPOINT_FILES = ("state.json", "trainable.safetensors", "optimizer.pt")
RNG_FILE = "rng.json"
OLD_RNG_FILE = "rng.pkl"  # written by dcustom before RNG state became JSON; never read
# Files that runs not ending through the loop write last (UCE erasure, an early-stopped reward run).
FINISHED_MARKERS = ("report.json", "reward_report.json")


# ----------------------------------------------------------------------------- the run folder


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


def check_outside_inputs(run_dir: Path, run_config) -> None:
    """The image folder is only ever read: a run folder inside it would write into it."""
    images = getattr(getattr(run_config, "data", None), "images", None)
    if not images:
        return
    inputs, out = Path(images).resolve(), run_dir.resolve()
    if out == inputs or inputs in out.parents:
        raise DcustomError(f"train.output_dir: {str(run_dir)!r} is inside data.images {str(images)!r}, which dcustom never "
                           "writes to; accepted: a run folder outside the image folder.")


# ----------------------------------------------------------------------------- checkpoints


def step_dirs(run_dir: Path) -> list[Path]:
    """Every checkpoints/step-N folder, complete or not, oldest first (temp and `.deleting` names are not)."""
    folder = Path(run_dir) / "checkpoints"
    found = [p for p in folder.glob(CHECKPOINT_PREFIX + "*") if p.is_dir() and p.name[len(CHECKPOINT_PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def is_complete_checkpoint(path: Path) -> bool:
    """All files a checkpoint is written with (old pickle-RNG ones count, so resume can refuse them by name)."""
    path = Path(path)
    return all((path / n).is_file() for n in CHECKPOINT_FILES) and any((path / n).is_file() for n in (RNG_FILE, OLD_RNG_FILE))


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The run's complete checkpoints, oldest first (a folder a kill left half-deleted is not one)."""
    return [p for p in step_dirs(run_dir) if is_complete_checkpoint(p)]


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


def rng_state() -> dict:
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


def remove_folder(path: Path) -> None:
    """Rename, then delete: a kill while deleting leaves a `.deleting` folder that is never listed as a checkpoint."""
    trash = path.with_name(path.name + ".deleting")
    shutil.rmtree(trash, ignore_errors=True)
    path.rename(trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(run_dir: Path, step: int, params: dict, optimizer, scheduler, keep: int, rng_states: list,
                    extra: dict, save_files: Callable[[Path], list]) -> Path:
    """Write checkpoints/step-N under a temp name, then rename: a crash never leaves half a checkpoint.

    `rng_states`: one `rng_state()` per rank; `extra`: the method's JSON state; `save_files(folder)` writes
    the method's deliverable files into the checkpoint too. Keeps the newest `keep` (0: all)."""
    import torch
    from safetensors.torch import save_file

    final = run_dir / "checkpoints" / f"{CHECKPOINT_PREFIX}{step}"
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: p.detach().float().cpu().contiguous() for k, p in params.items()}, str(tmp / "trainable.safetensors"))
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, tmp / "optimizer.pt")
    (tmp / RNG_FILE).write_text(json.dumps({"format": 1, "ranks": rng_states}))  # one state per rank
    (tmp / "state.json").write_text(json.dumps({"step": step, "extra": extra}))
    save_files(tmp)
    if final.exists():
        remove_folder(final)
    tmp.rename(final)
    for leftover in (run_dir / "checkpoints").glob(f"{CHECKPOINT_PREFIX}*.deleting"):
        shutil.rmtree(leftover, ignore_errors=True)  # from a kill during an earlier prune
    complete = checkpoint_dirs(run_dir)
    stale = [p for p in step_dirs(run_dir) if p not in complete]  # half-deleted by an older dcustom
    if keep > 0:
        stale += complete[:-keep]
    for old in stale:
        remove_folder(old)
    return final


def load_checkpoint(path: Path, params: dict, optimizer, scheduler, rank: int = 0) -> tuple[int, dict]:
    """Restore parameters, optimizer, scheduler and this rank's RNG from checkpoint `path` (read and checked in
    full before anything changes); returns (step, the method's extra state)."""
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
    return step, state.get("extra", {})


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__
