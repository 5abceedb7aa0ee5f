"""flow_lora: a peft LoRA (or DoRA) on the MM-DiT transformer of SD3/3.5 or FLUX.1, trained by flow matching.

Runs inside `dcustom.trainers.loop` as a `TrainingMethod`, like the UNet adapter trainer: the same data path
(`FlowObjective` reuses the subject trainers' examples, buckets, cached latents and cached text, T5 included),
the same peft settings (`peft_adapters.lora_config`), the same run folder, events, checkpoints and exact resume.
What the family decides (families.py): which component is trained (`transformer`), the default target modules
(the joint-attention projections of image and text streams), how σ is shifted, FLUX's guidance input.

Files: the diffusers file `FluxPipeline.load_lora_weights` / `StableDiffusion3Pipeline.load_lora_weights` read,
and the kohya/ComfyUI file in the original checkpoint's module names with q/k/v fused (adapters/dit.py).
"""

from __future__ import annotations

from pathlib import Path

from dcustom.adapters.files import dcustom_metadata
from dcustom.config import to_dict
from dcustom.trainers.denoising import SubjectMethod
from dcustom.trainers.flow.config import FlowLoraTrainConfig
from dcustom.trainers.flow.objective import FlowObjective
from dcustom.trainers.loop import LoopContext, run_training
from dcustom.trainers.peft_adapters import check_targets, lora_config, peft_version, save_adapter_files


class FlowLoraMethod(SubjectMethod):
    def __init__(self, cfg: FlowLoraTrainConfig, pipe=None):
        self.cfg = cfg
        self.objective = FlowObjective(cfg.model, cfg.data, cfg.flow, pipe, cfg.model_config)

    def setup(self, ctx: LoopContext):
        cfg = self.cfg
        self.ctx = ctx
        pipe = self.objective.load(ctx)
        transformer = pipe.transformer
        self.targets = list(cfg.target_modules or self.family.lora_targets)
        check_targets(transformer, self.targets, what=f"{self.family.label} transformer",
                      examples="to_q, to_k, to_v, to_out.0, add_q_proj, to_add_out, ff.net.2, proj_mlp")
        transformer.add_adapter(lora_config(cfg, self.targets))
        # Frozen weights in the compute dtype; the loop keeps the LoRA weights in fp32.
        if transformer.dtype != ctx.weight_dtype:
            transformer.to(dtype=ctx.weight_dtype)
        if ctx.cfg.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()
        transformer.train()
        self.objective.prepare_examples()
        if cfg.data.cache_text:  # CLIP and T5 run once here, never in a step
            self.objective.cache_text()
        return list(range(len(self.objective.examples)))

    def trainable_parameters(self):
        return {f"transformer.{n}": p for n, p in self.pipe.transformer.named_parameters() if p.requires_grad}

    def training_step(self, batch, step):
        return self.objective.loss([self.objective.examples[i] for i in batch])

    def save(self, folder: Path) -> list[Path]:
        """The diffusers file in every folder; the kohya/ComfyUI file too in the final run folder (not for DoRA,
        whose magnitudes have no place in a fused q/k/v module)."""
        cfg = self.cfg
        meta = dcustom_metadata(cfg.method, cfg.model, self.family.name, to_dict(cfg), cfg.method,
                                peft_version=peft_version())
        final = Path(folder) == Path(self.ctx.cfg.output_dir)
        paths = save_adapter_files(folder, self.pipe, self.family.name, "lora", meta, final=final, dora=cfg.dora).paths
        if final and cfg.write_kohya and not cfg.dora:
            from dcustom.adapters.dit import save_dit_kohya_lora

            paths.append(save_dit_kohya_lora(folder, self.pipe, self.family.name, meta))
        return paths

    def sample(self, step: int, folder: Path) -> list[Path]:
        return self.objective.render_samples(folder, self.cfg.validation_prompts, self.cfg.sample_steps,
                                             self.cfg.sample_seed, self.cfg.sample_guidance)


def train(cfg: FlowLoraTrainConfig, pipe=None, on_event=None, should_stop=None, progress: bool = True):
    """Python API: train a LoRA on an SD3/FLUX transformer; returns the loop's TrainResult (run folder, files)."""
    method = FlowLoraMethod(cfg, pipe=pipe)
    result = run_training(method, cfg.train, run_config=cfg, on_event=on_event, should_stop=should_stop, progress=progress)
    result.method = method
    return result


def run(cfg: FlowLoraTrainConfig):
    """Registry entry point (`dcustom train flow_lora`)."""
    result = train(cfg)
    print(f"used {len(result.method.used)} image(s) from {cfg.data.images}")
    for path, why in result.method.skipped:
        print(f"skipped {path}: {why}")
    return result
