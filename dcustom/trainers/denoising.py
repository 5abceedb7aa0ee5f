"""The denoising objective the subject trainers share (LoRA/OFT/BOFT in `adapter`, `textual_inversion`).

A method holds one `DenoisingObjective` and calls it in this order:

    pipe = objective.load(ctx)             # pipeline on the device, every base weight frozen, DDPM noise scheduler
    ...                                    # the method adds what it trains (peft adapter, new token rows)
    objective.prepare_examples()           # scan, caption, bucket, flip, cache VAE latents (+ class images)
    objective.cache_text()                 # only when the text encoders stay frozen
    loss = objective.loss_with_prior(examples)   # in training_step

The loss of an example: its latent (one of its flip variants, drawn from the cached VAE posterior),
noise (+ noise offset), a uniform timestep, the ε or v target, the UNet's prediction from the caption's
text embeddings (the empty caption with probability data.caption_dropout; SDXL: pooled embeddings and
micro-conditioning), the squared error averaged per sample (`per_sample_loss`, the one place a per-pixel
weight multiplies in: an image's mask, see `mask_weights`), plus the drift from the base model on a prompt
without the trigger (`keep_prompts`, when set), then the min-SNR-γ weight. Examples are batched per aspect bucket, since a UNet batch needs one shape. Draws
use torch's global RNG in a fixed order, which the loop seeds and checkpoints: resume stays exact.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dcustom.data import (
    DataConfig,
    class_prompt,
    ensure_class_images,
    make_buckets,
    nearest_bucket,
    open_mask,
    open_rgb,
    resize_crop,
    scan_images,
    to_tensor,
    unet_stride,
)
from dcustom.errors import DcustomError
from dcustom.trainers.loop import TrainingMethod

log = logging.getLogger("dcustom.train")


@dataclass
class Example:
    """One image, ready for the UNet: pixel tensors or cached latent moments for each flip variant.

    Everything per variant is a list indexed the same way."""

    pixels: list  # [variant] -> [3, H, W] (dropped once latents are cached)
    moments: list  # [variant] -> (mean, std) of the VAE posterior, or None
    caption: str
    time_ids: object  # SDXL micro-conditioning (orig h, orig w, crop top, crop left, target h, target w)
    bucket: tuple  # (w, h)
    weights: Optional[list] = None  # [variant] -> [1, h, w] loss weight at latent resolution (from the mask), or None


def per_sample_loss(prediction, target, weight=None):
    """Squared error averaged over channels and pixels, one value per sample ([B, C, h, w] -> [B]).

    With a per-pixel `weight` [B, 1, h, w] it is the weighted mean (normalised by the weight's mean, so a
    mask changes where the model learns, not how large the loss and its gradients are)."""
    import torch.nn.functional as F

    err = F.mse_loss(prediction, target, reduction="none")
    if weight is None:
        return err.mean(dim=(1, 2, 3))
    return (err * weight).mean(dim=(1, 2, 3)) / weight.mean(dim=(1, 2, 3)).clamp_min(1e-8)


def mask_weights(mask, outside: float, latent_size: tuple):
    """A mask (PIL "L", white = subject) -> loss weights at latent resolution: outside + (1 - outside) * coverage,
    coverage being the mask's mean over each latent pixel's footprint (masked loss as in kohya's and
    OneTrainer's trainers, with a floor `outside` so the background is not forgotten entirely)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    m = torch.from_numpy(np.asarray(mask, dtype=np.float32) / 255.0)[None, None]
    coverage = F.adaptive_avg_pool2d(m, latent_size)[0]  # [1, h, w]
    return outside + (1.0 - outside) * coverage


def min_snr_weight(noise_scheduler, timesteps, gamma: float, prediction: str):
    """Min-SNR-γ (Hang et al., 2023): min(SNR, γ) / SNR for ε targets, min(SNR, γ) / (SNR + 1) for v targets."""
    import torch
    from diffusers.training_utils import compute_snr

    snr = compute_snr(noise_scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma)
    return clipped / snr if prediction == "epsilon" else clipped / (snr + 1)


class DenoisingObjective:
    """Data, text encoding and the denoising loss of a subject trainer (see the module doc for the order)."""

    def __init__(self, model: str, data: DataConfig, min_snr_gamma: Optional[float], noise_offset: float, pipe=None,
                 keep_prompts=(), keep_weight: float = 1.0):
        self.model, self.data = model, data
        self.min_snr_gamma, self.noise_offset = min_snr_gamma, noise_offset
        self.keep_prompts, self.keep_weight = list(keep_prompts), keep_weight
        self.pipe = pipe
        self.examples, self.class_examples, self.text_cache = [], [], {}
        self.used, self.skipped = [], []

    # --- the frozen pipeline ----------------------------------------------------------------
    def load(self, ctx):
        """The pipeline on the device (loaded unless one was given), its family, prediction type, a DDPM
        noise scheduler, and every base weight frozen. Returns the pipeline."""
        from diffusers import DDPMScheduler

        from dcustom.families import prediction_type
        from dcustom.models import family_of, load_pipeline

        self.ctx = ctx
        if self.pipe is None:
            self.pipe = load_pipeline(self.model, dtype="fp32", device=str(ctx.device))
        pipe = self.pipe
        pipe.to(ctx.device)
        self.family = family_of(pipe)
        if self.family.is_dit:  # flow matching on a transformer: its own objective (trainers/flow/)
            raise DcustomError(f"model {self.model!r} is {self.family.label}, a flow-matching transformer; train a LoRA "
                               "on it with 'dcustom train flow_lora'.")
        self.prediction = prediction_type(pipe)
        if self.prediction not in ("epsilon", "v_prediction"):
            raise DcustomError(f"model {self.model!r} predicts {self.prediction!r}; accepted: epsilon or v_prediction.")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.text_encoders = [getattr(pipe, n) for n in self.family.text_encoders]
        for module in [pipe.unet, pipe.vae, *self.text_encoders]:
            module.requires_grad_(False)
        return pipe

    @property
    def resolution(self) -> int:
        if self.data.resolution:
            return self.data.resolution
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    # --- examples ---------------------------------------------------------------------------
    def prepare_examples(self) -> list:
        """The training images as Examples (and, with data.prior, the class images); returns the examples."""
        data = self.data
        res = self.resolution
        stride = unet_stride(self.pipe)
        if res % stride:
            raise DcustomError(f"data.resolution: {res} is not a multiple of {stride} (this model's UNet stride).")
        min_size = data.min_size if data.min_size is not None else res // 2
        report = scan_images(data.images, data.instance_prompt, min_size, data.caption_prefix, data.masks,
                             data.alpha_mask)
        self.skipped, self.used = report.skipped, report.images
        for path, why in report.skipped:
            log.warning("skipped %s: %s", path.name, why)
        log.info("training on %d image(s) from %r (%d skipped)", len(report.images), str(data.images), len(report.skipped))
        self._warn_long_captions(report.images)
        buckets = make_buckets(res, stride) if data.buckets else [(res, res)]
        self.examples = []
        for rec in report.images:
            image, _ = open_rgb(rec.path)
            mask = open_mask(rec.mask, image.size, alpha=rec.mask == rec.path) if rec.mask else None
            self.examples.append(self._example(image, rec.caption, nearest_bucket(image.size, buckets), mask))
        return self.examples

    def prepare_class_examples(self) -> list:
        """DreamBooth prior preservation: class images (generated once, cached) as Examples."""
        prior = self.data.prior
        res = self.resolution
        paths = ensure_class_images(self.pipe, prior, self.model, res, seed=self.ctx.cfg.seed)
        self.class_examples = [self._example(open_rgb(p)[0], class_prompt(prior, i), (res, res)) for i, p in enumerate(paths)]
        return self.class_examples

    def _warn_long_captions(self, records) -> None:
        """Once per run: captions the text encoder will cut (it does so silently)."""
        from dcustom.generate import prompt_overflow

        long = [(r, over) for r in records for over in [prompt_overflow(self.pipe, r.caption)] if over]
        if long:
            (first, (count, limit)) = long[0]
            log.warning("%d caption(s) are longer than the text encoder's %d tokens (e.g. %s: %d tokens); the rest "
                        "of each is ignored.", len(long), limit, first.path.name, count)

    def _example(self, image, caption, bucket, mask=None) -> Example:
        import torch
        from PIL import ImageOps

        cropped, (top, left) = resize_crop(image, bucket)
        variants = [cropped, ImageOps.mirror(cropped)] if self.data.flip else [cropped]
        pixels = [to_tensor(v) for v in variants]
        time_ids = torch.tensor([image.height, image.width, top, left, bucket[1], bucket[0]], dtype=torch.float32)
        ex = Example(pixels, [None] * len(pixels), caption, time_ids, bucket)
        if mask is not None:  # cropped and flipped exactly as the image, then pooled to the latent grid
            m, _ = resize_crop(mask, bucket)
            stride = self.pipe.vae_scale_factor
            latent_size = (bucket[1] // stride, bucket[0] // stride)
            masks = [m, ImageOps.mirror(m)] if self.data.flip else [m]
            ex.weights = [mask_weights(v, self.data.mask_outside_weight, latent_size) for v in masks]
        if self.data.cache_latents:
            ex.moments = [self._moments(p[None]) for p in pixels]
            ex.pixels = []
        return ex

    def _moments(self, pixels):
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean[0].float(), dist.std[0].float()

    # --- text -------------------------------------------------------------------------------
    def cache_text(self) -> None:
        """Encode every caption once (only valid while the text encoders are frozen)."""
        import torch

        captions = {e.caption for e in self.examples + self.class_examples} | set(self.keep_prompts)
        if self.data.caption_dropout:
            captions.add("")
        with torch.no_grad():
            for caption in captions:
                self.text_cache[caption] = tuple(None if t is None else t.detach() for t in self.encode_text([caption]))

    def encode_text(self, captions: list):
        """(prompt_embeds, pooled or None) for a list of captions, with gradients when the text side trains."""
        device = self.ctx.device
        if self.family.name == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self.pipe.encode_prompt(captions, device, 1, False)
        return embeds, None

    def _captions(self, examples) -> list:
        """Each example's caption, or "" with probability data.caption_dropout (no draw when it is 0)."""
        import torch

        p = self.data.caption_dropout
        if not p:
            return [ex.caption for ex in examples]
        return ["" if float(torch.rand(())) < p else ex.caption for ex in examples]

    def _text(self, captions: list):
        import torch

        if self.text_cache:
            parts = [self.text_cache[c] for c in captions]
            embeds = torch.cat([p[0] for p in parts])
            pooled = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
            return embeds, pooled
        return self.encode_text(captions)

    # --- loss -------------------------------------------------------------------------------
    def loss_with_prior(self, examples):
        """The loss of `examples`, plus data.prior.loss_weight times that of as many random class images."""
        loss = self.loss(examples)
        if self.class_examples:
            import torch

            picks = torch.randint(len(self.class_examples), (len(examples),)).tolist()
            loss = loss + self.data.prior.loss_weight * self.loss([self.class_examples[i] for i in picks])
        return loss

    def loss(self, examples):
        """Mean denoising loss over examples, run per aspect bucket (a UNet batch needs one shape)."""
        groups = {}
        for ex in examples:
            groups.setdefault(ex.bucket, []).append(ex)
        total = 0.0
        for group in groups.values():
            total = total + self._group_loss(group) * (len(group) / len(examples))
        return total

    def _latents(self, examples):
        """Scaled latents of `examples` (one flip variant each, drawn) and the variants drawn."""
        import torch

        latents, variants = [], []
        for ex in examples:
            v = int(torch.randint(len(ex.moments) if ex.moments[0] is not None else len(ex.pixels), ()).item())
            if ex.moments[0] is not None:
                mean, std = ex.moments[v]
            else:
                mean, std = self._moments(ex.pixels[v][None])
            latents.append(mean + std * torch.randn_like(mean))
            variants.append(v)
        vae_cfg = self.pipe.vae.config
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        return (torch.stack(latents) - shift) * vae_cfg.scaling_factor, variants

    def _group_loss(self, group):
        import torch

        device, unet = self.ctx.device, self.pipe.unet
        latents, variants = self._latents(group)
        latents = latents.to(device)
        noise = torch.randn_like(latents)
        if self.noise_offset:
            noise = noise + self.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
        sched = self.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        embeds, pooled = self._text(self._captions(group))
        kwargs = {}
        if self.family.micro_conditioning:
            time_ids = torch.stack([ex.time_ids for ex in group]).to(device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device), "time_ids": time_ids}
        dtype = self.ctx.weight_dtype
        pred = unet(noisy.to(dtype), t, embeds.to(device, dtype), **kwargs).sample.float()
        weight = None
        if any(ex.weights for ex in group):  # images without a mask weigh 1 everywhere
            ones = torch.ones(1, *latents.shape[2:])
            weight = torch.stack([ex.weights[v] if ex.weights else ones for ex, v in zip(group, variants)]).to(device)
        per_sample = per_sample_loss(pred, target.float(), weight)
        if self.keep_prompts:
            time_ids = kwargs["added_cond_kwargs"]["time_ids"] if kwargs else None
            per_sample = per_sample + self.keep_weight * self._kept_prompt_drift(noisy.to(dtype), t, time_ids)
        if self.min_snr_gamma:
            per_sample = per_sample * min_snr_weight(sched, t, self.min_snr_gamma, self.prediction)
        return per_sample.mean()

    def _kept_prompt_drift(self, noisy, t, time_ids):
        """Per sample, the squared distance of the adapted UNet's prediction from the base model's at the same noisy
        latents, for one of `keep_prompts` drawn per sample (prompts without the trigger: "" is guidance's
        unconditional branch). An adapter on text-independent layers (convolutions, feed-forward) otherwise changes
        every prompt, and guidance amplifies whatever differs between its two branches."""
        import torch

        unet, device = self.pipe.unet, self.ctx.device
        picks = torch.randint(len(self.keep_prompts), (noisy.shape[0],)).tolist()
        prompts = [self.keep_prompts[i] for i in picks]

        def predict(embeds, pooled):
            added = None if time_ids is None else {"text_embeds": pooled.to(device), "time_ids": time_ids}
            return unet(noisy, t, embeds.to(device, noisy.dtype), added_cond_kwargs=added).sample.float()

        with torch.no_grad(), self._adapters_off():
            base = predict(*self._text(prompts))  # the text side is the base model's too (it differs if it trains)
        return per_sample_loss(predict(*self._text(prompts)), base)

    @contextlib.contextmanager
    def _adapters_off(self):
        """The base model: every peft adapter on the UNet and on trained text encoders switched off."""
        modules = [self.pipe.unet] + [te for te in self.text_encoders if getattr(te, "_hf_peft_config_loaded", False)]
        for module in modules:
            module.disable_adapters()
        try:
            yield
        finally:
            for module in modules:
                module.enable_adapters()

    # --- validation images ------------------------------------------------------------------
    def render_samples(self, folder: Path, prompts: list, steps: int, seed: int) -> list[Path]:
        """One image per prompt (seed + i, same each time, so they are comparable) at the training resolution."""
        import torch

        paths = []
        res = self.resolution
        unet = self.pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            for i, prompt in enumerate(prompts):
                g = torch.Generator(device="cpu").manual_seed(seed + i)
                with self.ctx.accelerator.autocast():
                    image = self.pipe(prompt, num_inference_steps=steps, width=res, height=res, generator=g).images[0]
                path = Path(folder) / f"{i:02d}.png"
                image.save(path)
                paths.append(path)
        finally:
            unet.train(was_training)
        return paths


class SubjectMethod(TrainingMethod):
    """A training method built on a `DenoisingObjective` (held as `self.objective`): the pipeline, its family and
    the images used or skipped are the objective's."""

    @property
    def pipe(self):
        return self.objective.pipe

    @property
    def family(self):
        return self.objective.family

    @property
    def used(self) -> list:
        return self.objective.used

    @property
    def skipped(self) -> list:
        return self.objective.skipped
