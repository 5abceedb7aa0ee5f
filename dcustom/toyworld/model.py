"""The toy model: Stable Diffusion's architecture in miniature, as stock diffusers/transformers classes.

AutoencoderKL 64x64x3 <-> 16x16x4, CLIPTextModel + CLIPTokenizer over the grammar's words (subject
triggers included, never trained on by the base), UNet2DConditionModel with cross-attention, DDIM.
`save_model_folder` writes a standard diffusers folder in fp16 that
`StableDiffusionPipeline.from_pretrained` loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.toyworld.config import ToyModelConfig

MAX_FILE_BYTES = 16 * 2**20
MAX_TOTAL_BYTES = 64 * 2**20


def build_tokenizer(cfg: ToyModelConfig, out_dir: str | Path):
    from dcustom.tokenizer_vocab import build_clip_tokenizer
    from dcustom.toyworld.grammar import vocabulary

    return build_clip_tokenizer(vocabulary(), out_dir, model_max_length=cfg.text_max_length)


def build_text_encoder(cfg: ToyModelConfig, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel

    vocab = len(tokenizer)
    return CLIPTextModel(CLIPTextConfig(
        vocab_size=vocab,
        hidden_size=cfg.text_hidden,
        intermediate_size=cfg.text_hidden * 4,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        max_position_embeddings=cfg.text_max_length,
        hidden_act="quick_gelu",
        projection_dim=cfg.text_hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ))


def build_vae(cfg: ToyModelConfig):
    from diffusers import AutoencoderKL

    n = len(cfg.vae_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n,
        block_out_channels=list(cfg.vae_channels),
        layers_per_block=cfg.vae_layers_per_block,
        latent_channels=cfg.latent_channels,
        norm_num_groups=min(32, cfg.vae_channels[0]),
        sample_size=64,
    )


def build_unet(cfg: ToyModelConfig):
    from diffusers import UNet2DConditionModel

    n = len(cfg.unet_channels)
    cross = min(cfg.unet_cross_attention_levels, n)
    down = ["CrossAttnDownBlock2D"] * cross + ["DownBlock2D"] * (n - cross)
    up = ["UpBlock2D"] * (n - cross) + ["CrossAttnUpBlock2D"] * cross
    return UNet2DConditionModel(
        sample_size=64 // 2 ** (len(cfg.vae_channels) - 1),
        in_channels=cfg.latent_channels,
        out_channels=cfg.latent_channels,
        down_block_types=down,
        up_block_types=up,
        block_out_channels=list(cfg.unet_channels),
        layers_per_block=cfg.unet_layers_per_block,
        cross_attention_dim=cfg.text_hidden,
        attention_head_dim=[max(1, c // cfg.unet_head_dim) for c in cfg.unet_channels],
        norm_num_groups=min(32, cfg.unet_channels[0]),
    )


def build_scheduler():
    from diffusers import DDIMScheduler

    # SD1.x's noise schedule and sampler settings, so every SD1.x tool treats the toy model alike.
    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=False, steps_offset=1, prediction_type="epsilon",
                         timestep_spacing="leading", num_train_timesteps=1000)


def build_components(cfg: ToyModelConfig, work_dir: str | Path, seed: int = 0) -> dict:
    """Fresh components (random weights from `seed`), the tokenizer written to work_dir/tokenizer."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = build_tokenizer(cfg, Path(work_dir) / "tokenizer")
        text_encoder = build_text_encoder(cfg, tokenizer)
        vae = build_vae(cfg)
        unet = build_unet(cfg)
    return dict(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=build_scheduler())


def assemble_pipeline(components: dict):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(**components, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_model_folder(pipe, out_dir: str | Path) -> Path:
    """Write `pipe` as an fp16 diffusers folder atomically; checks the 16 MiB / 64 MiB size limits."""
    import copy

    import diffusers
    import torch

    diffusers.utils.logging.set_verbosity_error()  # "fp16 on cpu" notes: we only save, never run, this copy
    out = Path(out_dir)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    half = copy.deepcopy(pipe)
    half.to(device="cpu", dtype=torch.float16)
    half.save_pretrained(str(tmp), safe_serialization=True)
    sizes = {str(p.relative_to(tmp)): p.stat().st_size for p in tmp.rglob("*") if p.is_file()}
    big = {k: v for k, v in sizes.items() if v >= MAX_FILE_BYTES}
    if big or sum(sizes.values()) >= MAX_TOTAL_BYTES:
        shutil.rmtree(tmp)
        raise DcustomError(f"toy model folder would break the size limits (each file < 16 MiB, all < 64 MiB): "
                           f"largest files {sorted(sizes.items(), key=lambda kv: -kv[1])[:3]}; shrink model.* widths.")
    if out.exists():
        shutil.rmtree(out)
    tmp.replace(out)
    return out


def folder_sizes(folder: str | Path) -> dict[str, int]:
    folder = Path(folder)
    return {str(p.relative_to(folder)): p.stat().st_size for p in folder.rglob("*") if p.is_file()}
