"""Settings of one generation run (torch-free; shared by the CLI, the UI and YAML files)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dcustom.config import opt

REFERENCE_SCHEDULERS = ("default", "ddim")  # with a style reference, "default" samples with DDIM too
SCHEDULERS = ("default", "ddim", "dpmpp_2m", "dpmpp_2m_karras", "euler", "euler_a", "pndm", "lms", "unipc", "heun")


@dataclass
class GenerateConfig:
    method: str = opt("generate", "Config kind; always 'generate'.")
    model: str = opt("builtin:toy", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a .safetensors/.ckpt file or a hub id.")
    model_config: Optional[str] = opt(None, "Only for a single-file model offline: a local diffusers folder of the same family whose configs describe it.")
    prompt: str = opt("a photo of a cat", "What to draw.")
    negative_prompt: str = opt("", "What to steer away from.")
    steps: int = opt(30, "Sampling steps.")
    guidance: float = opt(7.5, "Classifier-free guidance scale (1 disables CFG).")
    seed: Optional[int] = opt(None, "Seed of the first image (image i uses seed+i); null picks one at random.")
    width: Optional[int] = opt(None, "Width in pixels (multiple of 8); null uses the model's default.")
    height: Optional[int] = opt(None, "Height in pixels (multiple of 8); null uses the model's default.")
    count: int = opt(1, "Number of images.")
    scheduler: str = opt("default", "Sampler: " + ", ".join(SCHEDULERS) + ".")
    output_dir: str = opt("outputs", "Folder the PNGs are written to.")
    dtype: str = opt("auto", "Weights precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")
    adapters: list[str] = opt([], "Adapters to apply: 'path' or 'path:weight' (LoRA files, kohya files, OFT/BOFT or run folders); they stack.")
    style_ref: Optional[str] = opt(None, "Style reference image file: it is DDIM-inverted once and the images attend to its self-attention keys/values while they are sampled (StyleAligned shared attention with q/k AdaIN); sampling then uses DDIM. null: no reference.")
    style_strength: float = opt(1.0, "Fraction of the sampling steps, from the first, in which the images attend to the style reference: 0 = never (plain DDIM), 1 = every step.")
    style_layers: str = opt("all_self", "Self-attention layers that attend to the style reference: a family preset (all_self, decoder_self, decoder_self_late, ...) or a regex over unet.attn_processors names.")

    def __post_init__(self):
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} is not known; accepted: {', '.join(SCHEDULERS)}")
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if self.count < 1:
            raise ValueError(f"count must be at least 1, got {self.count}")
        if not 0.0 <= self.style_strength <= 1.0:
            raise ValueError(f"style_strength must be between 0 and 1, got {self.style_strength}")
        if self.style_ref and self.scheduler not in REFERENCE_SCHEDULERS:
            raise ValueError(f"scheduler {self.scheduler!r} cannot be used with a style reference (its DDIM inversion is "
                             f"replayed step by step); accepted with style_ref: {', '.join(REFERENCE_SCHEDULERS)}")
        for name in ("width", "height"):
            v = getattr(self, name)
            if v is not None and (v < 8 or v % 8):
                raise ValueError(f"{name} must be a positive multiple of 8, got {v}")
