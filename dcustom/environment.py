"""What `dcustom env` reports: versions, accelerators, attention backend, optional extras, and whether the
installed versions match the locked set (`requirements.lock`, the set the suite passed with)."""

from __future__ import annotations

import importlib.metadata as md
import platform
import re
from pathlib import Path

# The packages whose versions decide whether dcustom works: `dcustom env` checks them against the lock.
KEY_PACKAGES = ("torch", "diffusers", "transformers", "peft", "accelerate", "gradio")
LOCK_FILE = Path(__file__).resolve().parents[1] / "requirements.lock"


def _version(dist: str) -> str:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return "not installed"


def describe_environment() -> dict[str, str]:
    import torch

    info = {"dcustom": _version("dcustom"), "python": platform.python_version(), "platform": platform.platform()}
    for dist in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors"):
        info[dist] = _version(dist)
    cuda = torch.cuda.is_available()
    info["cuda"] = f"yes ({torch.cuda.get_device_name(0)}, CUDA {torch.version.cuda})" if cuda else "no"
    mps = getattr(torch.backends, "mps", None)
    info["mps"] = "yes" if mps is not None and mps.is_available() else "no"
    info["bf16 on accelerator"] = "yes" if cuda and torch.cuda.is_bf16_supported() else "no"
    xformers = _version("xformers")
    sdpa = hasattr(torch.nn.functional, "scaled_dot_product_attention")
    info["attention backend"] = "xformers available; default SDPA" if xformers != "not installed" and sdpa else (
        "torch SDPA (scaled_dot_product_attention)" if sdpa else "plain attention")
    for extra, dist in (("extra ui: gradio", "gradio"), ("extra gpu: xformers", "xformers"),
                        ("extra gpu: bitsandbytes", "bitsandbytes")):
        info[extra] = _version(dist)
    info["torch threads"] = str(torch.get_num_threads())
    return info


def locked_versions(lock: Path = LOCK_FILE) -> dict[str, str]:
    """{normalized name: version} from a pip-freeze style lock ('' when there is no lock beside the package)."""
    if not lock.is_file():
        return {}
    out = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"^([A-Za-z0-9_.\-]+)==([^\s;#]+)", line.strip())
        if m:
            out[_normalize(m.group(1))] = m.group(2)
    return out


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def lock_report(lock: Path = LOCK_FILE) -> list[tuple[str, str, str, str]]:
    """(package, installed, locked, verdict) for each key package; verdict is 'ok', 'OUTSIDE LOCK' or 'no lock'."""
    locked = locked_versions(lock)
    rows = []
    for dist in KEY_PACKAGES:
        have, want = _version(dist), locked.get(_normalize(dist), "")
        if not locked:
            verdict = "no lock"
        elif have == want or (want and have.split("+")[0] == want.split("+")[0]):
            verdict = "ok"
        else:
            verdict = "OUTSIDE LOCK"
        rows.append((dist, have, want or "-", verdict))
    return rows


def check_peft_supports_transformers() -> None:
    """Fail in one sentence when the installed peft is older than the installed transformers requires.

    transformers refuses text-encoder adapters with peft below its MIN_PEFT_VERSION, but only when the
    first adapter is added, i.e. after the pipeline is loaded and the data prepared. Checking first
    turns that mid-setup ValueError into a clear message before any work.
    """
    from dcustom.errors import DcustomError

    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # an older transformers without the constant: nothing to compare against
        return
    from packaging.version import Version

    peft, transformers = _version("peft"), _version("transformers")
    if peft == "not installed" or Version(peft) < Version(MIN_PEFT_VERSION):
        raise DcustomError(
            f"peft {peft} is too old for transformers {transformers}, which needs peft >= {MIN_PEFT_VERSION} for "
            f"text-encoder adapters; install the locked versions with 'bash scripts/setup.sh' (or "
            f"'pip install -r requirements.lock'), or install a transformers release that accepts peft {peft}.")
