"""The flow-matching objective of SD3/3.5 and FLUX.1 (rectified flow, Esser et al. 2024, "Scaling Rectified Flow
Transformers for High-Resolution Image Synthesis", arXiv:2403.03206).

A latent x0 and noise ε are joined on a straight line, x_σ = (1 − σ)·x0 + σ·ε, σ ∈ [0, 1]; the transformer predicts
the velocity along it, v = ε − x0, and the loss is the squared error of that prediction. What differs from the
UNet trainers is only the noise path, the target and the model call, so `FlowObjective` reuses the subject
trainers' `DenoisingObjective` for everything else (images, buckets, flips, cached VAE latents with the VAE's
shift and scale, cached text, masks) and overrides:

    load          the transformer instead of a UNet; no DDPM scheduler (σ is drawn here)
    encode_text   CLIP + T5 through the pipeline's own encode_prompt (cached once: T5 runs only at setup)
    _group_loss   σ drawn and shifted as the family samples, x_σ, velocity target, the family's transformer call

σ is drawn logit-normal (the SD3 paper's best sampler, §3.1, m = 0, s = 1) or uniform, then shifted towards noise
as the model's sampler shifts it: SD3 by a fixed s (σ' = sσ / (1 + (s−1)σ), the paper's §5.3.2 with s = 3),
FLUX by s = e^μ with μ growing linearly in the image's token count (its scheduler's dynamic shifting). Draws use
torch's global RNG in a fixed order, so the loop's resume stays exact.
"""

from __future__ import annotations

import math
from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.trainers.denoising import DenoisingObjective, per_sample_loss


def sample_sigmas(n: int, sampling: str, logit_mean: float = 0.0, logit_std: float = 1.0):
    """n noise levels σ ∈ (0, 1): logit-normal σ = sigmoid(N(m, s)) (SD3 paper eq. 19) or uniform."""
    import torch

    if sampling == "logit_normal":
        return torch.sigmoid(torch.randn(n) * logit_std + logit_mean)
    return torch.rand(n)


def shift_sigmas(sigmas, shift: float):
    """σ' = sσ / (1 + (s − 1)σ): the SD3 paper's timestep shift (§5.3.2); s > 1 spends more steps near noise."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def resolution_shift(image_tokens: int, config) -> float:
    """FLUX's shift for an image of `image_tokens` packed tokens: s = e^μ, μ linear in the token count between
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift) of its scheduler config. With s = e^μ,
    shift_sigmas equals the sampler's e^μ / (e^μ + 1/σ − 1)."""
    slope = (config.max_shift - config.base_shift) / (config.max_image_seq_len - config.base_image_seq_len)
    mu = config.base_shift + slope * (image_tokens - config.base_image_seq_len)
    return math.exp(mu)


def flow_target(latents, noise):
    """The velocity the transformer learns: d x_σ / dσ = ε − x0."""
    return noise - latents


class FlowObjective(DenoisingObjective):
    """Data and text of the subject trainers, the flow-matching loss of SD3/FLUX (see the module doc)."""

    def __init__(self, model: str, data, flow, pipe=None, model_config=None):
        super().__init__(model, data, None, 0.0, pipe)
        self.flow, self.model_config = flow, model_config

    def load(self, ctx):
        """The pipeline on the device, its family (SD3 or FLUX, else one sentence), every base weight frozen."""
        from dcustom.models import family_of, load_pipeline

        self.ctx = ctx
        if self.pipe is None:
            self.pipe = load_pipeline(self.model, dtype="fp32", device=str(ctx.device), config=self.model_config)
        pipe = self.pipe
        pipe.to(ctx.device)
        self.family = family_of(pipe)
        if self.family.objective != "flow":
            raise DcustomError(f"model {self.model!r} is {self.family.label}, a UNet model; flow_lora trains SD3/3.5 and "
                               "FLUX.1 transformers: train it with 'dcustom train lora'.")
        self.prediction = "flow"
        self.text_encoders = [getattr(pipe, n) for n in self.family.text_encoders]
        for module in [pipe.transformer, pipe.vae, *self.text_encoders]:
            module.requires_grad_(False)
        return pipe

    @property
    def resolution(self) -> int:
        return self.data.resolution or self.pipe.default_sample_size * self.pipe.vae_scale_factor

    @property
    def max_sequence_length(self) -> int:
        return self.flow.max_sequence_length or (256 if self.family.name == "sd3" else 512)

    def encode_text(self, captions: list):
        """(T5 + CLIP token embeddings, pooled CLIP embedding) as the pipeline conditions its transformer."""
        kwargs = dict(prompt=captions, prompt_2=None, device=self.ctx.device, num_images_per_prompt=1,
                      max_sequence_length=self.max_sequence_length)
        if self.family.name == "sd3":
            embeds, _, pooled, _ = self.pipe.encode_prompt(prompt_3=None, do_classifier_free_guidance=False, **kwargs)
        else:
            embeds, pooled, _ = self.pipe.encode_prompt(**kwargs)
        return embeds, pooled

    def shift(self, image_tokens: int) -> float:
        if self.flow.shift is not None:
            return self.flow.shift
        config = self.pipe.scheduler.config
        if self.family.timestep_shift == "resolution" and config.get("use_dynamic_shifting", False):
            return resolution_shift(image_tokens, config)
        return float(config.get("shift", 1.0))

    def _group_loss(self, group):
        import torch

        device = self.ctx.device
        latents, variants = self._latents(group)
        latents = latents.to(device)
        noise = torch.randn_like(latents)
        tokens = (latents.shape[2] // 2) * (latents.shape[3] // 2)  # 2x2 patches (SD3) or packing (FLUX)
        sigmas = sample_sigmas(len(group), self.flow.sampling, self.flow.logit_mean, self.flow.logit_std)
        sigmas = shift_sigmas(sigmas, self.shift(tokens)).to(device)
        s = sigmas.view(-1, 1, 1, 1)
        noisy = (1 - s) * latents + s * noise
        embeds, pooled = self._text(self._captions(group))
        pred = self.predict(noisy, sigmas, embeds.to(device), pooled.to(device)).float()
        weight = None
        if any(ex.weights for ex in group):  # images without a mask weigh 1 everywhere
            ones = torch.ones(1, *latents.shape[2:])
            weight = torch.stack([ex.weights[v] if ex.weights else ones for ex, v in zip(group, variants)]).to(device)
        return per_sample_loss(pred, flow_target(latents, noise).float(), weight).mean()

    def predict(self, noisy, sigmas, embeds, pooled):
        """The transformer's velocity for latents `noisy` [B, C, h, w] at noise levels `sigmas` [B], called exactly
        as the family's pipeline calls it (SD3: timestep σ·1000; FLUX: packed 2x2 tokens with position ids, σ,
        and the guidance embedding when the model has one)."""
        import torch

        transformer, dtype = self.pipe.transformer, self.ctx.weight_dtype
        embeds, pooled = embeds.to(dtype), pooled.to(dtype)
        if self.family.name == "sd3":
            return transformer(hidden_states=noisy.to(dtype), timestep=sigmas * 1000, encoder_hidden_states=embeds,
                               pooled_projections=pooled, return_dict=False)[0]
        b, c, h, w = noisy.shape
        pipe = self.pipe
        packed = pipe._pack_latents(noisy.to(dtype), b, c, h, w)
        img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, dtype)
        txt_ids = torch.zeros(embeds.shape[1], 3, device=noisy.device, dtype=dtype)
        guidance = None
        if transformer.config.guidance_embeds:
            guidance = torch.full((b,), self.flow.guidance, device=noisy.device, dtype=torch.float32)
        out = transformer(hidden_states=packed, timestep=sigmas.to(dtype), guidance=guidance, pooled_projections=pooled,
                          encoder_hidden_states=embeds, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
        scale = pipe.vae_scale_factor
        return pipe._unpack_latents(out, h * scale, w * scale, scale)

    def render_samples(self, folder: Path, prompts: list, steps: int, seed: int, guidance: float = 3.5) -> list[Path]:
        """One image per prompt (seed + i) at the training resolution, with the caption length used in training."""
        import torch

        paths, res, transformer = [], self.resolution, self.pipe.transformer
        was_training = transformer.training
        transformer.eval()
        try:
            for i, prompt in enumerate(prompts):
                g = torch.Generator(device="cpu").manual_seed(seed + i)
                with self.ctx.accelerator.autocast():
                    image = self.pipe(prompt, num_inference_steps=steps, width=res, height=res, generator=g,
                                      guidance_scale=guidance, max_sequence_length=self.max_sequence_length).images[0]
                path = Path(folder) / f"{i:02d}.png"
                image.save(path)
                paths.append(path)
        finally:
            transformer.train(was_training)
        return paths
