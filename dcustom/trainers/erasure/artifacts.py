"""Erasure outputs: a diffusers LoRA file, or a whole model folder, both carrying dcustom metadata, and
the `ErasureResult` every algorithm returns.

The LoRA file is the format `pipe.load_lora_weights` reads (keys ``unet.<module>.lora_A.weight``,
peft config in the ``lora_adapter_metadata`` header entry), so an erasure loads onto a stock
pipeline and stacks with other adapters through `pipe.set_adapters`. The header carries the
project's flat ``dcustom.*`` string entries (version, method, base_model, family, format, config as
JSON) plus the erasure's own: algorithm, erase/anchors/preserve (JSON lists) and solve figures.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from dcustom.errors import DcustomError

LORA_FILE = "pytorch_lora_weights.safetensors"
FULL_FOLDER = "model"
PREFIX = "dcustom."


@dataclass
class ErasureResult:
    """What `run` returns for every algorithm: the run folder, the files written, the time and the figures."""

    run_dir: Path
    files: list
    seconds: float
    info: dict = field(default_factory=dict)
    pipe: object = field(default=None, repr=False)  # the edited pipeline, in memory

    def __str__(self) -> str:
        return f"erasure written to {self.run_dir} in {self.seconds:.1f} s: " + ", ".join(str(f) for f in self.files)


def dcustom_metadata(cfg, pipe, **extra) -> dict:
    """The header entries every erasure file carries (all values are strings, as safetensors needs)."""
    from dcustom.version import __version__
    from dcustom.config import to_dict
    from dcustom.models import family_of

    meta = {"version": __version__, "method": "erasure", "base_model": getattr(pipe, "_dcustom_spec", cfg.model),
            "family": family_of(pipe).name, "config": to_dict(cfg), "algorithm": cfg.algorithm,
            "erase": list(cfg.erase), "anchors": [cfg.anchor_for(i) for i in range(len(cfg.erase))],
            "preserve": list(cfg.preserve), **extra}
    return {PREFIX + k: v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str) for k, v in meta.items()}


def lora_config_dict(rank: int, alpha: float, target_modules: list[str]) -> dict:
    """The peft LoraConfig as diffusers records it, so loaders recover the true alpha."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules)).to_dict()
    return {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}


def save_lora_file(path: Path, state: dict, lora_config: dict, metadata: dict) -> Path:
    """Write a diffusers LoRA safetensors file atomically (temp name, then rename)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    packed = {f"unet.{k}": v for k, v in lora_config.items()}
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(packed, sort_keys=True, default=str),
              **metadata, PREFIX + "format": "diffusers"}
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp), metadata=header)
    tmp.replace(path)
    return path


def save_full_model(pipe, folder: Path, metadata: dict) -> Path:
    """Write the whole pipeline with its edited weights as a diffusers folder (temp folder, then rename)."""
    from safetensors.torch import load_file, save_file

    folder = Path(folder)
    tmp = folder.with_name("." + folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for weights in sorted((tmp / "unet").glob("*.safetensors")):
        save_file(load_file(str(weights)), str(weights), metadata={"format": "pt", **metadata, PREFIX + "format": "full_model"})
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
    return folder


def read_metadata(path) -> dict:
    """The dcustom metadata of an erasure LoRA file or model folder, JSON values decoded, prefix dropped."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        candidates = [path / LORA_FILE, *sorted((path / "unet").glob("*.safetensors")),
                      *sorted((path / FULL_FOLDER / "unet").glob("*.safetensors"))]
        found = [p for p in candidates if p.is_file()]
        if not found:
            raise DcustomError(f"{str(path)!r} holds no erasure output ({LORA_FILE} or a model folder).")
        path = found[0]
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise DcustomError(f"{str(path)!r} is not a readable safetensors file ({exc}).") from None
    if header.get(PREFIX + "method") != "erasure":
        raise DcustomError(f"{str(path)!r} carries no dcustom erasure metadata; it was not written by 'dcustom train erasure'.")
    out = {}
    for key, value in header.items():
        if key.startswith(PREFIX):
            try:
                out[key[len(PREFIX):]] = json.loads(value)
            except ValueError:
                out[key[len(PREFIX):]] = value
    return out


def load_erasure(pipe, path, adapter_name: str = "erasure", scale: float = 1.0):
    """Load an erasure LoRA file (or a run folder holding one) onto `pipe` as a named adapter."""
    path = Path(path)
    if path.is_dir():
        path = path / LORA_FILE
    if not path.is_file():
        raise DcustomError(f"erasure adapter {str(path)!r} does not exist; pass the run folder or its {LORA_FILE}.")
    pipe.load_lora_weights(str(path), adapter_name=adapter_name)
    if scale != 1.0:
        pipe.set_adapters([adapter_name], [scale])
    return pipe
