"""`ToyBaseConfig`: the recipe that trains the embedded toy model (torch-free schema)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal

from dcustom.config import opt


@dataclass
class ToyModelConfig:
    vae_channels: List[int] = opt([16, 32, 64], "AutoencoderKL block widths; 3 blocks = two 2x downsamples: 64x64 -> 16x16.")
    vae_layers_per_block: int = opt(1, "ResNet layers per VAE block.")
    latent_channels: int = opt(8, "Latent channels (SD1/SDXL use 4, SD3 16; 8 carries the held-out subjects' details here).")
    text_hidden: int = opt(64, "CLIPTextModel hidden size (= UNet cross-attention dim).")
    text_layers: int = opt(2, "CLIPTextModel transformer layers.")
    text_heads: int = opt(4, "CLIPTextModel attention heads.")
    text_max_length: int = opt(32, "Tokenizer model_max_length (captions are at most ~16 tokens).")
    unet_channels: List[int] = opt([64, 96, 96], "UNet block widths at 16x16, 8x8, 4x4.")
    unet_layers_per_block: int = opt(1, "ResNet layers per UNet block.")
    unet_head_dim: int = opt(16, "Channels per attention head in the UNet.")
    unet_cross_attention_levels: int = opt(2, "How many of the highest-resolution UNet levels get cross-attention "
                                           "(the mid block always has it).")

    def __post_init__(self):
        # Checked here, before any stage runs, so a value that cannot build fails in one sentence naming
        # the key instead of a diffusers traceback minutes into the run.
        _check_widths("vae_channels", self.vae_channels, exactly=3,
                      why="3 blocks = two 2x downsamples: 64x64 images -> the 16x16 latents the recipe's masks use")
        _check_widths("unet_channels", self.unet_channels, at_most=4, why="the 16x16 latent allows at most 3 downsamples")
        for key in ("vae_layers_per_block", "latent_channels", "text_hidden", "text_layers", "text_heads",
                    "unet_layers_per_block", "unet_head_dim"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be at least 1, got {getattr(self, key)}")
        for key, widths in (("vae_channels", self.vae_channels), ("unet_channels", self.unet_channels)):
            groups = min(32, widths[0])  # diffusers' GroupNorm uses this many groups in every block
            bad = [w for w in widths if w % groups]
            if bad:
                raise ValueError(f"{key} {widths}: every width must be divisible by the norm groups "
                                 f"min(32, first width) = {groups}; {bad[0]} is not")
        bad = [w for w in self.unet_channels if w % self.unet_head_dim]
        if bad:
            raise ValueError(f"unet_channels {self.unet_channels}: every width must be a multiple of "
                             f"unet_head_dim {self.unet_head_dim}; {bad[0]} is not")
        if self.text_hidden % self.text_heads:
            raise ValueError(f"text_hidden {self.text_hidden} must be divisible by text_heads {self.text_heads}")
        if self.text_max_length < 16:
            raise ValueError(f"text_max_length must be at least 16 (captions take up to ~16 tokens), "
                             f"got {self.text_max_length}")
        if not 0 <= self.unet_cross_attention_levels <= len(self.unet_channels):
            raise ValueError(f"unet_cross_attention_levels must be between 0 and len(unet_channels) = "
                             f"{len(self.unet_channels)}, got {self.unet_cross_attention_levels}")


def _check_widths(key: str, widths, why: str, exactly: int | None = None, at_most: int | None = None):
    if not widths or (exactly is not None and len(widths) != exactly) or (at_most is not None and len(widths) > at_most):
        count = f"exactly {exactly}" if exactly is not None else f"1 to {at_most}"
        raise ValueError(f"{key} must list {count} block widths ({why}), got {list(widths)}")
    if any(w < 1 for w in widths):
        raise ValueError(f"{key} widths must be positive, got {list(widths)}")


@dataclass
class TextStageConfig:
    steps: int = opt(200, "Text-encoder alignment steps (0 skips the stage).")
    batch_size: int = opt(128, "Captions per step.")
    lr: float = opt(1e-3, "AdamW learning rate.")
    freeze_after: bool = opt(True, "Freeze the text encoder for the UNet stage (a fixed, pre-aligned conditioning).")


@dataclass
class VaeStageConfig:
    steps: int = opt(8000, "AutoencoderKL steps.")
    batch_size: int = opt(16, "Images per step.")
    lr: float = opt(2e-3, "AdamW learning rate (cosine decay, 200 warmup steps).")
    kl_weight: float = opt(1e-6, "KL term weight (SD-like: tiny, latents stay informative).")
    object_weight: float = opt(2.0, "Extra reconstruction weight on object pixels.")
    generic_fraction: float = opt(0.5, "Fraction of each batch drawn from generic procedural images (random polygons, "
                                       "colours, textures and small details; never a subject) instead of base renders, "
                                       "so the autoencoder carries what the base split never shows.")
    generic_images: int = opt(20000, "Generic images rendered for the VAE stage (0 = none).")


@dataclass
class UnetStageConfig:
    steps: int = opt(4000, "UNet optimizer steps.")
    batch_size: int = opt(32, "Latents per step.")
    lr: float = opt(1.5e-3, "Peak AdamW learning rate.")
    warmup_steps: int = opt(50, "Linear warmup steps.")
    min_lr_ratio: float = opt(0.05, "Cosine decay floor as a fraction of lr.")
    weight_decay: float = opt(0.01, "AdamW weight decay.")
    grad_clip: float = opt(1.0, "Max gradient norm.")
    object_weight: float = opt(4.0, "Loss weight on latent pixels covered by the object is 1 + object_weight.")
    min_snr_gamma: float = opt(5.0, "Min-SNR-gamma timestep weighting (0 disables).")
    cond_dropout: float = opt(0.1, "Probability of training on the empty caption (classifier-free guidance).")
    noise_offset: float = opt(0.1, "Per-image, per-channel constant added to the training noise (offset noise): "
                                   "without it the sampler starts every image at the mean brightness and black or "
                                   "white backgrounds come out gray (0 disables).")
    ema_decay: float = opt(0.999, "EMA of the UNet weights, used for evaluation and export (0 disables).")


@dataclass
class CurveConfig:
    every: int = opt(1000, "Measure per-attribute judge accuracy every N UNet steps (and at the end).")
    prompts: int = opt(16, "Held-out prompts per measurement (fixed seed).")
    sampling_steps: int = opt(10, "DDIM steps when sampling for the curve.")
    guidance: float = opt(4.0, "Classifier-free guidance scale when sampling for the curve.")
    judge: Literal["eval", "train"] = opt("eval", "Judge that reports the curve (J_eval only ever reports).")


@dataclass
class ToyBaseConfig:
    method: str = opt("toy_base", "Recipe id (do not change).")
    output_dir: str = opt("runs/toy_base", "Run folder: config.yaml, events.jsonl, checkpoints/, learning_curve.*, model/.")
    seed: int = opt(0, "Seed of everything: data pool, captions, noise, initial weights.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N.")
    mixed_precision: Literal["auto", "no", "bf16"] = opt("auto", "auto = bf16 autocast on CUDA, fp32 on CPU.")
    threads: int = opt(0, "CPU threads for torch (0 = torch's default).")
    compile: bool = opt(False, "torch.compile the UNet (CUDA only).")
    pool_size: int = opt(3000, "Rendered training images (base split only), encoded to latents once.")
    captions_per_image: int = opt(4, "Captions pre-drawn per image (synonyms, templates); one is picked per step.")
    render_workers: int = opt(0, "Processes rendering the pool (0 = one per CPU core, at most 16).")
    min_size: float = opt(30.0, "Smallest object diameter in pixels (larger objects bind shape better).")
    max_size: float = opt(54.0, "Largest object diameter in pixels.")
    max_angle: float = opt(15.0, "Largest object rotation in degrees.")
    caption_detail: float = opt(0.2, "Probability of adding size / position words to a caption.")
    model: ToyModelConfig = opt(ToyModelConfig(), "Architecture.")
    text: TextStageConfig = opt(TextStageConfig(), "Stage 1: align the text encoder to the grammar's attributes.")
    vae: VaeStageConfig = opt(VaeStageConfig(), "Stage 2: the autoencoder.")
    unet: UnetStageConfig = opt(UnetStageConfig(), "Stage 3: the denoiser on cached latents.")
    curve: CurveConfig = opt(CurveConfig(), "Learning curve.")
    checkpoint_every: int = opt(500, "Save a resumable checkpoint every N optimizer steps (all stages counted).")
    keep_checkpoints: int = opt(2, "Checkpoints kept (older ones are deleted).")
    resume: bool = opt(True, "Continue from the newest checkpoint in output_dir if there is one.")
    time_budget_minutes: float = opt(150.0, "Wall-clock cap for this invocation (0 = none). When it runs out the run "
                                          "checkpoints; inside the UNet stage it also measures and exports the "
                                          "current EMA model (marked partial), so a lease that ends early still "
                                          "leaves a model. Run the same command again to continue.")
    install: bool = opt(False, "Copy the final model into the package as builtin:toy (refused unless shape accuracy "
                              "reaches install_min_shape_accuracy).")
    install_min_shape_accuracy: float = opt(0.8, "Minimum final J_eval shape accuracy for install.")


TINY_OVERRIDES = (
    "pool_size=24", "captions_per_image=2", "render_workers=1", "threads=1",
    "model.vae_channels=[8,16,16]", "model.text_hidden=32", "model.text_layers=1", "model.text_heads=2",
    "model.unet_channels=[16,32,32]", "model.unet_head_dim=8",
    "text.steps=2", "text.batch_size=8", "vae.steps=2", "vae.batch_size=4",
    "vae.generic_fraction=0.5", "vae.generic_images=6",
    "unet.steps=3", "unet.batch_size=4", "unet.warmup_steps=1",
    "curve.every=100", "curve.prompts=2", "curve.sampling_steps=2", "checkpoint_every=100",
)


def tiny_config(output_dir: str, overrides=()) -> ToyBaseConfig:
    """The recipe at toy-of-the-toy size (seconds on CPU): same code path, for tests and smoke runs."""
    from dcustom.config import load_config

    return load_config(ToyBaseConfig, None, overrides=list(TINY_OVERRIDES) + [f"output_dir={output_dir}"] + list(overrides))
