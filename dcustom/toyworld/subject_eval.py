"""`dcustom eval subject`: does a subject trainer teach builtin:toy a subject? (issue 16's acceptance)

For a method (lora, oft, boft, textual_inversion, pivotal) and a held-out subject (robot, ladybug, pine):

1. five renders of the subject on white, gray and striped backgrounds, with captions and masks
   (`toyworld.subjects.write_subject_examples`), exactly what the demo and the app's Train tab use;
2. the method trained on them with the shipped config (`configs/<method>.yaml`; pivotal tuning is
   `configs/textual_inversion.yaml` with the pivotal overrides below) and nothing else changed but the
   paths and the trigger words;
3. the adapter (best/ when fidelity tracking kept an earlier step, else the last) drawing the subject on the
   backgrounds the examples never show (black, dotted, checkered) x `seeds`, at the generate defaults;
   J_eval judges subject and background. The last step is measured too, so best vs last is visible;
4. prompt accuracy on 12 unrelated base prompts x 2 seeds with the adapter loaded, over the base model's.

Writes <out>/<method>-<subject>/figures.json and grid.png (top row base model, the rest the adapter).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from dcustom.errors import DcustomError

SUBJECT_METHODS = ("lora", "oft", "boft", "textual_inversion", "pivotal")
EVAL_STEPS, EVAL_GUIDANCE = 30, 7.5  # the generate command's defaults: what a user gets
# Pivotal tuning (Kumari et al. 2023 / the diffusers advanced script): the vectors train for the first half, the
# LoRA throughout. The vectors' rate is 1e-3, a fifth of textual inversion's: at 5e-3 the new word also learned
# the examples' backgrounds (robot on unseen ones: 0.62 right, against 1.00 at 1e-3; docs/results.md). The LoRA
# takes configs/lora.yaml's layers, rank, alpha, rate and hold.
PIVOTAL_OVERRIDES = ("adapter=lora", "embedding_fraction=0.5", "embedding_lr=1.0e-3")


def pivotal_lora_overrides(config_dir: Path) -> list[str]:
    """configs/lora.yaml's adapter settings as overrides of the textual-inversion config: layers, rank, alpha, rate,
    the hold on prompts without the token, and how often fidelity is checked (for best/)."""
    import json

    from dcustom.config import read_yaml

    lora = read_yaml(Path(config_dir) / "lora.yaml")
    found = [f"adapter_options.target_modules=[{','.join(lora['target_modules'])}]", f"lora.rank={lora['rank']}",
             f"lora.alpha={lora['alpha']}", f"train.lr={lora['train']['lr']}"]
    if lora.get("keep_prompts"):
        found += [f"keep_prompts={json.dumps(lora['keep_prompts'])}", f"keep_weight={lora.get('keep_weight', 1.0)}"]
    if lora["train"].get("sample_every"):
        found.append(f"train.sample_every={lora['train']['sample_every']}")
    return found


def subject_prompts(thing: str, backgrounds) -> list[str]:
    return [f"a {thing} on a {bg} background" for bg in backgrounds]


def judge_subject(images, subject: str, backgrounds: list, judge) -> dict:
    """Share of images J_eval labels as `subject`, with the right background, and both."""
    preds = judge.predict(images)
    subj = [label == subject for label in preds["subject"]["labels"]]
    bg = [label == b for label, b in zip(preds["background"]["labels"], backgrounds)]
    n = len(images)
    return {"subject": sum(subj) / n, "background": sum(bg) / n, "both": sum(s and b for s, b in zip(subj, bg)) / n,
            "images": n}


def unrelated_prompts() -> list[str]:
    """The 12 base prompts (no subject) the unrelated-prompt accuracy is measured on."""
    from dcustom.toyworld.evaluate import heldout_prompts

    return heldout_prompts(n_base=12)[:12]


def unrelated_accuracy(pipe) -> float:
    """Prompt accuracy of `pipe` on the unrelated prompts x seeds 0, 1, judged by J_eval (20 steps, guidance 5: as
    the model card measures prompt accuracy)."""
    from dcustom.toyworld.evaluate import evaluate_pipeline

    report = evaluate_pipeline(pipe, prompts=unrelated_prompts(), seeds=[0, 1])
    return report["groups"]["base"]["prompt"]


def method_config(method: str, config_dir: Path, examples: Path, subject: str, run_dir: Path, overrides=()):
    """(config, trigger text used in prompts): the shipped config with only paths and trigger words changed."""
    from dcustom.config import load_config
    from dcustom.registry import get_method
    from dcustom.toyworld.subjects import trigger_phrase

    method_id = "textual_inversion" if method == "pivotal" else method
    path = Path(config_dir) / f"{method_id}.yaml"
    if not path.is_file():
        raise DcustomError(f"{path}: the shipped config of {method_id} is missing; run from the repository root "
                           "or pass --configs with the folder that holds configs/<method>.yaml.")
    phrase = trigger_phrase(subject)
    common = ["model=builtin:toy", f"data.images={examples}", f"train.output_dir={run_dir}"]
    if method_id == "textual_inversion":
        # A new word replaces the trigger: captions name the subject by it ("a <robot> on a gray background").
        token, class_word = f"<{subject}>", phrase.split()[1]
        extra = [f"tokens=[{token}]", f"init_words=[{class_word}]", "prompts=captions",
                 f"validation_prompts=[a {token} on a black background]", f"fidelity.subject={subject}"]
        extra += list(PIVOTAL_OVERRIDES) + pivotal_lora_overrides(config_dir) if method == "pivotal" else []
        thing = token
    else:
        extra = [f"data.instance_prompt=a photo of a {phrase}", f"validation_prompts=[a {phrase} on a black background]",
                 f"fidelity.subject={subject}"]
        thing = phrase
    cls = get_method(method_id, kind="train").config_class()
    return load_config(cls, path, overrides=common + extra + list(overrides)), thing


def adapter_folders(run_dir: Path, last_step: int) -> list[tuple[str, Path]]:
    """("best", run_dir/best) when fidelity tracking kept an earlier step than the last, then ("last", run_dir)."""
    best = Path(run_dir) / "best"
    earlier = best.is_dir() and json.loads((best / "best.json").read_text())["step"] < last_step
    return ([("best", best)] if earlier else []) + [("last", Path(run_dir))]


def evaluate_subject_method(method: str, subject: str, out_dir: str | Path, config_dir: str | Path = "configs",
                            overrides=(), seeds=tuple(range(8)), base_accuracy: float | None = None,
                            log=print) -> dict:
    """Train `method` on 5 renders of `subject` and measure it (see the module doc); returns the figures."""
    import torch

    from dcustom.adapters.load import load_adapter
    from dcustom.models import load_pipeline
    from dcustom.registry import get_method
    from dcustom.toyworld.evaluate import generate_images
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.render import grid
    from dcustom.toyworld.subjects import write_subject_examples
    from dcustom.trainers.fidelity import UNSEEN_BACKGROUNDS

    if method not in SUBJECT_METHODS:
        raise DcustomError(f"method {method!r} is not a subject method; accepted: {', '.join(SUBJECT_METHODS)}.")
    out = Path(out_dir) / f"{method}-{subject}"
    out.mkdir(parents=True, exist_ok=True)
    thing = f"<{subject}>" if method in ("textual_inversion", "pivotal") else None
    examples, _ = write_subject_examples(subject, out / "examples", thing=thing)
    cfg, thing = method_config(method, Path(config_dir), examples, subject, out / "run", overrides)
    log(f"{method} on the {subject}: {cfg.train.steps} steps ...")
    torch.manual_seed(0)
    started = time.process_time(), time.perf_counter()
    result = get_method(cfg.method, kind="train").implementation()(cfg)
    cpu_s, wall_s = time.process_time() - started[0], time.perf_counter() - started[1]

    prompts = subject_prompts(thing, UNSEEN_BACKGROUNDS)
    backgrounds = [bg for bg in UNSEEN_BACKGROUNDS for _ in seeds]
    judge = load_judge("eval")
    pipe = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
    if base_accuracy is None:
        base_accuracy = unrelated_accuracy(pipe)
    shown = [p * len(seeds) + s for p in range(len(prompts)) for s in range(min(4, len(seeds)))]  # grid columns
    before = generate_images(pipe, prompts, seeds[:4], steps=EVAL_STEPS, guidance=EVAL_GUIDANCE)
    figures = {"method": method, "subject": subject, "prompt_thing": thing, "steps": cfg.train.steps,
               "train_cpu_seconds": round(cpu_s, 1), "train_wall_seconds": round(wall_s, 1),
               "eval": {"steps": EVAL_STEPS, "guidance": EVAL_GUIDANCE, "seeds": list(seeds),
                        "backgrounds": list(UNSEEN_BACKGROUNDS)},
               "base_unrelated_accuracy": base_accuracy}
    rows = [before]
    for which, folder in adapter_folders(result.run_dir, cfg.train.steps):
        adapted = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
        load_adapter(adapted, folder)
        images = generate_images(adapted, prompts, seeds, steps=EVAL_STEPS, guidance=EVAL_GUIDANCE)
        scores = judge_subject(images, subject, backgrounds, judge)
        scores["unrelated_accuracy"] = unrelated_accuracy(adapted)
        scores["unrelated_ratio"] = scores["unrelated_accuracy"] / max(base_accuracy, 1e-9)
        best = folder / "best.json"
        scores["step"] = json.loads(best.read_text())["step"] if best.is_file() else cfg.train.steps
        figures[which] = scores
        rows.append([images[i] for i in shown])
        log(f"  {which} (step {scores['step']}): subject {scores['subject']:.2f}  background {scores['background']:.2f}"
            f"  unrelated {scores['unrelated_ratio']:.2f}")
    figures["chosen"] = "best" if "best" in figures else "last"
    sheet = grid([im for row in rows for im in row], columns=len(rows[-1]))
    sheet.resize((sheet.width * 2, sheet.height * 2), 0).save(out / "grid.png")
    (out / "figures.json").write_text(json.dumps(figures, indent=1))
    return figures
