"""LoRA on the UNet for reward fine-tuning: add (peft via `unet.add_adapter`), list, save, scale.

The saved files are diffusers' `pytorch_lora_weights.safetensors` (the pipeline class's own
`save_lora_weights`, with the peft config so the true alpha survives; `pipe.load_lora_weights(folder)`
loads it) and a kohya/A1111 copy, both through the shared writers in `dcustom.adapters.files`.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

from dcustom.trainers.peft_adapters import ATTN_TARGETS, LoraAdapterConfig, lora_config

ADAPTER_NAME = "reward"


def add_reward_lora(unet, lora: LoraAdapterConfig | None = None, target_modules=ATTN_TARGETS) -> dict:
    """Freeze the UNet and add a LoRA adapter (default: rank 4, alpha = rank); returns {name: parameter} of
    the trainable weights.

    `init="gaussian"` (as AlignProp/TRL) draws A from a Gaussian and sets B = 0, so the adapted
    model starts exactly at the base model; consequently only B gets gradient at the first step.
    """
    unet.requires_grad_(False)
    lora = lora if lora is not None else LoraAdapterConfig(rank=4, alpha=None)
    unet.add_adapter(lora_config(lora, target_modules), adapter_name=ADAPTER_NAME)
    return lora_parameters(unet)


def lora_parameters(unet) -> dict:
    return {name: p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad}


def save_reward_lora(pipe, folder: Path, base_model: str = "", config: dict | None = None) -> list[Path]:
    """Write the adapter into `folder`: diffusers LoRA (+ peft config, true alpha) and kohya/A1111 keys,
    both with dcustom metadata, each written to a temp name then renamed (dcustom.adapters.files)."""
    from dcustom.adapters.files import dcustom_metadata, save_diffusers_lora, save_kohya_lora
    from dcustom.models import family_of

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    family = family_of(pipe).name
    meta = dcustom_metadata("reward", base_model or getattr(pipe, "_dcustom_spec", ""), family, config, "diffusers")
    return [save_diffusers_lora(folder, pipe, [], meta, ADAPTER_NAME),
            save_kohya_lora(folder, pipe, family, [], meta, ADAPTER_NAME)]


@contextlib.contextmanager
def lora_scale(unet, scale: float):
    """Temporarily scale the reward LoRA by `scale` (0 = base model, 1 = as trained): DRaFT's
    LoRA scaling / AlignProp's soup with the base, for evaluation at inference."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in unet.modules() if isinstance(m, BaseTunerLayer)]
    saved = [dict(m.scaling) for m in layers]
    try:
        for m in layers:
            for name in m.scaling:
                m.scaling[name] = m.scaling[name] * scale
        yield
    finally:
        for m, s in zip(layers, saved):
            m.scaling.clear()
            m.scaling.update(s)
