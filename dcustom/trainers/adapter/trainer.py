"""One trainer for LoRA (incl. DoRA), OFT and BOFT: a peft config injected with `unet.add_adapter`.

Runs inside `dcustom.trainers.loop`: this class supplies setup / trainable_parameters /
training_step / after_optimizer_step / save / sample. Supports ε- and v-prediction, min-SNR-γ,
noise offset, SD1.x/2.x and SDXL (micro-conditioning), DreamBooth prior preservation, optional
text-encoder LoRA, cached latents (two flip variants) and cached text embeddings.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from dcustom.config import to_dict
from dcustom.data import (
    DataConfig,
    ensure_class_images,
    make_buckets,
    nearest_bucket,
    open_rgb,
    resize_crop,
    scan_images,
    to_tensor,
    unet_stride,
)
from dcustom.errors import DcustomError
from dcustom.trainers.adapter.config import AdapterTrainConfig
from dcustom.trainers.loop import LoopContext, run_training

log = logging.getLogger("dcustom.train")
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


@dataclass
class Example:
    """One image, ready for the UNet: pixel tensors or cached latent moments for each flip variant."""

    pixels: list  # [variant] -> [3, H, W] (dropped once latents are cached)
    moments: list  # [variant] -> (mean, std) of the VAE posterior, or None
    caption: str
    time_ids: object  # SDXL micro-conditioning (orig h, orig w, crop top, crop left, target h, target w)
    bucket: tuple  # (w, h)


def peft_config_for(cfg: AdapterTrainConfig):
    from peft import BOFTConfig, LoraConfig, OFTConfig

    if cfg.method == "lora":
        return LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, use_dora=cfg.dora,
                          init_lora_weights="gaussian", target_modules=list(cfg.target_modules))
    if cfg.method == "oft":
        return OFTConfig(r=0, oft_block_size=cfg.block_size, target_modules=list(cfg.target_modules), coft=cfg.coft,
                         eps=cfg.eps, use_cayley_neumann=cfg.cayley_neumann, module_dropout=cfg.module_dropout)
    if cfg.method == "boft":
        return BOFTConfig(boft_block_size=cfg.block_size, boft_n_butterfly_factor=cfg.butterfly_factor,
                          target_modules=list(cfg.target_modules), boft_dropout=cfg.dropout, bias="none")
    raise DcustomError(f"method {cfg.method!r} is not an adapter method; accepted: lora, oft, boft.")


def text_encoder_alpha(cfg) -> float:
    """The text-encoder LoRA's alpha: text_encoder_alpha when set, else the configured alpha (never silently the rank)."""
    return float(cfg.alpha if cfg.text_encoder_alpha is None else cfg.text_encoder_alpha)


class AdapterMethod:
    def __init__(self, cfg: AdapterTrainConfig, pipe=None):
        self.cfg = cfg
        self.pipe = pipe
        self.skipped, self.used = [], []

    # --- loop interface -------------------------------------------------------------------
    def _load_frozen_pipeline(self, ctx: LoopContext):
        """Shared start of every subject trainer: the pipeline on the device, family, prediction
        type, a DDPM noise scheduler, and every base weight frozen. Returns the pipeline."""
        from diffusers import DDPMScheduler

        from dcustom.families import prediction_type
        from dcustom.models import family_of, load_pipeline

        cfg = self.cfg
        self.ctx = ctx
        if self.pipe is None:
            self.pipe = load_pipeline(cfg.model, dtype="fp32", device=str(ctx.device))
        pipe = self.pipe
        pipe.to(ctx.device)
        self.family = family_of(pipe)
        self.prediction = prediction_type(pipe)
        if self.prediction not in ("epsilon", "v_prediction"):
            raise DcustomError(f"model {cfg.model!r} predicts {self.prediction!r}; accepted: epsilon or v_prediction.")
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        self.text_encoders = [getattr(pipe, n) for n in self.family.text_encoders]
        for module in [pipe.unet, pipe.vae, *self.text_encoders]:
            module.requires_grad_(False)
        return pipe

    def setup(self, ctx: LoopContext):
        import torch

        cfg = self.cfg
        self.train_te = cfg.method == "lora" and cfg.text_encoder_lora
        if self.train_te:  # before any work: a peft too old for transformers fails only when the adapter is added
            from dcustom.environment import check_peft_supports_transformers

            check_peft_supports_transformers()
        pipe = self._load_frozen_pipeline(ctx)
        self._check_targets(pipe.unet)
        if cfg.method == "boft":
            from dcustom.adapters.boft_kernel import ensure_boft_kernel

            self.boft_kernel = ensure_boft_kernel()  # before the layers exist: peft reads it while building them
        pipe.unet.add_adapter(peft_config_for(cfg))
        if cfg.method == "boft":
            self._record_effective_butterfly(pipe.unet)
        if self.train_te:
            from peft import LoraConfig

            for te in self.text_encoders:
                te.add_adapter(LoraConfig(r=cfg.text_encoder_rank, lora_alpha=text_encoder_alpha(cfg),
                                          init_lora_weights="gaussian", target_modules=TE_TARGETS))
        # Frozen weights in the compute dtype; the loop keeps trainable (adapter) weights in fp32.
        for module in [pipe.unet, *self.text_encoders]:
            if module.dtype != ctx.weight_dtype:
                module.to(dtype=ctx.weight_dtype)
        if ctx.cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if self.train_te:
                for te in self.text_encoders:
                    te.gradient_checkpointing_enable()
        pipe.unet.train()
        self.examples = self._prepare_examples()
        self.class_examples = self._prepare_class_examples() if cfg.data.prior.enabled else []
        self.text_cache = {}
        if cfg.data.cache_text and not self.train_te:
            with torch.no_grad():
                for caption in {e.caption for e in self.examples + self.class_examples}:
                    self.text_cache[caption] = tuple(None if t is None else t.detach() for t in self._encode_text([caption]))
        return list(range(len(self.examples)))

    def trainable_parameters(self):
        named = {f"unet.{n}": p for n, p in self.pipe.unet.named_parameters() if p.requires_grad}
        if self.train_te:
            for attr, te in zip(self.family.text_encoders, self.text_encoders):
                named.update({f"{attr}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        return named

    def training_step(self, batch, step):
        instance = [self.examples[i] for i in batch]
        loss = self._loss(instance)
        if self.class_examples:
            import torch

            picks = torch.randint(len(self.class_examples), (len(instance),)).tolist()
            loss = loss + self.cfg.data.prior.loss_weight * self._loss([self.class_examples[i] for i in picks])
        return loss

    def after_optimizer_step(self, step):
        pass

    def save(self, folder: Path) -> list[Path]:
        from dcustom.adapters import files

        folder = Path(folder)
        final = folder == Path(self.ctx.cfg.output_dir)
        meta = files.dcustom_metadata(self.cfg.method, self.cfg.model, self.family.name, to_dict(self.cfg),
                                      self.cfg.method, peft_version=_peft_version())
        te_names = list(self.family.text_encoders) if self.train_te else []
        out = []
        if self.cfg.method == "lora":
            out.append(files.save_diffusers_lora(folder, self.pipe, te_names, {**meta, "dcustom.format": "diffusers"}))
            if self.cfg.write_kohya and final and not self.cfg.dora:
                out.append(files.save_kohya_lora(folder, self.pipe, self.family.name, te_names, meta))
        else:
            out.append(files.save_peft_folder(folder / "unet", self.pipe.unet, {**meta, "dcustom.format": "peft"}))
            if final and self.cfg.extract_rank > 0:
                path, rel = files.save_extracted_lora(folder, self.pipe.unet, self.cfg.extract_rank,
                                                      {**meta, "dcustom.method": f"{self.cfg.method}-extracted-lora"})
                self.extraction_error = rel
                written = files.read_metadata(path)
                self.extraction_worst = (written["dcustom.extraction_worst_module"],
                                         float(written["dcustom.extraction_worst_rel_error"]))
                out.append(path)
            if final and self.cfg.write_merged:
                out.append(files.save_merged_unet(folder, self.pipe.unet, meta))
            if final and self.cfg.write_full_diff:
                out.append(files.save_full_diff(folder, self.pipe, self.family.name, meta))
        return out

    def sample(self, step: int, folder: Path) -> list[Path]:
        import torch

        paths = []
        res = self.resolution
        was_training = self.pipe.unet.training
        self.pipe.unet.eval()
        try:
            for i, prompt in enumerate(self.cfg.validation_prompts):
                g = torch.Generator(device="cpu").manual_seed(self.cfg.sample_seed + i)
                with self.ctx.accelerator.autocast():
                    image = self.pipe(prompt, num_inference_steps=self.cfg.sample_steps, width=res, height=res,
                                      generator=g).images[0]
                path = Path(folder) / f"{i:02d}.png"
                image.save(path)
                paths.append(path)
        finally:
            self.pipe.unet.train(was_training)
        return paths

    # --- data ---------------------------------------------------------------------------
    def _check_targets(self, unet):
        names = {n.rsplit(".", 1)[-1] if "." in n else n for n, _ in unet.named_modules()}
        full = {n for n, _ in unet.named_modules()}
        for t in self.cfg.target_modules:
            if t not in names and not any(n.endswith("." + t) for n in full):
                raise DcustomError(f"target_modules: {t!r} matches no UNet layer; accepted e.g. to_q, to_k, to_v, to_out.0, proj_in, ff.net.2.")
        if self.cfg.method in ("oft", "boft"):
            import torch

            size = self.cfg.block_size
            for n, m in unet.named_modules():
                if isinstance(m, torch.nn.Linear) and any(n == t or n.endswith("." + t) for t in self.cfg.target_modules):
                    if m.in_features % size:
                        raise DcustomError(f"block_size: {size} does not divide the input width {m.in_features} of "
                                           f"UNet layer {n!r}; accepted: a divisor of every targeted layer's width.")

    def _record_effective_butterfly(self, unet):
        """peft silently trains BOFT with 1 butterfly factor when it finds no block-diagonal kernel. With
        ensure_boft_kernel() that should not happen; the check stays in case a peft version stops reading
        the kernel cache. Records the factor actually used, so the saved adapter_config matches the weights."""
        from peft.tuners.boft.layer import BOFTLayer

        layer = next(m for m in unet.modules() if isinstance(m, BOFTLayer))
        effective = int(layer.boft_R["default"].shape[0])
        if effective != self.cfg.butterfly_factor:
            log.warning("BOFT: peft found no block-diagonal kernel, so it trains with %d butterfly "
                        "factor(s) instead of %d; the saved adapter records %d.", effective, self.cfg.butterfly_factor, effective)
            unet.peft_config["default"].boft_n_butterfly_factor = effective
        self.effective_butterfly_factor = effective

    @property
    def resolution(self) -> int:
        if self.cfg.data.resolution:
            return self.cfg.data.resolution
        return self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor

    def _prepare_examples(self):
        data: DataConfig = self.cfg.data
        res = self.resolution
        stride = unet_stride(self.pipe)
        if res % stride:
            raise DcustomError(f"data.resolution: {res} is not a multiple of {stride} (this model's UNet stride).")
        min_size = data.min_size if data.min_size is not None else res // 2
        report = scan_images(data.images, data.instance_prompt, min_size, data.caption_prefix)
        self.skipped, self.used = report.skipped, report.images
        for path, why in report.skipped:
            log.warning("skipped %s: %s", path.name, why)
        log.info("training on %d image(s) from %r (%d skipped)", len(report.images), str(data.images), len(report.skipped))
        self._warn_long_captions(report.images)
        buckets = make_buckets(res, stride) if data.buckets else [(res, res)]
        out = []
        for rec in report.images:
            image, _ = open_rgb(rec.path)
            out.append(self._example(image, rec.caption, nearest_bucket(image.size, buckets)))
        return out

    def _warn_long_captions(self, records) -> None:
        """Once per run: captions the text encoder will cut (it does so silently)."""
        from dcustom.generate import prompt_overflow

        long = [(r, over) for r in records for over in [prompt_overflow(self.pipe, r.caption)] if over]
        if long:
            (first, (count, limit)) = long[0]
            log.warning("%d caption(s) are longer than the text encoder's %d tokens (e.g. %s: %d tokens); the rest "
                        "of each is ignored.", len(long), limit, first.path.name, count)

    def _prepare_class_examples(self):
        prior = self.cfg.data.prior
        res = self.resolution
        paths = ensure_class_images(self.pipe, prior, self.cfg.model, res, seed=self.ctx.cfg.seed)
        return [self._example(open_rgb(p)[0], prior.class_prompt, (res, res)) for p in paths]

    def _example(self, image, caption, bucket):
        import torch
        from PIL import ImageOps

        cropped, (top, left) = resize_crop(image, bucket)
        variants = [cropped, ImageOps.mirror(cropped)] if self.cfg.data.flip else [cropped]
        pixels = [to_tensor(v) for v in variants]
        time_ids = torch.tensor([image.height, image.width, top, left, bucket[1], bucket[0]], dtype=torch.float32)
        ex = Example(pixels, [None] * len(pixels), caption, time_ids, bucket)
        if self.cfg.data.cache_latents:
            ex.moments = [self._moments(p[None]) for p in pixels]
            ex.pixels = []
        return ex

    def _moments(self, pixels):
        import torch

        vae = self.pipe.vae
        with torch.no_grad():
            dist = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist
        return dist.mean[0].float(), dist.std[0].float()

    def _encode_text(self, captions: list):
        """(prompt_embeds, pooled or None) for a list of captions, with gradients when the TE trains."""
        device = self.ctx.device
        if self.family.name == "sdxl":
            embeds, _, pooled, _ = self.pipe.encode_prompt(captions, device=device, num_images_per_prompt=1,
                                                           do_classifier_free_guidance=False)
            return embeds, pooled
        embeds, _ = self.pipe.encode_prompt(captions, device, 1, False)
        return embeds, None

    # --- loss ---------------------------------------------------------------------------
    def _latents(self, examples):
        import torch

        latents = []
        for ex in examples:
            v = int(torch.randint(len(ex.moments) if ex.moments[0] is not None else len(ex.pixels), ()).item())
            if ex.moments[0] is not None:
                mean, std = ex.moments[v]
            else:
                mean, std = self._moments(ex.pixels[v][None])
            latents.append(mean + std * torch.randn_like(mean))
        vae_cfg = self.pipe.vae.config
        shift = getattr(vae_cfg, "shift_factor", None) or 0.0
        return (torch.stack(latents) - shift) * vae_cfg.scaling_factor

    def _text(self, examples):
        import torch

        captions = [ex.caption for ex in examples]
        if self.text_cache:
            parts = [self.text_cache[c] for c in captions]
            embeds = torch.cat([p[0] for p in parts])
            pooled = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
            return embeds, pooled
        return self._encode_text(captions)

    def _loss(self, examples):
        """Mean denoising loss over examples, run per aspect bucket (a UNet batch needs one shape)."""
        groups = {}
        for ex in examples:
            groups.setdefault(ex.bucket, []).append(ex)
        total = 0.0
        for group in groups.values():
            total = total + self._group_loss(group) * (len(group) / len(examples))
        return total

    def _group_loss(self, group):
        import torch
        import torch.nn.functional as F
        from diffusers.training_utils import compute_snr

        device, unet = self.ctx.device, self.pipe.unet
        latents = self._latents(group).to(device)
        noise = torch.randn_like(latents)
        if self.cfg.noise_offset:
            noise = noise + self.cfg.noise_offset * torch.randn(latents.shape[0], latents.shape[1], 1, 1, device=device)
        sched = self.noise_scheduler
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy = sched.add_noise(latents, noise, t)
        target = noise if self.prediction == "epsilon" else sched.get_velocity(latents, noise, t)
        embeds, pooled = self._text(group)
        kwargs = {}
        if self.family.micro_conditioning:
            time_ids = torch.stack([ex.time_ids for ex in group]).to(device)
            kwargs["added_cond_kwargs"] = {"text_embeds": pooled.to(device), "time_ids": time_ids}
        dtype = self.ctx.weight_dtype
        pred = unet(noisy.to(dtype), t, embeds.to(device, dtype), **kwargs).sample.float()
        per_sample = F.mse_loss(pred, target.float(), reduction="none").mean(dim=(1, 2, 3))
        if self.cfg.min_snr_gamma:
            snr = compute_snr(sched, t)
            clipped = torch.clamp(snr, max=self.cfg.min_snr_gamma)
            weight = clipped / snr if self.prediction == "epsilon" else clipped / (snr + 1)
            per_sample = per_sample * weight
        return per_sample.mean()


def _peft_version() -> str:
    import peft

    return peft.__version__


def train(cfg: AdapterTrainConfig, pipe=None, on_event=None, should_stop=None, progress: bool = True):
    """Python API: train a LoRA/OFT/BOFT adapter; returns the loop's TrainResult (run folder, files)."""
    method = AdapterMethod(cfg, pipe=pipe)
    result = run_training(method, cfg.train, run_config=cfg, on_event=on_event, should_stop=should_stop, progress=progress)
    result.method = method
    return result


def run(cfg: AdapterTrainConfig):
    """Registry entry point (`dcustom train lora|oft|boft`)."""
    result = train(cfg)
    print(f"used {len(result.method.used)} image(s) from {cfg.data.images}")
    for path, why in result.method.skipped:
        print(f"skipped {path}: {why}")
    extraction = getattr(result.method, "extraction_error", None)
    if extraction is not None:
        print(f"extracted LoRA relative error (Frobenius, all modules): {extraction:.4f}")
        module, error = result.method.extraction_worst
        print(f"extracted LoRA worst module: {module} ({error:.4f} of its change); for an exact export to "
              "ComfyUI/Forge, A1111 and InvokeAI set write_full_diff: true (or run dcustom adapters convert --to full)")
    return result
