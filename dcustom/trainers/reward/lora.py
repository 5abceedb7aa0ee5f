"""LoRA on the UNet for reward fine-tuning: add (peft via `unet.add_adapter`), list, save, scale.

The saved file is diffusers' `pytorch_lora_weights.safetensors` (written by the pipeline class's
own `save_lora_weights`, with the peft config as adapter metadata so the true alpha survives), so
`pipe.load_lora_weights(folder)` loads it in any diffusers pipeline of the same family.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

ADAPTER_NAME = "reward"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def add_reward_lora(unet, rank: int = 4, alpha: float | None = None, targets=DEFAULT_TARGETS,
                    init: str = "gaussian") -> dict:
    """Freeze the UNet and add a LoRA adapter; returns {name: parameter} of the trainable weights.

    `init="gaussian"` (as AlignProp/TRL) draws A from a Gaussian and sets B = 0, so the adapted
    model starts exactly at the base model; consequently only B gets gradient at the first step.
    """
    from peft import LoraConfig

    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=list(targets),
                        init_lora_weights=init)
    unet.add_adapter(config, adapter_name=ADAPTER_NAME)
    return lora_parameters(unet)


def lora_parameters(unet) -> dict:
    return {name: p for name, p in unet.named_parameters() if "lora_" in name and p.requires_grad}


def save_reward_lora(pipe, folder: Path, metadata: dict | None = None) -> Path:
    """Write the adapter as diffusers LoRA weights into `folder` (temp file, then rename)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    unet = pipe.unet
    state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().float().cpu().contiguous() for k, v in convert_state_dict_to_diffusers(state).items()}
    peft_config = unet.peft_config[ADAPTER_NAME].to_dict()
    peft_config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in peft_config.items()}
    tmp_name = "pytorch_lora_weights.safetensors.tmp"
    type(pipe).save_lora_weights(str(folder), unet_lora_layers=state, weight_name=tmp_name,
                                 unet_lora_adapter_metadata=peft_config)
    final = folder / "pytorch_lora_weights.safetensors"
    (folder / tmp_name).replace(final)
    return final


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
