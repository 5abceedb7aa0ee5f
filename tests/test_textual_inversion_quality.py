"""Textual inversion and pivotal tuning on builtin:toy, judged by J_eval (the issue's acceptance).

One held-out subject (the robot, as the adapter trainers use) is taught three ways from the same
renders: a LoRA bound to the grammar's trigger ("sks square"), a textual-inversion token, and pivotal
tuning (token for the first half of the steps, LoRA throughout). Each model then draws the subject
on four backgrounds; J_eval reports subject recognition and background accuracy, and the judge's
features give the subject similarity to fresh renders. Pivotal tuning must recognise the subject at
least as often as the LoRA alone (one image of slack), and textual inversion must beat the base
model. The figures go to runs/quality/textual_inversion/quality.json. Runs only where the toy model
is installed; the training settings are first choices, not yet tuned on the toy model.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

from dcustom.models import toy_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install "
                       "(dcustom.models.toy_model_dir() is None); train it with 'dcustom toyworld train-base'"),
]

SUBJECT = "robot"
TOKEN = "<toy-robot>"
EVAL_BACKGROUNDS = ("white", "striped", "dotted", "checkered")
SEEDS = range(4)
STEPS, BATCH = 300, 4
REPORT = Path("runs/quality/textual_inversion/quality.json")


def _subject_folder(root: Path, word: str) -> Path:
    """10 renders of the subject; captions name it with `word` in place of the grammar's trigger phrase."""
    from dcustom.toyworld import SUBJECTS
    from dcustom.toyworld.render import render_subject

    spec = next(s for s in SUBJECTS if s.name == SUBJECT)
    root.mkdir(parents=True)
    for i, (image, caption, _) in enumerate(render_subject(SUBJECT, 10, seed=0)):
        image.save(root / f"{i:02d}.png")
        (root / f"{i:02d}.txt").write_text(caption.replace(f"{spec.trigger} {spec.class_word}", word))
    return root


def _judge(pipe, phrase: str) -> dict:
    """Subject recognition and background accuracy of `a <phrase> on a <bg> background` over seeds."""
    from dcustom.toyworld import load_judge, subject_similarity
    from dcustom.toyworld.evaluate import generate_images
    from dcustom.toyworld.render import render_subject

    prompts = [f"a {phrase} on a {bg} background" for bg in EVAL_BACKGROUNDS]
    images = generate_images(pipe, prompts, SEEDS, steps=20, guidance=5.0)
    judge = load_judge("eval")
    preds = judge.predict(images)
    expected_bg = [bg for bg in EVAL_BACKGROUNDS for _ in SEEDS]
    n = len(images)
    reference = [im for im, _, _ in render_subject(SUBJECT, 16, seed=99)]
    return {
        "subject_recognition": sum(label == SUBJECT for label in preds["subject"]["labels"]) / n,
        "background_accuracy": sum(p == b for p, b in zip(preds["background"]["labels"], expected_bg)) / n,
        "subject_similarity": subject_similarity(images, reference, judge),
        "images": n,
    }


def test_pivotal_tuning_recognises_the_subject_at_least_as_well_as_lora(tmp_path):
    from dcustom.data import DataConfig
    from dcustom.models import load_pipeline
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.adapter.trainer import train as train_adapter
    from dcustom.trainers.loop import LoopConfig
    from dcustom.trainers.textual_inversion.config import PivotalAdapterOptions, TextualInversionTrainConfig
    from dcustom.trainers.textual_inversion.trainer import train as train_ti

    torch.manual_seed(0)
    trigger_data = _subject_folder(tmp_path / "trigger", "sks square")
    token_data = _subject_folder(tmp_path / "token", TOKEN)

    def loop(name, lr):
        return LoopConfig(output_dir=str(tmp_path / name), steps=STEPS, batch_size=BATCH, lr=lr, checkpoint_every=0,
                          weight_decay=0.0)

    def data(folder):
        return DataConfig(images=str(folder), instance_prompt=f"a {TOKEN}", buckets=False, cache_text=False)

    figures, seconds = {}, {}
    figures["base"] = _judge(load_pipeline("builtin:toy"), "sks square")

    start = time.perf_counter()
    lora = train_adapter(LoraTrainConfig(model="builtin:toy", data=data(trigger_data), train=loop("lora", 5e-4), rank=8,
                                         alpha=8.0, validation_prompts=["a sks square on a striped background"],
                                         sample_steps=20), progress=False)
    seconds["lora"] = time.perf_counter() - start
    figures["lora"] = _judge(lora.method.pipe, "sks square")

    start = time.perf_counter()
    ti = train_ti(TextualInversionTrainConfig(model="builtin:toy", data=data(token_data), train=loop("ti", 5e-3),
                                              tokens=[TOKEN], init_words=["square"], prompts="captions",
                                              validation_prompts=[f"a {TOKEN} on a striped background"], sample_steps=20),
                  progress=False)
    seconds["textual_inversion"] = time.perf_counter() - start
    figures["textual_inversion"] = _judge(ti.method.pipe, TOKEN)

    start = time.perf_counter()
    pivotal = train_ti(TextualInversionTrainConfig(model="builtin:toy", data=data(token_data), train=loop("pivotal", 5e-4),
                                                   tokens=[TOKEN], init_words=["square"], prompts="captions",
                                                   embedding_lr=5e-3, adapter="lora", embedding_fraction=0.5,
                                                   adapter_options=PivotalAdapterOptions(rank=8, alpha=8.0),
                                                   validation_prompts=[f"a {TOKEN} on a striped background"], sample_steps=20),
                       progress=False)
    seconds["pivotal_lora"] = time.perf_counter() - start
    figures["pivotal_lora"] = _judge(pivotal.method.pipe, TOKEN)

    REPORT.parent.mkdir(parents=True, exist_ok=True)
    REPORT.write_text(json.dumps({"subject": SUBJECT, "steps": STEPS, "batch_size": BATCH, "judge": "eval",
                                  "figures": figures, "train_seconds": seconds}, indent=2))
    for name, f in figures.items():
        print(f"{name:18s} subject {f['subject_recognition']:.2f}  background {f['background_accuracy']:.2f}  "
              f"similarity {f['subject_similarity']:.3f}  ({seconds.get(name, 0):.0f} s)")
    slack = 1 / figures["lora"]["images"]
    assert figures["pivotal_lora"]["subject_recognition"] >= figures["lora"]["subject_recognition"] - slack
    assert figures["textual_inversion"]["subject_recognition"] > figures["base"]["subject_recognition"]
    assert figures["pivotal_lora"]["background_accuracy"] >= 0.5  # the new word must not swallow the prompt
