"""`dcustom train erasure`: run UCE (closed form) or ESD (through the shared training loop)."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from dcustom.trainers.erasure.config import ErasureTrainConfig


@dataclass
class ErasureResult:
    run_dir: Path
    files: list
    seconds: float
    info: dict = field(default_factory=dict)
    pipe: object = field(default=None, repr=False)  # the edited pipeline, in memory

    def __str__(self) -> str:
        return f"erasure written to {self.run_dir} in {self.seconds:.1f} s: " + ", ".join(str(f) for f in self.files)


def run(cfg: ErasureTrainConfig, pipe=None, on_event=None, should_stop=None, progress: bool = True) -> ErasureResult:
    """Erase `cfg.erase` from `cfg.model` (or from an already loaded `pipe`, edited in place)."""
    if cfg.algorithm == "uce":
        return run_uce(cfg, pipe=pipe)
    from dcustom.trainers.erasure.esd import run_esd

    return run_esd(cfg, pipe=pipe, on_event=on_event, should_stop=should_stop, progress=progress)


def run_uce(cfg: ErasureTrainConfig, pipe=None) -> ErasureResult:
    from dcustom.config import save_yaml
    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.artifacts import (LORA_FILE, FULL_FOLDER, dcustom_metadata, lora_config_dict,
                                                    save_full_model, save_lora_file)
    from dcustom.trainers.erasure.uce import apply_uce, compute_uce

    from dcustom.outputs import writable_folder
    from dcustom.trainers.loop import choose_run_dir

    start = time.perf_counter()
    # Before the model loads: a folder that cannot be written costs nothing, a finished run is never overwritten.
    out = writable_folder(choose_run_dir(cfg.train.output_dir, None), "train.output_dir")
    if pipe is None:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.train.device)
    anchors = [cfg.anchor_for(i) for i in range(len(cfg.erase))]
    u = cfg.uce
    edit = compute_uce(pipe, list(cfg.erase), anchors, list(cfg.preserve), list(cfg.templates), lam=u.lam,
                       erase_scale=u.erase_scale, preserve_scale=u.preserve_scale, tokens=u.tokens,
                       preserve_empty_prompt=u.preserve_empty_prompt, max_rank=u.max_rank)
    save_yaml(cfg, out / "config.yaml")
    info = {"solve_seconds": round(edit.seconds, 4), "rank": edit.rank, "dropped_energy": edit.dropped_energy,
            "edited_modules": len(edit.modules), **edit.info}
    meta = dcustom_metadata(cfg, pipe, **info)
    files = []
    if cfg.output_format() == "lora":
        files.append(save_lora_file(out / LORA_FILE, edit.lora_state,
                                    lora_config_dict(edit.rank, edit.rank, edit.modules), meta))
    apply_uce(pipe, edit)
    if cfg.output_format() == "full":
        files.append(save_full_model(pipe, out / FULL_FOLDER, meta))
    seconds = time.perf_counter() - start
    info["total_seconds"] = round(seconds, 3)
    (out / "report.json").write_text(json.dumps(info, indent=2))
    return ErasureResult(out, files, seconds, info, pipe)
