"""Configs of the adapter trainer (torch-free): one schema per method id, sharing the common part.

`LoraTrainConfig` is the LoRA settings every method shares (`LoraAdapterConfig`: rank, alpha, dropout, dora,
init) plus the adapter trainer's common part, so the lora method's YAML keeps them at its top level."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dcustom.config import opt
from dcustom.data import DataConfig
from dcustom.trainers.fidelity import FidelityConfig
from dcustom.trainers.loop import LoopConfig
from dcustom.trainers.peft_adapters import ATTN_TARGETS, LoraAdapterConfig


@dataclass
class AdapterTrainConfig:
    method: str = opt("lora", "Adapter kind: lora, oft or boft (the command's method id).")
    model: str = opt("tiny:sd15", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    data: DataConfig = opt(DataConfig(), "Training images and captions.")
    train: LoopConfig = opt(LoopConfig(), "Shared loop settings (steps, lr, precision, checkpoints).")
    target_modules: list[str] = opt(list(ATTN_TARGETS), "UNet Linear layers the adapter wraps (peft target_modules).")
    min_snr_gamma: Optional[float] = opt(5.0, "Min-SNR-gamma loss weighting (null disables; 5 is the paper's value).", gt=0)
    noise_offset: float = opt(0.0, "Noise offset (e.g. 0.05) for darker/brighter images; 0 disables.", ge=0)
    keep_prompts: list[str] = opt(
        [], "Prompts without the trigger whose predictions stay the base model's: each step adds the adapted UNet's "
            "squared distance from the base on one of them, at the same noisy latents ('' is guidance's unconditional "
            "branch). An adapter on convolutions or feed-forward layers otherwise changes every prompt. Empty "
            "disables it (it costs two more UNet passes per step).")
    keep_weight: float = opt(1.0, "Weight of that loss.", ge=0)
    validation_prompts: list[str] = opt(["a photo of sks dog on the beach"], "Prompts rendered as samples (every train.sample_every steps and at the end).")
    sample_steps: int = opt(25, "Sampling steps for validation images.", ge=1)
    sample_seed: int = opt(1234, "Seed of the validation images (same each time, so they are comparable).", ge=0)
    fidelity: FidelityConfig = opt(FidelityConfig(), "Subject fidelity and prompt adherence with each sample, and the "
                                                      "best step's adapter kept in best/.")

    def __post_init__(self):
        if self.train.steps < 1:
            raise ValueError(f"train.steps must be at least 1, got {self.train.steps}")
        if not self.target_modules:
            raise ValueError("target_modules is empty; name at least one UNet layer, e.g. [to_q, to_k, to_v, to_out.0]")


@dataclass
class LoraTrainConfig(LoraAdapterConfig, AdapterTrainConfig):
    method: str = opt("lora", "Always 'lora'.")
    text_encoder_lora: bool = opt(False, "Also train LoRA on the text encoder(s) (disables text caching).")
    text_encoder_rank: int = opt(8, "Rank of the text-encoder LoRA.", ge=1)
    text_encoder_alpha: Optional[float] = opt(None, "Alpha of the text-encoder LoRA (its update is scaled by alpha / text_encoder_rank); null: the same as alpha.")
    write_kohya: bool = opt(True, "Also write lora_kohya.safetensors (A1111/Forge/ComfyUI keys, true per-module alpha).")


@dataclass
class OftTrainConfig(AdapterTrainConfig):
    method: str = opt("oft", "Always 'oft'.")
    block_size: int = opt(32, "OFT block size (must divide each targeted layer's input width).", ge=1)
    coft: bool = opt(False, "Constrained OFT (bounds the rotation by eps).")
    eps: float = opt(6e-5, "COFT radius.", gt=0)
    cayley_neumann: bool = opt(True, "Cayley-Neumann approximation (OFTv2, faster).")
    module_dropout: float = opt(0.0, "Multiplicative dropout of whole blocks.", ge=0, lt=1)
    write_merged: bool = opt(False, "Also write the merged UNet weights (unet_merged.safetensors).")
    extract_rank: int = opt(32, "Rank of the SVD-extracted LoRA written for LoRA-only tools (0: none).", ge=0)
    write_full_diff: bool = opt(False, "Also write full_diff.safetensors: the exact weight changes, which ComfyUI/Forge, "
                                       "A1111 and InvokeAI add as they are (as large as the adapted layers, float32).")


@dataclass
class BoftTrainConfig(AdapterTrainConfig):
    method: str = opt("boft", "Always 'boft'.")
    block_size: int = opt(4, "BOFT block size (boft_block_size).", ge=1)
    butterfly_factor: int = opt(2, "Number of butterfly factors (boft_n_butterfly_factor).", ge=1)
    dropout: float = opt(0.0, "BOFT multiplicative dropout.", ge=0, lt=1)
    write_merged: bool = opt(False, "Also write the merged UNet weights (unet_merged.safetensors).")
    extract_rank: int = opt(32, "Rank of the SVD-extracted LoRA written for LoRA-only tools (0: none).", ge=0)
    write_full_diff: bool = opt(False, "Also write full_diff.safetensors: the exact weight changes, which ComfyUI/Forge, "
                                       "A1111 and InvokeAI add as they are (as large as the adapted layers, float32).")
