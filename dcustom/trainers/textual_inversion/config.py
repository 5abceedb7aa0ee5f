"""Settings of a textual-inversion run (torch-free, so `dcustom config print textual_inversion` is instant).

Textual inversion learns new token vectors only; pivotal tuning is the same run with `adapter: lora`
or `oft`: the new vectors train for the first `embedding_fraction` of the steps, the adapter from
`adapter_options.start_step` to the end, and both files are saved. The LoRA's rank, alpha, dropout
and DoRA are the `lora:` section (`LoraAdapterConfig`, the same in every method that trains a LoRA).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Optional

from dcustom.config import opt
from dcustom.data import DataConfig
from dcustom.trainers.fidelity import FidelityConfig
from dcustom.trainers.loop import LoopConfig
from dcustom.trainers.peft_adapters import ATTN_TARGETS, LoraAdapterConfig


@dataclass
class PivotalAdapterConfig:
    block_size: int = opt(32, "OFT block size (adapter oft; must divide each targeted layer's input width).")
    target_modules: list = opt(list(ATTN_TARGETS), "UNet Linear layers the adapter wraps (peft target_modules).")
    start_step: int = opt(0, "Optimizer step at which the adapter starts training (0: from the start).")
    write_kohya: bool = opt(True, "Also write lora_kohya.safetensors (A1111/Forge/ComfyUI keys) for a LoRA.")

    def __post_init__(self):
        if self.block_size < 1:
            raise ValueError("adapter_options.block_size must be at least 1")
        if self.start_step < 0:
            raise ValueError(f"adapter_options.start_step must be >= 0, got {self.start_step}")


@dataclass
class TextualInversionTrainConfig:
    moved_keys: ClassVar[dict] = {"adapter_options.rank": "lora.rank", "adapter_options.alpha": "lora.alpha",
                                  "adapter_options.dropout": "lora.dropout"}

    method: str = opt("textual_inversion", "Config kind; always 'textual_inversion'.")
    model: str = opt("tiny:sd15", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    data: DataConfig = opt(DataConfig(instance_prompt="a photo of <toy-subject>", cache_text=False),
                           "Training images; captions are used when prompts is 'captions' (text is never cached: the tokens learn).")
    train: LoopConfig = opt(LoopConfig(output_dir="runs/textual_inversion", steps=1000, lr=5e-3, weight_decay=0.0,
                                       checkpoint_every=250),
                            "Shared loop settings; train.lr is the adapter's rate in pivotal tuning, else the vectors'.")
    tokens: list = opt(["<toy-subject>"], "New placeholder tokens (one or more), written in prompts as they are here.")
    init_words: list = opt(["toy"], "Word each token starts from, one per token or one for all (a word of several "
                                    "sub-tokens starts from their mean; '' starts from the mean of the whole vocabulary).")
    num_vectors: int = opt(1, "Vectors per token (multi-vector: the token expands to tok, tok_1, ... as diffusers does).")
    prompts: Literal["templates", "captions"] = opt(
        "templates", "templates: random object/style templates around the tokens; captions: the data's captions "
                     "(.txt files or data.instance_prompt), which must contain a token.")
    learnable_property: Literal["object", "style"] = opt("object", "Template set: object ('a photo of a {}') or style ('a painting in the style of {}').")
    embedding_lr: Optional[float] = opt(None, "Learning rate of the new vectors; null: train.lr (set it when an adapter trains at train.lr).")
    adapter: Literal["none", "lora", "oft"] = opt("none", "Pivotal tuning: also train a LoRA or OFT adapter on the UNet (none: vectors only).")
    embedding_fraction: float = opt(1.0, "Share of the steps during which the vectors train (pivotal tuning: e.g. 0.5); then they are frozen.")
    adapter_options: PivotalAdapterConfig = opt(PivotalAdapterConfig(), "The adapter of pivotal tuning: where it goes, when it starts.")
    lora: LoraAdapterConfig = opt(LoraAdapterConfig(rank=8, alpha=8.0), "The LoRA of pivotal tuning (adapter lora).")
    keep_prompts: list = opt([], "Pivotal tuning: prompts without the tokens whose predictions stay the base model's "
                                 "while the adapter trains (the adapter trainer's keep_prompts; the vectors alone never "
                                 "change them). Empty disables it.")
    keep_weight: float = opt(1.0, "Weight of that loss.", ge=0)
    min_snr_gamma: Optional[float] = opt(5.0, "Min-SNR-gamma loss weighting (null disables).", gt=0)
    noise_offset: float = opt(0.0, "Noise offset (e.g. 0.05); 0 disables.", ge=0)
    validation_prompts: list = opt(["a photo of <toy-subject> on a striped background"], "Prompts rendered as samples (every train.sample_every steps and at the end).")
    sample_steps: int = opt(25, "Sampling steps for validation images.", ge=1)
    sample_seed: int = opt(1234, "Seed of the validation images.", ge=0)
    fidelity: FidelityConfig = opt(FidelityConfig(), "Subject fidelity with each sample (its prompts name the subject by "
                                                      "the first token), and the best step's files kept in best/.")

    def __post_init__(self):
        if self.train.steps < 1:
            raise ValueError(f"train.steps must be at least 1, got {self.train.steps}")
        if not self.tokens:
            raise ValueError("tokens: give at least one placeholder token, e.g. ['<toy-subject>']")
        bad = [t for t in self.tokens if not isinstance(t, str) or not t.strip() or any(c.isspace() for c in t)]
        if bad:
            raise ValueError(f"tokens: {bad[0]!r} is not a usable token; accepted: one word without spaces, e.g. '<toy-subject>'")
        upper = [t for t in self.tokens if t != t.lower()]
        if upper:  # CLIP tokenizers lowercase the prompt, so a capital letter would never match
            raise ValueError(f"tokens: {upper[0]!r} has capital letters, which CLIP tokenizers lower-case in prompts; use {upper[0].lower()!r}")
        if len(set(self.tokens)) < len(self.tokens):
            raise ValueError(f"tokens: {self.tokens} names a token twice")
        if len(self.init_words) not in (1, len(self.tokens)):
            raise ValueError(f"init_words: give one word for all tokens or one per token ({len(self.tokens)}), got {len(self.init_words)}")
        if self.num_vectors < 1:
            raise ValueError(f"num_vectors must be at least 1, got {self.num_vectors}")
        if not 0.0 <= self.embedding_fraction <= 1.0:
            raise ValueError(f"embedding_fraction must be between 0 and 1, got {self.embedding_fraction}")
        if self.embedding_lr is not None and self.embedding_lr <= 0:
            raise ValueError(f"embedding_lr must be > 0 or null, got {self.embedding_lr}")
        if self.adapter == "none" and self.embedding_fraction == 0:
            raise ValueError("embedding_fraction 0 with adapter none trains nothing; raise it or pick adapter lora/oft")
        if self.adapter != "none" and self.adapter_options.start_step >= self.train.steps:
            raise ValueError(f"adapter_options.start_step ({self.adapter_options.start_step}) must be below train.steps ({self.train.steps})")
