"""Content + style → stylized image: the engine every injection-based style method runs on.

`StyleTransferConfig` holds the fields every such method shares; a method (StyleID in
`style_injection`, MasaCtrl in `attention_injection`) is a subclass with its paper's defaults, and
`stylize(pipe, content, style, cfg)` runs it with either feature source:

- "recorded" (two passes): features are recorded while inverting (which has to happen anyway), so
  sampling is one batch-1 pass; costs feature memory (fp16, optionally offloaded, cached).
- "in_batch" (one pass): the content/style references ride in the sampling batch and their
  latents are replayed from the inversion trajectories before every UNet call, so they produce the
  very features the recorded path would have stored; costs a larger batch, no feature store.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dcustom.config import opt
from dcustom.errors import DcustomError
from dcustom.pipelines.injection import MODES

FEATURE_SOURCES = ("recorded", "in_batch")


@dataclass
class StyleTransferConfig:
    """Fields shared by every content + style → stylized image method."""

    method: str = opt("style_injection", "Method id.")
    model: str = opt("builtin:toy", "Base model: builtin:toy, tiny:sd15|sd2|sdxl, a diffusers folder, a checkpoint file or a hub id.")
    content: str = opt("", "Content image file (any size or mode; converted to the model's resolution).")
    style: str = opt("", "Style image file (any size or mode).")
    output: str = opt("outputs/style/result.png", "Result PNG; a content | style | result grid is written next to it as <name>-grid.png.")
    steps: int = opt(50, "DDIM steps, used for both inversion and sampling.")
    gamma: float = opt(0.75, "Query preservation γ: q = γ·q_content + (1−γ)·q (0 disables it).")
    temperature: float = opt(1.5, "Attention temperature T: logits × T before softmax (1 disables it).")
    layers: str = opt("decoder_self_late", "Self-attention layers: a family preset (decoder_self_late, decoder_self, all_self, ...) or a regex over unet.attn_processors names.")
    step_start: float = opt(0.0, "Inject from this fraction of the sampling steps on (0 = from the first step).")
    step_end: float = opt(1.0, "Stop injecting at this fraction of the sampling steps (1 = through the last).")
    mode: str = opt("replace", "'replace': attend to the style's K/V only; 'concat': attend to [own; style] K/V.")
    style_weight: float = opt(1.0, "'concat' only: each style token's attention weight relative to an own token (log w is "
                                   "added to the style's logits, StyleAligned's shared-score shift); 1 = plain concat.")
    init_adain: bool = opt(True, "Ablation switch: give the content's inverted latent the style latent's channel mean/std.")
    adain_at: float = opt(0.0, "When init_adain: the fraction of the sampling steps after which the latent gets the style trajectory's channel mean/std at that timestep (0 = z_T, as StyleID).")
    adain_std: bool = opt(True, "When init_adain: match the style latent's channel std as well as its mean (off = shift the mean only: the tone moves, the content's contrast stays).")
    inject_attention: bool = opt(True, "Ablation switch: inject style K/V into self-attention (off = plain sampling from the start latent).")
    feature_source: str = opt("recorded", "'recorded': record features during inversion and replay them (two passes); 'in_batch': the references ride in the sampling batch, replayed from their inversion trajectories.")
    prompt: str = opt("", "Text prompt while sampling (StyleID uses the empty prompt).")
    guidance: float = opt(1.0, "Classifier-free guidance while sampling (1 = off, as StyleID).")
    eta: float = opt(0.0, "DDIM eta; 0 is deterministic, > 0 adds seeded noise.")
    seed: int = opt(0, "Seed of the sampling noise (only used when eta > 0).")
    feature_dtype: str = opt("fp16", "Precision of recorded features: fp16 (half the memory) or fp32.")
    offload: bool = opt(False, "Keep recorded features in CPU memory (saves accelerator memory, ~30% slower on GPU).")
    cache_dir: Optional[str] = opt(None, "Folder for cached inversions (trajectory + features) keyed by image, model, scheduler, steps, layers and dtype; null keeps them in memory only.")
    resolution: Optional[int] = opt(None, "Square working resolution in pixels; null uses the model's default.")
    dtype: str = opt("auto", "Weights precision: auto (fp16 on CUDA, fp32 on CPU), fp32, fp16, bf16.")
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps.")

    def __post_init__(self):
        if self.steps < 1:
            raise ValueError(f"steps must be at least 1, got {self.steps}")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"gamma must be between 0 and 1, got {self.gamma}")
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}")
        if self.style_weight <= 0:
            raise ValueError(f"style_weight must be positive, got {self.style_weight}")
        if not 0.0 <= self.adain_at < 1.0:
            raise ValueError(f"adain_at must be at least 0 and below 1 (a fraction of the sampling steps), got {self.adain_at}")
        if not 0.0 <= self.step_start <= self.step_end <= 1.0:
            raise ValueError(f"need 0 <= step_start <= step_end <= 1, got {self.step_start} and {self.step_end}")
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r} is not known; accepted: {', '.join(MODES)}")
        if self.feature_source not in FEATURE_SOURCES:
            raise ValueError(f"feature_source {self.feature_source!r} is not known; accepted: {', '.join(FEATURE_SOURCES)}")
        if self.feature_dtype not in ("fp16", "fp32"):
            raise ValueError(f"feature_dtype {self.feature_dtype!r} is not known; accepted: fp16, fp32")


@dataclass
class StyleResult:
    image: object  # PIL
    latents: object  # (1, C, h, w)
    content: object  # PIL, fitted to the model
    style: object
    layers: list
    applied: set
    timings: dict = field(default_factory=dict)


def _progress(on_step: Optional[Callable[[int, int], None]], total: int):
    done = [0]

    def tick():
        done[0] += 1
        if on_step is not None:
            on_step(done[0], total)

    return tick


def stylize(pipe, content, style, cfg, cache=None, on_step=None) -> StyleResult:
    """Stylize PIL image `content` with PIL image `style` by `cfg` (a StyleTransferConfig)."""
    import torch

    from dcustom.models import family_of
    from dcustom.pipelines.adain import latent_adain
    from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps, steps_in_window
    from dcustom.pipelines.images import fit, model_resolution
    from dcustom.pipelines.injection import InBatchSource, RecordedSource, injection
    from dcustom.pipelines.inversion import (InversionCache, ddim_scheduler, decode_latents, invert, replay_callback,
                                             sample_from)

    if cfg.eta and cfg.inject_attention and cfg.feature_source == "in_batch":
        raise DcustomError("eta > 0 cannot be used with feature_source 'in_batch' (the batch shares one noise draw with "
                           "the replayed references); use eta 0 or feature_source 'recorded'.")
    cache = cache if cache is not None else InversionCache(cfg.cache_dir)
    height, width = model_resolution(pipe, cfg.resolution)
    content, style = fit(content, width, height), fit(style, width, height)
    inject = cfg.inject_attention
    layers = resolve_layers(pipe.unet, cfg.layers, family_of(pipe)) if inject else []
    recorded = inject and cfg.feature_source == "recorded"
    use_q = cfg.gamma > 0
    tick = _progress(on_step, 3 * cfg.steps)
    common = dict(steps=cfg.steps, feature_dtype=cfg.feature_dtype, offload="cpu" if cfg.offload else None,
                  cache=cache, height=height, width=width, on_step=tick)
    timings = {}
    t0 = time.perf_counter()
    inv_c = invert(pipe, content, layers=layers if recorded and use_q else None, kinds=("q",), **common)
    timings["invert_content_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    inv_s = invert(pipe, style, layers=layers if recorded else None, kinds=("k", "v"), **common)
    timings["invert_style_s"] = time.perf_counter() - t0
    timings["cache_hits"] = int(inv_c.cache_hit) + int(inv_s.cache_hit)

    timesteps = sampling_timesteps(pipe, cfg.steps, ddim_scheduler(pipe))
    # StyleID's initial-latent AdaIN, at z_T or (adain_at > 0) on the way down, against the style's own
    # inversion latent at the same timestep: by then the content's layout is set (see docs/results.md).
    adain_step = round(cfg.adain_at * cfg.steps) if cfg.init_adain else -1
    start = latent_adain(inv_c.zT, inv_s.zT, match_std=cfg.adain_std) if adain_step == 0 else inv_c.zT
    active = steps_in_window(timesteps, cfg.step_start, cfg.step_end)
    generator = torch.Generator(device="cpu" if pipe.device.type == "mps" else pipe.device).manual_seed(cfg.seed)
    sample = dict(steps=cfg.steps, prompt=cfg.prompt, guidance=cfg.guidance, eta=cfg.eta, generator=generator)
    applied: set = set()

    def late_adain(i, tensors):
        # After step i the latents are the UNet's input at timesteps[i + 1]; the target is the last row.
        if adain_step > 0 and i + 1 == adain_step:
            latents = tensors["latents"]
            latents[-1:] = latent_adain(latents[-1:], inv_s.input_at(timesteps[adain_step]), match_std=cfg.adain_std)
        return tensors

    def plain_callback(_pipe, i, _t, tensors):
        tick()
        return late_adain(i, tensors)

    t0 = time.perf_counter()
    if not inject:
        latents = sample_from(pipe, start, callback=plain_callback, **sample)
    elif recorded:
        source = RecordedSource(style=inv_s.features, content=inv_c.features if use_q else None)
        with injection(pipe, layers, source, active, gamma=cfg.gamma, temperature=cfg.temperature,
                       mode=cfg.mode, reference_weight=cfg.style_weight) as gate:
            latents = sample_from(pipe, start, callback=plain_callback, **sample)
        applied = set(gate.applied)
    else:
        refs = [inv_c, inv_s] if use_q else [inv_s]
        roles = ("content", "style", "target") if use_q else ("style", "target")
        batch = torch.cat([inv.input_at(timesteps[0]) for inv in refs] + [start])

        put_back = replay_callback(dict(enumerate(refs)), timesteps)

        def replay(_pipe, i, _t, tensors):
            # Before the next UNet call, put each reference back on its inversion trajectory.
            tick()
            return late_adain(i, put_back(_pipe, i, _t, tensors))

        with injection(pipe, layers, InBatchSource(roles), active, gamma=cfg.gamma, temperature=cfg.temperature,
                       mode=cfg.mode, reference_weight=cfg.style_weight) as gate:
            latents = sample_from(pipe, batch, callback=replay, **sample)[-1:]
        applied = set(gate.applied)
    timings["sample_s"] = time.perf_counter() - t0
    image = decode_latents(pipe, latents)[0]
    return StyleResult(image, latents, content, style, layers, applied, timings)


def run_transfer(cfg, pipe=None, cache=None, on_step=None) -> str:
    """Load model and images named by `cfg`, stylize, write result + grid PNGs; returns the result path."""
    import json

    from dcustom.config import to_dict
    from dcustom.models import load_pipeline
    from dcustom.outputs import save_png
    from dcustom.pipelines.images import grid, read_image

    if not cfg.content:
        raise DcustomError(f"{cfg.method}: no content image given; pass --content FILE (or content: in the YAML).")
    if not cfg.style:
        raise DcustomError(f"{cfg.method}: no style image given; pass --style FILE (or style: in the YAML).")
    content = read_image(cfg.content, "content image")
    style = read_image(cfg.style, "style image")
    out = Path(cfg.output)
    if out.suffix.lower() != ".png":
        raise DcustomError(f"output {cfg.output!r} must be a .png file path.")
    if pipe is None:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.device)
    result = stylize(pipe, content, style, cfg, cache=cache, on_step=on_step)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"dcustom": json.dumps({**to_dict(cfg), "layers": result.layers})}
    save_png(result.image, out, meta)
    save_png(grid([result.content, result.style, result.image]), out.with_name(out.stem + "-grid.png"), meta)
    return str(out)
