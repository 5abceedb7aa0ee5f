"""A subject LoRA on builtin:toy, judged by J_eval (issue 16): the shipped configs/lora.yaml, changed only in
paths, trigger and length, trained on 5 renders of the held-out robot (white, gray, striped backgrounds)
and drawing it on the backgrounds it never saw (black, dotted, checkered).

The full measurement (3 subjects x LoRA/OFT/BOFT, 24 images each, best vs last) is `dcustom eval subject`,
recorded in docs/results.md. This re-check trains to step 700, the step best/ keeps in that run
(J_eval: subject 0.88, background 1.00, unrelated-prompt ratio 0.87 on 24 images), and asserts with
margins on 12 images. OFT, BOFT and the other subjects miss the issue's bars today and have no re-check.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from dcustom.models import toy_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install"),
]

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def test_lora_draws_the_robot_on_unseen_backgrounds(tmp_path):
    from dcustom.toyworld.subject_eval import evaluate_subject_method

    figures = evaluate_subject_method("lora", "robot", tmp_path, CONFIGS, seeds=range(4), log=lambda _m: None,
                                      overrides=["train.steps=700", "train.sample_every=0", "fidelity.keep_best=false",
                                                 "train.checkpoint_every=0", "write_kohya=false"])
    last = figures["last"]
    assert figures["chosen"] == "last" and last["step"] == 700, figures
    assert last["subject"] >= 0.6, figures  # 0.88 measured on 24 images
    assert last["background"] >= 0.85, figures  # 1.00
    assert last["unrelated_ratio"] >= 0.75, figures  # 0.87
