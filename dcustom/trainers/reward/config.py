"""Settings of a reward fine-tuning run (torch-free: `dcustom config print reward` stays instant)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from dcustom.config import opt
from dcustom.trainers.loop import LoopConfig
from dcustom.trainers.peft_adapters import ATTN_TARGETS, LoraAdapterConfig

POLICIES = ("draft", "draft_k", "draft_lv", "alignprop_step", "alignprop_trajectory")
REWARD_NAMES = ("colourfulness", "compressibility", "aesthetic", "clip_score", "toy_attribute", "toy_alignment")


@dataclass
class SamplerConfig:
    steps: int = opt(20, "DDIM steps of each training trajectory (the papers use 50).", ge=1)
    guidance: float = opt(5.0, "Classifier-free guidance scale (<= 1 disables CFG).")
    eta: float = opt(0.0, "DDIM eta; > 0 injects noise, drawn up front (reparameterised).")
    height: Optional[int] = opt(None, "Image height; null uses the model's default.")
    width: Optional[int] = opt(None, "Image width; null uses the model's default.")
    negative_prompt: str = opt("", "Negative prompt of the unconditional CFG branch.")
    checkpoint_unet: bool = opt(True, "Wrap each grad-keeping UNet call in torch.utils.checkpoint (memory ~ one call).")
    checkpoint_vae: bool = opt(False, "Also checkpoint the VAE decode (train.gradient_checkpointing turns this on too).")


@dataclass
class PolicyConfig:
    name: str = opt("draft_k", "Which UNet calls keep gradients: " + ", ".join(POLICIES) + ".")
    k: int = opt(1, "draft_k: number of last steps in the graph.")
    lv_copies: int = opt(2, "draft_lv: re-noised copies of x0, each taking one grad step.")
    step_lo: int = opt(0, "alignprop_step: lowest per-step boundary (the original draws randint(0, 50)).")
    step_hi: Optional[int] = opt(None, "alignprop_step: highest per-step boundary; null = the step count.")
    boundary_mean: float = opt(0.84, "alignprop_trajectory: boundary mean as a fraction of the steps (42/50).")
    boundary_std: float = opt(0.10, "alignprop_trajectory: boundary std as a fraction of the steps (5/50).")

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"policy.name {self.name!r} is not known; accepted: {', '.join(POLICIES)}")


@dataclass
class RewardConfig:
    name: str = opt("colourfulness", "Reward: " + ", ".join(REWARD_NAMES) + ".")
    options: dict[str, Any] = opt({}, "Reward options, e.g. {head: colour, value: red} for toy_attribute, "
                                      "{clip_path: ..., head_path: ...} for aesthetic, {judge_path: ...}.")
    mode: str = opt("maximize", "maximize (loss = -r) or target (loss = |r - target|, AlignProp's L1 to 10).")
    target: float = opt(10.0, "Target value for mode=target.")
    coeff: float = opt(1.0, "Loss coefficient (AlignProp uses 0.01 with the aesthetic reward).")
    kl_weight: float = opt(0.0, "Weight of mean |f_theta - f_base|^2 over the grad steps (DRaFT+; 0 disables).")

    def __post_init__(self):
        if self.name not in REWARD_NAMES:
            raise ValueError(f"reward.name {self.name!r} is not known; accepted: {', '.join(REWARD_NAMES)}")
        if self.mode not in ("maximize", "target"):
            raise ValueError(f"reward.mode {self.mode!r} is not known; accepted: maximize, target")


@dataclass
class EvalConfig:
    prompts: list[str] = opt([], "Evaluation prompts; empty uses the training prompts.")
    images_per_prompt: int = opt(2, "Fixed seeds per evaluation prompt.")
    seed: int = opt(1234, "First evaluation seed (fixed across evaluations).")
    lora_scales: list[float] = opt([0.0, 0.5, 1.0], "LoRA scales evaluated at the end (0 = base): DRaFT's scaling curve.")
    early_stop_patience: int = opt(0, "Stop after this many evaluations without improvement (0: never); the best LoRA is kept.")
    early_stop_metric: str = opt("train", "What early stopping watches on the evaluation images: train (the training reward) or eval (its held-out counterpart).")
    min_delta: float = opt(0.0, "Smallest improvement that resets the patience.")
    best_of_n: bool = opt(False, "At the end, also report best-of-N sampling from the base model at the same number of reward-model calls as training.")

    def __post_init__(self):
        if self.early_stop_metric not in ("train", "eval"):
            raise ValueError(f"eval.early_stop_metric {self.early_stop_metric!r} is not known; accepted: train, eval")


def _reward_loop_defaults() -> LoopConfig:
    return LoopConfig(output_dir="runs/reward", steps=100, batch_size=2, lr=1e-3, weight_decay=1e-4,
                      max_grad_norm=1.0, sample_every=10, checkpoint_every=50, warmup_steps=0,
                      lr_scheduler="constant")


@dataclass
class RewardTrainConfig:
    moved_keys: ClassVar[dict] = {"lora.targets": "target_modules"}

    method: str = opt("reward", "Config kind; always 'reward'.")
    model: str = opt("tiny:sd15", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    prompts: list[str] = opt(["a red circle on a white background"], "Training prompts; each micro-batch draws train.batch_size of them.")
    prompt_file: Optional[str] = opt(None, "A text file with one training prompt per line (replaces prompts).")
    sampler: SamplerConfig = opt(SamplerConfig(), "The differentiable sampler.")
    policy: PolicyConfig = opt(PolicyConfig(), "Gradient policy: which UNet calls keep gradients.")
    reward: RewardConfig = opt(RewardConfig(), "The reward and the loss built from it.")
    lora: LoraAdapterConfig = opt(LoraAdapterConfig(rank=4, alpha=None),
                                  "The LoRA trained on the UNet (rank: AlignProp/TRL 4; DRaFT 8 at small scale, 32 at large); "
                                  "dora is not available.")
    target_modules: list[str] = opt(list(ATTN_TARGETS), "UNet modules that get the LoRA (peft target_modules).")
    eval: EvalConfig = opt(EvalConfig(), "Evaluation every train.sample_every steps: rewards, report, early stopping.")
    preflight_gradient_check: bool = opt(True, "Before training, check that the reward's gradient reaches every LoRA B matrix.")
    train: LoopConfig = opt(_reward_loop_defaults(), "The shared training loop.")

    def __post_init__(self):
        if self.lora.dora:
            raise ValueError("lora.dora is not available for reward fine-tuning (its LoRA is scaled at evaluation); "
                             "set it to false")
