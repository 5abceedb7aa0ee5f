"""One trainer for LoRA (incl. DoRA), OFT and BOFT: a peft config injected with `unet.add_adapter`.

Runs inside `dcustom.trainers.loop` as a `TrainingMethod`. The data, text encoding and loss are the
shared `DenoisingObjective` (ε- and v-prediction, min-SNR-γ, noise offset, SD1.x/2.x and SDXL
micro-conditioning, DreamBooth prior preservation, aspect buckets, cached latents with two flip
variants, cached text embeddings); the peft side is `dcustom.trainers.peft_adapters` (configs from
settings, checks, files). What is left here is the order of the steps and the optional text-encoder LoRA.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dcustom.adapters.files import dcustom_metadata
from dcustom.config import to_dict
from dcustom.trainers.adapter.config import AdapterTrainConfig
from dcustom.trainers.denoising import DenoisingObjective, SubjectMethod
from dcustom.trainers.fidelity import FidelityTracking
from dcustom.trainers.loop import LoopContext, run_training
from dcustom.trainers.peft_adapters import (
    TEXT_ENCODER_TARGETS,
    LoraAdapterConfig,
    boft_config,
    check_targets,
    effective_butterfly_factor,
    lora_config,
    oft_config,
    peft_version,
    save_adapter_files,
)

log = logging.getLogger("dcustom.train")


def peft_config_for(cfg: AdapterTrainConfig):
    """The UNet's peft config for a lora, oft or boft run."""
    if cfg.method == "lora":
        return lora_config(cfg, cfg.target_modules)  # LoraTrainConfig is a LoraAdapterConfig
    if cfg.method == "oft":
        return oft_config(cfg.block_size, cfg.target_modules, coft=cfg.coft, eps=cfg.eps,
                          cayley_neumann=cfg.cayley_neumann, module_dropout=cfg.module_dropout)
    return boft_config(cfg.block_size, cfg.butterfly_factor, cfg.target_modules, cfg.dropout)


def text_encoder_alpha(cfg) -> float:
    """The text-encoder LoRA's alpha: text_encoder_alpha when set, else the UNet LoRA's (never silently the rank)."""
    return float(cfg.scale_alpha if cfg.text_encoder_alpha is None else cfg.text_encoder_alpha)


class AdapterMethod(FidelityTracking, SubjectMethod):
    def __init__(self, cfg: AdapterTrainConfig, pipe=None):
        self.cfg = cfg
        self.objective = DenoisingObjective(cfg.model, cfg.data, cfg.min_snr_gamma, cfg.noise_offset, pipe,
                                            keep_prompts=cfg.keep_prompts, keep_weight=cfg.keep_weight)
        self.extraction_error = self.extraction_worst = None

    # --- loop interface -------------------------------------------------------------------
    def setup(self, ctx: LoopContext):
        cfg = self.cfg
        self.ctx = ctx
        self.train_te = cfg.method == "lora" and cfg.text_encoder_lora
        if self.train_te:  # before any work: a peft too old for transformers fails only when the adapter is added
            from dcustom.environment import check_peft_supports_transformers

            check_peft_supports_transformers()
        pipe = self.objective.load(ctx)
        check_targets(pipe.unet, cfg.target_modules, cfg.block_size if cfg.method in ("oft", "boft") else None,
                      linear_only=cfg.method == "oft")
        if cfg.method == "boft":
            from dcustom.adapters.boft_kernel import ensure_boft_kernel

            self.boft_kernel = ensure_boft_kernel()  # before the layers exist: peft reads it while building them
        pipe.unet.add_adapter(peft_config_for(cfg))
        if cfg.method == "boft":
            self.effective_butterfly_factor = effective_butterfly_factor(pipe.unet, cfg.butterfly_factor)
        text_encoders = self.objective.text_encoders
        if self.train_te:
            te_lora = LoraAdapterConfig(rank=cfg.text_encoder_rank, alpha=text_encoder_alpha(cfg))
            for te in text_encoders:
                te.add_adapter(lora_config(te_lora, TEXT_ENCODER_TARGETS))
        # Frozen weights in the compute dtype; the loop keeps trainable (adapter) weights in fp32.
        for module in [pipe.unet, *text_encoders]:
            if module.dtype != ctx.weight_dtype:
                module.to(dtype=ctx.weight_dtype)
        if ctx.cfg.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            if self.train_te:
                for te in text_encoders:
                    te.gradient_checkpointing_enable()
        pipe.unet.train()
        self.objective.prepare_examples()
        if cfg.data.prior.enabled:
            self.objective.prepare_class_examples()
        if cfg.data.cache_text and not self.train_te:
            self.objective.cache_text()
        if ctx.is_main:
            self._make_judge()
        return list(range(len(self.objective.examples)))

    def trainable_parameters(self):
        named = {f"unet.{n}": p for n, p in self.pipe.unet.named_parameters() if p.requires_grad}
        if self.train_te:
            for attr, te in zip(self.family.text_encoders, self.objective.text_encoders):
                named.update({f"{attr}.{n}": p for n, p in te.named_parameters() if p.requires_grad})
        return named

    def training_step(self, batch, step):
        return self.objective.loss_with_prior([self.objective.examples[i] for i in batch])

    def save(self, folder: Path, best: bool = False) -> list[Path]:
        """The adapter files into `folder`: everything in the run folder, the adapter alone in checkpoints, and
        for best/ the adapter plus the kohya file (the one other tools load; extraction waits for the end)."""
        cfg = self.cfg
        meta = dcustom_metadata(cfg.method, cfg.model, self.family.name, to_dict(cfg), cfg.method,
                                peft_version=peft_version())
        if cfg.method == "lora":
            te_names = list(self.family.text_encoders) if self.train_te else []
            extra = dict(text_encoders=te_names, dora=cfg.dora, write_kohya=cfg.write_kohya)
        else:
            extra = dict(extract_rank=cfg.extract_rank, write_merged=cfg.write_merged, write_full_diff=cfg.write_full_diff)
        final = Path(folder) == Path(self.ctx.cfg.output_dir)  # checkpoints get the adapter only
        if best and cfg.method == "lora":
            final = True  # a LoRA's final extras are its kohya file: cheap, and what A1111/ComfyUI users load
        written = save_adapter_files(folder, self.pipe, self.family.name, cfg.method, meta, final=final, **extra)
        if written.extraction is not None:
            self.extraction_error, *worst = written.extraction
            self.extraction_worst = tuple(worst)
        return written.paths

    def sample(self, step: int, folder: Path) -> list[Path]:
        return self.objective.render_samples(folder, self.cfg.validation_prompts, self.cfg.sample_steps,
                                             self.cfg.sample_seed)


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
    extraction = result.method.extraction_error
    if extraction is not None:
        print(f"extracted LoRA relative error (Frobenius, all modules): {extraction:.4f}")
        module, error = result.method.extraction_worst
        print(f"extracted LoRA worst module: {module} ({error:.4f} of its change); for an exact export to "
              "ComfyUI/Forge, A1111 and InvokeAI set write_full_diff: true (or run dcustom adapters convert --to full)")
    return result
