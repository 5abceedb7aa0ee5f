"""Method id -> (config class, implementation): one explicit dict, torch-free.

Ids are snake_case and the same in the CLI sub-command, the YAML `method:`, this key and
`configs/<id>.yaml`. Where the code lives is what `config` and `run` point to, not the id: lora, oft
and boft share `trainers/adapter/`, the style methods are modules of `pipelines/`, toy_base is in
`toyworld/` (docs/architecture.md has the table).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from dcustom.errors import DcustomError


@dataclass(frozen=True)
class Method:
    id: str
    kind: str  # "generate", "train", "style", "recipe"
    config: str  # "module:ConfigClass"
    run: str  # "module:function(config, ...)"
    summary: str

    def config_class(self):
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)

    def implementation(self):
        module, name = self.run.split(":")
        return getattr(importlib.import_module(module), name)


METHODS: dict[str, Method] = {
    "generate": Method("generate", "generate", "dcustom.generate_config:GenerateConfig", "dcustom.generate:generate",
                       "Text-to-image generation with optional adapters."),
    "toy_base": Method("toy_base", "recipe", "dcustom.toyworld.config:ToyBaseConfig", "dcustom.toyworld.train_base:run",
                       "Train the embedded toy model (text encoder, VAE, UNet) from a seed."),
    "erasure": Method("erasure", "train", "dcustom.trainers.erasure.config:ErasureTrainConfig",
                      "dcustom.trainers.erasure.run:run",
                      "Concept erasure: closed-form UCE or ESD-x/ESD-u fine-tuning; a composable LoRA or edited weights."),
    "lora": Method("lora", "train", "dcustom.trainers.adapter.config:LoraTrainConfig", "dcustom.trainers.adapter.trainer:run",
                   "Subject LoRA (or DoRA) from a few images; diffusers + kohya/A1111 files."),
    "oft": Method("oft", "train", "dcustom.trainers.adapter.config:OftTrainConfig", "dcustom.trainers.adapter.trainer:run",
                  "Orthogonal fine-tuning (peft OFTv2) adapter from a few images."),
    "boft": Method("boft", "train", "dcustom.trainers.adapter.config:BoftTrainConfig", "dcustom.trainers.adapter.trainer:run",
                   "Butterfly orthogonal fine-tuning (peft BOFT) adapter from a few images."),
    "flow_lora": Method("flow_lora", "train", "dcustom.trainers.flow.config:FlowLoraTrainConfig",
                        "dcustom.trainers.flow.trainer:run",
                        "LoRA (or DoRA) on an SD3/3.5 or FLUX.1 transformer by flow matching; diffusers + kohya/ComfyUI files."),
    "textual_inversion": Method("textual_inversion", "train", "dcustom.trainers.textual_inversion.config:TextualInversionTrainConfig",
                                "dcustom.trainers.textual_inversion.trainer:run",
                                "Textual inversion: new token vectors; with adapter lora/oft, pivotal tuning (both files)."),
    "reward": Method("reward", "train", "dcustom.trainers.reward.config:RewardTrainConfig", "dcustom.trainers.reward.trainer:run",
                     "Reward fine-tuning by backpropagation through sampling (AlignProp, DRaFT, DRaFT-K/-LV); a UNet LoRA."),
    "style_injection": Method("style_injection", "style", "dcustom.pipelines.style_injection:StyleInjectionConfig",
                              "dcustom.pipelines.style_injection:run",
                              "Training-free style transfer (StyleID): content queries, style K/V, temperature, latent AdaIN."),
    "attention_injection": Method("attention_injection", "style", "dcustom.pipelines.attention_injection:AttentionInjectionConfig",
                                  "dcustom.pipelines.attention_injection:run",
                                  "Training-free MasaCtrl-style mutual self-attention to a reference image's K/V."),
}


def get_method(method_id: str, kind: str | None = None) -> Method:
    candidates = {k: m for k, m in METHODS.items() if kind is None or m.kind == kind}
    if method_id not in candidates:
        what = f"{kind} method" if kind else "method"
        raise DcustomError(f"{what} {method_id!r} is not known; accepted: {', '.join(candidates)}.")
    return candidates[method_id]


def methods_of_kind(kind: str) -> list[str]:
    return [k for k, m in METHODS.items() if m.kind == kind]
