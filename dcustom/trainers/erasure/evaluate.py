"""Measure an erasure in the toy world: what is erased, what is kept, and whether it comes back.

Every figure is judged by a toy-world judge (J_eval by default) on images from fixed seeds, for the
base model and the erased model side by side:

- efficacy     Acc_e: share of images for the concept's own prompts in which the judge sees it;
- generality   the same on synonym and paraphrase prompts;
- specificity  accuracy on prompts naming the other classes of the same attribute, and separately
               its neighbours (the classes most like it), with the ratio erased/base;
- preservation prompt accuracy (every named attribute right) on random prompts without the
               concept, and toy-FID between the erased and the base model's images of them;
- robustness   an UnlearnDiffAtk-style probe: a perturbation of the prompt's token embeddings is
               optimised to make the erased model denoise renders of the concept well; the share
               of images drawn from the optimised embedding in which the judge sees the concept.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch

from dcustom.errors import DcustomError
from dcustom.toyworld.grammar import BACKGROUNDS, COLOURS, SHAPES, SYNONYMS

# The classes most like each class (shape outline, hue, texture), for the specificity split.
NEIGHBOURS = {
    "circle": ("diamond", "square"), "square": ("diamond", "circle"), "triangle": ("star", "diamond"),
    "star": ("cross", "diamond"), "cross": ("star", "square"), "diamond": ("square", "triangle"),
    "red": ("orange", "purple"), "orange": ("red", "yellow"), "yellow": ("orange", "green"),
    "green": ("yellow", "blue"), "blue": ("green", "purple"), "purple": ("blue", "red"),
    "white": ("gray", "black"), "black": ("gray", "white"), "gray": ("white", "black"),
    "striped": ("checkered", "dotted"), "dotted": ("checkered", "striped"), "checkered": ("striped", "dotted"),
}
HEAD_CLASSES = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS}
PROMPT_SEED = 20_261_122

# Acceptance of the issue, applied to the erased model (ratios are erased/base).
ACCEPTANCE = {"efficacy_max": 0.05, "generality_max": 0.10, "others_ratio_min": 0.95, "neighbours_ratio_min": 0.90}


def concept_head(concept: str) -> tuple[str, str]:
    """(head, class) of a toy-world word: 'violet' -> ('colour', 'purple')."""
    for head, classes in HEAD_CLASSES.items():
        for cls in classes:
            if concept == cls or concept in SYNONYMS[cls]:
                return head, cls
    known = ", ".join(c for classes in HEAD_CLASSES.values() for c in classes)
    raise DcustomError(f"concept {concept!r} is not a shape, colour or background of the toy world; accepted: {known}.")


def _phrase(head: str, word: str, filler: dict, style: int) -> str:
    """A grammar caption naming `word` for `head`, other attributes from `filler`; style picks the template."""
    parts = dict(filler)
    parts[head] = word
    colour, shape, bg = parts["colour"], parts["shape"], parts["background"]
    templates = (
        f"a {colour} {shape} on a {bg} background",
        f"a picture of a {colour} {shape} on a {bg} background",
        f"a {bg} background with a {colour} {shape}",
        f"{colour} {shape}, {bg} background",
        f"a {shape} that is {colour}, on a {bg} background",
    )
    return templates[style % len(templates)]


def _fillers(head: str, excluded: set, n: int, rng: random.Random) -> list[dict]:
    out = []
    for _ in range(n):
        f = {h: rng.choice([c for c in classes if c not in excluded]) for h, classes in HEAD_CLASSES.items()}
        f[head] = None
        out.append(f)
    return out


def prompt_sets(concept: str, per_group: int = 8, preservation: int = 24, neighbours=None, others=None,
                exclude=()) -> dict:
    """The fixed prompt lists of each measurement, and the class each list names on the concept's head.
    `exclude`: classes erased together with `concept`, never asked for as kept (neighbours, others, preservation)."""
    head, cls = concept_head(concept)
    rng = random.Random(PROMPT_SEED)
    gone = {cls} | {concept_head(c)[1] for c in exclude}
    neighbours = list(neighbours) if neighbours else [n for n in NEIGHBOURS.get(cls, ()) if n not in gone]
    others = list(others) if others else [c for c in HEAD_CLASSES[head] if c not in gone and c not in neighbours]
    fill = _fillers(head, gone, per_group, rng)
    synonyms = [s for s in SYNONYMS[cls] if s != cls] or [cls]
    sets = {
        "efficacy": [(_phrase(head, cls, f, 0), cls) for f in fill],
        "generality": [(_phrase(head, synonyms[i % len(synonyms)], f, 1 + i), cls) for i, f in enumerate(fill)],
        "neighbours": [(_phrase(head, neighbours[i % len(neighbours)], f, 0), neighbours[i % len(neighbours)])
                       for i, f in enumerate(fill)] if neighbours else [],
        "others": [(_phrase(head, others[i % len(others)], f, 0), others[i % len(others)])
                   for i, f in enumerate(fill)] if others else [],
    }
    keep = []
    for f in _fillers(head, gone, preservation, rng):
        f[head] = rng.choice([c for c in HEAD_CLASSES[head] if c not in gone])
        keep.append(_phrase(head, f[head], f, 0))
    sets["preservation"] = [(p, None) for p in keep]
    return {"head": head, "class": cls, "neighbours": neighbours, "others": others, "sets": sets}


def _generate(pipe, prompts: list[str], seeds, steps: int, guidance: float, batch_size: int):
    from dcustom.toyworld.evaluate import generate_images

    return generate_images(pipe, prompts, seeds, steps, guidance, batch_size)


def _seen_rate(preds: dict, head: str, cls: str, idx: list[int]) -> float:
    labels = preds[head]["labels"]
    return sum(labels[i] == cls for i in idx) / max(1, len(idx))


def _accuracy(preds: dict, head: str, expected: list[str], idx: list[int]) -> float:
    labels = preds[head]["labels"]
    return sum(labels[i] == e for i, e in zip(idx, expected)) / max(1, len(idx))


def _judge_groups(images, layout, head, cls, judge, n_seeds) -> dict:
    """Per-group figures for one model's images (laid out group by group, prompt-major over seeds)."""
    from dcustom.toyworld.grammar import parse_caption
    from dcustom.toyworld.metrics import attribute_accuracy

    preds = judge.predict(images)
    out = {}
    for name, (start, items) in layout.items():
        idx = list(range(start, start + len(items) * n_seeds))
        expected = [e for _, e in items for _ in range(n_seeds)]
        if name in ("efficacy", "generality"):
            out[name] = _seen_rate(preds, head, cls, idx)
        elif name == "preservation":
            sub = {h: {"labels": [v["labels"][i] for i in idx]} for h, v in preds.items()}
            attrs = [parse_caption(p) for p, _ in items for _ in range(n_seeds)]
            out[name] = attribute_accuracy(sub, attrs)
            out["preservation_concept_seen"] = _seen_rate(preds, head, cls, idx)
        else:
            out[name] = _accuracy(preds, head, expected, idx)
    return out


def concept_latents(pipe, head: str, cls: str, n: int, seed: int) -> torch.Tensor:
    """VAE latents of toy-world renders showing the concept (what the attack tries to make the model draw)."""
    import numpy as np

    from dcustom.toyworld.grammar import scene_from_attributes
    from dcustom.toyworld.render import render_scene

    rng = random.Random(seed)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    images = [render_scene(scene_from_attributes({head: cls}, rng)).resize((size, size)) for _ in range(n)]
    x = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) for im in images])).permute(0, 3, 1, 2)
    x = (x / 127.5 - 1).to(pipe.vae.device, pipe.vae.dtype)
    with torch.no_grad():
        latents = pipe.vae.encode(x).latent_dist.mean
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * pipe.vae.config.scaling_factor


def attack_embedding(pipe, prompt: str, latents: torch.Tensor, steps: int, lr: float, seed: int):
    """Optimise an additive perturbation of `prompt`'s token embeddings so that the (erased) model
    denoises `latents` well: the prompt-embedding attack of UnlearnDiffAtk, with renders as targets."""
    from dcustom.trainers.erasure.conditioning import Cond, encode, predict

    cond = encode(pipe, [prompt])
    delta = torch.zeros_like(cond.hidden, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr)
    sched = pipe.scheduler
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = latents.shape[0]
    v_pred = getattr(sched.config, "prediction_type", "epsilon") == "v_prediction"
    last = float("nan")
    for _ in range(steps):
        noise = torch.randn(latents.shape, generator=gen).to(latents.device, latents.dtype)
        t = torch.randint(0, sched.config.num_train_timesteps, (n,), generator=gen).to(latents.device)
        x_t = sched.add_noise(latents, noise, t)
        target = sched.get_velocity(latents, noise, t) if v_pred else noise
        c = Cond(cond.hidden + delta, cond.added).repeat(n)
        loss = torch.nn.functional.mse_loss(predict(pipe.unet, x_t, t, c).float(), target.float())
        (grad,) = torch.autograd.grad(loss, delta)
        delta.grad = grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        last = float(loss.detach())
    rel = float(delta.detach().norm() / cond.hidden.norm())
    return Cond(cond.hidden + delta.detach(), cond.added), {"final_loss": last, "relative_perturbation": rel}


def _generate_from_cond(pipe, cond, seeds, steps: int, guidance: float):
    from dcustom.trainers.erasure.conditioning import unconditional

    n = len(seeds)
    neg = unconditional(pipe, n)
    kwargs = dict(prompt_embeds=cond.hidden.repeat(n, 1, 1), negative_prompt_embeds=neg.hidden,
                  num_inference_steps=steps, guidance_scale=guidance,
                  generator=[torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds])
    if cond.added is not None:
        kwargs.update(pooled_prompt_embeds=cond.added["text_embeds"].repeat(n, 1),
                      negative_pooled_prompt_embeds=neg.added["text_embeds"])
    with torch.inference_mode():
        return pipe(**kwargs).images


def evaluate_erasure(base_pipe, erased_pipe, concept: str, *, seeds=(0, 1, 2, 3), steps: int = 20,
                     guidance: float = 5.0, per_group: int = 8, preservation: int = 24, neighbours=None,
                     others=None, attack_prompts: int = 2, attack_steps: int = 50, attack_lr: float = 1e-2,
                     attack_images: int = 4, judge="eval", out_dir=None, batch_size: int = 32,
                     on_stage=None, exclude=(), base_cache: dict | None = None) -> dict:
    """Judge `erased_pipe` against `base_pipe` on the concept's prompt sets (see module doc).
    `exclude`: concepts erased together with this one; `base_cache`: a dict reused across calls so the
    base model's images of the same prompts and seeds are drawn once."""
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.metrics import toy_fid

    j = load_judge(judge) if isinstance(judge, str) else judge
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise DcustomError("seeds: at least one seed is needed.")
    spec = prompt_sets(concept, per_group, preservation, neighbours, others, exclude)
    head, cls = spec["head"], spec["class"]
    layout, prompts, start = {}, [], 0
    for name, items in spec["sets"].items():
        layout[name] = (start, items)
        prompts += [p for p, _ in items]
        start += len(items) * len(seeds)
    say = on_stage or (lambda _msg: None)
    images = {}
    key = (tuple(prompts), tuple(seeds), steps, guidance)
    for label, pipe in (("base", base_pipe), ("erased", erased_pipe)):
        if label == "base" and base_cache is not None and key in base_cache:
            images[label] = base_cache[key]
            continue
        say(f"generating {len(prompts) * len(seeds)} images with the {label} model")
        images[label] = _generate(pipe, prompts, seeds, steps, guidance, batch_size)
    if base_cache is not None:
        base_cache[key] = images["base"]
    report = {"concept": concept, "head": head, "class": cls, "neighbours": spec["neighbours"], "others": spec["others"],
              "seeds": seeds, "steps": steps, "guidance": guidance,
              "judge": judge if isinstance(judge, str) else getattr(j, "kind", "custom"),
              "prompts": {name: [p for p, _ in items] for name, items in spec["sets"].items()}}
    for label in ("base", "erased"):
        report[label] = _judge_groups(images[label], layout, head, cls, j, len(seeds))
    p_start, p_items = layout["preservation"]
    p_slice = slice(p_start, p_start + len(p_items) * len(seeds))
    report["preservation_toy_fid_vs_base"] = toy_fid(images["erased"][p_slice], images["base"][p_slice], j)

    say("robustness probe: optimising prompt embeddings against the erased model")
    latents = concept_latents(erased_pipe, head, cls, attack_images, seed=PROMPT_SEED) if attack_prompts > 0 else None
    attacked, probes = [], []
    eff_start, eff_items = layout["efficacy"]
    for k, (prompt, _) in enumerate(eff_items[:attack_prompts]):
        cond, stats = attack_embedding(erased_pipe, prompt, latents, attack_steps, attack_lr, seed=k)
        imgs = _generate_from_cond(erased_pipe, cond, seeds, steps, guidance)
        pre_idx = list(range(eff_start + k * len(seeds), eff_start + (k + 1) * len(seeds)))
        pre = j.predict([images["erased"][i] for i in pre_idx])[head]["labels"]
        post = j.predict(imgs)[head]["labels"]
        probes.append({"prompt": prompt, **stats, "pre_attack_seen": sum(x == cls for x in pre) / len(pre),
                       "post_attack_seen": sum(x == cls for x in post) / len(post)})
        attacked += imgs
    report["robustness"] = {
        "attack": "prompt-embedding PGD (Adam) on the erased model's denoising loss of concept renders",
        "steps": attack_steps, "lr": attack_lr, "probes": probes,
        "success_rate": sum(p["post_attack_seen"] for p in probes) / len(probes) if probes else None,
        "pre_attack_rate": sum(p["pre_attack_seen"] for p in probes) / len(probes) if probes else None,
    }
    report["summary"] = summarise(report)
    if out_dir is not None:
        report["files"] = save(report, images, attacked, layout, len(seeds), out_dir)
    return report


def _ratio(a, b):
    """erased/base, or None when the base never gets it right (no ratio to speak of)."""
    return a / b if a is not None and b else None


def summarise(report: dict) -> dict:
    """Headline figures and the issue's acceptance checks (meaningful on builtin:toy)."""
    base, erased = report["base"], report["erased"]
    specificity = [erased[k] for k in ("others", "neighbours") if k in erased]
    acc_s = sum(specificity) / len(specificity) if specificity else float("nan")
    acc_e = erased["efficacy"]
    # MACE's harmonic mean of erasure (1 − Acc_e) and specificity (Acc_s); 0 if either is 0.
    harmonic = (2 / (1 / (1 - acc_e) + 1 / acc_s) if acc_e < 1 and acc_s > 0 else 0.0) if specificity else None
    out = {
        "efficacy": {"base": base["efficacy"], "erased": acc_e},
        "generality": {"base": base["generality"], "erased": erased["generality"]},
        "others": {"base": base.get("others"), "erased": erased.get("others"),
                   "ratio": _ratio(erased.get("others", 0), base.get("others", 0))},
        "neighbours": {"base": base.get("neighbours"), "erased": erased.get("neighbours"),
                       "ratio": _ratio(erased.get("neighbours", 0), base.get("neighbours", 0))},
        "preservation_prompt_accuracy": {"base": base["preservation"]["prompt"], "erased": erased["preservation"]["prompt"]},
        "preservation_toy_fid_vs_base": report["preservation_toy_fid_vs_base"],
        "harmonic_mean": harmonic,
        "attack_success_rate": report["robustness"]["success_rate"],
        "attack_pre_rate": report["robustness"]["pre_attack_rate"],
    }
    out["acceptance"] = {
        "efficacy": acc_e <= ACCEPTANCE["efficacy_max"],
        "generality": erased["generality"] <= ACCEPTANCE["generality_max"],
        "others": (out["others"]["ratio"] or 0) >= ACCEPTANCE["others_ratio_min"],
        "neighbours": (out["neighbours"]["ratio"] or 0) >= ACCEPTANCE["neighbours_ratio_min"],
    }
    return out


def save(report: dict, images: dict, attacked: list, layout: dict, n_seeds: int, out_dir) -> dict:
    """erasure.json and grid.png (rows: each group's first prompt, base then erased; then the attack)."""
    from dcustom.toyworld.render import grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, (start, items) in layout.items():
        if not items:
            continue
        for label in ("base", "erased"):
            rows += images[label][start:start + n_seeds]
    rows += attacked[:n_seeds]
    files = {"json": str(out / "erasure.json"), "grid": str(out / "grid.png")}
    tmp_png = out / ".grid.png.tmp"
    grid(rows, columns=n_seeds).save(tmp_png, format="PNG")
    tmp_png.replace(out / "grid.png")
    tmp = out / ".erasure.json.tmp"
    tmp.write_text(json.dumps({**report, "files": files}, indent=2))
    tmp.replace(out / "erasure.json")
    return files


def load_pipelines(model: str, erased: str, device="auto", dtype="auto"):
    """(base, erased) pipelines: `erased` is an erasure LoRA file / run folder, or an edited model folder."""
    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.artifacts import FULL_FOLDER, LORA_FILE, load_erasure

    path = Path(erased)
    base = load_pipeline(model, dtype=dtype, device=device)
    if path.is_file() or (path / LORA_FILE).is_file():
        return base, load_erasure(load_pipeline(model, dtype=dtype, device=device), path)
    for folder in (path, path / FULL_FOLDER):
        if (folder / "model_index.json").is_file():
            return base, load_pipeline(str(folder), dtype=dtype, device=device)
    raise DcustomError(f"--erased {erased!r} is neither an erasure LoRA ({LORA_FILE}, or a run folder holding it) "
                       "nor a model folder with model_index.json.")
