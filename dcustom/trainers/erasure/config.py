"""Settings of a concept-erasure run (torch-free, so `dcustom config print erasure` is instant).

Three algorithms share one config:
- ``uce``: closed-form edit of every cross-attention key/value projection (seconds, no training);
- ``esd_x``: ESD fine-tuning of the cross-attention layers (specific: erases the word's effect);
- ``esd_u``: ESD fine-tuning of everything except cross-attention (thorough: erases the look).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from dcustom.config import opt
from dcustom.trainers.loop import LoopConfig
from dcustom.trainers.peft_adapters import LoraAdapterConfig

ALGORITHMS = ("uce", "esd_x", "esd_u")


@dataclass
class UceConfig:
    lam: float = opt(0.5, "λ: weight keeping each projection close to the original (larger = smaller edit).")
    erase_scale: float = opt(1.0, "Weight of mapping each erased concept onto its anchor.")
    preserve_scale: float = opt(1.0, "Weight of keeping the preserved concepts' keys/values unchanged.")
    tokens: Literal["concept", "concept_and_after"] = opt(
        "concept_and_after",
        "Which token embeddings are edited: the concept's own tokens, or those and every later position "
        "(end-of-text and padding also carry the concept through the causal text encoder).")
    preserve_empty_prompt: bool = opt(True, "Also keep the empty prompt's keys/values (the unconditional branch of CFG).")
    max_rank: int = opt(0, "Cap on the saved LoRA's rank (0: exact, the rank of the edit).")

    def __post_init__(self):
        if self.lam <= 0:
            raise ValueError(f"uce.lam must be > 0 (it keeps the solve well posed), got {self.lam}")
        if self.erase_scale <= 0 or self.preserve_scale < 0:
            raise ValueError("uce.erase_scale must be > 0 and uce.preserve_scale >= 0")


@dataclass
class EsdConfig:
    negative_guidance: float = opt(1.0, "η: the target is ε(x,r) − η·(ε(x,c) − ε(x,r)) from the frozen model, r the "
                                        "template with the concept replaced by its anchor.")
    start_guidance: float = opt(3.0, "CFG scale of the frozen model's partial sampling that produces x_t.")
    ddim_steps: int = opt(50, "DDIM steps of that sampling; x_t stops at a uniformly drawn step.")
    train_mode: Literal["lora", "weights"] = opt(
        "lora", "lora: a LoRA on the selected layers (its settings: the lora section; a composable file); "
                "weights: fine-tune the selected weights.")

    def __post_init__(self):
        if self.ddim_steps < 1:
            raise ValueError(f"esd.ddim_steps must be at least 1, got {self.ddim_steps}")


@dataclass
class ErasureTrainConfig:
    moved_keys: ClassVar[dict] = {"esd.lora_rank": "lora.rank", "esd.lora_alpha": "lora.alpha"}

    method: str = opt("erasure", "Config kind; always 'erasure'.")
    algorithm: Literal["uce", "esd_x", "esd_u"] = opt(
        "uce", "uce (closed form, seconds), esd_x (ESD on cross-attention) or esd_u (ESD on the rest).")
    model: str = opt("builtin:toy", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    erase: list[str] = opt(["purple"], "Concepts to erase (words or short phrases); several in one run.")
    anchors: list[str] = opt([""], "What each erased concept becomes: one per concept, or one for all ('' = nothing). "
                              "ESD guides away from the concept towards each template with the concept replaced by its "
                              "anchor ('' drops the word; ∅ when nothing is left).")
    preserve: list[str] = opt(["red", "green", "blue", "yellow", "orange"],
                              "Concepts that must stay as they are (UCE keeps their keys/values; ESD ignores this list).")
    templates: list[str] = opt(["{}", "a {}", "a picture of a {}", "a {} on a white background"],
                               "Prompt templates; '{}' is replaced by each concept.")
    save_format: Literal["auto", "lora", "full"] = opt(
        "auto", "lora: a diffusers LoRA file (loads with pipe.load_lora_weights, composes with other adapters); "
        "full: a whole diffusers model folder with the edited weights; auto: lora, except full for esd.train_mode weights.")
    dtype: str = opt("auto", "Weights precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    uce: UceConfig = opt(UceConfig(), "UCE settings (algorithm uce).")
    esd: EsdConfig = opt(EsdConfig(), "ESD settings (algorithms esd_x, esd_u).")
    lora: LoraAdapterConfig = opt(LoraAdapterConfig(rank=8, alpha=8.0),
                                  "The LoRA ESD trains on the selected layers (esd.train_mode lora); dora is not available.")
    train: LoopConfig = opt(
        LoopConfig(output_dir="runs/erasure", steps=200, lr=1e-4, checkpoint_every=100),
        "Run folder and training loop (ESD); UCE uses only output_dir, device and seed.")

    def __post_init__(self):
        if self.algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm {self.algorithm!r} is not known; accepted: {', '.join(ALGORITHMS)}")
        if not self.erase or any(not c.strip() for c in self.erase):
            raise ValueError("erase must list at least one non-empty concept")
        if len(self.anchors) not in (1, len(self.erase)):
            raise ValueError(f"anchors must hold 1 or {len(self.erase)} entries (one per erased concept), got {len(self.anchors)}")
        if not self.templates or any(t.count("{}") != 1 for t in self.templates):
            raise ValueError("every entry of templates must contain '{}' exactly once")
        overlap = set(self.erase) & set(self.preserve)
        if overlap:
            raise ValueError(f"concept {sorted(overlap)[0]!r} is both erased and preserved")
        if self.lora.dora:
            raise ValueError("lora.dora is not available for erasure (its file is a plain LoRA that stacks with others); "
                             "set it to false")

        if self.algorithm != "uce" and self.save_format != "auto" and self.save_format != self.output_format():
            raise ValueError(f"esd.train_mode {self.esd.train_mode!r} writes save_format {self.output_format()!r}; "
                             f"set save_format to auto or {self.output_format()}")

    def output_format(self) -> str:
        """What is written: 'lora' or 'full' (ESD's format follows its train_mode)."""
        if self.algorithm == "uce":
            return "lora" if self.save_format == "auto" else self.save_format
        return "lora" if self.esd.train_mode == "lora" else "full"

    def anchor_for(self, index: int) -> str:
        return self.anchors[index] if len(self.anchors) > 1 else self.anchors[0]
