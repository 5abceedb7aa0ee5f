"""Text-to-image generation: the demo's main job, shared by the CLI and the UI."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from typing import Callable, Optional

from dcustom.generate_config import GenerateConfig
from dcustom.outputs import save_png, writable_folder

log = logging.getLogger("dcustom.generate")

SCHEDULER_CLASSES = {
    "ddim": ("DDIMScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
}


def set_scheduler(pipe, name: str) -> None:
    """Swap the pipeline's sampler, keeping its trained noise schedule and prediction type."""
    if name == "default":
        return
    import diffusers

    from dcustom.errors import DcustomError
    from dcustom.models import family_of

    family = family_of(pipe)
    if family.objective == "flow":  # DDPM samplers read betas a flow-matching scheduler does not have
        raise DcustomError(f"scheduler {name!r} is a DDPM sampler; {family.label} is a flow-matching model and samples "
                           "with its own flow-matching Euler scheduler: accepted: default.")

    cls_name, extra = SCHEDULER_CLASSES[name]
    pipe.scheduler = getattr(diffusers, cls_name).from_config(pipe.scheduler.config, **extra)


def a1111_parameters(cfg: GenerateConfig, seed: int, width: int, height: int, reference: Optional[dict] = None) -> str:
    """The 'parameters' PNG text A1111/Forge and many viewers read back."""
    lines = [cfg.prompt]
    if cfg.negative_prompt:
        lines.append(f"Negative prompt: {cfg.negative_prompt}")
    sampler = reference["sampler"] if reference else cfg.scheduler
    line = (f"Steps: {cfg.steps}, Sampler: {sampler}, CFG scale: {cfg.guidance}, Seed: {seed}, "
            f"Size: {width}x{height}, Model: {cfg.model}")
    if reference:
        line += f", Style reference: {Path(reference['image']).name}, Style strength: {reference['strength']}"
    lines.append(line)
    return "\n".join(lines)


def load_style_reference(cfg: GenerateConfig):
    """The style reference image of `cfg` (None without one); a bad path is one clear sentence."""
    if not cfg.style_ref:
        return None
    from dcustom.pipelines.images import read_image

    return read_image(cfg.style_ref, "style reference image (style_ref)")


def prompt_overflow(pipe, text: str) -> Optional[tuple[int, int]]:
    """(tokens, limit) when `text` is longer than the text encoder's window (which silently cuts it), else None.

    Counts as the pipeline will: textual-inversion tokens expanded, start and end tokens included."""
    tokenizer = getattr(pipe, "tokenizer", None) or getattr(pipe, "tokenizer_2", None)
    if tokenizer is None or not text:
        return None
    if hasattr(pipe, "maybe_convert_prompt"):
        text = pipe.maybe_convert_prompt(text, tokenizer)
    count = len(tokenizer(text, truncation=False).input_ids)
    limit = tokenizer.model_max_length
    return (count, limit) if count > limit else None


def warn_long_prompt(pipe, text: str, what: str) -> Optional[str]:
    """Say once that `text` will be truncated (the pipeline's own note is silenced with the library chatter)."""
    over = prompt_overflow(pipe, text)
    if over is None:
        return None
    message = (f"{what} has {over[0]:,} tokens but the text encoder reads only the first {over[1]} (start and end "
               "included); the rest is ignored, so shorten it or put what matters first.")
    log.warning(message)
    return message


def file_sha256(path) -> str:
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _next_index(folder: Path) -> int:
    taken = [int(p.name.split("-", 1)[0]) for p in folder.glob("*.png") if p.name.split("-", 1)[0].isdigit()]
    return max(taken, default=-1) + 1


def run_pipeline(pipe, cfg: GenerateConfig, seeds: list[int], on_step: Optional[Callable[[int, int], None]] = None, **extra):
    """Call a diffusers pipeline for `seeds` (one image each); returns PIL images."""
    import torch

    device = pipe.device
    gen_device = "cpu" if device.type == "mps" else device
    generators = [torch.Generator(device=gen_device).manual_seed(s) for s in seeds]
    kwargs = dict(
        prompt=[cfg.prompt] * len(seeds),
        negative_prompt=[cfg.negative_prompt] * len(seeds) if cfg.negative_prompt else None,
        num_inference_steps=cfg.steps,
        guidance_scale=cfg.guidance,
        generator=generators,
        width=cfg.width,
        height=cfg.height,
    )
    if on_step is not None:
        def callback(_pipe, step, _t, tensors):
            on_step(step + 1, cfg.steps)
            return tensors

        kwargs["callback_on_step_end"] = callback
    kwargs.update(extra)
    with torch.inference_mode():
        return pipe(**kwargs).images


def generate(cfg: GenerateConfig, pipe=None, on_step: Optional[Callable[[int, int], None]] = None,
             cache=None) -> list[Path]:
    """Generate `cfg.count` images and write them as PNGs with their parameters; returns the paths.

    With `cfg.style_ref` the images attend to the reference while they are sampled
    (`generate_with_style_reference`); `cache` (an InversionCache) keeps its inversion for later calls.
    """
    from dcustom.models import load_pipeline

    out = writable_folder(cfg.output_dir, "output_dir")  # before the model loads and any image is sampled
    style = load_style_reference(cfg)  # before the (slow) model load
    if pipe is None:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.device, config=cfg.model_config)
    if style is None:
        set_scheduler(pipe, cfg.scheduler)
    if cfg.adapters or getattr(pipe, "_dcustom_adapter_specs", None):
        from dcustom.adapters.load import apply_adapters

        apply_adapters(pipe, cfg.adapters)
    warn_long_prompt(pipe, cfg.prompt, "prompt")
    warn_long_prompt(pipe, cfg.negative_prompt, "negative_prompt")
    base_seed = cfg.seed if cfg.seed is not None else secrets.randbelow(2**31 - cfg.count)
    seeds = [base_seed + i for i in range(cfg.count)]
    reference = None
    if style is None:
        images = run_pipeline(pipe, cfg, seeds, on_step=on_step)
    else:
        from dcustom.pipelines.style_aligned import generate_with_style_reference

        result = generate_with_style_reference(
            pipe, cfg.prompt, style, seeds=seeds, steps=cfg.steps, guidance=cfg.guidance,
            negative_prompt=cfg.negative_prompt, strength=cfg.style_strength, layers=cfg.style_layers,
            height=cfg.height, width=cfg.width, cache=cache, on_step=on_step)
        images = result.images
        reference = {"image": str(cfg.style_ref), "sha256": file_sha256(cfg.style_ref), **result.settings}
    out.mkdir(parents=True, exist_ok=True)  # again: it may have been removed while sampling
    index = _next_index(out)
    paths = []
    for i, (image, seed) in enumerate(zip(images, seeds)):
        params = {**{k: v for k, v in vars(cfg).items()}, "seed": seed, "width": image.width, "height": image.height}
        if reference is not None:
            params["style_reference"] = reference
        text = {"parameters": a1111_parameters(cfg, seed, image.width, image.height, reference),
                "dcustom": json.dumps(params)}
        paths.append(save_png(image, out / f"{index + i:05d}-{seed}.png", text))
    return paths
