"""Adapter files: save, load, convert, merge, extract and inspect every adapter kind dcustom writes.

- LoRA/DoRA: diffusers `pytorch_lora_weights.safetensors` (true alpha in the peft metadata) and a
  kohya/A1111 `lora_kohya.safetensors` (`lora_unet_*`, `lora_te*_*`, per-module `.alpha`).
- OFT/BOFT: peft folders (`unet/adapter_model.safetensors` + `adapter_config.json`), a merged UNet
  folder and an SVD-extracted LoRA (kohya keys) for tools that only read LoRA.
Every safetensors header carries dcustom metadata (method, base model, family, version, config).

Modules: files (the writers and file names), load (load onto a pipeline, inspect), kohya (LoRA keys
between the diffusers and kohya/A1111 forms), convert (`adapters convert`), merge (`adapters merge`,
`adapters extract`), embeddings (textual-inversion files), boft_kernel (peft's BOFT fast path).
"""

from dcustom.adapters.files import (  # noqa: F401
    DIFFUSERS_LORA_NAME,
    KOHYA_LORA_NAME,
    EXTRACTED_LORA_NAME,
    read_metadata,
)
