"""What `dcustom env` reports: versions, accelerators, attention backend, optional extras."""

from __future__ import annotations

import importlib.metadata as md
import platform


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
