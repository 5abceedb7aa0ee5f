"""`dcustom eval erasure` on a tiny pipeline (plumbing: prompt sets, judging, JSON, grid, attack),
and the prompt-embedding attack actually lowers the erased model's denoising loss."""

import json

import pytest
import torch
from PIL import Image

from dcustom.config import from_dict
from dcustom.trainers.erasure.config import ErasureTrainConfig


def judge_or_random():
    """The shipped J_eval; where its weights are not in this checkout, the same network with random
    weights (the numbers are then meaningless, the plumbing is the same)."""
    from dcustom.toyworld.judges import RECIPES, Judge, load_judge, weights_path

    if weights_path("eval").is_file():
        return load_judge("eval")
    torch.manual_seed(0)
    return Judge(RECIPES["eval"].arch, "eval").eval()


def uce_run(tmp_path, pipe):
    from dcustom.trainers.erasure.run import run

    cfg = from_dict(ErasureTrainConfig, dict(model="tiny:sd15", erase=["star"], preserve=["circle", "square"],
                                             train={"output_dir": str(tmp_path / "run"), "device": "cpu"}))
    return run(cfg, pipe=pipe)


def test_prompt_sets_follow_the_protocol():
    from dcustom.trainers.erasure.evaluate import concept_head, prompt_sets

    assert concept_head("violet") == ("colour", "purple")
    spec = prompt_sets("star", per_group=4, preservation=6)
    sets = spec["sets"]
    assert spec["neighbours"] == ["cross", "diamond"] and "star" not in spec["others"]
    assert all(" star " in f" {p} " for p, _ in sets["efficacy"])
    assert all("pentagram" in p for p, _ in sets["generality"])
    assert [e for _, e in sets["neighbours"]] == ["cross", "diamond", "cross", "diamond"]
    assert all(e in p for p, e in sets["others"]) and len(sets["preservation"]) == 6
    assert not any(w in p for p, _ in sets["preservation"] for w in ("star", "pentagram"))


def test_eval_erasure_runs_on_tiny_pipeline(tmp_path, tiny_pipe):
    from dcustom.trainers.erasure.evaluate import evaluate_erasure

    base, erased = tiny_pipe("sd15"), uce_run(tmp_path, tiny_pipe("sd15")).pipe
    report = evaluate_erasure(base, erased, "star", seeds=[0, 1], steps=2, per_group=2, preservation=2,
                              attack_prompts=1, attack_steps=2, attack_images=2, judge=judge_or_random(),
                              out_dir=tmp_path / "eval")
    saved = json.loads((tmp_path / "eval" / "erasure.json").read_text())
    assert saved["summary"] == json.loads(json.dumps(report["summary"]))
    for label in ("base", "erased"):
        for key in ("efficacy", "generality", "neighbours", "others"):
            assert 0.0 <= saved[label][key] <= 1.0
        assert 0.0 <= saved[label]["preservation"]["prompt"] <= 1.0
    assert saved["preservation_toy_fid_vs_base"] >= 0.0
    probe = saved["robustness"]["probes"][0]
    assert probe["relative_perturbation"] > 0 and probe["final_loss"] == probe["final_loss"]
    assert 0.0 <= saved["robustness"]["success_rate"] <= 1.0
    assert set(saved["summary"]["acceptance"]) == {"efficacy", "generality", "others", "neighbours"}
    grid = Image.open(tmp_path / "eval" / "grid.png")
    assert grid.size == (2 * 66 + 2, 11 * 66 + 2)  # 2 seeds; 5 groups x (base, erased) + the attack row


def test_attack_lowers_the_denoising_loss(tiny_pipe):
    from dcustom.trainers.erasure.conditioning import encode, predict
    from dcustom.trainers.erasure.evaluate import attack_embedding, concept_latents

    pipe = tiny_pipe("sd15")
    latents = concept_latents(pipe, "shape", "star", 2, seed=0)
    gen = torch.Generator().manual_seed(7)
    noise = torch.randn(latents.shape, generator=gen)
    t = torch.tensor([300, 700])
    x_t = pipe.scheduler.add_noise(latents, noise, t)

    def loss(cond):
        with torch.no_grad():
            return torch.nn.functional.mse_loss(predict(pipe.unet, x_t, t, cond.repeat(2)), noise)

    before = loss(encode(pipe, ["a red star"]))
    cond, stats = attack_embedding(pipe, "a red star", latents, steps=8, lr=0.05, seed=0)
    assert loss(cond) < before and stats["relative_perturbation"] > 0


def test_cli_eval_erasure(tmp_path, tiny_pipe, cli):
    from dcustom.toyworld.judges import weights_path

    code, _, err = cli("eval", "erasure", "--erased", tmp_path, "--concept", "zebra", "--model", "tiny:sd15")
    assert code == 2 and "concept 'zebra' is not a shape, colour or background of the toy world; accepted:" in err
    run_dir = uce_run(tmp_path, tiny_pipe("sd15")).run_dir
    code, _, err = cli("eval", "erasure", "--erased", tmp_path / "nothing", "--concept", "star", "--model", "tiny:sd15",
                       "--device", "cpu")
    assert code == 2 and "is neither an erasure LoRA" in err
    if not weights_path("eval").is_file():
        pytest.skip("J_eval weights are not in this checkout (dcustom/toyworld/weights/judge_eval.safetensors)")
    code, out, err = cli("eval", "erasure", "--erased", run_dir, "--concept", "star", "--model", "tiny:sd15",
                         "--seeds", "0", "--prompts", "1", "--preservation-prompts", "1", "--steps", "2",
                         "--attack-prompts", "1", "--attack-steps", "1", "--device", "cpu", "-o", tmp_path / "eval")
    assert code == 0, err
    assert "efficacy" in out and out.strip().endswith("erasure.json")
    assert (tmp_path / "eval" / "grid.png").is_file()
