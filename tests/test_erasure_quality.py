"""Erasure quality on builtin:toy, judged by J_eval: one figure per method re-checked with a margin.

The full protocol (`dcustom eval erasure-methods`, docs/results.md "Concept erasure") erases the colour
purple with UCE, ESD-x and ESD-u on the grammar templates of `dcustom.trainers.erasure.suite` and judges
8 prompts per group x 4 seeds. Here UCE is rerun with the same settings and judged on a smaller set
(4 prompts per group, 4 seeds), with thresholds between the measured figures and the issue's bars, and so is
ESD-x (its 1000 training steps take about 400 s on one thread). ESD-u misses the efficacy bar on the toy
model (results.md says what was tried), so it has no quality test. Runs only where the toy model is installed.
"""

import pytest
import torch

from dcustom.models import toy_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install "
                       "(dcustom.models.toy_model_dir() is None); train it with 'dcustom toyworld train-base'"),
]


def _erase_and_judge(tmp_path, algorithm: str) -> dict:
    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.evaluate import evaluate_erasure
    from dcustom.trainers.erasure.run import run
    from dcustom.trainers.erasure.suite import method_config

    torch.manual_seed(0)
    cfg = method_config(algorithm, ["purple"], str(tmp_path / algorithm))
    result = run(cfg, progress=False)
    report = evaluate_erasure(load_pipeline("builtin:toy"), result.pipe, "purple", seeds=range(4), per_group=4,
                              preservation=4, attack_prompts=0)
    summary = report["summary"]
    print(algorithm, {k: summary[k] for k in ("efficacy", "generality", "others", "neighbours")})
    return summary


def test_uce_erases_purple_on_the_toy_model(tmp_path):
    # Measured at full size (32 images per group, docs/results.md): own 0.000, synonyms 0.000, others and
    # neighbours kept 1.000 of base. Here 16 images per group: one surviving image is allowed on each.
    s = _erase_and_judge(tmp_path, "uce")
    assert s["efficacy"]["base"] >= 0.8, s  # the base model draws purple: there is something to erase
    assert s["efficacy"]["erased"] <= 0.07, s
    assert s["generality"]["erased"] <= 0.07, s
    assert (s["others"]["ratio"] or 0) >= 0.9, s
    assert (s["neighbours"]["ratio"] or 0) >= 0.85, s


def test_esd_x_erases_purple_on_the_toy_model(tmp_path):
    # Measured at full size (docs/results.md): own 0.000, synonyms 0.000, others and neighbours 1.000 of base,
    # prompt accuracy kept. Here 16 images per group: two surviving images are allowed on each.
    s = _erase_and_judge(tmp_path, "esd_x")
    assert s["efficacy"]["base"] >= 0.8, s
    assert s["efficacy"]["erased"] <= 0.13, s
    assert s["generality"]["erased"] <= 0.13, s
    assert (s["others"]["ratio"] or 0) >= 0.9, s
    assert (s["neighbours"]["ratio"] or 0) >= 0.85, s
