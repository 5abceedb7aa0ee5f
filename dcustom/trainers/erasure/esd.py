"""ESD: fine-tune the model so that the concept's prediction becomes its own negative guidance.

For x_t drawn by partially sampling the frozen model on the concept prompt (DDIM, CFG
``start_guidance``, stopped at a uniformly drawn step), the trained prediction ε_θ(x_t, c) is
regressed onto

    target = ε*(x_t, r) − η (ε*(x_t, c) − ε*(x_t, r))

from the frozen model ε*. The target is affine in ε with coefficients summing to one, so the same
formula holds for v-prediction outputs; it is applied to the UNet's raw output.

The reference r is the concept's own prompt with the concept replaced by its anchor ('' drops the word),
and the unconditional embedding ∅ only when nothing is left. The paper trains on the concept alone
("Van Gogh") with r = ∅, where both readings agree. On prompts that name the concept beside other things ("a purple
star on a grass background") the empty reference negates the whole prompt: the concept's share of the
gradient vanishes and ESD erased no purple on builtin:toy (100 % survived), while the template reference
negates the concept's direction only (docs/results.md, Concept erasure).

ESD-x trains cross-attention (``esd_x``), ESD-u everything else (``esd_u``); either as a LoRA on
those layers (the frozen model is the same UNet with the adapter disabled) or on the weights
themselves (against a frozen copy). It runs in the shared loop `dcustom.trainers.loop`.
"""

from __future__ import annotations

import contextlib
import copy
import time
from pathlib import Path

import torch

from dcustom.trainers.erasure.conditioning import Cond, encode, predict, unconditional
from dcustom.trainers.erasure.selection import selected_modules
from dcustom.trainers.loop import TrainingMethod

ADAPTER_NAME = "erasure"


def reference_prompt(template: str, anchor: str) -> str:
    """The template with the concept replaced by its anchor, spaces tidied ('' when nothing is left)."""
    return " ".join(template.format(anchor).split())


def esd_target(eps_base: torch.Tensor, eps_concept: torch.Tensor, eta: float) -> torch.Tensor:
    """ε(x,r) − η(ε(x,c) − ε(x,r)): the frozen model guided *away* from the concept, towards the reference r."""
    return eps_base - eta * (eps_concept - eps_base)


class EsdMethod(TrainingMethod):
    """The ESD recipe as a method of the shared training loop (dcustom.trainers.loop)."""

    def __init__(self, cfg, pipe=None):
        self.cfg, self.pipe = cfg, pipe
        self.frozen_unet = None

    # -- loop interface -------------------------------------------------------------------------
    def setup(self, ctx):
        from diffusers import DDIMScheduler

        from dcustom.models import load_pipeline

        cfg = self.cfg
        if self.pipe is None:
            self.pipe = load_pipeline(cfg.model, dtype=ctx.weight_dtype, device=str(ctx.device))
        pipe = self.pipe
        for name in ("unet", "vae", "text_encoder", "text_encoder_2"):
            component = getattr(pipe, name, None)
            if component is not None:
                component.requires_grad_(False)
        unet = pipe.unet
        self.modules = selected_modules(unet, cfg.algorithm)
        if cfg.esd.train_mode == "lora":
            from dcustom.trainers.peft_adapters import lora_config

            unet.add_adapter(lora_config(cfg.lora, self.modules), adapter_name=ADAPTER_NAME)
            self.params = {n: p for n, p in unet.named_parameters() if "lora_" in n}
        else:
            self.frozen_unet = copy.deepcopy(unet).eval()
            self.params = {f"{m}.{n}": p for m, mod in self.modules.items() for n, p in mod.named_parameters(recurse=False)}
        for p in self.params.values():
            p.requires_grad_(True)
        if ctx.cfg.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        anchors = [cfg.anchor_for(i) for i in range(len(cfg.erase))]
        prompts = [t.format(c) for c in cfg.erase for t in cfg.templates]
        references = [reference_prompt(t, a) for a in anchors for t in cfg.templates]
        self.concept_conds = encode(pipe, prompts)
        self.base_conds = encode(pipe, references)
        self.null = unconditional(pipe, 1)
        self.reference_is_null = [not r for r in references]
        self.started = time.perf_counter()
        return [(ci, ti) for ci in range(len(cfg.erase)) for ti in range(len(cfg.templates))]

    def trainable_parameters(self):
        return self.params

    def training_step(self, batch, step):
        losses = [self._loss(ci, ti) for ci, ti in batch]
        return torch.stack(losses).mean()

    def save(self, folder: Path) -> list[Path]:
        from dcustom.trainers.erasure.artifacts import (FULL_FOLDER, LORA_FILE, dcustom_metadata, save_full_model,
                                                        save_lora_file)

        meta = dcustom_metadata(self.cfg, self.pipe, edited_modules=len(self.modules),
                                train_mode=self.cfg.esd.train_mode)
        folder = Path(folder)
        if self.cfg.esd.train_mode == "lora":
            from peft.utils import get_peft_model_state_dict

            unet = self.pipe.unet
            state = get_peft_model_state_dict(unet, adapter_name=ADAPTER_NAME)
            config = unet.peft_config[ADAPTER_NAME].to_dict()
            config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
            return [save_lora_file(folder / LORA_FILE, {f"unet.{k}": v for k, v in state.items()}, config, meta)]
        return [save_full_model(self.pipe, folder / FULL_FOLDER, meta)]

    def sample(self, step: int, folder: Path) -> list[Path]:
        """One image per erased concept (fixed seed), drawn by the model being trained."""
        from dcustom.outputs import save_png

        paths = []
        for i, concept in enumerate(self.cfg.erase):
            gen = torch.Generator(device="cpu").manual_seed(i)
            image = self.pipe(concept, num_inference_steps=min(25, self.cfg.esd.ddim_steps),
                              generator=gen).images[0]
            paths.append(save_png(image, Path(folder) / f"{i:02d}-{concept.replace(' ', '_')[:40]}.png",
                                  {"prompt": concept, "step": str(step)}))
        return paths

    # -- the objective --------------------------------------------------------------------------
    @contextlib.contextmanager
    def frozen(self):
        """The original model: the adapter switched off, or the frozen copy of the weights."""
        if self.frozen_unet is not None:
            yield self.frozen_unet
            return
        unet = self.pipe.unet
        unet.disable_adapters()
        try:
            yield unet
        finally:
            unet.enable_adapters()

    def _cond(self, conds: Cond, index: int) -> Cond:
        added = None if conds.added is None else {k: v[index:index + 1] for k, v in conds.added.items()}
        return Cond(conds.hidden[index:index + 1], added)

    @torch.no_grad()
    def partial_sample(self, unet, cond: Cond, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t after `stop` DDIM steps of CFG sampling (x_T when stop = 0) and its timestep t."""
        sched, cfg_scale = self.scheduler, self.cfg.esd.start_guidance
        sched.set_timesteps(self.cfg.esd.ddim_steps, device=unet.device)
        config = unet.config
        dtype = next(unet.parameters()).dtype
        x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, device=unet.device, dtype=dtype)
        x = x * sched.init_noise_sigma
        both = self.null.cat(cond)
        for t in sched.timesteps[:stop]:
            model_in = sched.scale_model_input(torch.cat([x, x]), t)
            uncond, text = predict(unet, model_in, t, both).chunk(2)
            x = sched.step(uncond + cfg_scale * (text - uncond), t, x).prev_sample
        return sched.scale_model_input(x, sched.timesteps[stop]), sched.timesteps[stop]

    def _loss(self, concept_index: int, template_index: int) -> torch.Tensor:
        k = concept_index * len(self.cfg.templates) + template_index
        concept = self._cond(self.concept_conds, k)
        base = self.null if self.reference_is_null[k] else self._cond(self.base_conds, k)
        stop = int(torch.randint(0, self.cfg.esd.ddim_steps, (1,)))
        with self.frozen() as ref:
            x_t, t = self.partial_sample(ref, concept, stop)
            with torch.no_grad():
                target = esd_target(predict(ref, x_t, t, base), predict(ref, x_t, t, concept),
                                    self.cfg.esd.negative_guidance)
        prediction = predict(self.pipe.unet, x_t, t, concept)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


def run_esd(cfg, pipe=None, on_event=None, should_stop=None, progress: bool = True):
    from dcustom.trainers.erasure.artifacts import ErasureResult
    from dcustom.trainers.loop import run_training

    start = time.perf_counter()
    method = EsdMethod(cfg, pipe)
    result = run_training(method, cfg.train, run_config=cfg, on_event=on_event, should_stop=should_stop,
                          progress=progress)
    seconds = time.perf_counter() - start
    info = {"status": result.status, "steps": result.step, "last_loss": result.last_loss,
            "edited_modules": len(method.modules), "trainable_parameters": sum(p.numel() for p in method.params.values())}
    return ErasureResult(Path(result.run_dir), [Path(f) for f in result.files], seconds, info, method.pipe)
