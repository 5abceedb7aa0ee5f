"""Configs of the training-free style-transfer methods (torch-free: `dcustom config print` is instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dcustom.config import opt

FEATURE_SOURCES = ("recorded", "in_batch")
INJECTION_MODES = ("replace", "concat")


@dataclass
class StyleTransferConfig:
    """Fields shared by every content + style → stylized image method."""

    method: str = opt("style_injection", "Method id.")
    model: str = opt("builtin:toy", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    content: str = opt("", "Content image file (any size or mode; converted to the model's resolution).")
    style: str = opt("", "Style image file (any size or mode).")
    output: str = opt("outputs/style/result.png", "Result PNG; a content | style | result grid is written next to it as <name>-grid.png.")
    steps: int = opt(50, "DDIM steps, used for both inversion and sampling.")
    gamma: float = opt(0.75, "Query preservation γ: q = γ·q_content + (1−γ)·q (0 disables it).")
    temperature: float = opt(1.5, "Attention temperature T: logits × T before softmax (1 disables it).")
    layers: str = opt("decoder_self_late", "Self-attention layers: a family preset (decoder_self_late, decoder_self, all_self, ...) or a regex over unet.attn_processors names.")
    step_start: float = opt(0.0, "Inject from this fraction of the sampling steps on (0 = from the first step).")
    step_end: float = opt(1.0, "Stop injecting at this fraction of the sampling steps (1 = through the last).")
    mode: str = opt("replace", "'replace': attend to the style's K/V only; 'concat': attend to [own; style] K/V.")
    init_adain: bool = opt(True, "Ablation switch: give the content's inverted latent the style latent's channel mean/std.")
    inject_attention: bool = opt(True, "Ablation switch: inject style K/V into self-attention (off = plain sampling from the start latent).")
    feature_source: str = opt("recorded", "'recorded': record features during inversion and replay them (two passes); 'in_batch': the references ride in the sampling batch, replayed from their inversion trajectories.")
    prompt: str = opt("", "Text prompt while sampling (StyleID uses the empty prompt).")
    guidance: float = opt(1.0, "Classifier-free guidance while sampling (1 = off, as StyleID).")
    eta: float = opt(0.0, "DDIM eta; 0 is deterministic, > 0 adds seeded noise.")
    seed: int = opt(0, "Seed of the sampling noise (only used when eta > 0).")
    feature_dtype: str = opt("fp16", "Precision of recorded features: fp16 (half the memory) or fp32.")
    offload: bool = opt(False, "Keep recorded features in CPU memory (saves accelerator memory, ~30% slower on GPU).")
    cache_dir: Optional[str] = opt(None, "Folder for cached inversions (trajectory + features) keyed by image, model, scheduler, steps, layers and dtype; null keeps them in memory only.")
    resolution: Optional[int] = opt(None, "Square working resolution in pixels; null uses the model's default.")
    dtype: str = opt("auto", "Weights precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be between 0 and 1, got {self.gamma}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if not 0.0 <= self.step_start <= self.step_end <= 1.0:
            raise ValueError(f"need 0 <= step_start <= step_end <= 1, got {self.step_start} and {self.step_end}")
        if self.mode not in INJECTION_MODES:
            raise ValueError(f"mode {self.mode!r} is not known; accepted: {', '.join(INJECTION_MODES)}")
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source {self.feature_source!r} is not known; accepted: {', '.join(FEATURE_SOURCES)}")
        if self.feature_dtype not in ("fp16", "fp32"):
            raise ValueError(f"feature_dtype {self.feature_dtype!r} is not known; accepted: fp16, fp32")


@dataclass
class StyleInjectionConfig(StyleTransferConfig):
    """StyleID (Chung et al., CVPR 2024): content queries blended with γ, style K/V injected into the
    late decoder self-attention, attention temperature T, initial-latent AdaIN. Paper defaults."""

    method: str = opt("style_injection", "Method id; always 'style_injection'.")


@dataclass
class AttentionInjectionConfig(StyleTransferConfig):
    """MasaCtrl-style mutual self-attention: the target's queries attend to the reference's K/V in the
    late decoder layers from a start step on ('concat' attends to [own; reference])."""

    method: str = opt("attention_injection", "Method id; always 'attention_injection'.")
    gamma: float = opt(0.0, "Query preservation γ (MasaCtrl uses none: 0).")
    temperature: float = opt(1.0, "Attention temperature T (MasaCtrl: 1).")
    step_start: float = opt(0.08, "Inject from this fraction of the steps on (MasaCtrl skips the first 4 of 50: 0.08).")
    init_adain: bool = opt(False, "Give the content's inverted latent the style latent's channel mean/std (off in MasaCtrl).")
    feature_source: str = opt("in_batch", "'in_batch' (MasaCtrl: the reference rides in the batch, its latent replayed from its inversion) or 'recorded'.")
