"""StyleAligned-style shared attention (Hertz et al., CVPR 2024) for a batch that shares one style.

Batch layout per prompt list: [reference, target_1, ..., target_n]. In the chosen self-attention
layers each target attends to [own tokens; reference tokens] after its queries and keys are
AdaIN-normalised to the reference's (per head and channel, over tokens). CFG halves each use their
own reference row. The reference is either generated from `style_prompt` or, with `style_image`,
replayed from its DDIM inversion before every UNet call.

    images = style_aligned_generate(pipe, ["a cat", "a house"], style_prompt="a neon drawing", steps=30)
"""

from __future__ import annotations

import contextlib
from typing import Optional, Sequence

from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps, steps_in_window
from dcustom.pipelines.injection import InBatchSource


@contextlib.contextmanager
def shared_attention(pipe, n_targets: int, steps: int, layers="all_self", qk_adain: bool = True,
                     step_start: float = 0.0, step_end: float = 1.0, scheduler=None):
    """Shared attention for a pipeline call with 1 + n_targets images (row 0 is the reference)."""
    from dcustom.models import family_of
    from dcustom.pipelines.style_injection import injection

    names = resolve_layers(pipe.unet, layers, family_of(pipe))
    active = steps_in_window(sampling_timesteps(pipe, steps, scheduler), step_start, step_end)
    roles = ("style",) + ("target",) * n_targets
    with injection(pipe, names, InBatchSource(roles), active, mode="concat", qk_adain=qk_adain) as gate:
        yield gate


def style_aligned_generate(pipe, prompts: Sequence[str], style_prompt: str = "", steps: int = 30,
                           guidance: float = 5.0, seed: int = 0, style_image=None, layers="all_self",
                           qk_adain: bool = True, output_type: str = "pil", height: Optional[int] = None,
                           width: Optional[int] = None):
    """Generate `prompts` sharing the style of `style_prompt` (or of `style_image`); returns
    [reference, *targets] as the pipeline returns them (PIL images, or latents)."""
    import torch

    from dcustom.pipelines.attention_injection import replay_callback
    from dcustom.pipelines.images import model_resolution
    from dcustom.pipelines.inversion import ddim_scheduler, invert, scheduler_swapped

    if height is None or width is None:
        height, width = model_resolution(pipe)
    n = len(prompts)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (n + 1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator).to(pipe.device, pipe.unet.dtype)
    kwargs = {}
    scheduler = ddim_scheduler(pipe)
    timesteps = sampling_timesteps(pipe, steps, scheduler)
    if style_image is not None:
        inv = invert(pipe, style_image, steps=steps, prompt=style_prompt, height=height, width=width)
        latents[0] = inv.input_at(timesteps[0])[0]
        kwargs["callback_on_step_end"] = replay_callback({0: inv}, timesteps)
    with scheduler_swapped(pipe, scheduler), shared_attention(pipe, n, steps, layers, qk_adain, scheduler=scheduler):
        with torch.no_grad():
            return pipe(prompt=[style_prompt] + list(prompts), num_inference_steps=steps, guidance_scale=guidance,
                        latents=latents, height=height, width=width, output_type=output_type, **kwargs).images
