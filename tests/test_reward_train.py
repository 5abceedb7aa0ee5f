"""`dcustom train reward` end to end on tiny:sd15 with the colourfulness reward, early stopping,
and the builtin:toy quality checks (run only where the toy model is shipped)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dcustom.cli import app
from dcustom.models import toy_model_dir

# configs/reward.yaml is the make-it-red task on builtin:toy; these tests put the tiny pipeline and colourfulness back.
TINY = ["model=tiny:sd15", "reward.name=colourfulness", "reward.options={}", "prompts=[a red circle on a white background]",
        "policy.k=1", "train.steps=100"]
SMALL = TINY + ["sampler.steps=2", "sampler.height=32", "sampler.width=32", "train.device=cpu", "train.checkpoint_every=0",
         "eval.images_per_prompt=2", "eval.lora_scales=[0,1]"]


def _train(tmp_path, *overrides):
    args = ["train", "reward", "--config", "configs/reward.yaml", "--set", f"train.output_dir={tmp_path}"]
    for o in SMALL + list(overrides):
        args += ["--set", o]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    return json.loads((tmp_path / "reward_report.json").read_text()), result.output


def test_cli_run_raises_colourfulness_and_writes_a_loadable_lora(tmp_path):
    report, output = _train(tmp_path, "train.steps=6", "train.sample_every=3", "policy.name=draft", "train.lr=1e-2")
    evals = report["evaluations"]
    assert [e["step"] for e in evals] == [0, 3, 6]
    # measured on this config: 73.49 -> 74.69 (train reward) and 73.48 -> 74.70 (uint8 oracle)
    assert evals[-1]["reward_train"] > evals[0]["reward_train"] + 0.3
    assert evals[-1]["reward_eval"] > evals[0]["reward_eval"] + 0.3
    assert report["eval_reward"] == "colourfulness_oracle" and report["hacking_gap"] is not None
    assert [c["scale"] for c in report["lora_scale_curve"]] == [0, 1]
    assert report["lora_scale_curve"][0]["reward_train"] == pytest.approx(evals[0]["reward_train"], abs=1e-3)
    assert all(b["grad_calls"] == 2 for b in report["batch_rewards"])  # full chain at 2 steps
    assert (tmp_path / "reward_report.png").is_file() or "matplotlib" not in str(report)
    events = [json.loads(line) for line in (tmp_path / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "end" and events[-1]["status"] == "finished"
    from dcustom.models import load_pipeline

    pipe = load_pipeline("tiny:sd15", device="cpu", dtype="fp32")
    pipe.load_lora_weights(str(tmp_path))
    assert "finished at step 6" in output


def test_early_stopping_keeps_the_best_lora(tmp_path):
    # A negative coefficient makes training *lower* the reward, so the first evaluation after
    # step 0 is worse and patience 1 stops the run; the kept LoRA is the best one: step 0 (B = 0).
    report, _ = _train(tmp_path, "train.steps=4", "train.sample_every=1", "reward.coeff=-1", "train.lr=1e-2",
                       "eval.early_stop_patience=1", "policy.name=draft", "preflight_gradient_check=false",
                       "eval.lora_scales=[]")
    assert report["early_stopped"] and report["best_step"] == 0
    assert [e["step"] for e in report["evaluations"]] == [0, 1]
    assert report["evaluations"][1]["reward_train"] < report["evaluations"][0]["reward_train"]
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / "pytorch_lora_weights.safetensors"))
    assert all(float(v.abs().max()) == 0.0 for k, v in weights.items() if "lora_B" in k or "lora.up" in k)


def test_resume_continues_exactly_with_a_random_policy(tmp_path):
    import shutil

    from safetensors.torch import load_file

    common = ["train.steps=2", "train.checkpoint_every=1", "train.sample_every=0", "policy.name=alignprop_step",
              "train.lr=1e-2", "preflight_gradient_check=false", "eval.lora_scales=[]", "sampler.eta=1.0"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _train(straight, *common)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoints" / "step-1", resumed / "checkpoints" / "step-1")
    report, _ = _train(resumed, *common, "train.resume=latest")
    a = load_file(str(straight / "pytorch_lora_weights.safetensors"))
    b = load_file(str(resumed / "pytorch_lora_weights.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) == 0.0
    assert [e["step"] for e in report["evaluations"]] == [0, 2]  # step 0 came back with the checkpoint
    assert [b["step"] for b in report["batch_rewards"]] == [0, 1]


def test_bad_config_values_are_one_clear_sentence(tmp_path):
    result = CliRunner().invoke(app, ["train", "reward", "--set", "policy.name=draft_q"])
    assert result.exit_code == 2
    assert "policy.name 'draft_q' is not known; accepted: draft, draft_k, draft_lv" in result.output
    result = CliRunner().invoke(app, ["train", "reward", "--set", "prompt_file=/nonexistent.txt",
                                      "--set", f"train.output_dir={tmp_path}", "--set", "train.device=cpu"])
    assert result.exit_code == 2 and "prompt_file: '/nonexistent.txt' does not exist" in result.output
    assert not (tmp_path / "config.yaml").exists()


TOY = toy_model_dir()
needs_toy = pytest.mark.skipif(TOY is None, reason="builtin:toy is not shipped in this install (no toy model weights)")


@pytest.mark.slow
@needs_toy
def test_toy_make_it_red_raises_j_eval_and_keeps_unrelated_prompts(tmp_path):
    """configs/reward.yaml (make it red on builtin:toy, DRaFT-K K=2) cut to 20 updates: J_eval's reward must rise,
    beat best-of-N from the base model at the same number of reward calls, and J_eval prompt accuracy on
    unrelated prompts must stay >= 90 % of base. Measured at 20 updates (1 thread, 54.5 s CPU): J_eval -4.12 -> -0.075,
    best-of-13 -3.32, red in 12/12 images, unrelated prompts 0.972 of base."""
    from dcustom.trainers.reward.suite import train_policy

    row = train_policy("configs/reward.yaml", "draft_k", str(tmp_path),
                       ["train.steps=20", "train.sample_every=0", "eval.lora_scales=[]"])
    print("toy make-it-red:", json.dumps(row, default=str))
    assert row["j_eval_gain"] > 3.0, row
    assert row["reward_eval_final"] > row["best_of_n"]["reward_eval"] + 1.0, row
    assert row["best_of_n"]["reward_calls"] <= row["best_of_n"]["training_reward_calls"]  # never more calls than training
    judged = row["judged"]
    assert judged["target_rate_base"] <= 0.1 and judged["target_rate_tuned"] >= 0.75, judged
    assert judged["unrelated_ratio"] >= 0.9, judged
