"""Textual inversion on builtin:toy, judged by J_eval (issue 16): the shipped configs/textual_inversion.yaml,
changed only in paths and the new word (<pine>, initialised from its class word), trained on 5 renders of the
held-out pine and drawing it on the backgrounds it never saw.

`dcustom eval subject --methods textual_inversion` measured on 24 images: pine 1.00 (background 1.00,
unrelated ratio 1.00), robot and ladybug 0.00 (a new word cannot add colours and details the UNet never
drew; docs/results.md). This re-check asserts the pine with margins on 12 images. Pivotal tuning is not
measured yet and has no re-check.
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


def test_textual_inversion_draws_the_pine_on_unseen_backgrounds(tmp_path):
    from dcustom.toyworld.subject_eval import evaluate_subject_method

    figures = evaluate_subject_method("textual_inversion", "pine", tmp_path, CONFIGS, seeds=range(4),
                                      log=lambda _m: None, overrides=["train.checkpoint_every=0"])
    last = figures["last"]
    assert figures["prompt_thing"] == "<pine>" and last["step"] == 1000, figures
    assert last["subject"] >= 0.75, figures  # 1.00 measured on 24 images
    assert last["background"] >= 0.85, figures  # 1.00
    assert last["unrelated_ratio"] >= 0.9, figures  # 1.00
