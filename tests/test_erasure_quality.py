"""Erasure quality on builtin:toy, judged by J_eval (the issue's acceptance), UCE and ESD-x side by side.

Erase the shape "star": J_eval must find it in <= 5 % of images for its own prompts and <= 10 % for
synonym prompts, while the other shapes keep >= 95 % of their base accuracy and the neighbours
(cross, diamond) >= 90 %. Figures, run times and the robustness probe's success rate are written to
runs/quality/erasure_<algorithm>/erasure.json. Runs only where the toy model is installed.
"""

import time

import pytest
import torch

from dcustom.models import toy_model_dir

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install "
                       "(dcustom.models.toy_model_dir() is None); train it with 'dcustom toyworld train-base'"),
]

SHAPES = ["circle", "square", "triangle", "cross", "diamond"]
SETTINGS = {
    "uce": {"uce": {"lam": 0.5, "tokens": "concept_and_after"}},
    "esd_x": {"esd": {"ddim_steps": 20, "negative_guidance": 1.0, "train_mode": "lora", "lora_rank": 8},
              "train": {"steps": 300, "lr": 5e-4, "checkpoint_every": 0}},
}


@pytest.mark.parametrize("algorithm", list(SETTINGS))
def test_erase_a_shape_on_the_toy_model(tmp_path, algorithm):
    from dcustom.config import from_dict
    from dcustom.models import load_pipeline
    from dcustom.trainers.erasure.config import ErasureTrainConfig
    from dcustom.trainers.erasure.evaluate import evaluate_erasure
    from dcustom.trainers.erasure.run import run

    torch.manual_seed(0)
    data = {"model": "builtin:toy", "algorithm": algorithm, "erase": ["star"], "anchors": [""], "preserve": SHAPES,
            "templates": ["{}", "a {}", "a red {}", "a blue {}", "a {} on a white background", "a picture of a {}"]}
    data.update({k: dict(v) for k, v in SETTINGS[algorithm].items()})
    data.setdefault("train", {})
    data["train"].update(output_dir=str(tmp_path / "run"))
    start = time.perf_counter()
    result = run(from_dict(ErasureTrainConfig, data), progress=False)
    seconds = time.perf_counter() - start
    report = evaluate_erasure(load_pipeline("builtin:toy"), result.pipe, "star", seeds=range(8), per_group=8,
                              preservation=24, attack_prompts=2, attack_steps=50,
                              out_dir=f"runs/quality/erasure_{algorithm}")
    s = report["summary"]
    print(f"{algorithm}: {seconds:.1f} s, efficacy {s['efficacy']}, generality {s['generality']}, others {s['others']}, "
          f"neighbours {s['neighbours']}, toy-FID vs base {s['preservation_toy_fid_vs_base']:.3f}, "
          f"attack success {s['attack_success_rate']}")
    assert s["efficacy"]["erased"] <= 0.05
    assert s["generality"]["erased"] <= 0.10
    assert s["others"]["ratio"] >= 0.95
    assert s["neighbours"]["ratio"] >= 0.90
