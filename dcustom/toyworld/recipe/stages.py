"""`Run`: the state of one toy-recipe run, and one optimizer step's loss for each of its three stages.

A stage step takes the generator of its (seed, stage, step) and draws everything random from it, so
any step can be redone exactly after a resume; the driver (`train_base`) does the backward pass and
the optimizer step. The data pool is rendered once per invocation (it is cheaper than storing it),
captions are tokenized once, and the UNet stage trains on latents the frozen VAE encoded once.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dcustom.toyworld.config import ToyBaseConfig
from dcustom.toyworld.grammar import SceneRanges
from dcustom.toyworld.recipe.text import CaptionEncoder, TextProbe, concepts, text_losses

STAGES = ("text", "vae", "unet")


def step_generator(seed: int, stage: str, step: int, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + STAGES.index(stage) * 100_000_019 + step) % (2**63 - 1))
    return gen


def cosine_lambda(warmup: int, total: int, floor: float):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def unwrap(module):
    """The module itself behind a torch.compile wrapper (its weights are the same tensors)."""
    return getattr(module, "_orig_mod", module)


class Run:
    """State of one train-base run (modules, optimizer, stage, step) plus its folder.

    Everything a checkpoint holds lives here as attributes (`recipe.checkpoints` writes and restores
    them); `stage_setup` builds a stage's optimizer, so a resume rebuilds it before loading its state.
    """

    def __init__(self, cfg: ToyBaseConfig, log=print, on_step=None):
        from dcustom.models import resolve_device
        from dcustom.toyworld.model import build_components

        self.cfg, self.log, self.on_step = cfg, log, on_step
        self.dir = Path(cfg.output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(resolve_device(cfg.device))
        use_bf16 = cfg.mixed_precision == "bf16" or (cfg.mixed_precision == "auto" and self.device.type == "cuda")
        self.autocast_dtype = torch.bfloat16 if use_bf16 else None
        c = build_components(cfg.model, self.dir, seed=cfg.seed)
        self.tokenizer, self.scheduler = c["tokenizer"], c["scheduler"]
        self.text_encoder = c["text_encoder"].to(self.device)
        self.vae = c["vae"].to(self.device)
        self.unet = c["unet"].to(self.device)
        _, head_of, class_of = concepts()
        self.head_of, self.class_of = head_of.to(self.device), class_of.to(self.device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed + 1)
            self.probe = TextProbe(cfg.model.text_hidden, len(head_of) - 1).to(self.device)
        self.ema = None
        self.stage, self.step, self.global_step = "text", 0, 0
        self.curve: list[dict] = []
        self.optimizer = self.lr_sched = None
        self.seconds_before, self.started = 0.0, time.time()  # wall time of earlier invocations + this one
        self.latents = None

    # ------------------------------------------------------------ data
    def build_pool(self):
        import os

        from dcustom.toyworld.data import render_pool

        cfg = self.cfg
        ranges = SceneRanges(cfg.min_size, cfg.max_size, cfg.max_angle)
        workers = cfg.render_workers or min(16, os.cpu_count() or 1)
        t0 = time.time()
        pool = render_pool(cfg.pool_size, cfg.seed, ranges, cfg.captions_per_image, cfg.caption_detail, workers)
        ids, labels = CaptionEncoder(self.tokenizer).batch([t for caps in pool.captions for t in caps])
        self.token_ids = ids.view(len(pool.captions), cfg.captions_per_image, -1).to(self.device)
        self.token_labels = labels.view(len(pool.captions), cfg.captions_per_image, -1).to(self.device)
        self.images = torch.from_numpy(pool.images)  # uint8, stays on CPU; batches are moved
        self.masks = torch.from_numpy(pool.masks.astype("float32")).to(self.device)
        self.empty_ids = self.tokenizer("", padding="max_length", max_length=self.tokenizer.model_max_length,
                                        return_tensors="pt").input_ids.to(self.device)
        self.log(f"pool: {cfg.pool_size} images x {cfg.captions_per_image} captions in {time.time() - t0:.0f}s")
        self.generic = None
        if self.stage in ("text", "vae") and cfg.vae.generic_fraction > 0 and cfg.vae.generic_images > 0:
            from dcustom.toyworld.generic import render_generic_pool

            t0 = time.time()
            self.generic = torch.from_numpy(render_generic_pool(cfg.vae.generic_images, cfg.seed, workers))
            self.log(f"generic pool: {cfg.vae.generic_images} images in {time.time() - t0:.0f}s")

    def batch_captions(self, idx, gen, with_labels: bool = False):
        pick = torch.randint(0, self.cfg.captions_per_image, (len(idx),), generator=gen, device=self.device)
        if with_labels:
            return self.token_ids[idx, pick], self.token_labels[idx, pick]
        return self.token_ids[idx, pick]

    def batch_images(self, idx):
        x = self.images[idx.cpu()].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        return x

    def autocast(self):
        if self.autocast_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    # ------------------------------------------------------------ optimizers per stage
    def stage_setup(self, stage: str):
        cfg = self.cfg
        if stage == "text":
            params = list(self.text_encoder.parameters()) + list(self.probe.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=cfg.text.lr, weight_decay=0.01)
            lam = cosine_lambda(min(100, cfg.text.steps // 10), cfg.text.steps, 0.05)
        elif stage == "vae":
            self.optimizer = torch.optim.AdamW(self.vae.parameters(), lr=cfg.vae.lr, weight_decay=0.0)
            lam = cosine_lambda(min(200, cfg.vae.steps // 10), cfg.vae.steps, 0.05)
        else:
            params = list(self.unet.parameters())
            if not cfg.text.freeze_after:
                params += list(self.text_encoder.parameters())
            self.optimizer = torch.optim.AdamW(params, lr=cfg.unet.lr, weight_decay=cfg.unet.weight_decay)
            lam = cosine_lambda(cfg.unet.warmup_steps, cfg.unet.steps, cfg.unet.min_lr_ratio)
            if cfg.unet.ema_decay > 0 and self.ema is None:
                import copy

                self.ema = copy.deepcopy(self.unet).requires_grad_(False)
        self.lr_sched = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lam)

    def stage_steps(self, stage: str) -> int:
        return {"text": self.cfg.text.steps, "vae": self.cfg.vae.steps, "unet": self.cfg.unet.steps}[stage]

    # ------------------------------------------------------------ one step per stage
    def text_step(self, gen):
        cfg = self.cfg
        self.text_encoder.train()
        idx = torch.randint(0, len(self.token_ids), (cfg.text.batch_size,), generator=gen, device=self.device)
        ids, labels = self.batch_captions(idx, gen, with_labels=True)
        with self.autocast():
            return text_losses(self.text_encoder, self.probe, ids, labels, self.head_of, self.class_of)

    def vae_step(self, gen):
        cfg = self.cfg
        self.vae.train()
        idx = torch.randint(0, len(self.images), (cfg.vae.batch_size,), generator=gen, device=self.device)
        x = self.batch_images(idx)
        weight = 1 + cfg.vae.object_weight * F.interpolate(self.masks[idx][:, None], scale_factor=4, mode="nearest")
        n_generic = round(cfg.vae.batch_size * cfg.vae.generic_fraction) if self.generic is not None else 0
        if n_generic:  # the batch's tail comes from the generic pool (uniform weight: it has no object mask)
            pick = torch.randint(0, len(self.generic), (n_generic,), generator=gen, device=self.device)
            x[-n_generic:] = self.generic[pick.cpu()].to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            weight[-n_generic:] = 1
        with self.autocast():
            posterior = self.vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen, device=self.device)
            rec = self.vae.decode(z).sample.float()
        err = (rec - x).abs() + (rec - x).pow(2)
        rec_loss = (weight * err).mean() / weight.mean()
        return rec_loss + cfg.vae.kl_weight * posterior.kl().float().mean()

    def unet_step(self, gen):
        cfg, u = self.cfg, self.cfg.unet
        self.unet.train()
        idx = torch.randint(0, len(self.latents), (u.batch_size,), generator=gen, device=self.device)
        latents = self.latents[idx]
        ids = self.batch_captions(idx, gen)
        drop = torch.rand(len(idx), generator=gen, device=self.device) < u.cond_dropout
        ids = torch.where(drop[:, None], self.empty_ids.expand_as(ids), ids)
        noise = torch.randn(latents.shape, generator=gen, device=self.device)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(idx),), generator=gen, device=self.device)
        if u.noise_offset > 0:  # the scaled-linear schedule never noises an image's mean away: teach other means
            noise = noise + u.noise_offset * torch.randn(*latents.shape[:2], 1, 1, generator=gen, device=self.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        with self.autocast():
            with torch.set_grad_enabled(not cfg.text.freeze_after):
                cond = self.text_encoder(ids).last_hidden_state
            pred = self.unet(noisy, t, cond).sample.float()
        err = (pred - noise).pow(2).mean(dim=1)  # [B, 16, 16]
        weight = 1 + u.object_weight * self.masks[idx]
        per_sample = (weight * err).mean(dim=(1, 2)) / weight.mean(dim=(1, 2))
        if u.min_snr_gamma > 0:
            alphas = self.scheduler.alphas_cumprod.to(self.device)[t]
            snr = alphas / (1 - alphas)
            per_sample = per_sample * snr.clamp(max=u.min_snr_gamma) / snr
        return per_sample.mean()

    # ------------------------------------------------------------ latents
    @torch.no_grad()
    def encode_pool(self):
        self.vae.eval()
        chunks = []
        for i in range(0, len(self.images), 512):
            x = self.batch_images(torch.arange(i, min(i + 512, len(self.images))))
            chunks.append(self.vae.encode(x).latent_dist.mean.float())
        raw = torch.cat(chunks)
        scale = float(1.0 / raw.std())
        self.vae.register_to_config(scaling_factor=scale)
        self.latents = raw * scale
        self.log(f"latents: {tuple(raw.shape)}, scaling_factor {scale:.4f}")

    # ------------------------------------------------------------ time and events
    def elapsed_seconds(self) -> float:
        """Wall time spent on this run so far, all stages and all invocations (resumes) together."""
        return self.seconds_before + time.time() - self.started

    def event(self, payload: dict):
        payload = {"time": round(time.time(), 3), **payload}
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(payload) + "\n")

    # ------------------------------------------------------------ the model as a pipeline (curve, export)
    def pipeline(self, use_ema: bool = True):
        from dcustom.toyworld.model import assemble_pipeline

        unet = self.ema if (use_ema and self.ema is not None) else self.unet
        return assemble_pipeline(dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                      unet=unet, scheduler=self.scheduler))

