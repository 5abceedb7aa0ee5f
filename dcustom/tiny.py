"""Tiny random pipelines built from configs in code, for tests (seconds on CPU, no download).

They have the real SD1.x / SD2.x / SDXL / SD3 / FLUX architectures in miniature: the same diffusers
classes, attention layer names and conditioning paths, with random weights from a fixed seed. The two
MM-DiT families (SD3, FLUX) have CLIP + T5 text encoders, a 16-channel-style VAE without quant convs
and a flow-matching scheduler, as the real ones do; only the widths and depths are small.
"""

from __future__ import annotations

import tempfile

TINY_WORDS = (
    "a an the of on in with and photo picture painting drawing style cat dog car house tree person "
    "red green blue yellow white black orange purple circle square triangle star background striped "
    "dotted plain sks toy subject"
).split()

TINY_SPECS = ("sd15", "sd2", "sdxl", "sd3", "flux")
DIT_SPECS = ("sd3", "flux")


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
    """A random tiny pipeline: kind is "sd15", "sd2" (v-prediction), "sdxl", "sd3" or "flux"."""
    import torch
    from diffusers import (
        DDIMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    if kind not in TINY_SPECS:
        raise ValueError(f"unknown tiny pipeline {kind!r}; accepted: {', '.join(TINY_SPECS)}")
    if kind in DIT_SPECS:
        return _build_tiny_dit(kind, seed)
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


# ----------------------------------------------------------------------------- MM-DiT families

T5_WIDTH = 64  # joint_attention_dim: the transformer reads T5's hidden states (and SD3 pads CLIP's to this width)


def _t5_tokenizer(max_length=77):
    from dcustom.tokenizer_vocab import build_t5_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        return build_t5_tokenizer(TINY_WORDS, tmp, model_max_length=max_length)


def _t5_encoder(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    config = T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=16, d_ff=64, num_layers=2, num_heads=4,
                      relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                      is_encoder_decoder=False, use_cache=False)
    return T5EncoderModel(config)


def _dit_vae(shift_factor: float, scaling_factor: float):
    """SD3/FLUX-style VAE: no quant convs, a shift and a scale on the latents; 3 levels = 4x down."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 16, 16], in_channels=3, out_channels=3,
                         down_block_types=["DownEncoderBlock2D"] * 3, up_block_types=["UpDecoderBlock2D"] * 3,
                         latent_channels=4, norm_num_groups=8, sample_size=64, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def _build_tiny_dit(kind: str, seed: int):
    """tiny:sd3 (SD3 medium's layout: two CLIPs with projection + T5, SD3Transformer2DModel, shift 3) or tiny:flux
    (FLUX.1-dev's: CLIP + T5, FluxTransformer2DModel with the guidance embedding, resolution-dependent shift)."""
    import torch
    from diffusers import (FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel,
                           SD3Transformer2DModel, StableDiffusion3Pipeline)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        tokenizer = _tokenizer()
        vocab = len(tokenizer)
        t5_tokenizer = _t5_tokenizer()
        if kind == "sd3":
            transformer = SD3Transformer2DModel(sample_size=16, patch_size=2, in_channels=4, num_layers=2,
                                                attention_head_dim=8, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
                                                caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
                                                pos_embed_max_size=32)
            pipe = StableDiffusion3Pipeline(
                transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
                vae=_dit_vae(0.0609, 1.5305), text_encoder=_text_encoder(vocab, hidden_act="gelu", projection=True),
                tokenizer=tokenizer, text_encoder_2=_text_encoder(vocab, hidden_act="gelu", projection=True),
                tokenizer_2=_tokenizer(), text_encoder_3=_t5_encoder(len(t5_tokenizer)), tokenizer_3=t5_tokenizer)
        else:
            transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                                 pooled_projection_dim=32, guidance_embeds=True, axes_dims_rope=(4, 4, 8))
            scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
            pipe = FluxPipeline(transformer=transformer, scheduler=scheduler, vae=_dit_vae(0.1159, 0.3611),
                                text_encoder=_text_encoder(vocab), tokenizer=tokenizer,
                                text_encoder_2=_t5_encoder(len(t5_tokenizer)), tokenizer_2=t5_tokenizer)
            pipe.default_sample_size = 16  # FluxPipeline hard-codes 128 latents (1024 px); the tiny model draws 64 px
    pipe.set_progress_bar_config(disable=True)
    return pipe
