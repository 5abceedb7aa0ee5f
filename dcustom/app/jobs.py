"""Training jobs: each one a child process (`python -m dcustom.cli train <method> --config run.yaml`).

Jobs queue and run one at a time, so several users' jobs never compete for the GPU. The app
survives a child that runs out of memory or crashes, and Stop always works: it writes the loop's
STOP file (the run checkpoints and ends cleanly) and terminates the child if it has not exited
after a grace period (e.g. while still loading models).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dcustom.errors import DcustomError

FINAL_STATES = ("finished", "cancelled", "failed")


@dataclass
class Job:
    id: str
    method: str
    run_dir: Path
    config_path: Path
    adapter_name: str
    status: str = "queued"  # queued | running | stopping | finished | cancelled | failed
    process: Optional[subprocess.Popen] = None
    returncode: Optional[int] = None
    message: str = ""
    stop_requested_at: Optional[float] = None
    created: float = field(default_factory=time.time)

    @property
    def events_path(self) -> Path:
        return self.run_dir / "events.jsonl"

    @property
    def log_path(self) -> Path:
        return self.run_dir / "train.log"


def read_events(path: Path) -> list[dict]:
    """Events written so far; a half-written last line (the child is appending) is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def tail(path: Path, lines: int = 25) -> str:
    if not path.is_file():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


class TrainingQueue:
    """FIFO of training jobs with one worker thread; child processes run in their own session."""

    def __init__(self, library_dir: Path, cwd: Path, stop_grace_s: float = 15.0, python: str = sys.executable,
                 max_jobs: int = 16):
        self.library_dir, self.cwd, self.stop_grace_s, self.python = library_dir, cwd, stop_grace_s, python
        self.max_jobs = max_jobs
        self.jobs: dict[str, Job] = {}
        self._pending: deque[str] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._closed = False
        self._worker = threading.Thread(target=self._work, name="dcustom-training-queue", daemon=True)
        self._worker.start()

    # -- public -------------------------------------------------------------------------------
    def restore(self, runs_dir: Path) -> None:
        """List the runs of earlier sessions (read-only: their status comes from events.jsonl)."""
        for run_dir in sorted(p for p in Path(runs_dir).iterdir() if (p / "run.yaml").is_file()):
            if run_dir.name in self.jobs:
                continue
            end = next((e for e in reversed(read_events(run_dir / "events.jsonl")) if e.get("event") == "end"), None)
            status = end.get("status", "failed") if end else "failed"
            method = next((line.split(":", 1)[1].strip() for line in (run_dir / "run.yaml").read_text().splitlines()
                           if line.startswith("method:")), "?")
            message = "from an earlier session" + ("" if end else "; it ended without an 'end' event (app stopped?)")
            self.jobs[run_dir.name] = Job(run_dir.name, method, run_dir, run_dir / "run.yaml", "", status=status,
                                          message=message)

    def submit(self, job: Job) -> Job:
        with self._lock:
            waiting = sum(1 for j in self.jobs.values() if j.status in ("queued", "running", "stopping"))
            if waiting >= self.max_jobs:
                raise DcustomError(f"training queue is full ({waiting} jobs waiting or running); try again when one ends.")
            self.jobs[job.id] = job
            self._pending.append(job.id)
        self._wake.set()
        return job

    def position(self, job_id: str) -> Optional[int]:
        """0 for the running job, 1.. for queued ones, None for finished ones."""
        with self._lock:
            job = self.jobs[job_id]
            if job.status in ("running", "stopping"):
                return 0
            if job.status == "queued":
                return list(self._pending).index(job_id) + 1
            return None

    def stop(self, job_id: str) -> Job:
        with self._lock:
            job = self.get(job_id)
            if job.status == "queued":
                self._pending.remove(job_id)
                job.status, job.message = "cancelled", "removed from the queue before it started"
                return job
            if job.status not in ("running", "stopping"):
                return job
            job.status, job.stop_requested_at = "stopping", time.time()
        (job.run_dir / "STOP").write_text("stop requested from the app\n")
        threading.Thread(target=self._terminate_after_grace, args=(job,), daemon=True).start()
        return job

    def get(self, job_id: str) -> Job:
        if job_id not in self.jobs:
            raise DcustomError(f"training job {job_id!r} is not known; known jobs: {', '.join(self.jobs) or 'none'}.")
        return self.jobs[job_id]

    def close(self) -> None:
        """Stop everything (app shutdown): queued jobs are cancelled, the running child terminated."""
        self._closed = True
        with self._lock:
            ids = list(self.jobs)
        for job_id in ids:
            job = self.jobs[job_id]
            if job.status == "queued":
                self.stop(job_id)
            elif job.process is not None and job.process.poll() is None:
                _kill_group(job.process, signal.SIGTERM)
        self._wake.set()

    # -- worker -------------------------------------------------------------------------------
    def _work(self) -> None:
        while not self._closed:
            self._wake.wait(timeout=1.0)
            self._wake.clear()
            while not self._closed:
                with self._lock:
                    if not self._pending:
                        break
                    job = self.jobs[self._pending.popleft()]
                    job.status = "running"
                self._run(job)

    def _run(self, job: Job) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")
        cmd = [self.python, "-m", "dcustom.cli", "train", job.method, "--config", str(job.config_path)]
        try:
            with job.log_path.open("ab") as log:
                log.write(("$ " + " ".join(cmd) + "\n").encode())
                log.flush()
                job.process = subprocess.Popen(cmd, cwd=self.cwd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                               stdin=subprocess.DEVNULL, start_new_session=True)
                job.returncode = job.process.wait()
        except OSError as exc:
            job.returncode, job.message = -1, f"could not start the training process: {exc}"
        self._finish(job)

    def _finish(self, job: Job) -> None:
        end = next((e for e in reversed(read_events(job.events_path)) if e.get("event") == "end"), None)
        if end is not None and end.get("status") == "finished" and job.returncode == 0:
            job.status = "finished"
            try:
                folder = publish_adapter(job.run_dir, end.get("files") or [], self.library_dir / job.adapter_name)
                job.message = f"adapter {job.adapter_name!r} added to the library ({folder})"
            except OSError as exc:
                job.status, job.message = "failed", f"training finished but the adapter could not be copied: {exc}"
        elif job.stop_requested_at is not None:
            job.status = "cancelled"
            job.message = "stopped" + (f" at step {end['step']} (checkpoint kept)" if end else " before the first step")
        else:
            job.status = "failed"
            last = tail(job.log_path, 3).strip().splitlines()
            job.message = job.message or (last[-1] if last else f"the training process exited with code {job.returncode}")

    def _terminate_after_grace(self, job: Job) -> None:
        deadline = time.time() + self.stop_grace_s
        while time.time() < deadline:
            if job.process is None or job.process.poll() is not None:
                return
            time.sleep(0.2)
        _kill_group(job.process, signal.SIGTERM)
        try:
            job.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(job.process, signal.SIGKILL)


def _kill_group(process: subprocess.Popen, sig) -> None:
    try:
        os.killpg(process.pid, sig)  # the child's own session: its workers go too
    except (ProcessLookupError, PermissionError):
        pass


def publish_adapter(run_dir: Path, files: list, dest: Path) -> Path:
    """Copy a finished run's deliverables (and its config) into the library, atomically."""
    run_dir = Path(run_dir).resolve()
    tmp = dest.with_name("." + dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in files:
        src = Path(f)
        src = src if src.is_absolute() else run_dir / src
        rel = src.resolve().relative_to(run_dir)
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():  # a peft folder (OFT/BOFT: unet/adapter_model.safetensors + adapter_config.json)
            shutil.copytree(src, tmp / rel)
        else:
            shutil.copy2(src, tmp / rel)
    if (run_dir / "config.yaml").is_file():
        shutil.copy2(run_dir / "config.yaml", tmp / "config.yaml")
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)
    return dest
