"""Config of flow_lora (torch-free): the LoRA settings every method shares, the data, the loop, and `flow:`
(how timesteps are drawn and shifted, FLUX's guidance input, the T5 sequence length)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from dcustom.config import opt
from dcustom.data import DataConfig
from dcustom.trainers.loop import LoopConfig
from dcustom.trainers.peft_adapters import LoraAdapterConfig

SIGMA_SAMPLING = ("logit_normal", "uniform")


@dataclass
class FlowConfig:
    sampling: str = opt("logit_normal", "How σ (the noise level, 0 = image, 1 = noise) is drawn: logit_normal (SD3 paper, "
                                        "σ = sigmoid(N(mean, std)), favours the middle) or uniform.",
                        choices=SIGMA_SAMPLING)
    logit_mean: float = opt(0.0, "Mean of the logit-normal (the SD3 paper's m).")
    logit_std: float = opt(1.0, "Std of the logit-normal (the SD3 paper's s).", gt=0)
    shift: Optional[float] = opt(None, "Timestep shift s: σ' = sσ / (1 + (s-1)σ). null: the family's own (SD3: the "
                                       "scheduler's shift, 3.0; FLUX: resolution-dependent, from the image's token count "
                                       "as its sampler does).", gt=0)
    guidance: float = opt(1.0, "FLUX.1-dev's guidance-embedding input during training (1.0 is what FLUX LoRA trainers "
                               "use; ignored by models without the embedding, e.g. schnell and SD3).", ge=0)
    max_sequence_length: Optional[int] = opt(None, "T5 tokens per caption; null: the pipeline's default (SD3 256, "
                                                   "FLUX 512). Samples use the same length.", ge=1, le=512)


@dataclass
class FlowLoraTrainConfig(LoraAdapterConfig):
    method: str = opt("flow_lora", "Always 'flow_lora'.")
    model: str = opt("tiny:flux", "Base model: an SD3/3.5 or FLUX.1 diffusers folder, single file (with model_config) or "
                                  "hub id; tiny:sd3 or tiny:flux for tests.")
    model_config: Optional[str] = opt(None, "Only for a single-file model offline: a local diffusers folder of the same "
                                            "family whose configs describe it.")
    data: DataConfig = opt(DataConfig(), "Training images and captions (T5 and CLIP outputs are cached once).")
    train: LoopConfig = opt(LoopConfig(), "Shared loop settings (steps, lr, precision, checkpoints).")
    flow: FlowConfig = opt(FlowConfig(), "Flow-matching objective: timestep sampling and shift, FLUX guidance.")
    target_modules: list[str] = opt([],
                                    "Transformer Linear layers the LoRA wraps (peft target_modules); empty: the family's "
                                    "joint-attention projections (to_q/k/v, to_out.0, add_q/k/v_proj, to_add_out).")
    validation_prompts: list[str] = opt(["a photo of sks dog on the beach"], "Prompts rendered as samples.")
    sample_steps: int = opt(20, "Sampling steps for validation images.", ge=1)
    sample_guidance: float = opt(3.5, "Guidance of validation images (FLUX: the distilled guidance; SD3: CFG).", ge=0)
    sample_seed: int = opt(1234, "Seed of the validation images.", ge=0)
    write_kohya: bool = opt(True, "Also write lora_kohya.safetensors: the original checkpoint's module names with q/k/v "
                                  "fused (lora_unet_double_blocks_N_img_attn_qkv / lora_unet_joint_blocks_N_x_block_attn_qkv), "
                                  "the layout kohya sd-scripts and ComfyUI exchange.")

    def __post_init__(self):
        if self.data.prior.enabled:
            raise ValueError("data.prior: prior preservation is not available in flow_lora; set data.prior.enabled: false")
