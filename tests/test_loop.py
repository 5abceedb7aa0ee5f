"""The shared training loop on a small real torch model (no diffusion): resume, cancel, NaN, events."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.trainers.loop import LoopConfig, run_training
from dcustom.trainers.run_folder import find_checkpoint


class Regression:
    """A tiny method: fit y = A x with dropout, so noise, data order and RNG all matter for resume."""

    def __init__(self, nan_at: int | None = None):
        self.nan_at = nan_at
        self.saved = []

    def setup(self, ctx):
        g = torch.Generator().manual_seed(123)
        self.model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.3), torch.nn.Linear(8, 2))
        self.frozen = torch.nn.Linear(2, 2).requires_grad_(False)
        with torch.no_grad():
            for p in list(self.model.parameters()) + list(self.frozen.parameters()):
                p.copy_(torch.randn(p.shape, generator=g))
        self.target = torch.randn(2, 4, generator=g)
        return [torch.randn(4, generator=g) for _ in range(7)]

    def trainable_parameters(self):
        return dict(self.model.named_parameters())

    def training_step(self, batch, step):
        x = torch.stack(batch)
        x = x + 0.1 * torch.randn_like(x)  # uses the loop-seeded global RNG
        loss = ((self.frozen(self.model(x)) - x @ self.target.T) ** 2).mean()
        if self.nan_at is not None and step == self.nan_at:
            loss = loss * float("nan")
        return loss

    def after_optimizer_step(self, step):
        pass

    def save(self, folder: Path):
        path = Path(folder) / "weights.pt"
        torch.save(self.model.state_dict(), path)
        self.saved.append(path)
        return [path]

    def sample(self, step, folder):
        torch.randn(100)  # consuming RNG here must not change training
        path = Path(folder) / "sample.txt"
        path.write_text(str(step))
        return [path]


def cfg(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "run"), steps=6, batch_size=3, grad_accum=2, lr=1e-2, warmup_steps=2,
                lr_scheduler="cosine", checkpoint_every=0, seed=5, device="cpu", sample_every=2)
    base.update(kw)
    return LoopConfig(**base)


def weights(method):
    return {k: v.detach().clone() for k, v in method.model.state_dict().items()}


def test_resume_is_exact_and_events_written(tmp_path):
    full = Regression()
    res = run_training(full, cfg(tmp_path / "a"), progress=False)
    assert res.status == "finished" and res.step == 6

    events_seen = []
    first = Regression()
    stop_at_3 = lambda: len([e for e in events_seen if e["event"] == "step"]) >= 3  # noqa: E731
    res1 = run_training(first, cfg(tmp_path / "b"), on_event=events_seen.append, should_stop=stop_at_3, progress=False)
    assert res1.status == "cancelled" and res1.step == 3
    assert find_checkpoint(tmp_path / "b" / "run", "latest").name == "step-3"

    second = Regression()
    res2 = run_training(second, cfg(tmp_path / "b", resume="latest"), progress=False)
    assert res2.step == 6 and res2.status == "finished"
    a, b = weights(full), weights(second)
    for k in a:
        assert torch.equal(a[k], b[k]), k  # bitwise on CPU fp32
    init = Regression()
    init.setup(None)
    assert not torch.equal(a["0.weight"], init.model[0].weight)

    log = [json.loads(line) for line in (tmp_path / "b" / "run" / "events.jsonl").read_text().splitlines()]
    kinds = [e["event"] for e in log]
    assert kinds.count("step") == 6 and kinds.count("end") == 2 and "sample" in kinds and "save" in kinds
    assert (tmp_path / "b" / "run" / "weights.pt").is_file()
    assert not list((tmp_path / "b" / "run" / "checkpoints").glob("*.tmp"))


def test_frozen_weights_unchanged_and_trainable_changed(tmp_path):
    m = Regression()
    m_init = Regression()
    m_init.setup(None)
    run_training(m, cfg(tmp_path, steps=2), progress=False)
    assert torch.equal(m.frozen.weight, m_init.frozen.weight)
    assert not torch.equal(m.model[0].weight, m_init.model[0].weight)


def test_stop_file_cancels_and_named_resume(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "STOP").write_text("")
    res = run_training(Regression(), cfg(tmp_path, checkpoint_every=1), progress=False)
    assert res.status == "cancelled" and res.step == 0
    (run_dir / "STOP").unlink()
    run_training(Regression(), cfg(tmp_path, steps=2, checkpoint_every=1, keep_checkpoints=0), progress=False)
    assert (run_dir / "checkpoints" / "step-1").is_dir()
    res = run_training(Regression(), cfg(tmp_path, steps=3, resume="1"), progress=False)
    assert res.step == 3
    with pytest.raises(DcustomError, match="is not a checkpoint folder"):
        run_training(Regression(), cfg(tmp_path, resume="99"), progress=False)


def test_nan_loss_stops_with_message(tmp_path):
    with pytest.raises(DcustomError, match=r"training stopped at step 1: the loss became nan"):
        run_training(Regression(nan_at=1), cfg(tmp_path), progress=False)
    log = (tmp_path / "run" / "events.jsonl").read_text()
    assert '"status": "failed"' in log


def test_bad_optimizer_name(tmp_path):
    with pytest.raises(DcustomError, match="train.optimizer: 'sgd' is not known"):
        run_training(Regression(), cfg(tmp_path, optimizer="sgd"), progress=False)


def test_bad_scheduler_name(tmp_path):
    with pytest.raises(DcustomError, match="train.lr_scheduler: 'wavy' is not known; accepted: constant"):
        run_training(Regression(), cfg(tmp_path, lr_scheduler="wavy"), progress=False)
