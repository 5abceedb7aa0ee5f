"""DDIM inversion of an image through a stock pipeline, recording attention features on the way.

The pipeline itself runs the inversion: its scheduler is swapped for
`DDIMInverseScheduler.from_config(pipe.scheduler.config)` (never the constructor defaults, which
are wrong for Stable Diffusion), so every family's conditioning (SDXL micro-conditioning included)
and prediction type (ε or v) is handled by diffusers. Inversion and DDIM sampling at the same
step count visit the same timesteps, so recorded features are keyed by timestep in both passes.

The result (trajectory + features) can be cached in memory and on disk, keyed by image, model,
scheduler config, steps, prompt, guidance, layers, kinds and dtype.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from dcustom.pipelines.features import FeatureStore
from dcustom.pipelines.hooks import TimestepGate, attention_hooks, require_self_attention, timestep_key

CACHE_FORMAT = 1


def _ddim_config(pipe) -> dict:
    config = dict(pipe.scheduler.config)
    # DDIM (and its inverse) support "leading" and "trailing"; other schedulers' "linspace" maps to leading.
    if config.get("timestep_spacing") not in ("leading", "trailing"):
        config["timestep_spacing"] = "leading"
    return config


def ddim_scheduler(pipe):
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(_ddim_config(pipe))


def ddim_inverse_scheduler(pipe):
    from diffusers import DDIMInverseScheduler

    return DDIMInverseScheduler.from_config(_ddim_config(pipe))


@contextlib.contextmanager
def scheduler_swapped(pipe, scheduler):
    """Use `scheduler` inside the block; the pipeline's own scheduler object comes back after."""
    original = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield scheduler
    finally:
        pipe.scheduler = original


# ----------------------------------------------------------------------------- VAE


def encode_image(pipe, image, height: int, width: int):
    """Latent (1, C, h, w) of a PIL image fitted to (height, width): the posterior mean, scaled."""
    import torch

    from dcustom.pipelines.images import fit

    pixels = pipe.image_processor.preprocess(fit(image, width, height), height=height, width=width)
    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            latent = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        finally:
            if upcast:
                vae.to(dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((latent - shift) * vae.config.scaling_factor).to(pipe.unet.dtype)


def decode_latents(pipe, latents):
    """PIL images of latents (B, C, h, w)."""
    import torch

    vae = pipe.vae
    dtype = vae.dtype
    upcast = dtype == torch.float16 and getattr(vae.config, "force_upcast", False)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        if upcast:
            vae.to(torch.float32)
        try:
            z = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift
            pixels = vae.decode(z).sample
        finally:
            if upcast:
                vae.to(dtype)
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil")


# ----------------------------------------------------------------------------- result


@dataclass
class Inversion:
    """DDIM inversion of one image.

    trajectory[i] is the latent the UNet was called with at timesteps[i] (ascending);
    trajectory[-1] is the inverted latent z_T. `features` holds the recorded q/k/v, if any.
    """

    trajectory: object  # tensor (N + 1, B, C, h, w)
    timesteps: list[float]
    features: Optional[FeatureStore] = None
    key: Optional[str] = None
    cache_hit: bool = False
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def z0(self):
        return self.trajectory[0]

    @property
    def zT(self):
        return self.trajectory[-1]

    @property
    def steps(self) -> int:
        return len(self.timesteps)

    def input_at(self, t):
        """The latent the UNet saw at timestep t during inversion (to replay a reference branch)."""
        return self.trajectory[self.timesteps.index(timestep_key(t))]


# ----------------------------------------------------------------------------- cache


def model_fingerprint(pipe) -> str:
    """Identity of the weights that shape an inversion: spec, dtype, a sample of every parameter,
    and the state of loaded adapters (names and scales)."""
    import torch

    h = hashlib.sha256()
    h.update(str(getattr(pipe, "_dcustom_spec", type(pipe).__name__)).encode())
    for comp_name in ("unet", "vae", "text_encoder", "text_encoder_2"):
        comp = getattr(pipe, comp_name, None)
        if comp is None:
            continue
        h.update(f"{comp_name}:{comp.dtype}".encode())
        with torch.no_grad():
            for name, p in comp.named_parameters():
                h.update(name.encode())
                h.update(p.detach().flatten()[:8].float().cpu().numpy().tobytes())
        for name, module in comp.named_modules():
            scaling = getattr(module, "scaling", None)
            if isinstance(scaling, dict):
                h.update(f"{name}:{sorted(scaling.items())}:{getattr(module, 'active_adapters', '')}".encode())
    return h.hexdigest()[:24]


def inversion_key(pipe, pixels, steps, prompt, guidance, layers, kinds, feature_dtype) -> str:
    fields = {
        "format": CACHE_FORMAT,
        "image": hashlib.sha256(pixels.detach().float().cpu().numpy().tobytes()).hexdigest(),
        "model": model_fingerprint(pipe),
        "scheduler": {k: v for k, v in _ddim_config(pipe).items() if not k.startswith("_")},
        "steps": steps,
        "prompt": prompt,
        "guidance": guidance,
        "layers": sorted(layers or []),
        "kinds": sorted(kinds or []),
        "dtype": str(feature_dtype),
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:32]


class InversionCache:
    """In-memory LRU of inversions, optionally backed by safetensors files in `directory`."""

    def __init__(self, directory: Optional[str] = None, max_items: int = 8):
        self.directory = Path(directory) if directory else None
        self.max_items = max_items
        self.memory: OrderedDict[str, Inversion] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def _file(self, key: str) -> Optional[Path]:
        return self.directory / f"inversion-{key}.safetensors" if self.directory else None

    def get(self, key: str, device=None, offload=None, feature_dtype=None) -> Optional[Inversion]:
        if key in self.memory:
            self.memory.move_to_end(key)
            self.hits += 1
            return self.memory[key]
        path = self._file(key)
        if path is not None and path.is_file():
            from safetensors.torch import load_file

            tensors = load_file(str(path))
            meta = json.loads(tensors.pop("meta").numpy().tobytes().decode()) if "meta" in tensors else {}
            trajectory = tensors.pop("trajectory").to(device) if device else tensors.pop("trajectory")
            kinds = meta.get("kinds") or []
            features = (FeatureStore.from_tensors(tensors, kinds, dtype=feature_dtype, offload=offload, device=device)
                        if kinds else None)
            inv = Inversion(trajectory, [float(t) for t in meta["timesteps"]], features, key)
            self._remember(key, inv)
            self.hits += 1
            return inv
        self.misses += 1
        return None

    def put(self, key: str, inv: Inversion) -> None:
        self._remember(key, inv)
        path = self._file(key)
        if path is None:
            return
        import numpy as np
        import torch
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"trajectory": inv.trajectory.contiguous().cpu()}
        kinds = list(inv.features.kinds) if inv.features is not None else []
        if inv.features is not None:
            tensors.update(inv.features.to_tensors())
        meta = json.dumps({"timesteps": inv.timesteps, "kinds": kinds}).encode()
        tensors["meta"] = torch.from_numpy(np.frombuffer(meta, dtype=np.uint8).copy())
        tmp = path.with_name("." + path.name + ".tmp")
        save_file(tensors, str(tmp))
        tmp.replace(path)  # a partial file never replaces a good one

    def _remember(self, key, inv):
        self.memory[key] = inv
        self.memory.move_to_end(key)
        while len(self.memory) > self.max_items:
            self.memory.popitem(last=False)


# ----------------------------------------------------------------------------- inversion


def invert(pipe, image, steps: int = 50, prompt: str = "", guidance: float = 1.0,
           layers: Optional[Sequence[str]] = None, kinds: Sequence[str] = ("q", "k", "v"),
           feature_dtype="fp16", offload: Optional[str] = None, cache: Optional[InversionCache] = None,
           height: Optional[int] = None, width: Optional[int] = None,
           on_step: Optional[Callable[[], None]] = None) -> Inversion:
    """DDIM-invert `image` (a PIL image, or a latent tensor (1, C, h, w)) in `steps` steps.

    With `layers` (processor names), the self-attention `kinds` of those layers are recorded per
    timestep in `feature_dtype` ("fp16", "fp32" or a torch dtype), on `offload` ("cpu") if given.
    Guidance 1 and the empty prompt reproduce StyleID's inversion.
    """
    import time

    import torch

    from dcustom.pipelines.images import model_resolution

    start = time.perf_counter()
    dtype = {"fp16": torch.float16, "fp32": torch.float32, None: None}.get(feature_dtype, feature_dtype)
    if height is None or width is None:
        height, width = model_resolution(pipe)
    is_latent = isinstance(image, torch.Tensor)
    if is_latent:
        pixels = image
    else:
        from dcustom.pipelines.images import fit

        pixels = pipe.image_processor.preprocess(fit(image, width, height), height=height, width=width)
    layers = list(layers or [])
    kinds = tuple(kinds) if layers else ()
    key = inversion_key(pipe, pixels, steps, prompt, guidance, layers, kinds, dtype)
    if cache is not None:
        hit = cache.get(key, device=pipe.device, offload=offload, feature_dtype=dtype)
        if hit is not None:
            hit = dataclasses.replace(hit, cache_hit=True, seconds=time.perf_counter() - start)
            if on_step is not None:
                for _ in range(steps):
                    on_step()
            return hit

    z0 = image.to(pipe.device, pipe.unet.dtype) if is_latent else encode_image(pipe, image, height, width)
    latent_h, latent_w = z0.shape[-2:]
    trajectory = [z0]

    def record_latents(_pipe, _i, _t, tensors):
        trajectory.append(tensors["latents"].detach().clone())
        if on_step is not None:
            on_step()
        return tensors

    store = FeatureStore(kinds, dtype=dtype, offload=offload) if layers else None
    gate = TimestepGate()
    inverse = ddim_inverse_scheduler(pipe)
    with contextlib.ExitStack() as stack:
        stack.enter_context(scheduler_swapped(pipe, inverse))
        if layers:
            from dcustom.pipelines.injection import RecordProcessor

            require_self_attention(pipe.unet, layers)
            stack.enter_context(attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, store), gate))
        with torch.no_grad():
            pipe(prompt=[prompt] * z0.shape[0], latents=z0, num_inference_steps=steps, guidance_scale=guidance,
                 height=latent_h * pipe.vae_scale_factor, width=latent_w * pipe.vae_scale_factor,
                 output_type="latent", callback_on_step_end=record_latents)
        timesteps = [timestep_key(t) for t in inverse.timesteps]
    inv = Inversion(torch.stack(trajectory), timesteps, store, key, cache_hit=False,
                    seconds=time.perf_counter() - start)
    if cache is not None:
        cache.put(key, inv)
    return inv


def replay_callback(rows_to_inversions: dict, timesteps: Sequence[float]):
    """`callback_on_step_end` that puts row r of the latents back on its inversion trajectory
    before every UNet call (rows_to_inversions: {row: Inversion}), so a reference image rides in
    the sampling batch with the very latents it had while it was inverted."""

    def callback(_pipe, i, _t, tensors):
        latents = tensors["latents"]
        if i + 1 < len(timesteps):
            for row, inv in rows_to_inversions.items():
                latents[row] = inv.input_at(timesteps[i + 1])[0].to(latents.dtype)
        return {"latents": latents}

    return callback


def sample_from(pipe, latents, steps: int, prompt: str = "", guidance: float = 1.0, eta: float = 0.0,
                generator=None, callback=None):
    """DDIM sampling from `latents` with the pipeline (scheduler swapped to DDIM); returns latents."""
    import torch

    with scheduler_swapped(pipe, ddim_scheduler(pipe)), torch.no_grad():
        h, w = latents.shape[-2:]
        kwargs = dict(prompt=[prompt] * latents.shape[0], latents=latents, num_inference_steps=steps,
                      guidance_scale=guidance, eta=eta, generator=generator, output_type="latent",
                      height=h * pipe.vae_scale_factor, width=w * pipe.vae_scale_factor)
        if callback is not None:
            kwargs["callback_on_step_end"] = callback
        return pipe(**kwargs).images
