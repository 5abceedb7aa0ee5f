"""StyleAligned-style shared attention (Hertz et al., CVPR 2024) for a batch that shares one style.

Batch layout per prompt list: [reference, target_1, ..., target_n]. In the chosen self-attention
layers each target attends to [own tokens; reference tokens] after its queries and keys are
AdaIN-normalised to the reference's (per head and channel, over tokens). CFG halves each use their
own reference row. The reference is either generated from `style_prompt` or, with `style_image`,
replayed from its DDIM inversion before every UNet call.

    images = style_aligned_generate(pipe, ["a cat", "a house"], style_prompt="a neon drawing", steps=30)

`generate_with_style_reference` is text-to-image with a reference *image* as `dcustom generate
--style-ref` and the app use it: the reference is DDIM-inverted once (cacheable) and the images,
drawn from their own seeds, attend to it while they are sampled.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps, steps_in_window
from dcustom.pipelines.injection import InBatchSource, injection


SHARED_ATTENTION = "shared attention (StyleAligned): attend to [own; reference] keys/values, q/k AdaIN to the reference"


@contextlib.contextmanager
def shared_attention(pipe, n_targets: int, steps: int, layers="all_self", qk_adain: bool = True,
                     step_start: float = 0.0, step_end: float = 1.0, scheduler=None):
    """Shared attention for a pipeline call with 1 + n_targets images (row 0 is the reference)."""
    from dcustom.models import family_of

    names = resolve_layers(pipe.unet, layers, family_of(pipe))
    active = steps_in_window(sampling_timesteps(pipe, steps, scheduler), step_start, step_end)
    roles = ("style",) + ("target",) * n_targets
    with injection(pipe, names, InBatchSource(roles), active, mode="concat", qk_adain=qk_adain) as gate:
        yield gate


def style_aligned_generate(pipe, prompts: Sequence[str], style_prompt: str = "", steps: int = 30,
                           guidance: float = 5.0, seed: int = 0, style_image=None, layers="all_self",
                           qk_adain: bool = True, output_type: str = "pil", height: Optional[int] = None,
                           width: Optional[int] = None, *, style_inversion=None, generators=None,
                           negative_prompt: str = "", step_end: float = 1.0, on_step=None):
    """Generate `prompts` sharing the style of `style_prompt` (or of `style_image`, or of its
    ready `style_inversion`); returns [reference, *targets] as the pipeline returns them.

    `generators` (one per prompt) draw the targets' noise exactly as the pipeline would from them;
    otherwise `seed` draws every row. Targets attend to the reference in the sampling steps before
    fraction `step_end`. `on_step()` is called after every sampling step.
    """
    import torch

    from dcustom.pipelines.images import model_resolution
    from dcustom.pipelines.inversion import ddim_scheduler, invert, replay_callback, scheduler_swapped

    if height is None or width is None:
        height, width = model_resolution(pipe)
    n = len(prompts)
    shape = (n + 1, pipe.unet.config.in_channels, height // pipe.vae_scale_factor, width // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=torch.Generator(device="cpu").manual_seed(seed))
    latents = latents.to(pipe.device, pipe.unet.dtype)
    if generators is not None:
        from diffusers.utils.torch_utils import randn_tensor

        latents[1:] = randn_tensor((n,) + shape[1:], generator=list(generators), device=pipe.device,
                                   dtype=pipe.unet.dtype)
    scheduler = ddim_scheduler(pipe)
    timesteps = sampling_timesteps(pipe, steps, scheduler)
    inv = style_inversion
    if inv is None and style_image is not None:
        inv = invert(pipe, style_image, steps=steps, prompt=style_prompt, height=height, width=width)
    replay = replay_callback({0: inv}, timesteps) if inv is not None else None
    if inv is not None:
        latents[0] = inv.input_at(timesteps[0])[0]

    def callback(p, i, t, tensors):
        if replay is not None:
            tensors = replay(p, i, t, tensors)
        if on_step is not None:
            on_step()
        return tensors

    negatives = [""] + [negative_prompt] * n if negative_prompt else None
    with scheduler_swapped(pipe, scheduler), shared_attention(pipe, n, steps, layers, qk_adain, step_end=step_end,
                                                              scheduler=scheduler):
        with torch.no_grad():
            return pipe(prompt=[style_prompt] + list(prompts), negative_prompt=negatives, num_inference_steps=steps,
                        guidance_scale=guidance, latents=latents, height=height, width=width,
                        output_type=output_type, callback_on_step_end=callback).images


@dataclass
class ReferenceGeneration:
    """Images of `generate_with_style_reference`; `settings` says how the reference was used (None: none given)."""

    images: list
    settings: Optional[dict] = None
    timings: dict = field(default_factory=dict)


def generate_with_style_reference(pipe, prompt: str, style_image=None, *, seeds: Sequence[int], steps: int = 30,
                                  guidance: float = 7.5, negative_prompt: str = "", strength: float = 1.0,
                                  layers="all_self", qk_adain: bool = True, height: Optional[int] = None,
                                  width: Optional[int] = None, cache=None,
                                  on_step: Optional[Callable[[int, int], None]] = None) -> ReferenceGeneration:
    """Text-to-image for `seeds` (one image each, the pipeline's own noise per seed) with DDIM, the
    images attending to PIL `style_image` during the first `strength` fraction of the sampling steps.

    The reference is DDIM-inverted at `steps` (through `cache`, an InversionCache, when given) and
    replayed in an extra batch row. Without a reference or at strength 0 this is plain DDIM sampling,
    bit-identical to the pipeline called with the same generators. `on_step(done, total)` counts
    inversion and sampling steps.
    """
    import time

    import torch

    from dcustom.errors import DcustomError
    from dcustom.models import family_of
    from dcustom.pipelines.images import model_resolution
    from dcustom.pipelines.inversion import ddim_scheduler, invert, scheduler_swapped

    if not 0.0 <= strength <= 1.0:
        raise DcustomError(f"style strength must be between 0 and 1 (the fraction of steps attending to the reference), got {strength}.")
    use_reference = style_image is not None and strength > 0
    total = 2 * steps if use_reference else steps
    done = [0]

    def tick():
        done[0] += 1
        if on_step is not None:
            on_step(done[0], total)

    def tick_callback(_pipe, _i, _t, tensors):
        tick()
        return tensors

    device = pipe.device
    generators = [torch.Generator(device="cpu" if device.type == "mps" else device).manual_seed(s) for s in seeds]
    timings = {}
    if not use_reference:
        t0 = time.perf_counter()
        negatives = [negative_prompt] * len(seeds) if negative_prompt else None
        with scheduler_swapped(pipe, ddim_scheduler(pipe)), torch.no_grad():
            images = pipe(prompt=[prompt] * len(seeds), negative_prompt=negatives, num_inference_steps=steps,
                          guidance_scale=guidance, generator=generators, height=height, width=width,
                          callback_on_step_end=tick_callback).images
        timings["sample_s"] = time.perf_counter() - t0
        unused = None if style_image is None else {"strength": strength, "attended_steps": 0, "steps": steps,
                                                   "sampler": "ddim", "note": "strength 0: the reference was not used"}
        return ReferenceGeneration(list(images), unused, timings)

    default_height, default_width = model_resolution(pipe)
    height, width = height or default_height, width or default_width
    names = resolve_layers(pipe.unet, layers, family_of(pipe))
    attended = steps_in_window(sampling_timesteps(pipe, steps, ddim_scheduler(pipe)), 0.0, strength)
    inv = invert(pipe, style_image, steps=steps, height=height, width=width, cache=cache, on_step=tick)
    timings["invert_s"] = inv.seconds
    t0 = time.perf_counter()
    images = style_aligned_generate(pipe, [prompt] * len(seeds), steps=steps, guidance=guidance, layers=layers,
                                    qk_adain=qk_adain, height=height, width=width, style_inversion=inv,
                                    generators=generators, negative_prompt=negative_prompt, step_end=strength,
                                    on_step=tick)[1:]
    timings["sample_s"] = time.perf_counter() - t0
    settings = {"strength": strength, "method": SHARED_ATTENTION, "layers": layers, "attention_layers": len(names),
                "qk_adain": qk_adain, "attended_steps": len(attended), "steps": steps, "sampler": "ddim",
                "inversion": {"sampler": "ddim_inverse", "steps": steps, "prompt": "", "guidance": 1.0,
                              "cache_hit": inv.cache_hit}}
    return ReferenceGeneration(list(images), settings, timings)
