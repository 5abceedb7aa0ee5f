"""Erasure quality on builtin:toy, judged by J_eval (the issue's acceptance), UCE and ESD-x side by side.

Erase the shape "star": J_eval must find it in <= 5 % of images for its own prompts and <= 10 % for
synonym prompts, while the other shapes keep >= 95 % of their base accuracy and the neighbours
(cross, diamond) >= 90 %. Both methods' figures, run times and the robustness probe's success rate
are written to runs/quality/erasure_side_by_side.json (each method's full report and grid beside it).
Runs only where the toy model is installed.
"""

import json
import time
from pathlib import Path

import pytest
from quality_gate import PENDING
import torch

from dcustom.models import toy_model_dir

pytestmark = [
    PENDING,
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install "
                       "(dcustom.models.toy_model_dir() is None); train it with 'dcustom toyworld train-base'"),
]

OUT = Path("runs/quality")
SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
TEMPLATES = ["{}", "a {}", "a red {}", "a blue {}", "a {} on a white background", "a picture of a {}"]
SETTINGS = {
    "uce": {"uce": {"lam": 0.5, "tokens": "concept_and_after"}},
    "esd_x": {"esd": {"ddim_steps": 20, "negative_guidance": 1.0, "train_mode": "lora"}, "lora": {"rank": 8},
              "train": {"steps": 200, "lr": 5e-4, "checkpoint_every": 0}},
}


def test_erase_a_shape_on_the_toy_model(tmp_path):
    from dcustom.config import from_dict
    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.config import ErasureTrainConfig
    from dcustom.trainers.erasure.evaluate import evaluate_erasure
    from dcustom.trainers.erasure.run import run

    base = load_pipeline("builtin:toy")
    side_by_side, failures = {}, []
    for algorithm, settings in SETTINGS.items():
        torch.manual_seed(0)
        data = {"model": "builtin:toy", "algorithm": algorithm, "erase": ["star"], "anchors": [""],
                "preserve": SHAPES, "templates": TEMPLATES, **{k: dict(v) for k, v in settings.items()}}
        data["train"] = {**data.get("train", {}), "output_dir": str(tmp_path / algorithm)}
        start = time.perf_counter()
        result = run(from_dict(ErasureTrainConfig, data), progress=False)
        seconds = time.perf_counter() - start
        report = evaluate_erasure(base, result.pipe, "star", seeds=range(6), per_group=8, preservation=16,
                                  attack_prompts=2, attack_steps=50, out_dir=OUT / f"erasure_{algorithm}")
        s = report["summary"]
        side_by_side[algorithm] = {"seconds": round(seconds, 2), **s}
        checks = {"efficacy <= 0.05": s["efficacy"]["erased"] <= 0.05,
                  "generality <= 0.10": s["generality"]["erased"] <= 0.10,
                  "others ratio >= 0.95": (s["others"]["ratio"] or 0) >= 0.95,
                  "neighbours ratio >= 0.90": (s["neighbours"]["ratio"] or 0) >= 0.90}
        failures += [f"{algorithm}: {name} (got {s})" for name, ok in checks.items() if not ok]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "erasure_side_by_side.json").write_text(json.dumps(side_by_side, indent=2))
    print(json.dumps(side_by_side, indent=2))
    assert not failures, "\n".join(failures)
