"""A subject LoRA on builtin:toy, judged by J_eval (issue 16): the shipped configs/lora.yaml, changed only in
paths, trigger and length, trained on 5 renders of the held-out pine (white, gray, striped backgrounds)
and drawing it on the backgrounds it never saw (black, dotted, checkered).

The full measurement (3 subjects x LoRA/OFT/BOFT, 24 images each, best vs last) is `dcustom eval subject`,
recorded in docs/results.md. This re-check trains to step 1000, the last step of that run (J_eval: subject 1.00,
background 1.00, unrelated-prompt ratio 1.00 on 24 images), and asserts with margins on 12 images. The robot
and the ladybug pass only at one step each (0.92 at the robot's best, 0.83 at the ladybug's last), too narrow for a
re-check; OFT and BOFT miss the issue's bars today and have no re-check.
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


def test_lora_draws_the_pine_on_unseen_backgrounds(tmp_path):
    from dcustom.toyworld.subject_eval import evaluate_subject_method

    figures = evaluate_subject_method("lora", "pine", tmp_path, CONFIGS, seeds=range(4), log=lambda _m: None,
                                      overrides=["train.steps=1000", "train.sample_every=0", "fidelity.keep_best=false",
                                                 "train.checkpoint_every=0", "write_kohya=false"])
    last = figures["last"]
    assert figures["chosen"] == "last" and last["step"] == 1000, figures
    assert last["subject"] >= 0.8, figures  # 1.00 measured on 24 images
    assert last["background"] >= 0.85, figures  # 1.00
    assert last["unrelated_ratio"] >= 0.85, figures  # 1.00
