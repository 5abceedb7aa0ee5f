"""`dcustom train erasure`: dispatch to UCE (closed form, `uce.run_uce`) or ESD (the shared loop, `esd.run_esd`)."""

from __future__ import annotations

from dcustom.trainers.erasure.artifacts import ErasureResult
from dcustom.trainers.erasure.config import ErasureTrainConfig


def run(cfg: ErasureTrainConfig, pipe=None, on_event=None, should_stop=None, progress: bool = True) -> ErasureResult:
    """Erase `cfg.erase` from `cfg.model` (or from an already loaded `pipe`, edited in place)."""
    if cfg.algorithm == "uce":
        from dcustom.trainers.erasure.uce import run_uce

        return run_uce(cfg, pipe=pipe)
    from dcustom.trainers.erasure.esd import run_esd

    return run_esd(cfg, pipe=pipe, on_event=on_event, should_stop=should_stop, progress=progress)
