"""`dcustom toyworld train-base`: the reproducible recipe that trains the toy model from a seed.

Three stages, each resumable at any step:
1. text: the CLIPTextModel learns the grammar — each attribute word's token state is classified as its
   attribute value (synonyms become one concept) and the end-of-text/padding states as the whole
   caption's attributes. Then it is frozen: the UNet gets a fixed, clean conditioning from step 0.
2. vae: AutoencoderKL 64x64 <-> 16x16x4 with an object-weighted reconstruction loss; the pool is then
   encoded once and the latent scaling factor set from the latents' std (as SD does).
3. unet: epsilon-prediction on cached latents with an object-weighted, min-SNR-weighted loss,
   condition dropout for classifier-free guidance, warmup + cosine LR, EMA weights.

Every random draw of step s comes from a generator seeded by (seed, stage, s), so resume is exact:
checkpoints hold the weights, the optimizer and LR-scheduler states and the step.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dcustom.config import save_yaml, to_dict
from dcustom.errors import DcustomError
from dcustom.toyworld.config import ToyBaseConfig
from dcustom.toyworld.grammar import BACKGROUNDS, COLOURS, POSITION_WORDS, SHAPES, SIZE_WORDS, SYNONYMS, SceneRanges

STAGES = ("text", "vae", "unet")
SENTENCE_HEADS = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS,
                  "size": tuple(SIZE_WORDS), "position": tuple(POSITION_WORDS)}


def step_generator(seed: int, stage: str, step: int, device) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 1_000_003 + STAGES.index(stage) * 100_000_019 + step) % (2**63 - 1))
    return gen


# ---------------------------------------------------------------- text stage
def concepts():
    """word -> concept index (1-based; 0 = not an attribute), and per concept its (head index, class index)."""
    keys = [(h, cls) for h, classes in SENTENCE_HEADS.items() for cls in classes]
    word_to_concept = {}
    for k, (h, cls) in enumerate(keys):
        words = SIZE_WORDS[cls] if h == "size" else (POSITION_WORDS[cls].split()[-1],) if h == "position" else SYNONYMS[cls]
        for w in words:
            word_to_concept[w] = k + 1
    head_of = torch.tensor([-1] + [list(SENTENCE_HEADS).index(h) for h, _ in keys])
    class_of = torch.tensor([-1] + [SENTENCE_HEADS[h].index(c) for h, c in keys])
    return word_to_concept, head_of, class_of


class CaptionEncoder:
    """Token ids and per-token concept labels for captions, aligned word by word.

    A grammar word may take several BPE tokens; its concept label goes on its last token (whose
    state has seen the whole word under the causal mask); its other tokens are not scored (-100).
    Ids equal the tokenizer's own (CLIP tokenizes each word and punctuation mark on its own).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.length = tokenizer.model_max_length
        self.word_to_concept = concepts()[0]
        self._piece: dict[str, list[int]] = {}
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def __call__(self, text: str) -> tuple[list[int], list[int]]:
        if text in self._cache:
            return self._cache[text]
        ids, labels = [self.tok.bos_token_id], [-100]
        for piece in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
            if piece not in self._piece:
                self._piece[piece] = self.tok(piece, add_special_tokens=False).input_ids
            sub = self._piece[piece]
            concept = self.word_to_concept.get(piece, 0)
            ids += sub
            labels += [-100] * (len(sub) - 1) + [concept]
        ids, labels = ids[: self.length - 1], labels[: self.length - 1]
        pad = self.length - len(ids)
        ids += [self.tok.eos_token_id] * pad  # pad token = end-of-text, as in the pipeline
        labels += [-100] * pad
        self._cache[text] = (ids, labels)
        return ids, labels

    def batch(self, texts):
        pairs = [self(t) for t in texts]
        return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int16)


class TextProbe(nn.Module):
    """Linear read-outs used only while aligning the text encoder (not part of the model)."""

    def __init__(self, hidden: int, n_concepts: int):
        super().__init__()
        self.token = nn.Linear(hidden, n_concepts + 1)
        self.sentence = nn.ModuleDict({h: nn.Linear(hidden, len(c) + 1) for h, c in SENTENCE_HEADS.items()})


def text_losses(text_encoder, probe, ids, labels, head_of, class_of):
    states = text_encoder(ids).last_hidden_state  # [B, L, H]
    labels = labels.long()
    loss = F.cross_entropy(probe.token(states).flatten(0, 1), labels.flatten(), ignore_index=-100)
    eos_pos = (ids == ids[:, -1:]).int().argmax(dim=1)  # first end-of-text (= the padding token)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    tail = (pos >= eos_pos[:, None]).float()[..., None]  # end-of-text and padding states carry the whole caption
    summary = (states * tail).sum(1) / tail.sum(1)
    concepts_ = labels.clamp(min=0)
    for k, head in enumerate(SENTENCE_HEADS):
        in_head = head_of[concepts_] == k
        target = torch.where(in_head, class_of[concepts_] + 1, torch.zeros_like(concepts_)).amax(dim=1)
        loss = loss + F.cross_entropy(probe.sentence[head](summary), target)
    return loss


# ---------------------------------------------------------------- helpers
def cosine_lambda(warmup: int, total: int, floor: float):
    def f(step):
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return f


def save_state(module: nn.Module, path: Path):
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, str(path))


def load_state(module: nn.Module, path: Path):
    from safetensors.torch import load_file

    module.load_state_dict(load_file(str(path)))


class Run:
    """State of one train-base run (modules, optimizer, stage, step) plus its folder."""

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

    # ------------------------------------------------------------ checkpoints
    def checkpoint(self):
        ck_root = self.dir / "checkpoints"
        final = ck_root / f"step-{self.global_step}"
        tmp = ck_root / f".step-{self.global_step}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        save_state(self.text_encoder, tmp / "text_encoder.safetensors")
        save_state(self.vae, tmp / "vae.safetensors")
        save_state(self.unet, tmp / "unet.safetensors")
        save_state(self.probe, tmp / "text_probe.safetensors")
        if self.ema is not None:
            save_state(self.ema, tmp / "ema_unet.safetensors")
        if self.optimizer is not None:
            torch.save({"optimizer": self.optimizer.state_dict(), "lr_scheduler": self.lr_sched.state_dict()},
                       tmp / "optimizer.pt")
        state = {"model": to_dict(self.cfg.model), "stage": self.stage, "step": self.step,
                 "global_step": self.global_step, "curve": self.curve,
                 "scaling_factor": self.vae.config.scaling_factor, "train_seconds": round(self.elapsed_seconds(), 1)}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
        kept = sorted((p for p in ck_root.glob("step-*")), key=lambda p: int(p.name.split("-")[1]))
        for old in kept[:-max(1, self.cfg.keep_checkpoints)]:
            shutil.rmtree(old)
        self.event({"event": "save", "path": str(final)})

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.dir.glob("checkpoints/step-*"), key=lambda p: int(p.name.split("-")[1]))
        return found[-1] if found else None

    def restore(self, path: Path):
        state = json.loads((path / "state.json").read_text())
        self._check_same_architecture(path, state)
        load_state(self.text_encoder, path / "text_encoder.safetensors")
        load_state(self.vae, path / "vae.safetensors")
        load_state(self.unet, path / "unet.safetensors")
        load_state(self.probe, path / "text_probe.safetensors")
        self.vae.register_to_config(scaling_factor=state["scaling_factor"])
        self.stage, self.step, self.global_step = state["stage"], state["step"], state["global_step"]
        self.curve = state["curve"]
        self.seconds_before, self.started = state.get("train_seconds", 0.0), time.time()
        self.stage_setup(self.stage)
        if (path / "ema_unet.safetensors").is_file():
            load_state(self.ema, path / "ema_unet.safetensors")
        if (path / "optimizer.pt").is_file():
            opt = torch.load(path / "optimizer.pt", map_location=self.device, weights_only=True)
            self.optimizer.load_state_dict(opt["optimizer"])
            self.lr_sched.load_state_dict(opt["lr_scheduler"])
        self.log(f"resumed from {path} (stage {self.stage}, step {self.step})")

    def _check_same_architecture(self, path: Path, state: dict):
        """A checkpoint of another architecture cannot continue this run: say so before loading anything."""
        from safetensors import safe_open

        mine = to_dict(self.cfg.model)
        theirs = state.get("model")
        if theirs is not None:
            diff = [k for k in mine if theirs.get(k) != mine[k]]
            if diff:
                k = diff[0]
                raise DcustomError(f"cannot resume from {path}: it was trained with model.{k}={theirs.get(k)!r} but the "
                                   f"config says model.{k}={mine[k]!r}; use that value, or a new output_dir to start afresh.")
            return
        # Older checkpoints carry no architecture: compare tensor shapes instead.
        for name, module in (("vae", self.vae), ("unet", self.unet), ("text_encoder", self.text_encoder)):
            with safe_open(str(path / f"{name}.safetensors"), framework="pt") as f:
                shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            for key, tensor in module.state_dict().items():
                if shapes.get(key) != tuple(tensor.shape):
                    raise DcustomError(f"cannot resume from {path}: its {name} has another architecture ({key} is "
                                       f"{shapes.get(key)}, the config builds {tuple(tensor.shape)}); use the "
                                       f"config it was trained with, or a new output_dir to start afresh.")

    def elapsed_seconds(self) -> float:
        """Wall time spent on this run so far, all stages and all invocations (resumes) together."""
        return self.seconds_before + time.time() - self.started

    def event(self, payload: dict):
        payload = {"time": round(time.time(), 3), **payload}
        with open(self.dir / "events.jsonl", "a") as f:
            f.write(json.dumps(payload) + "\n")

    # ------------------------------------------------------------ learning curve
    def pipeline(self, use_ema: bool = True):
        from dcustom.toyworld.model import assemble_pipeline

        unet = self.ema if (use_ema and self.ema is not None) else self.unet
        return assemble_pipeline(dict(vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
                                      unet=unet, scheduler=self.scheduler))

    def measure(self, loss: float | None):
        from dcustom.toyworld.evaluate import generate_images, heldout_prompts, judge_generated
        from dcustom.toyworld.judges import load_judge

        c = self.cfg.curve
        pipe = self.pipeline()
        for m in (self.vae, self.text_encoder, self.unet, self.ema):
            if m is not None:
                m.eval()
        prompts = heldout_prompts(n_base=c.prompts)[: c.prompts]
        t0 = time.time()
        with self.autocast():
            images = generate_images(pipe, prompts, [0], c.sampling_steps, c.guidance, batch_size=64)
        report = judge_generated(images, prompts, [0], load_judge(c.judge))
        point = {"step": self.step, "loss": loss, **{k: round(v, 4) for k, v in report["accuracy"].items()},
                 "toy_fid": round(report["toy_fid"], 3), "seconds": round(time.time() - t0, 1),
                 "minutes": round(self.elapsed_seconds() / 60, 2)}
        self.curve.append(point)
        self.event({"event": "curve", **point})
        self.log("curve " + json.dumps(point))
        from dcustom.toyworld.render import grid

        (self.dir / "samples").mkdir(exist_ok=True)
        grid(images, columns=8).save(self.dir / "samples" / f"unet-{self.step:06d}.png")
        self.write_curve()

    def write_curve(self):
        tmp = self.dir / ".learning_curve.json.tmp"
        tmp.write_text(json.dumps(self.curve, indent=1))
        tmp.replace(self.dir / "learning_curve.json")
        plot_curve(self.curve, self.dir / "learning_curve.png")


def plot_curve(curve: list[dict], path: Path):
    """Per-attribute J_eval accuracy vs UNet step and vs wall-clock minutes (matplotlib, imported lazily;
    skipped if absent)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not curve:
        return None
    axes_x = [("step", "UNet step")]
    if all("minutes" in p for p in curve):  # older curves have no wall time
        axes_x.append(("minutes", "minutes since the run started (all stages)"))
    fig, axes = plt.subplots(1, len(axes_x), figsize=(6 * len(axes_x), 4), dpi=100, squeeze=False)
    chance = {"shape": 1 / len(SHAPES), "colour": 1 / len(COLOURS), "background": 1 / len(BACKGROUNDS)}
    for ax, (x_key, x_label) in zip(axes[0], axes_x):
        xs = [p[x_key] for p in curve]
        for key, colour in (("background", "tab:gray"), ("colour", "tab:red"), ("shape", "tab:blue"), ("prompt", "k")):
            if key in curve[0]:
                ax.plot(xs, [p[key] for p in curve], marker="o", color=colour, label=key)
            if key in chance:
                ax.axhline(chance[key], color=colour, ls=":", lw=0.8)
        ax.set_ylim(0, 1.02)
        ax.set_xlabel(x_label)
        ax.set_ylabel("J_eval accuracy on held-out prompts")
        ax.legend(loc="upper left")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name("." + path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def run(cfg: ToyBaseConfig, stop_after: int | None = None, log=print, on_step=None) -> Path:
    """Train (or resume) the toy model; returns the exported model folder (run_dir/model).

    stop_after: stop (with a checkpoint) once this many optimizer steps, all stages counted, are done.
    """
    threads = torch.get_num_threads()
    try:
        return _run(cfg, stop_after, log, on_step)
    finally:
        torch.set_num_threads(threads)  # cfg.threads applies to this run only


def _run(cfg: ToyBaseConfig, stop_after, log, on_step) -> Path:
    deadline = time.time() + cfg.time_budget_minutes * 60 if cfg.time_budget_minutes > 0 else None
    run_ = Run(cfg, log=log, on_step=on_step)
    resumed = False
    if cfg.resume and run_.latest_checkpoint() is not None:
        run_.restore(run_.latest_checkpoint())
        resumed = True
    save_yaml(cfg, run_.dir / "config.yaml")
    run_.build_pool()
    run_.event({"event": "start", "resumed": resumed, "config": to_dict(cfg)})
    start_stage = STAGES.index(run_.stage)
    for stage in STAGES[start_stage:]:
        if stage != run_.stage:  # entering a new stage from the previous one's end
            run_.stage, run_.step = stage, 0
            run_.stage_setup(stage)
        elif run_.optimizer is None:
            run_.stage_setup(stage)
        if stage == "unet":
            if cfg.text.freeze_after:
                run_.text_encoder.requires_grad_(False).eval()
            run_.encode_pool()
            if cfg.compile and run_.device.type == "cuda":
                run_.unet = torch.compile(run_.unet)
        total = run_.stage_steps(stage)
        if stage == "unet" and run_.step == 0 and total > 0 and not any(p["step"] == 0 for p in run_.curve):
            run_.measure(None)  # the untrained baseline: the curve starts at chance
        step_fn = {"text": run_.text_step, "vae": run_.vae_step, "unet": run_.unet_step}[stage]
        t0, loss_avg = time.time(), None
        while run_.step < total:
            if stop_after is not None and run_.global_step >= stop_after:
                run_.checkpoint()
                log(f"stopped after {run_.global_step} steps (checkpoint saved)")
                return run_.dir
            if deadline is not None and time.time() >= deadline:
                return out_of_time(run_, stage, round(loss_avg, 5) if loss_avg is not None else None)
            gen = step_generator(cfg.seed, stage, run_.step, run_.device)
            loss = step_fn(gen)
            run_.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            params = [p for g in run_.optimizer.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(params, cfg.unet.grad_clip if stage == "unet" else 1.0)
            run_.optimizer.step()
            run_.lr_sched.step()
            if stage == "unet" and run_.ema is not None:
                with torch.no_grad():
                    # EMA warmup: early on the average follows the weights (else a short run evaluates its init)
                    decay = min(cfg.unet.ema_decay, (1 + run_.step) / (10 + run_.step))
                    torch._foreach_lerp_(list(run_.ema.parameters()), list(_unwrap(run_.unet).parameters()), 1 - decay)
            run_.step += 1
            run_.global_step += 1
            value = float(loss.detach())
            loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
            if run_.step % 50 == 0 or run_.step == total:
                run_.event({"event": "step", "stage": stage, "step": run_.step, "loss": value,
                            "lr": run_.lr_sched.get_last_lr()[0], "seconds": round(time.time() - t0, 2)})
                log(f"[{stage}] step {run_.step}/{total} loss {loss_avg:.4f} ({time.time() - t0:.0f}s)")
            if on_step:
                on_step(stage, run_.step, total, value)
            if stage == "unet" and (run_.step % cfg.curve.every == 0 or run_.step == total):
                run_.measure(round(loss_avg, 5))
            if run_.global_step % cfg.checkpoint_every == 0:
                run_.checkpoint()
        run_.optimizer = None
        if run_.step == total and stage != "unet":
            run_.checkpoint()  # stage boundary: resume never redoes a finished stage
    return finish(run_)


def _unwrap(module):
    return getattr(module, "_orig_mod", module)


def out_of_time(run_: Run, stage: str, loss: float | None) -> Path:
    """The time budget ran out: keep everything resumable; inside the UNet stage also export the
    current EMA model (measured first, so its curve point is the one install checks)."""
    run_.log(f"time budget of {run_.cfg.time_budget_minutes} min used up at {stage} step {run_.step}")
    run_.event({"event": "budget", "stage": stage, "step": run_.step})
    if stage != "unet" or run_.step == 0:
        run_.checkpoint()
        return run_.dir
    if not run_.curve or run_.curve[-1]["step"] != run_.step:
        run_.measure(loss)
    return finish(run_, partial=True)


def finish(run_: Run, partial: bool = False) -> Path:
    from dcustom.toyworld.model import save_model_folder

    cfg = run_.cfg
    run_.unet = _unwrap(run_.unet)
    pipe = run_.pipeline(use_ema=True)  # export the EMA weights; the checkpoint keeps both, so a run can be extended
    out = save_model_folder(pipe, run_.dir / "model")
    run_.checkpoint()
    run_.event({"event": "end", "model": str(out), "partial": partial, "unet_step": run_.step})
    run_.log(f"model written to {out}" + (f" (partial: UNet step {run_.step} of {cfg.unet.steps})" if partial else ""))
    if cfg.install:
        install(run_.curve, out, cfg.install_min_shape_accuracy, run_.log)
    return out


SCORE_FILE = "toy_score.json"  # beside model_index.json: the figures the install decision compared


def install(curve: list[dict], folder: Path, min_shape: float, log=print) -> Path:
    """Copy a trained model folder into the package as builtin:toy, only if it binds shapes."""
    last = curve[-1] if curve else {}
    shape = last.get("shape", 0.0)
    if shape < min_shape:
        raise DcustomError(f"install refused: final J_eval shape accuracy {shape:.2f} is below "
                           f"install_min_shape_accuracy {min_shape:.2f}; the model stays in {folder}.")
    score = {k: last[k] for k in ("prompt", "shape", "colour", "background") if k in last}
    return install_folder(folder, log, score={"source": "learning curve (last point)", **score})


def install_folder(folder: str | Path, log=print, score: dict | None = None, target: Path | None = None) -> Path:
    """Copy a model folder into the package as builtin:toy (atomically: a temp copy, then rename).

    Never replaces a shipped model that scores higher: the prompt accuracy each install recorded (from
    the learning curve, or `score` given by the bars check) is compared first. A folder without a
    recorded score replaces nothing that has one.
    """
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        raise DcustomError(f"install refused: {str(folder)!r} is not a toy-model folder (no model_index.json).")
    target = target or Path(__file__).resolve().parent / "weights" / "toy"
    score = score or _read_score(folder)
    shipped = _read_score(target)
    if shipped.get("prompt") is not None and (score.get("prompt") is None or score["prompt"] < shipped["prompt"]):
        raise DcustomError(f"install refused: the shipped builtin:toy scores prompt accuracy {shipped['prompt']:.3f} "
                           f"and {str(folder)!r} scores {score.get('prompt', 'nothing recorded')}; the shipped model "
                           f"stays (delete {target} first to replace it anyway).")
    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(folder, tmp)
    if score:
        (tmp / SCORE_FILE).write_text(json.dumps(score, indent=1))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    log(f"installed as builtin:toy in {target}")
    return target


def _read_score(folder: Path) -> dict:
    try:
        return json.loads((folder / SCORE_FILE).read_text())
    except (OSError, ValueError):
        return {}
