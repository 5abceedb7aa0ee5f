"""`evaluate_pipeline`: judge any text-to-image pipeline on the toy world's held-out prompts.

Prompt accuracy (every named attribute right), per-attribute accuracy, toy-FID against renders of
the same prompts, and diversity across seeds; reported overall and per group ("base": shape x colour
pairs the base trained on; "compositional": the held-out pairs).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from dcustom.toyworld.grammar import HELDOUT_COMBOS, parse_caption, sample_scene, scene_from_attributes

DEFAULT_SEEDS = (0, 1, 2, 3)
PROMPT_SEED = 20_241_122  # fixed: the held-out prompt list never changes between runs


def heldout_prompts(n_base: int = 24, seed: int = PROMPT_SEED) -> list[str]:
    """A fixed prompt list: n_base prompts over trained pairs, then one per held-out shape x colour pair."""
    from dcustom.errors import DcustomError
    from dcustom.toyworld.grammar import BACKGROUNDS, base_combos

    distinct = len(base_combos()) * len(BACKGROUNDS)
    if not 0 < n_base <= distinct:  # more would never be found: the loop below draws distinct prompts
        raise DcustomError(f"prompts: {n_base} base prompts asked for; the grammar has {distinct} distinct ones "
                           "(shape x colour x background); accepted: 1 to that, with more --seeds for more images.")
    rng = random.Random(seed)
    prompts = []
    while len(prompts) < n_base:
        scene = sample_scene(rng, "base")
        text = f"a {scene.colour} {scene.shape} on a {scene.background} background"
        if text not in prompts:
            prompts.append(text)
    for shape, colour in HELDOUT_COMBOS:
        prompts.append(f"a {colour} {shape} on a {rng.choice(('white', 'gray', 'black'))} background")
    return prompts


def prompt_group(attrs: dict) -> str:
    if "subject" in attrs:
        return "subject"
    if "style" in attrs:
        return "style"
    if (attrs.get("shape"), attrs.get("colour")) in HELDOUT_COMBOS:
        return "compositional"
    return "base"


def generate_images(pipe, prompts: list[str], seeds, steps: int, guidance: float, batch_size: int = 32,
                    on_batch=None):
    """One image per (prompt, seed), prompt-major; the pipeline's own sampler and default size."""
    import torch

    pairs = [(p, s) for p in prompts for s in seeds]
    gen_device = "cpu" if pipe.device.type == "mps" else pipe.device
    images = []
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        generators = [torch.Generator(device=gen_device).manual_seed(int(s)) for _, s in chunk]
        with torch.inference_mode():
            out = pipe(prompt=[p for p, _ in chunk], num_inference_steps=steps, guidance_scale=guidance,
                       generator=generators)
        images += out.images
        if on_batch:
            on_batch(len(images), len(pairs))
    return images


def judge_generated(images, prompts: list[str], seeds, judge, reference_seed: int = 0) -> dict:
    """Scores for images laid out prompt-major over seeds (see generate_images)."""
    from dcustom.toyworld.metrics import attribute_accuracy, diversity, frechet_distance
    from dcustom.toyworld.render import render_scene

    n_seeds = len(seeds)
    attrs = [parse_caption(p) for p in prompts]
    expected = [a for a in attrs for _ in range(n_seeds)]
    preds = judge.predict(images)
    result = {"accuracy": attribute_accuracy(preds, expected)}
    groups: dict[str, list[int]] = {}
    for i, a in enumerate(expected):
        groups.setdefault(prompt_group(a), []).append(i)
    result["groups"] = {}
    for name, idx in groups.items():
        sub = {h: {"labels": [v["labels"][i] for i in idx]} for h, v in preds.items()}
        result["groups"][name] = attribute_accuracy(sub, [expected[i] for i in idx]) | {"images": len(idx)}
    rng = random.Random(reference_seed)
    reference = [render_scene(scene_from_attributes(a, rng)) for a in expected]
    result["toy_fid"] = frechet_distance(judge.features(images), judge.features(reference))
    result["diversity"] = diversity([images[k * n_seeds:(k + 1) * n_seeds] for k in range(len(prompts))], judge)
    result["reference_diversity"] = diversity(
        [reference[k * n_seeds:(k + 1) * n_seeds] for k in range(len(prompts))], judge)
    result["per_prompt"] = [
        {"prompt": p, "attributes": attrs[k],
         "judged": [{h: preds[h]["labels"][k * n_seeds + j] for h in preds} for j in range(n_seeds)]}
        for k, p in enumerate(prompts)
    ]
    return result


def evaluate_pipeline(pipe, prompts=None, seeds=None, judge: str = "eval", steps: int = 20, guidance: float = 5.0,
                      out_dir: str | Path | None = None, batch_size: int = 32, on_batch=None) -> dict:
    """Generate (prompt x seed) images with `pipe`, judge them, and return (and optionally save) the report.

    With out_dir, writes eval.json and grid.png (one row per prompt, one column per seed).
    """
    from dcustom.errors import DcustomError
    from dcustom.toyworld.judges import load_judge

    prompts = list(prompts) if prompts else heldout_prompts()
    seeds = [int(s) for s in (seeds if seeds is not None else DEFAULT_SEEDS)]
    if not seeds:
        raise DcustomError("seeds: at least one seed is needed.")
    unknown = [p for p in prompts if not parse_caption(p)]
    if unknown:
        raise DcustomError(f"prompt {unknown[0]!r} names no shape, colour, background, subject or style of the toy "
                           "world, so it cannot be judged; use the grammar's words (see docs/toyworld.md).")
    j = load_judge(judge)
    images = generate_images(pipe, prompts, seeds, steps, guidance, batch_size, on_batch)
    report = {"model": getattr(pipe, "_dcustom_spec", type(pipe).__name__), "judge": judge, "steps": steps,
              "guidance": guidance, "seeds": seeds, "prompts": len(prompts)}
    report |= judge_generated(images, prompts, seeds, j)
    if out_dir is not None:
        save_report(report, images, len(seeds), out_dir)
    return report


def save_report(report: dict, images, columns: int, out_dir: str | Path) -> dict:
    """eval.json and grid.png in out_dir, each written to a temp name first."""
    from dcustom.toyworld.render import grid

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".eval.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    tmp.replace(out / "eval.json")
    tmp_png = out / ".grid.png.tmp"
    grid(images, columns=columns).save(tmp_png, format="PNG")
    tmp_png.replace(out / "grid.png")
    report["files"] = {"json": str(out / "eval.json"), "grid": str(out / "grid.png")}
    return report
