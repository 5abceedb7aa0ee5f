"""Subject fidelity and prompt adherence while a subject trains, and the best checkpoint.

Every `train.sample_every` steps (and at the end) a subject trainer draws a few fixed validation
prompts and scores the images; the scores go to events.jsonl (event "validation"), `validation.png`
plots them with the loss, and the adapter of the best-scoring step is kept in `best/` beside the last.
Over-fitting is the usual failure of few-image training, and the last step is not the best one; the
judges tell which is.

Two judges:
- `toy`: on builtin:toy, the toy world's classifiers. J_train picks the best step: its mean
  probability of the subject on images whose background is right, on backgrounds the examples never show,
  times the share of six unrelated base prompts it still finds drawn right (KEPT_PROMPTS); J_eval only reports, so selection
  is never scored by the judge it optimised.
- `features`: on any model, a DINOv2 or CLIP model from a LOCAL folder (`fidelity.feature_model`; nothing is
  downloaded): subject fidelity is the mean cosine similarity of generated images to the training
  images (the DINO / CLIP-I score of DreamBooth, Ruiz et al. 2023), prompt adherence CLIP's
  image-text similarity (CLIP-T). The step with the highest subject fidelity is kept.
Without either, training says once why nothing is measured.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from dcustom.config import opt
from dcustom.errors import DcustomError

UNSEEN_BACKGROUNDS = ("black", "dotted", "checkered")  # the toy subject examples show white, gray, striped
# Base prompts the adapter must keep drawing (one per shape; none is in the evaluation's unrelated-prompt set):
# a subject adapter that draws its subject by redrawing everything else is over-fitted, not better.
KEPT_PROMPTS = ("a blue circle on a gray background", "a yellow square on a black background",
                "a green triangle on a black background", "a yellow star on a checkered background",
                "a purple cross on a white background", "a orange diamond on a striped background")


@dataclass
class FidelityConfig:
    judge: Literal["auto", "toy", "features", "none"] = opt(
        "auto", "auto: toy on builtin:toy with a subject trigger, features when feature_model is set, else none.")
    subject: Optional[str] = opt(None, "Toy subject (robot, ladybug, pine); null: found from its trigger word in the captions.")
    feature_model: Optional[str] = opt(None, "Local folder of a DINOv2 or CLIP model (transformers) for the features judge.")
    prompts: list[str] = opt([], "Validation prompts; empty: toy: the subject on black, dotted and checkered "
                                 "backgrounds; features: validation_prompts.")
    seeds: int = opt(2, "Images per prompt (seeds 0..n-1, the same at every step).", ge=1)
    steps: int = opt(20, "Sampling steps of the validation images.", ge=1)
    guidance: float = opt(5.0, "Classifier-free guidance of the validation images.", ge=0)
    batch_size: int = opt(8, "Validation images per pipeline call (more is faster, mostly on a CPU, and needs more "
                             "memory).", ge=1)
    keep_best: bool = opt(True, "Keep the best step's adapter files in best/ beside the last ones.")


def make_judge(cfg: FidelityConfig, model: str, texts: list[str], reference_images: list, validation_prompts: list,
               thing: Optional[str] = None):
    """(judge or None, reason). `texts` are the training captions and prompts (to find a toy subject); `thing`, the
    words the toy judge's prompts name the subject by (None: its trigger phrase, e.g. 'qrv robot')."""
    kind = cfg.judge
    subject = cfg.subject or _subject_from_triggers(texts)
    if kind == "auto":
        kind = "toy" if model == "builtin:toy" and subject else "features" if cfg.feature_model else "none"
    if kind == "toy":
        if not subject:
            raise DcustomError("fidelity.judge is toy but no subject is known: set fidelity.subject (robot, ladybug, "
                               "pine) or put its trigger word (sks, zwx, qrv) in the captions.")
        return ToyJudge(subject, cfg, thing), None
    if kind == "features":
        if not cfg.feature_model:
            raise DcustomError("fidelity.judge is features but fidelity.feature_model is not set; give a local folder "
                               "of a DINOv2 or CLIP model (nothing is downloaded).")
        return FeatureJudge(cfg, reference_images, validation_prompts), None
    return None, ("no subject-fidelity judge: not builtin:toy with a subject trigger, and fidelity.feature_model "
                  "names no local DINOv2/CLIP folder (nothing is downloaded); the last step is kept")


def _subject_from_triggers(texts: list[str]) -> Optional[str]:
    from dcustom.toyworld.grammar import SUBJECTS

    words = {w for t in texts for w in t.lower().replace(",", " ").split()}
    found = [s.name for s in SUBJECTS if s.trigger in words]
    return found[0] if len(found) == 1 else None


def draw(pipe, prompts: list[str], seeds: int, steps: int, guidance: float, size: Optional[int] = None,
         batch_size: int = 8) -> list:
    """prompts x seeds images (prompt-major), seed k for the k-th image of every prompt, batch_size per pipeline
    call (each image has its own generator, so the batching does not change which noise it starts from)."""
    import torch

    images = []
    kwargs = {"width": size, "height": size} if size else {}
    jobs = [(prompt, k) for prompt in prompts for k in range(seeds)]
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start:start + batch_size]
        generators = [torch.Generator(device="cpu").manual_seed(k) for _, k in chunk]
        with torch.no_grad():
            images += pipe([prompt for prompt, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                           generator=generators, **kwargs).images
    return images


class ToyJudge:
    """J_train selects, J_eval reports: subject recognised, background right, and both, on unseen backgrounds."""

    name = "toy"

    def __init__(self, subject: str, cfg: FidelityConfig, thing: Optional[str] = None):
        from dcustom.toyworld.subjects import trigger_phrase

        self.subject, self.cfg = subject, cfg
        phrase = thing or trigger_phrase(subject)
        self.prompts = list(cfg.prompts) or [f"a {phrase} on a {bg} background" for bg in UNSEEN_BACKGROUNDS]

    def measure(self, pipe, size: Optional[int] = None) -> dict:
        from dcustom.toyworld.grammar import HEADS, parse_caption
        from dcustom.toyworld.judges import load_judge

        c = self.cfg
        drawn = draw(pipe, self.prompts + list(KEPT_PROMPTS), c.seeds, c.steps, c.guidance, batch_size=c.batch_size)
        images, kept_images = drawn[:len(self.prompts) * c.seeds], drawn[len(self.prompts) * c.seeds:]
        wanted = [parse_caption(p) for p in KEPT_PROMPTS for _ in range(c.seeds)]
        backgrounds = [parse_caption(p).get("background") for p in self.prompts for _ in range(c.seeds)]
        scores = {"judge": "toy", "subject": self.subject, "images": len(images) + len(kept_images)}
        for kind in ("train", "eval"):
            judge = load_judge(kind)
            kept = judge.predict(kept_images)
            scores[f"kept_{kind}"] = sum(all(kept[h]["labels"][i] == w[h] for h in w)
                                         for i, w in enumerate(wanted)) / len(kept_images)
            # The same as a probability (each image: the product over its heads of the judge's probability of the
            # wanted label): reported, so a selection that the 12 kept images' labels cannot separate can be studied.
            scores[f"kept_{kind}_p"] = sum(math.prod(float(kept[h]["probs"][i, HEADS[h].index(w[h])]) for h in w)
                                           for i, w in enumerate(wanted)) / len(kept_images)
            preds = judge.predict(images)
            subj = [label == self.subject for label in preds["subject"]["labels"]]
            bg = [b is None or label == b for label, b in zip(preds["background"]["labels"], backgrounds)]
            scores[f"subject_{kind}"] = sum(subj) / len(images)
            scores[f"prompt_{kind}"] = sum(bg) / len(images)
            scores[f"both_{kind}"] = sum(s and b for s, b in zip(subj, bg)) / len(images)
            if kind == "train":
                p_subject = preds["subject"]["probs"][:, HEADS["subject"].index(self.subject)].tolist()
                # J_train's probability, not its label: the judges disagree on the soft subjects a few hundred
                # steps draw (robot LoRA: J_eval 11/12 robots, J_train 0/12 with p 0-0.28), so labels tie every
                # step at 0. Times the share of KEPT_PROMPTS still right, so the step that draws the subject
                # without redrawing the rest wins (the steps with the most robots kept 70 % of other prompts).
                subject_score = sum(p for p, b in zip(p_subject, bg) if b) / len(images)
                scores["select"] = subject_score * scores["kept_train"]
        return scores


class FeatureJudge:
    """DINO / CLIP-I subject fidelity (and CLIP-T prompt adherence) from a local DINOv2 or CLIP model."""

    name = "features"

    def __init__(self, cfg: FidelityConfig, reference_images: list, validation_prompts: list):
        import torch
        from transformers import AutoConfig

        self.cfg = cfg
        folder = Path(cfg.feature_model).expanduser()
        if not (folder / "config.json").is_file():
            raise DcustomError(f"fidelity.feature_model: {str(folder)!r} is not a local model folder (no config.json); "
                               "accepted: a transformers DINOv2 or CLIP folder (nothing is downloaded).")
        kind = AutoConfig.from_pretrained(str(folder), local_files_only=True).model_type
        if kind == "dinov2":
            from transformers import Dinov2Model

            self.model, self.mean, self.std = Dinov2Model.from_pretrained(str(folder), local_files_only=True), \
                (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
            self.size = 224
        elif kind == "clip":
            from transformers import CLIPModel, CLIPTokenizer

            self.model = CLIPModel.from_pretrained(str(folder), local_files_only=True)
            self.tokenizer = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
            self.mean, self.std = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)
            self.size = self.model.config.vision_config.image_size
        else:
            raise DcustomError(f"fidelity.feature_model: {str(folder)!r} is a {kind!r} model; accepted: dinov2 or clip.")
        self.kind = kind
        self.model.eval().requires_grad_(False)
        self.prompts = list(cfg.prompts) or list(validation_prompts)
        if not self.prompts:
            raise DcustomError("fidelity: no validation prompts; set fidelity.prompts or validation_prompts.")
        with torch.no_grad():
            self.reference = self._embed(reference_images)

    def _pixels(self, images):
        import numpy as np
        import torch

        arrays = [np.asarray(im.convert("RGB").resize((self.size, self.size)), dtype=np.float32) / 255.0 for im in images]
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
        return (x - torch.tensor(self.mean)[:, None, None]) / torch.tensor(self.std)[:, None, None]

    def _embed(self, images):
        import torch.nn.functional as F

        x = self._pixels(images)
        if self.kind == "dinov2":
            features = self.model(pixel_values=x).last_hidden_state[:, 0]  # the CLS token, as the DINO score uses
        else:
            features = self.model.get_image_features(pixel_values=x)
            features = getattr(features, "pooler_output", features)
        return F.normalize(features.float(), dim=-1)

    def measure(self, pipe, size: Optional[int] = None) -> dict:
        import torch
        import torch.nn.functional as F

        c = self.cfg
        images = draw(pipe, self.prompts, c.seeds, c.steps, c.guidance, size, c.batch_size)
        with torch.no_grad():
            emb = self._embed(images)
            scores = {"judge": f"features ({self.kind})", "images": len(images),
                      "subject_fidelity": float((emb @ self.reference.T).mean())}
            if self.kind == "clip":
                tokens = self.tokenizer([p for p in self.prompts for _ in range(c.seeds)], padding=True,
                                        truncation=True, return_tensors="pt")
                text = self.model.get_text_features(**tokens)
                text = F.normalize(getattr(text, "pooler_output", text).float(), dim=-1)
                scores["prompt_adherence"] = float((emb * text).sum(-1).mean())
        scores["select"] = scores["subject_fidelity"]
        return scores


class FidelityTracking:
    """What a subject trainer (a `SubjectMethod` whose config has `fidelity`, `model`, `data.instance_prompt` and
    `validation_prompts`) adds for fidelity tracking: the judge, made once at setup (`_make_judge`); `validate` with
    each sample; the best step's files in best/, written by the method's own `save(folder, best=True)`; and the best
    step in each checkpoint, so a resumed run keeps comparing against it."""

    judge = judge_reason = best = None

    def _make_judge(self, thing: Optional[str] = None):
        """`thing`: the words prompts name the subject by (textual inversion: its token); None: the toy trigger."""
        import logging

        from dcustom.data import open_rgb

        cfg = self.cfg
        texts = [ex.caption for ex in self.objective.examples] + [cfg.data.instance_prompt] + cfg.validation_prompts
        references = [open_rgb(rec.path)[0] for rec in self.used] if cfg.fidelity.judge in ("auto", "features") \
            and cfg.fidelity.feature_model else []
        self.judge, self.judge_reason = make_judge(cfg.fidelity, cfg.model, texts, references, cfg.validation_prompts,
                                                   thing=thing)
        if self.judge_reason:
            logging.getLogger("dcustom.train").warning("%s", self.judge_reason)

    def validate(self, step: int, run_dir: Path):
        """Subject fidelity and prompt adherence at `step`; keeps best/ up to date."""
        if self.judge is None:  # said once, in the log and in events.jsonl
            reason, self.judge_reason = self.judge_reason, None
            return {"judge": "none", "reason": reason} if reason else None
        unet = self.pipe.unet
        was_training = unet.training
        unet.eval()
        try:
            with self.ctx.accelerator.autocast():
                scores = self.judge.measure(self.pipe, size=self.objective.resolution)
        finally:
            unet.train(was_training)
        if self.cfg.fidelity.keep_best and (self.best is None or scores["select"] > self.best["score"]):
            self.best = {"step": step, "score": scores["select"]}
            self._save_best(Path(run_dir))
        if self.best is not None:
            scores["best_step"] = self.best["step"]
        plot_validation(Path(run_dir) / "events.jsonl", Path(run_dir) / "validation.png", {"step": step, **scores})
        return scores

    def _save_best(self, run_dir: Path):
        """The files as they are now into run_dir/best (a temp folder renamed over the old one)."""
        import json
        import shutil

        tmp, best = run_dir / ".best.tmp", run_dir / "best"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        self.save(tmp, best=True)
        (tmp / "best.json").write_text(json.dumps(self.best))
        if best.exists():
            shutil.rmtree(best)
        tmp.rename(best)

    def extra_state(self) -> dict:
        return {"best": self.best}

    def load_extra_state(self, state: dict) -> None:
        self.best = state.get("best")


def plot_validation(events_file: Path, out: Path, current: Optional[dict] = None) -> Optional[Path]:
    """Loss and the validation scores against the step, from events.jsonl plus the `current` scores not yet
    logged (matplotlib; skipped if absent)."""
    import json

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    events = [json.loads(line) for line in Path(events_file).read_text().splitlines() if line.strip()]
    steps = [e for e in events if e.get("event") == "step"]
    vals = [e for e in events if e.get("event") == "validation" and "select" in e] + ([current] if current else [])
    if not vals:
        return None
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if steps:
        twin = ax.twinx()
        twin.plot([e["step"] for e in steps], [e["loss"] for e in steps], color="0.75", lw=0.8, label="loss")
        twin.set_ylabel("training loss")
    keys = [k for k in ("both_train", "both_eval", "subject_eval", "prompt_eval", "subject_fidelity", "prompt_adherence")
            if k in vals[-1]]
    for key in keys:
        ax.plot([e["step"] for e in vals], [e[key] for e in vals], marker="o", label=key)
    best = vals[-1].get("best_step")
    if best is not None:
        ax.axvline(best, color="k", ls=":", lw=1, label=f"best step {best}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation score")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name("." + out.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(out)
    return out
