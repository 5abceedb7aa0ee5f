"""The shipped judges: accurate on fresh renders, small, independent, differentiable; the metrics on their features."""

import json
import subprocess
import sys

import pytest
import torch

from dcustom.toyworld.judges import RECIPES, head_accuracy, load_judge, render_dataset, weights_path

FRESH_SEED = 31_337  # never used to train either judge (their data seeds are 100_000 and 900_000)


@pytest.fixture(scope="module")
def fresh():
    return render_dataset(400, FRESH_SEED)


@pytest.mark.parametrize("kind", ["train", "eval"])
def test_judge_is_accurate_on_fresh_renders(kind, fresh):
    x, y = fresh
    acc = head_accuracy(load_judge(kind), x, y)
    assert all(a >= 0.96 for a in acc.values()), acc  # acceptance is >= 98 % on 2000 renders; margin for 400


def test_judges_are_small_and_independent():
    from safetensors import safe_open

    metas = {}
    for kind in ("train", "eval"):
        path = weights_path(kind)
        assert path.stat().st_size < 1_000_000
        with safe_open(str(path), framework="pt") as f:
            metas[kind] = f.metadata()
        assert all(v >= 0.98 for v in json.loads(metas[kind]["fresh_accuracy"]).values())
    assert metas["train"]["arch"] != metas["eval"]["arch"]
    assert RECIPES["train"].seed != RECIPES["eval"].seed and RECIPES["train"].data_seed != RECIPES["eval"].data_seed


def test_judges_disagree_on_generated_images(tiny_pipe):
    pipe = tiny_pipe("sd15")
    images = pipe(["a red circle on a white background"] * 8, num_inference_steps=2,
                  generator=torch.Generator().manual_seed(0)).images
    a, b = load_judge("train").predict(images), load_judge("eval").predict(images)
    disagreements = sum(a[h]["labels"][i] != b[h]["labels"][i] for h in a for i in range(len(images)))
    assert disagreements > 0


def test_predict_and_features_shapes_and_gradients():
    from dcustom.toyworld.render import render_attributes

    judge = load_judge("eval")
    image = render_attributes("star", "red", "striped")
    out = judge.predict([image, image.resize((128, 128))])
    assert out["shape"]["labels"] == ["star", "star"] and out["colour"]["labels"] == ["red", "red"]
    assert out["background"]["labels"][0] == "striped" and out["shape"]["probs"].shape == (2, 6)
    assert judge.features([image]).shape == (1, 96) and load_judge("train").features(image).shape == (1, 64)
    x = torch.rand(2, 3, 64, 64, requires_grad=True)  # usable as a differentiable reward
    judge(x)["shape"].logsumexp(-1).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(Exception, match="judge 'best' is not known; accepted: train, eval."):
        load_judge("best")


def test_metrics_on_judge_features():
    from dcustom.toyworld import render_subject, subject_similarity, toy_fid
    from dcustom.toyworld.render import render_samples

    robot_a = [s[0] for s in render_subject("robot", 12, seed=1)]
    robot_b = [s[0] for s in render_subject("robot", 12, seed=2)]
    bug = [s[0] for s in render_subject("ladybug", 12, seed=3)]
    assert subject_similarity(robot_a, robot_b) > subject_similarity(robot_a, bug) + 0.1
    base_a = [s[0] for s in render_samples(64, 5)]
    base_b = [s[0] for s in render_samples(64, 6)]
    noise = [torch.rand(3, 64, 64) for _ in range(64)]
    same, other = toy_fid(base_a, base_b), toy_fid(base_a, torch.stack(noise))
    assert toy_fid(base_a, base_a) < 1e-6 and same * 3 < other


def test_toyworld_import_is_torch_free():
    code = "import dcustom.toyworld as t; t.render_samples; t.HEADS\nimport sys\nassert 'torch' not in sys.modules"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_cli_train_judges_writes_a_loadable_judge(cli, tmp_path):
    code, out, err = cli("toyworld", "train-judges", "--which", "eval", "--images", "128", "--epochs", "1",
                         "--check-images", "32", "--output-dir", tmp_path)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert set(result["fresh_accuracy"]) == {"shape", "colour", "background", "subject", "style"}
    judge = load_judge("eval", path=tmp_path / "judge_eval.safetensors")
    assert judge.arch == RECIPES["eval"].arch and json.loads(judge.meta["fresh_accuracy"]) == result["fresh_accuracy"]
    assert not list(tmp_path.glob("*.tmp"))
