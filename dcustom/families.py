"""Model families: everything family-specific lives in one small description per family.

Trainers and hooks ask the family which text encoders exist, which attention layers a preset
selects and which extra conditioning the UNet needs, so a new family (SD3, FLUX) is one more entry
here rather than an edit in every trainer. The MM-DiT families (SD3, FLUX) also say which component
denoises (`transformer`), that they are trained by flow matching, how their timesteps are shifted,
and which Linear layers a LoRA wraps by default.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Family:
    name: str  # "sd1", "sd2", "sdxl"
    label: str
    text_encoders: tuple[str, ...]  # pipeline attribute names
    tokenizers: tuple[str, ...]
    micro_conditioning: bool  # SDXL add_time_ids / pooled text embeds
    default_resolution: int
    # Named regexes over `unet.attn_processors` keys, used by training-free hooks.
    layer_presets: dict[str, str] = field(default_factory=dict)
    denoiser: str = "unet"  # the pipeline attribute that predicts: "unet" or "transformer"
    objective: str = "noise"  # "noise" (DDPM ε/v) or "flow" (rectified flow: velocity, σ in [0, 1])
    # Flow families: "fixed" (SD3: σ' = sσ / (1 + (s-1)σ), s from the scheduler) or "resolution" (FLUX: the
    # exponent μ grows linearly with the number of image tokens, σ' = e^μ / (e^μ + 1/σ - 1)).
    timestep_shift: str = "none"
    lora_targets: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")  # LoRA default target_modules

    @property
    def is_dit(self) -> bool:
        return self.denoiser == "transformer"


_SD_PRESETS = {
    "all_self": r".*attn1\.processor$",
    "all_cross": r".*attn2\.processor$",
    # Every decoder self-attention (SD1.x: up_blocks.1-3; SDXL: up_blocks.0-1, 36 layers).
    "decoder_self": r"^up_blocks\.\d+\..*attn1\.processor$",
    # StyleID / MasaCtrl / FreeCustom: LDM output blocks 6-11 = SD1.x up_blocks.2 and up_blocks.3.
    "decoder_self_late": r"^up_blocks\.[23]\..*attn1\.processor$",
    "mid_and_decoder_self": r"^(mid_block|up_blocks)\..*attn1\.processor$",
    # InstantStyle's SD1.5 style blocks (cross-attention; experimental per its authors).
    "instantstyle_style": r"^up_blocks\.1\..*attn2\.processor$",
}

FAMILIES: dict[str, Family] = {
    "sd1": Family("sd1", "Stable Diffusion 1.x", ("text_encoder",), ("tokenizer",), False, 512, dict(_SD_PRESETS)),
    "sd2": Family("sd2", "Stable Diffusion 2.x", ("text_encoder",), ("tokenizer",), False, 768, dict(_SD_PRESETS)),
    "sdxl": Family(
        "sdxl",
        "Stable Diffusion XL",
        ("text_encoder", "text_encoder_2"),
        ("tokenizer", "tokenizer_2"),
        True,
        1024,
        {
            **_SD_PRESETS,
            # SDXL's highest-resolution decoder attention is up_blocks.1 (Visual Style Prompting's default).
            "decoder_self_late": r"^up_blocks\.1\..*attn1\.processor$",
            # InstantStyle: style in up_blocks.0.attentions.1, layout in down_blocks.2.attentions.1 (cross-attention).
            "instantstyle_style": r"^up_blocks\.0\.attentions\.1\..*attn2\.processor$",
            "instantstyle_layout": r"^down_blocks\.2\.attentions\.1\..*attn2\.processor$",
        },
    ),
}

# MM-DiT joint attention: image and text tokens attend together in every `attn` of a transformer block
# (FLUX also has single-stream blocks, whose `attn` sees the concatenated stream).
_JOINT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
_DIT_PRESETS = {
    "all_self": r"transformer_blocks\.\d+\.attn\.processor$",  # every joint (and single-stream) attention
    "joint": r"^transformer_blocks\.\d+\.attn\.processor$",  # the two-stream (MM-DiT) blocks
}
FAMILIES["sd3"] = Family("sd3", "Stable Diffusion 3/3.5", ("text_encoder", "text_encoder_2", "text_encoder_3"),
                         ("tokenizer", "tokenizer_2", "tokenizer_3"), False, 1024, dict(_DIT_PRESETS),
                         denoiser="transformer", objective="flow", timestep_shift="fixed", lora_targets=_JOINT_TARGETS)
FAMILIES["flux"] = Family("flux", "FLUX.1", ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2"), False,
                          1024, {**_DIT_PRESETS, "single": r"^single_transformer_blocks\.\d+\.attn\.processor$"},
                          denoiser="transformer", objective="flow", timestep_shift="resolution",
                          lora_targets=_JOINT_TARGETS)


def denoiser(pipe):
    """The module that predicts noise or velocity: `pipe.unet` (SD1/2, SDXL) or `pipe.transformer` (SD3, FLUX)."""
    return pipe.transformer if getattr(pipe, "transformer", None) is not None else pipe.unet


def detect_family(pipe) -> Family:
    """Family of a loaded diffusers pipeline, from its components (not its class name alone)."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        if getattr(pipe, "text_encoder_3", None) is not None or type(transformer).__name__.startswith("SD3"):
            return FAMILIES["sd3"]
        if type(transformer).__name__.startswith("Flux"):
            return FAMILIES["flux"]
    if getattr(pipe, "text_encoder_2", None) is not None or "XL" in type(pipe).__name__:
        return FAMILIES["sdxl"]
    cross_dim = getattr(pipe.unet.config, "cross_attention_dim", 768)
    if isinstance(cross_dim, (list, tuple)):
        cross_dim = cross_dim[0]
    # SD2.x uses OpenCLIP ViT-H (1024-d, gelu), SD1.x CLIP ViT-L (768-d, quick_gelu).
    text_act = getattr(getattr(pipe.text_encoder, "config", None), "hidden_act", "quick_gelu")
    if cross_dim == 1024 or text_act == "gelu":
        return FAMILIES["sd2"]
    return FAMILIES["sd1"]


def prediction_type(pipe) -> str:
    """"epsilon", "v_prediction" or "sample", as the scheduler config says."""
    return getattr(pipe.scheduler.config, "prediction_type", "epsilon")
