"""Subject fidelity per validation step and the best checkpoint (trainers/fidelity.py) on tiny pipelines:
the toy judges score every sample step, the best-scoring step's adapter lands in best/, a run without a
judge says why once, and DINOv2 / CLIP feature judges work from a local folder."""

from __future__ import annotations

import json

import pytest
import torch
from image_helpers import write_noise_images

from dcustom.errors import DcustomError
from dcustom.trainers.fidelity import FidelityConfig, FeatureJudge, make_judge


def _cfg(images, out, steps=3, **fidelity):
    from dcustom.data import DataConfig
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.loop import LoopConfig

    loop = LoopConfig(output_dir=str(out), steps=steps, batch_size=2, lr=1e-2, device="cpu", seed=3, sample_every=1,
                      checkpoint_every=1)
    return LoraTrainConfig(model="tiny:sd15", rank=4, train=loop, validation_prompts=["a sks square"], sample_steps=2,
                           data=DataConfig(images=str(images), instance_prompt="a photo of a sks square", resolution=32),
                           fidelity=FidelityConfig(**{"steps": 2, "seeds": 1, **fidelity}))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("subject"), [(32, 32), (32, 32)], seed=0)


def _events(run_dir):
    return [json.loads(line) for line in (run_dir / "events.jsonl").read_text().splitlines()]


def test_toy_judge_scores_every_sample_step_and_keeps_the_best_adapter(images, tmp_path):
    from safetensors.torch import load_file

    from dcustom.trainers.adapter.trainer import train

    result = train(_cfg(images, tmp_path / "run", judge="toy"), progress=False)
    vals = [e for e in _events(result.run_dir) if e["event"] == "validation"]
    assert [v["step"] for v in vals] == [1, 2, 3]
    for v in vals:
        assert v["judge"] == "toy" and v["subject"] == "robot" and v["images"] == 3 + 6  # sks = the robot's trigger; + KEPT_PROMPTS
        assert {"subject_train", "prompt_train", "both_train", "subject_eval", "prompt_eval", "both_eval", "kept_train",
                "kept_eval"} <= set(v)
        assert 0.0 <= v["kept_train_p"] <= 1.0 and 0.0 <= v["kept_eval_p"] <= 1.0
        # J_train selects by its probability of the subject where the background is right; J_eval only reports
        assert 0.0 <= v["select"] <= min(v["prompt_train"], v["kept_train"])
        assert v["select"] > 0 or v["both_train"] == 0 or v["kept_train"] == 0
    best = json.loads((result.run_dir / "best" / "best.json").read_text())
    first_best = max(vals, key=lambda v: (v["select"], -v["step"]))  # the earliest step with the top score
    assert best["step"] == first_best["step"] == vals[-1]["best_step"]
    kept = load_file(str(result.run_dir / "best" / "pytorch_lora_weights.safetensors"))
    ckpt = next((result.run_dir / "checkpoints" / f"step-{best['step']}").rglob("pytorch_lora_weights.safetensors"),
                None) if best["step"] < 3 else result.run_dir / "pytorch_lora_weights.safetensors"
    if ckpt is not None:  # the kept file is the adapter of that step, not the last one
        ref = load_file(str(ckpt))
        assert kept.keys() == ref.keys() and all(torch.equal(kept[k], ref[k]) for k in kept)
    assert (result.run_dir / "best" / "lora_kohya.safetensors").is_file()
    assert (result.run_dir / "validation.png").stat().st_size > 1000


def test_best_follows_the_judge_and_survives_resume(images, tmp_path, monkeypatch):
    from dcustom.trainers.adapter.trainer import AdapterMethod, train

    scripted = iter([0.2, 0.7, 0.4, 0.9])

    class Scripted:  # a judge whose scores are known in advance: which step is best is then certain
        def measure(self, pipe, size=None):
            return {"judge": "scripted", "select": next(scripted)}

    monkeypatch.setattr(AdapterMethod, "_make_judge", lambda self: setattr(self, "judge", Scripted()))
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 3  # noqa: E731
    train(_cfg(images, tmp_path / "run", steps=4), on_event=seen.append, should_stop=stop, progress=False)
    assert json.loads((tmp_path / "run" / "best" / "best.json").read_text())["step"] == 2
    cfg = _cfg(images, tmp_path / "run", steps=4)
    cfg.train.resume = "latest"
    train(cfg, progress=False)  # step 4 scores 0.9 > the restored best 0.7
    vals = [e for e in _events(tmp_path / "run") if e["event"] == "validation"]
    assert [(v["step"], v["best_step"]) for v in vals] == [(1, 1), (2, 2), (3, 2), (4, 4)]


def test_without_a_judge_the_run_says_why_once(images, tmp_path):
    from dcustom.trainers.adapter.trainer import train

    result = train(_cfg(images, tmp_path / "run", judge="auto"), progress=False)  # tiny:sd15 is not builtin:toy
    vals = [e for e in _events(result.run_dir) if e["event"] == "validation"]
    assert len(vals) == 1 and vals[0]["judge"] == "none" and "nothing is downloaded" in vals[0]["reason"]
    assert not (result.run_dir / "best").exists()


def test_judge_choice_errors_are_one_sentence():
    with pytest.raises(DcustomError, match="no subject is known: set fidelity.subject"):
        make_judge(FidelityConfig(judge="toy"), "builtin:toy", ["a photo of a dog"], [], [])
    with pytest.raises(DcustomError, match="fidelity.feature_model is not set"):
        make_judge(FidelityConfig(judge="features"), "tiny:sd15", [], [], ["x"])
    with pytest.raises(DcustomError, match="is not a local model folder"):
        make_judge(FidelityConfig(judge="features", feature_model="/nonexistent"), "tiny:sd15", [], [], ["x"])
    judge, _ = make_judge(FidelityConfig(), "builtin:toy", ["a zwx circle on grass"], [], [])
    assert judge.subject == "ladybug" and all("zwx circle" in p for p in judge.prompts)


def _tiny_feature_models(tmp_path):
    from transformers import CLIPConfig, CLIPModel, Dinov2Config, Dinov2Model

    from dcustom.tiny import _tokenizer

    torch.manual_seed(0)
    dino = tmp_path / "dino"
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=224, patch_size=56)).save_pretrained(dino)
    clip = tmp_path / "clip"
    tok = _tokenizer()
    tok.save_pretrained(clip)
    CLIPModel(CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=77),
        vision_config=dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                           image_size=32, patch_size=16),
        projection_dim=16)).save_pretrained(clip)
    return dino, clip


def test_dinov2_and_clip_feature_judges_from_a_local_folder(tmp_path, tiny_pipe):
    from PIL import Image

    dino, clip = _tiny_feature_models(tmp_path)
    refs = [Image.new("RGB", (32, 32), (200, 30, 30)), Image.new("RGB", (32, 32), (30, 200, 30))]
    for folder, keys in ((dino, {"subject_fidelity"}), (clip, {"subject_fidelity", "prompt_adherence"})):
        judge = FeatureJudge(FidelityConfig(feature_model=str(folder), seeds=1, steps=2), refs, ["a photo of a cat"])
        scores = judge.measure(tiny_pipe(), size=32)
        assert keys <= set(scores) and scores["images"] == 1
        assert all(-1.0 <= scores[k] <= 1.0 for k in keys) and scores["select"] == scores["subject_fidelity"]
        assert torch.allclose(judge._embed(refs), judge.reference)  # same images, same embedding: deterministic
        same = judge._embed(refs[:1]) @ judge.reference[:1].T
        assert same.item() == pytest.approx(1.0, abs=1e-5)  # an image is most similar to itself


def test_validation_images_do_not_depend_on_the_batch_size():
    """draw() batches prompts x seeds; every image keeps its own seed, so batching changes no image."""
    import numpy as np

    from dcustom.models import load_pipeline
    from dcustom.trainers.fidelity import draw

    pipe = load_pipeline("tiny:sd15", device="cpu")
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a sks square", "a red circle", "a blue star"]
    one = draw(pipe, prompts, 2, 2, 5.0, size=32, batch_size=1)
    batched = draw(pipe, prompts, 2, 2, 5.0, size=32, batch_size=4)
    assert len(one) == len(batched) == 6
    for a, b in zip(one, batched):
        assert np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max() <= 1
    assert np.abs(np.asarray(one[0], dtype=np.int16) - np.asarray(one[1], dtype=np.int16)).max() > 1  # seeds differ
