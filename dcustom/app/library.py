"""The adapter library: one folder per adapter under <data>/adapters, applied to pipelines by name."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from dcustom.app.paths import AppPaths, safe_name
from dcustom.errors import DcustomError


@dataclass
class AdapterEntry:
    name: str
    folder: Path
    files: list  # relative paths of the .safetensors files


def list_adapters(paths: AppPaths) -> list[AdapterEntry]:
    out = []
    for folder in sorted(paths.adapters.iterdir()):
        if folder.is_dir() and not folder.name.startswith("."):
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*.safetensors"))
            if files:
                out.append(AdapterEntry(folder.name, folder, files))
    return out


def adapter_folder(paths: AppPaths, name: str) -> Path:
    folder = paths.adapters / safe_name(name, "adapter")
    if not folder.is_dir():
        known = ", ".join(a.name for a in list_adapters(paths)) or "none yet"
        raise DcustomError(f"adapter {name!r} is not in the library; available: {known}.")
    return folder


def _load_adapter_fn():
    try:
        from dcustom.adapters import load_adapter
    except ImportError:  # older tree: the loader is not re-exported yet
        from dcustom.adapters.load import load_adapter
    return load_adapter


@contextlib.contextmanager
def adapters_applied(state, pipe, adapters: list):
    """Load (name, weight) adapters from the library onto `pipe` for the block, then take them off.

    LoRAs come off with diffusers' `unload_lora_weights`; a peft adapter (OFT/BOFT) is injected
    into the UNet's modules, so the cached pipeline is dropped instead and reloaded next time.
    """
    if not adapters:
        yield pipe
        return
    folders = [(adapter_folder(state.paths, name), float(weight)) for name, weight in adapters]
    load_adapter = _load_adapter_fn()
    try:
        for i, (folder, weight) in enumerate(folders):
            load_adapter(pipe, folder, scale=weight, name=f"slot{i}")
        yield pipe
    finally:
        from peft import LoraConfig

        configs = getattr(pipe.unet, "peft_config", None) or {}
        if any(not isinstance(c, LoraConfig) for c in configs.values()):
            state.forget_pipeline()
        else:
            pipe.unload_lora_weights()
