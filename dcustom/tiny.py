"""Tiny random pipelines built from configs in code, for tests (seconds on CPU, no download).

They have the real SD1.x / SD2.x / SDXL architectures in miniature: the same diffusers classes,
attention layer names and conditioning paths, with random weights from a fixed seed.
"""

from __future__ import annotations

import tempfile

TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing style cat dog car house tree person "
    "red green blue yellow white black orange purple circle square triangle star background striped "
    "dotted plain sks toy subject"
).split()

TINY_SPECS = ("sd15", "sd2", "sdxl")


def _tokenizer(max_length=77):
    from dcustom.tokenizer_vocab import build_clip_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_clip_tokenizer(TINY_WORDS, tmp, model_max_length=max_length)


def _text_encoder(vocab_size: int, hidden_act: str = "quick_gelu", projection: bool = False):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=vocab_size,
        hidden_act=hidden_act,
        projection_dim=32,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=[16, 32],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )


def build_tiny_pipeline(kind: str = "sd15", seed: int = 0):
    """A random tiny pipeline: kind is "sd15", "sd2" (v-prediction) or "sdxl"."""
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if kind not in TINY_SPECS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; accepted: {', '.join(TINY_SPECS)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        vocab = len(tokenizer)
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction" if kind == "sd2" else "epsilon",
            timestep_spacing="leading",
        )
        if kind == "sdxl":
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64),
                layers_per_block=2,
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                attention_head_dim=(2, 4),
                use_linear_projection=True,
                addition_embed_type="text_time",
                addition_time_embed_dim=8,
                transformer_layers_per_block=(1, 2),
                projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled text
                cross_attention_dim=64,
                norm_num_groups=8,
            )
            pipe = StableDiffusionXLPipeline(
                vae=_vae(),
                text_encoder=_text_encoder(vocab),
                text_encoder_2=_text_encoder(vocab, projection=True),
                tokenizer=tokenizer,
                tokenizer_2=_tokenizer(),
                unet=unet,
                scheduler=scheduler,
            )
        else:
            unet = UNet2DConditionModel(
                block_out_channels=(32, 64),
                layers_per_block=2,
                sample_size=32,
                in_channels=4,
                out_channels=4,
                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
                cross_attention_dim=32,
                attention_head_dim=8,
                norm_num_groups=8,
                use_linear_projection=kind == "sd2",
            )
            pipe = StableDiffusionPipeline(
                vae=_vae(),
                text_encoder=_text_encoder(vocab, hidden_act="gelu" if kind == "sd2" else "quick_gelu"),
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipe.set_progress_bar_config(disable=True)
    return pipe
