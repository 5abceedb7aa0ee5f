"""The adapter library: one folder per adapter under <data>/adapters, applied to pipelines by name."""

from __future__ import annotations

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
