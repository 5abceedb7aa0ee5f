"""A differentiable DDIM/CFG sampler over a stock pipeline's UNet, scheduler and VAE.

`RewardSampler(pipe, ...)` rolls out a trajectory x_T -> x_0 with the pipeline's own components,
keeps exactly the UNet calls a `GradPolicy` selects in the autograd graph (each one wrapped in
`torch.utils.checkpoint`, use_reentrant=False, so only its inputs are stored), then decodes x_0
through the VAE *with* gradient. Every step uses diffusers' `DDIMScheduler.step`, which is plain
tensor arithmetic and therefore differentiable; with eta > 0 its injected noise is drawn up front
and passed as `variance_noise` (the reparameterisation trick).

Conditioning comes from the pipeline's own `encode_prompt` (text encoders are frozen and run
without gradient). SDXL also gets its pooled text embedding and micro-conditioning time ids
(original size, crop top-left, target size), built the way the SDXL pipeline builds them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from dcustom.errors import DcustomError
from dcustom.trainers.reward.policies import GradPolicy


@dataclass
class Conditioning:
    """UNet inputs besides (x_t, t); with CFG the unconditional half comes first."""

    embeds: "object"  # Tensor [B or 2B, L, D]
    added: Optional[dict] = None  # SDXL: {"text_embeds": [.., P], "time_ids": [.., 6]}
    cfg: bool = False


@dataclass
class Rollout:
    """Result of one differentiable trajectory."""

    images: "object"  # [copies*B, 3, H, W] in [0, 1], with gradient when any UNet call kept it
    latents: "object"  # x_0 latents, [copies*B, C, h, w]
    grad_steps: list[int]  # step indices (sampling order) whose UNet call kept gradients
    grad_calls: int  # UNet calls kept in the graph (== len(grad_steps), or lv copies for DRaFT-LV)
    copies: int = 1  # DRaFT-LV: number of re-noised copies stacked in the batch
    kl: "object" = None  # mean squared difference to the base UNet's output over the grad calls
    timesteps: list[int] = field(default_factory=list)

    def per_sample(self, values):
        """Average a [copies*B] tensor over the LV copies -> [B]."""
        return values.view(self.copies, -1).mean(0) if self.copies > 1 else values


def encode_prompts(pipe, prompts: list[str], negative_prompt: str = "", guidance_scale: float = 1.0,
                   height: int = 64, width: int = 64, original_size=None, crop_coords=(0, 0),
                   target_size=None) -> Conditioning:
    """Text conditioning for `prompts` with the pipeline's own encoders (no gradient)."""
    import torch

    from dcustom.models import family_of

    cfg = guidance_scale > 1.0
    device = pipe.unet.device
    negatives = [negative_prompt] * len(prompts)
    with torch.no_grad():
        if family_of(pipe).micro_conditioning:
            pe, ne, pooled, npooled = pipe.encode_prompt(
                prompt=list(prompts), device=device, num_images_per_prompt=1, do_classifier_free_guidance=cfg,
                negative_prompt=negatives)
            time_ids = sdxl_time_ids(original_size or (height, width), crop_coords, target_size or (height, width),
                                     len(prompts), device, pe.dtype)
            if cfg:
                embeds = torch.cat([ne, pe])
                added = {"text_embeds": torch.cat([npooled, pooled]), "time_ids": torch.cat([time_ids, time_ids])}
            else:
                embeds, added = pe, {"text_embeds": pooled, "time_ids": time_ids}
            return Conditioning(embeds, added, cfg)
        pe, ne = pipe.encode_prompt(list(prompts), device, 1, cfg, negative_prompt=negatives)
        return Conditioning(torch.cat([ne, pe]) if cfg else pe, None, cfg)


def sdxl_time_ids(original_size, crop_coords, target_size, batch: int, device, dtype):
    """SDXL micro-conditioning: (orig_h, orig_w, crop_top, crop_left, target_h, target_w) per sample."""
    import torch

    ids = list(original_size) + list(crop_coords) + list(target_size)
    if len(ids) != 6:
        raise DcustomError("sdxl micro-conditioning: original_size, crop_coords and target_size must be pairs.")
    return torch.tensor([ids], device=device, dtype=dtype).repeat(batch, 1)


class RewardSampler:
    """Differentiable DDIM sampler with classifier-free guidance over a stock pipeline's parts."""

    def __init__(self, pipe, steps: int = 20, guidance_scale: float = 5.0, eta: float = 0.0,
                 height: Optional[int] = None, width: Optional[int] = None, checkpointing: bool = True,
                 checkpoint_vae: bool = False):
        from diffusers import DDIMScheduler

        if steps < 1:
            raise DcustomError(f"sampler.steps: {steps} is not valid; at least 1 step is needed.")
        self.pipe, self.unet, self.vae = pipe, pipe.unet, pipe.vae
        # Only the UNet's adapter trains: the VAE and text encoders must not build parameter graphs.
        from dcustom.models import family_of

        pipe.vae.requires_grad_(False)
        for name in family_of(pipe).text_encoders:
            getattr(pipe, name).requires_grad_(False)
        # DDIM with the pipeline's own noise schedule and prediction type (epsilon or v).
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        self.steps, self.guidance_scale, self.eta = steps, guidance_scale, eta
        factor = getattr(pipe, "vae_scale_factor", 8)
        size = pipe.unet.config.sample_size * factor
        self.height, self.width = height or size, width or size
        if self.height % factor or self.width % factor:
            raise DcustomError(f"sampler.height/width: {self.height}x{self.width} must be multiples of {factor} for this VAE.")
        self.latent_shape = (pipe.unet.config.in_channels, self.height // factor, self.width // factor)
        self.checkpointing = checkpointing
        self.checkpoint_vae = checkpoint_vae

    # -- conditioning -------------------------------------------------------------------------
    def encode(self, prompts: list[str], negative_prompt: str = "") -> Conditioning:
        return encode_prompts(self.pipe, prompts, negative_prompt, self.guidance_scale, self.height, self.width)

    # -- one UNet call ------------------------------------------------------------------------
    def _unet(self, x, t, embeds, text_embeds, time_ids):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added, return_dict=False)[0]

    def model_output(self, x, t, cond: Conditioning, grad: bool, raw: bool = False):
        """Guided model output (eps or v) at (x, t); with grad, the UNet call is checkpointed.

        raw=True returns (guided, unguided output of the whole CFG batch); the KL term uses the latter.
        """
        import torch
        from torch.utils.checkpoint import checkpoint

        x_in = torch.cat([x, x]) if cond.cfg else x
        x_in = self.scheduler.scale_model_input(x_in, t)
        text_embeds = None if cond.added is None else cond.added["text_embeds"]
        time_ids = None if cond.added is None else cond.added["time_ids"]
        args = (x_in, t, cond.embeds, text_embeds, time_ids)
        with torch.set_grad_enabled(grad):
            if grad and self.checkpointing:
                out = checkpoint(self._unet, *args, use_reentrant=False)
            else:
                out = self._unet(*args)
            guided = out
            if cond.cfg:
                uncond, text = out.chunk(2)
                guided = uncond + self.guidance_scale * (text - uncond)
        return (guided, out) if raw else guided

    def _base_output(self, x, t, cond: Conditioning):
        """The base model's raw output (adapters disabled), a constant target for the KL term."""
        import torch

        self.unet.disable_adapters()
        try:
            with torch.no_grad():
                return self.model_output(x, t, cond, grad=False, raw=True)[1]
        finally:
            self.unet.enable_adapters()

    # -- a trajectory -------------------------------------------------------------------------
    def initial_noise(self, batch: int, generator=None):
        """x_T and (for eta > 0) the per-step DDIM noise, drawn up front so the rollout is reparameterised."""
        import torch

        shape = (batch, *self.latent_shape)
        device, dtype = self.unet.device, self.unet.dtype
        x_T = torch.randn(shape, generator=generator, device="cpu").to(device, dtype)
        x_T = x_T * self.scheduler.init_noise_sigma
        step_noise = None
        if self.eta > 0:
            step_noise = torch.randn((self.steps, *shape), generator=generator, device="cpu").to(device, dtype)
        return x_T, step_noise

    def rollout(self, cond: Conditioning, policy: GradPolicy, generator=None, x_T=None, step_noise=None,
                kl: bool = False, decode: bool = True) -> Rollout:
        """Sample x_0 keeping exactly the UNet calls `policy` selects in the graph, then decode it."""
        import torch

        batch = cond.embeds.shape[0] // (2 if cond.cfg else 1)
        if x_T is None:
            x_T, step_noise = self.initial_noise(batch, generator)
        self.scheduler.set_timesteps(self.steps, device=self.unet.device)
        timesteps = [int(t) for t in self.scheduler.timesteps]
        in_graph = policy.grad_steps(len(timesteps), generator)
        x, kl_terms, grad_steps = x_T, [], []
        for i, t in enumerate(timesteps):
            grad = i in in_graph
            out, raw = self.model_output(x, t, cond, grad=grad, raw=True)
            if grad:
                grad_steps.append(i)
                if kl:
                    kl_terms.append(self._kl_term(raw, x, t, cond))
            noise = None if step_noise is None else step_noise[i]
            x = self.scheduler.step(out, t, x, eta=self.eta, variance_noise=noise).prev_sample
        copies = 1
        grad_calls = len(grad_steps)
        if policy.lv_copies:
            x, lv_kl = self._low_variance(x.detach(), timesteps[-1], cond, policy.lv_copies, generator, kl)
            kl_terms += lv_kl
            copies, grad_calls = policy.lv_copies, policy.lv_copies
        kl_value = torch.stack(kl_terms).mean() if kl_terms else None
        images = self.decode(x) if decode else None
        return Rollout(images, x, grad_steps, grad_calls, copies, kl_value, timesteps)

    def _kl_term(self, trained_raw, x, t, cond):
        """mean |f_theta(x_t) - f_base(x_t)|^2 at a grad step (DRaFT+'s KL for a shared variance).

        The base output is a constant target: its dependence on x_t is not differentiated.
        """
        return (trained_raw.float() - self._base_output(x, t, cond).float()).pow(2).mean()

    def _low_variance(self, x0, t_last: int, cond: Conditioning, copies: int, generator, kl: bool):
        """DRaFT-LV: re-noise x0 to the last timestep `copies` times, one grad-enabled step each."""
        import torch

        t = torch.tensor([t_last], device=x0.device)
        outs, kl_terms = [], []
        for _ in range(copies):
            eps = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
            x1 = self.scheduler.add_noise(x0, eps, t)
            out, raw = self.model_output(x1, t_last, cond, grad=True, raw=True)
            if kl:
                kl_terms.append(self._kl_term(raw, x1, t_last, cond))
            noise = None
            if self.eta > 0:
                noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device, x0.dtype)
            outs.append(self.scheduler.step(out, t_last, x1, eta=self.eta, variance_noise=noise).prev_sample)
        return torch.cat(outs), kl_terms

    # -- decoding -----------------------------------------------------------------------------
    def decode(self, latents):
        """Latents -> images in [0, 1] through the VAE decoder, keeping the gradient."""
        import torch
        from torch.utils.checkpoint import checkpoint

        config = self.vae.config
        z = latents / config.scaling_factor
        if getattr(config, "shift_factor", None):
            z = z + config.shift_factor
        z = z.to(self.vae.dtype)

        def run(z_):
            return self.vae.decode(z_, return_dict=False)[0]

        if self.checkpoint_vae and torch.is_grad_enabled() and z.requires_grad:
            image = checkpoint(run, z, use_reentrant=False)
        else:
            image = run(z)
        return (image.float() / 2 + 0.5).clamp(0, 1)
