"""LoRA / OFT / BOFT on builtin:toy, judged by J_eval (issue 5's acceptance).

Five renders of the held-out robot subject, all on white/gray/striped backgrounds, train each
method bound to the grammar's trigger phrase ("sks square"). The adapted model then draws the
subject on backgrounds it was never shown with (black, dotted, checkered): J_eval must recognise
the subject in >= 80 % of images and the background in >= 85 %; on unrelated base prompts the
prompt accuracy must stay >= 90 % of the base model's. Steps, CPU wall time and the figures go to
runs/quality/adapters/quality.json. Runs only where the toy model is installed; the training
settings are first choices, not yet tuned on the toy model (it was not available when written).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from quality_gate import PENDING

from dcustom.models import toy_model_dir

pytestmark = [
    PENDING,
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install "
                       "(dcustom.models.toy_model_dir() is None); train it with 'dcustom toyworld train-base'"),
]

SUBJECT = "robot"
TRAIN_BACKGROUNDS = ("white", "gray", "striped")
EVAL_BACKGROUNDS = ("black", "dotted", "checkered")
SEEDS = range(4)
REPORT = Path("runs/quality/adapters/quality.json")
SETTINGS = {
    "lora": dict(rank=8, alpha=8.0, train=dict(steps=300, lr=1e-3)),
    "oft": dict(block_size=32, extract_rank=0, train=dict(steps=300, lr=1e-3)),
    "boft": dict(block_size=4, butterfly_factor=2, extract_rank=0, train=dict(steps=300, lr=1e-3)),
}


def _subject_folder(root: Path) -> tuple[Path, str]:
    from dcustom.toyworld import SUBJECTS
    from dcustom.toyworld.render import render_subject

    spec = next(s for s in SUBJECTS if s.name == SUBJECT)
    root.mkdir(parents=True, exist_ok=True)
    kept = 0
    for image, caption, scene in render_subject(SUBJECT, 60, seed=0):
        if scene.background in TRAIN_BACKGROUNDS and kept < 5:
            image.save(root / f"{kept:02d}.png")
            (root / f"{kept:02d}.txt").write_text(caption)
            kept += 1
    assert kept == 5
    return root, f"{spec.trigger} {spec.class_word}"


def _subject_scores(pipe, phrase: str) -> dict:
    from dcustom.toyworld import load_judge
    from dcustom.toyworld.evaluate import generate_images

    prompts = [f"a {phrase} on a {bg} background" for bg in EVAL_BACKGROUNDS]
    images = generate_images(pipe, prompts, SEEDS, steps=20, guidance=5.0)
    preds = load_judge("eval").predict(images)
    expected_bg = [bg for bg in EVAL_BACKGROUNDS for _ in SEEDS]
    subject = sum(label == SUBJECT for label in preds["subject"]["labels"]) / len(images)
    background = sum(a == b for a, b in zip(preds["background"]["labels"], expected_bg)) / len(images)
    return {"subject": subject, "background": background}


def _base_prompt_accuracy(pipe) -> float:
    from dcustom.toyworld import evaluate_pipeline, heldout_prompts

    report = evaluate_pipeline(pipe, prompts=heldout_prompts(n_base=12)[:12], seeds=[0, 1])
    return report["groups"]["base"]["prompt"]


@pytest.mark.parametrize("method", ["lora", "oft", "boft"])
def test_subject_on_unseen_backgrounds(method, tmp_path):
    import torch

    from dcustom.adapters.load import load_adapter
    from dcustom.data import DataConfig
    from dcustom.models import load_pipeline
    from dcustom.trainers.adapter.config import BoftTrainConfig, LoraTrainConfig, OftTrainConfig
    from dcustom.trainers.adapter.trainer import train
    from dcustom.trainers.loop import LoopConfig

    torch.manual_seed(0)
    folder, phrase = _subject_folder(tmp_path / "subject")
    settings = dict(SETTINGS[method])
    loop = LoopConfig(output_dir=str(tmp_path / "run"), batch_size=4, device="cpu", checkpoint_every=0,
                      warmup_steps=20, **settings.pop("train"))
    cls = {"lora": LoraTrainConfig, "oft": OftTrainConfig, "boft": BoftTrainConfig}[method]
    cfg = cls(model="builtin:toy", data=DataConfig(images=str(folder), instance_prompt=f"a {phrase}"), train=loop,
              validation_prompts=[f"a {phrase} on a dotted background"], **settings)
    base = load_pipeline("builtin:toy", device="cpu")
    base_acc = _base_prompt_accuracy(base)
    start = time.perf_counter()
    result = train(cfg, progress=False)
    wall = time.perf_counter() - start
    adapted = load_pipeline("builtin:toy", device="cpu")
    load_adapter(adapted, result.files[0])
    scores = _subject_scores(adapted, phrase)
    adapted_acc = _base_prompt_accuracy(adapted)
    figures = {"steps": loop.steps, "cpu_wall_s": round(wall, 1), **scores, "base_prompt_accuracy": base_acc,
               "adapted_prompt_accuracy": adapted_acc}
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    existing = json.loads(REPORT.read_text()) if REPORT.is_file() else {}
    existing[method] = figures
    REPORT.write_text(json.dumps(existing, indent=2))
    assert scores["subject"] >= 0.80, figures
    assert scores["background"] >= 0.85, figures
    assert adapted_acc >= 0.90 * base_acc, figures
