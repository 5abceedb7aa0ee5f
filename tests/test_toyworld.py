"""The toy world: renderer, grammar, held-out sets, model folder, train-base resume, eval base."""

import json
import random

import numpy as np
import pytest

from dcustom.errors import DcustomError
from dcustom.toyworld import grammar
from dcustom.toyworld.grammar import HEADS, is_heldout, parse_caption, sample_scene
from dcustom.toyworld.render import render_samples, render_style, render_subject


def test_renderer_is_deterministic_per_seed():
    a = render_samples(6, seed=3, split="judge")
    b = render_samples(6, seed=3, split="judge")
    c = render_samples(6, seed=4, split="judge")
    for (ia, ta, sa), (ib, tb, sb) in zip(a, b):
        assert np.array_equal(np.asarray(ia), np.asarray(ib)) and ta == tb and sa == sb
        assert ia.size == (64, 64) and ia.mode == "RGB"
    assert any(not np.array_equal(np.asarray(x[0]), np.asarray(y[0])) for x, y in zip(a, c))


@pytest.mark.parametrize("split", ["base", "heldout_combo", "subject", "style", "judge"])
def test_captions_name_exactly_the_rendered_attributes(split):
    rng = random.Random(7)
    for _ in range(300):
        scene = sample_scene(rng, split)
        text = grammar.caption(scene, rng, detail=0.5)
        parsed = parse_caption(text)
        truth = {h: v for h, v in scene.labels().items() if v is not None and v != "none"}
        assert parsed == truth, (text, parsed, truth)


def test_heldout_sets_never_reach_base_training():
    from dcustom.toyworld.data import pool_scene
    from dcustom.toyworld.grammar import SceneRanges

    rng = random.Random(0)
    base = [sample_scene(rng, "base") for _ in range(5000)]
    pool = [pool_scene(0, i, SceneRanges(30, 54, 15))[0] for i in range(2000)]
    for scene in base + pool:
        assert not is_heldout(scene) and scene.subject is None and scene.style is None
    seen = {(s.shape, s.colour) for s in base}
    assert seen == set(grammar.base_combos())  # every trained pair appears, no held-out pair does
    assert not seen & set(grammar.HELDOUT_COMBOS)
    heldout_words = {s.trigger for s in grammar.SUBJECTS} | {w for ws in grammar.STYLE_WORDS.values() for w in ws}
    for scene in base[:500]:
        words = set(grammar.caption(scene, rng, detail=1.0).split())
        assert not words & heldout_words
    # and the things that are held out are recognised as such
    assert all(is_heldout(sample_scene(rng, s)) for s in ("heldout_combo", "subject", "style") for _ in range(50))


def test_subject_and_style_sets_render_with_their_labels():
    views = render_subject("ladybug", 4, seed=1)
    assert len(views) == 4 and all(s.subject == "ladybug" and "zwx" in t for _, t, s in views)
    assert len({(s.x, s.y, s.angle) for _, _, s in views}) == 4  # different poses
    styled = render_style("neon", 3, seed=2)
    assert all(s.style == "neon" and parse_caption(t)["style"] == "neon" for _, t, s in styled)
    with pytest.raises(ValueError, match="unknown subject 'cat'; accepted: robot, ladybug, pine"):
        render_subject("cat", 1)


def test_caption_encoder_matches_the_tokenizer(tmp_path):
    from dcustom.toyworld.config import ToyModelConfig
    from dcustom.toyworld.model import build_tokenizer
    from dcustom.toyworld.train_base import CaptionEncoder

    tok = build_tokenizer(ToyModelConfig(), tmp_path)
    enc = CaptionEncoder(tok)
    rng = random.Random(1)
    for _ in range(100):
        text = grammar.caption(sample_scene(rng, "base"), rng, detail=1.0)
        ids, labels = enc(text)
        ref = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True).input_ids
        assert ids == ref, text
        assert sum(1 for v in labels if v > 0) >= 3  # shape, colour and background words are labelled
    for s in grammar.SUBJECTS:  # triggers are in the vocabulary as single tokens
        assert len(tok(s.trigger, add_special_tokens=False).input_ids) == 1


def test_model_folder_round_trips_through_from_pretrained(tmp_path):
    import torch
    from diffusers import StableDiffusionPipeline

    from dcustom.models import load_pipeline
    from dcustom.toyworld.config import tiny_config
    from dcustom.toyworld.model import assemble_pipeline, build_components, save_model_folder

    cfg = tiny_config(str(tmp_path / "run"))
    pipe = assemble_pipeline(build_components(cfg.model, tmp_path / "work", seed=0))
    folder = save_model_folder(pipe, tmp_path / "model")
    loaded = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert loaded.vae_scale_factor == 4 and loaded.unet.config.sample_size == 16
    stored = _tensors(folder)
    assert stored and all(v.dtype == torch.float16 for v in stored.values())  # shipped in fp16
    for name in ("unet", "vae", "text_encoder"):
        ours = {k: v.half() for k, v in getattr(pipe, name).state_dict().items()}
        theirs = {k: v.half() for k, v in getattr(loaded, name).state_dict().items()}
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert loaded.tokenizer("a zwx circle").input_ids == pipe.tokenizer("a zwx circle").input_ids
    again = load_pipeline(str(folder), device="cpu", dtype="fp32")
    image = again("a red circle on a white background", num_inference_steps=2, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images[0]
    assert image.shape == (64, 64, 3)


@pytest.mark.parametrize("config", ["configs/toy_base.yaml", "configs/toy_base_gpu.yaml"])
def test_recipe_models_fit_the_size_limits(tmp_path, config):
    from dcustom.config import load_config
    from dcustom.toyworld.config import ToyBaseConfig
    from dcustom.toyworld.model import MAX_FILE_BYTES, assemble_pipeline, build_components, folder_sizes, save_model_folder

    model = load_config(ToyBaseConfig, config).model
    folder = save_model_folder(assemble_pipeline(build_components(model, tmp_path / "w")), tmp_path / "m")
    sizes = folder_sizes(folder)
    assert max(sizes.values()) < MAX_FILE_BYTES and sum(sizes.values()) < 64 * 2**20
    assert sizes["unet/diffusion_pytorch_model.safetensors"] > 2**20  # weights really are in the folder, in fp16


def _tensors(folder):
    from safetensors.torch import load_file

    return {f"{p.parent.name}/{k}": v for p in sorted(folder.rglob("*.safetensors")) for k, v in load_file(str(p)).items()}


def test_train_base_resume_is_exact(tmp_path):
    import torch

    from dcustom.toyworld.config import tiny_config
    from dcustom.toyworld.train_base import run

    straight = run(tiny_config(str(tmp_path / "a")), log=lambda m: None)
    run(tiny_config(str(tmp_path / "b")), stop_after=3, log=lambda m: None)  # stops inside the VAE stage
    assert not (tmp_path / "b" / "model").exists()
    run(tiny_config(str(tmp_path / "b")), stop_after=6, log=lambda m: None)  # inside the UNet stage
    resumed = run(tiny_config(str(tmp_path / "b")), log=lambda m: None)
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and len(a) > 100
    assert all(torch.equal(a[k], b[k]) for k in a)
    curve = json.loads((tmp_path / "a" / "learning_curve.json").read_text())
    assert curve and {"shape", "colour", "background", "prompt", "toy_fid"} <= set(curve[-1])
    assert (tmp_path / "a" / "learning_curve.png").stat().st_size > 1000
    events = [json.loads(line) for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    assert [e["resumed"] for e in events if e["event"] == "start"] == [False, True, True]


def test_train_base_time_budget_exports_a_partial_model_and_resumes_exactly(tmp_path):
    import torch

    from dcustom.toyworld.config import tiny_config
    from dcustom.toyworld.train_base import run

    straight = run(tiny_config(str(tmp_path / "a")), log=lambda m: None)
    out_of_time = tiny_config(str(tmp_path / "b"), ["time_budget_minutes=1e-9"])
    assert run(out_of_time, log=lambda m: None) == tmp_path / "b"  # budget gone before the UNet: checkpoint only
    assert not (tmp_path / "b" / "model").exists()
    run(tiny_config(str(tmp_path / "b")), stop_after=5, log=lambda m: None)  # one UNet step done
    partial = run(out_of_time, log=lambda m: None)  # inside the UNet stage: measured and exported
    events = [json.loads(line) for line in (tmp_path / "b" / "events.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "end"]
    assert partial == tmp_path / "b" / "model" and ends[-1]["partial"] and ends[-1]["unet_step"] == 1
    curve = json.loads((tmp_path / "b" / "learning_curve.json").read_text())
    assert curve[-1]["step"] == 1 and curve[-1]["minutes"] > 0
    resumed = run(tiny_config(str(tmp_path / "b")), log=lambda m: None)
    a, b = _tensors(straight), _tensors(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_train_base_weights_change_and_text_encoder_freezes(tmp_path):
    import torch

    from dcustom.toyworld.config import tiny_config
    from dcustom.toyworld.train_base import Run

    r = Run(tiny_config(str(tmp_path)), log=lambda m: None)
    r.build_pool()
    r.stage_setup("text")
    before = {k: v.clone() for k, v in r.text_encoder.state_dict().items()}
    loss = r.text_step(torch.Generator().manual_seed(0))
    loss.backward()
    r.optimizer.step()
    assert any(not torch.equal(before[k], v) for k, v in r.text_encoder.state_dict().items())


def test_evaluate_pipeline_on_tiny_sd15(tiny_pipe, tmp_path):
    from dcustom.toyworld.evaluate import evaluate_pipeline

    prompts = ["a red circle on a white background", "a blue star on a striped background"]
    report = evaluate_pipeline(tiny_pipe("sd15"), prompts, seeds=[0, 1], steps=2, out_dir=tmp_path)
    assert set(report["accuracy"]) == {"shape", "colour", "background", "prompt"}
    assert all(0 <= v <= 1 for v in report["accuracy"].values())
    assert report["toy_fid"] >= 0 and 0 <= report["diversity"] <= 2
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["prompts"] == 2 and len(saved["per_prompt"]) == 2 and saved["seeds"] == [0, 1]
    from PIL import Image

    assert Image.open(tmp_path / "grid.png").size == (2 * 66 + 2, 2 * 66 + 2)
    with pytest.raises(DcustomError, match="prompt 'a photo of a dog' names no shape, colour, background, subject or style"):
        evaluate_pipeline(tiny_pipe("sd15"), ["a photo of a dog"], seeds=[0], steps=1)


def test_cli_eval_base_on_tiny_sd15(cli, tmp_path):
    code, out, err = cli("eval", "base", "--model", "tiny:sd15", "--prompts", "2", "--seeds", "0,1", "--steps", "2",
                         "--output-dir", tmp_path, "--device", "cpu")
    assert code == 0, err
    assert "accuracy  shape" in out and "compositional" in out and "toy-FID" in out
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["prompts"] == 2 + len(grammar.HELDOUT_COMBOS) and report["judge"] == "eval"
    assert report["groups"]["compositional"]["images"] == 2 * len(grammar.HELDOUT_COMBOS)
    code, _, err = cli("eval", "base", "--model", "tiny:sd15", "--seeds", "zero", "--output-dir", tmp_path)
    assert code == 2 and "--seeds 'zero' must be comma-separated integers" in err


def test_cli_render_writes_images_and_captions(cli, tmp_path):
    code, out, err = cli("toyworld", "render", "--subject", "robot", "--count", "3", "-o", tmp_path)
    assert code == 0, err
    rows = [json.loads(line) for line in (tmp_path / "captions.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all("sks" in r["caption"] and r["labels"]["subject"] == "robot" for r in rows)
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "00002.png").is_file()


def test_heads_cover_the_grammar():
    assert HEADS["shape"] == grammar.SHAPES and HEADS["subject"][0] == "none" and len(grammar.SUBJECTS) >= 3
    assert len(grammar.STYLES) >= 3 and len(grammar.HELDOUT_COMBOS) >= 3
    assert grammar.ERASURE_CONCEPT == ("colour", "purple")


def test_cli_eval_base_bars_reports_every_bar_and_fails_when_one_does_not_hold(cli, tmp_path):
    from dcustom.toyworld.bars import BARS, all_base_prompts, all_compositional_prompts

    assert len(set(all_base_prompts())) == 192 and len(set(all_compositional_prompts())) == 24
    code, out, _ = cli("eval", "base", "-m", "tiny:sd15", "--bars", "--seeds", "0", "--prompt",
                       "a red circle on a white background", "--prompt", "a green circle on a white background",
                       "-o", tmp_path)
    assert code == 1, out  # a random tiny model holds no bar
    assert "some bars do not hold" in out and "compositional_prompt" in out
    saved = json.loads((tmp_path / "bars.json").read_text())
    assert set(saved["figures"]) == set(BARS) and None not in saved["figures"].values()
    assert saved["all_passed"] is False and saved["passed"]["vae_psnr_db"] is False
    assert saved["images"] == 2 and saved["steps"] == 30 and saved["figures"]["cpu_seconds_4_images"] > 0


def test_cli_eval_base_refuses_more_base_prompts_than_the_grammar_has(cli):
    code, out, err = cli("eval", "base", "-m", "tiny:sd15", "--prompts", "500")
    assert code == 2
    assert "prompts: 500 base prompts asked for; the grammar has 192 distinct ones" in out + err


@pytest.mark.parametrize("override, message", [
    ("model.vae_channels=[16,32]", "vae_channels must list exactly 3 block widths"),
    ("model.vae_channels=[]", "vae_channels must list exactly 3 block widths"),
    ("model.vae_channels=[16,0,64]", "vae_channels widths must be positive"),
    ("model.vae_channels=[16,24,64]", "every width must be divisible by the norm groups min(32, first width) = 16; 24 is not"),
    ("model.unet_channels=[64,100,96]", "unet_channels [64, 100, 96]: every width must be divisible by the norm groups"),
    ("model.unet_channels=[64,96,96,96,96]", "unet_channels must list 1 to 4 block widths"),
    ("model.unet_head_dim=48", "must be a multiple of unet_head_dim 48; 64 is not"),
    ("model.text_heads=3", "text_hidden 64 must be divisible by text_heads 3"),
    ("model.latent_channels=0", "latent_channels must be at least 1, got 0"),
    ("model.unet_cross_attention_levels=4", "unet_cross_attention_levels must be between 0 and len(unet_channels) = 3"),
    ("model.text_max_length=4", "text_max_length must be at least 16"),
])
def test_recipe_architecture_that_cannot_build_fails_before_any_stage(cli, tmp_path, override, message):
    code, out, err = cli("toyworld", "train-base", "--config", "configs/toy_base.yaml", "--set", override,
                         "--set", f"output_dir={tmp_path / 'run'}")
    assert code == 2 and message in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()  # nothing ran


def test_resume_from_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    from dcustom.toyworld.config import tiny_config
    from dcustom.toyworld.train_base import run

    run(tiny_config(str(tmp_path)), stop_after=3, log=lambda m: None)
    other = tiny_config(str(tmp_path), ["model.vae_channels=[8,16,32]"])
    with pytest.raises(DcustomError, match=r"it was trained with model.vae_channels=\[8, 16, 16\] but the config "
                                           r"says model.vae_channels=\[8, 16, 32\]"):
        run(other, log=lambda m: None)
    # a checkpoint from before architectures were recorded: the tensor shapes tell
    state_file = next(tmp_path.glob("checkpoints/step-*/state.json"))
    state = json.loads(state_file.read_text())
    del state["model"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(DcustomError, match=r"its vae has another architecture \(.* is \(16,.*the config builds \(32,"):
        run(other, log=lambda m: None)
    run(tiny_config(str(tmp_path)), log=lambda m: None)  # the right architecture still resumes


def test_install_never_replaces_a_shipped_model_that_scores_higher(tmp_path):
    from dcustom.toyworld.train_base import SCORE_FILE, install_folder

    def folder(name):
        f = tmp_path / name
        f.mkdir()
        (f / "model_index.json").write_text("{}")
        (f / "weights.bin").write_text(name)
        return f

    target = tmp_path / "shipped"
    install_folder(folder("good"), log=lambda m: None, score={"prompt": 0.9}, target=target)
    with pytest.raises(DcustomError, match="shipped builtin:toy scores prompt accuracy 0.900 and .* scores 0.8"):
        install_folder(folder("worse"), log=lambda m: None, score={"prompt": 0.8}, target=target)
    with pytest.raises(DcustomError, match="scores nothing recorded"):
        install_folder(folder("unscored"), log=lambda m: None, target=target)
    assert (target / "weights.bin").read_text() == "good"
    install_folder(folder("better"), log=lambda m: None, score={"prompt": 0.95}, target=target)
    assert (target / "weights.bin").read_text() == "better"
    assert json.loads((target / SCORE_FILE).read_text())["prompt"] == 0.95


def test_generic_images_are_reproducible_and_never_draw_a_subject():
    from dcustom.toyworld.generic import render_generic, render_generic_pool

    pool = render_generic_pool(5, seed=3)
    assert pool.shape == (5, 64, 64, 3) and pool.dtype == np.uint8
    assert np.array_equal(pool[2], render_generic(3, 2))
    assert not np.array_equal(pool[2], render_generic(4, 2))
    # the generic renderer has no access to the subjects' parts: nothing of theirs is imported
    import dcustom.toyworld.generic as generic

    assert "SUBJECT_PARTS" not in vars(generic) and "render_subject" not in vars(generic)


def test_recipe_resume_skips_unfinished_checkpoint_folders(tmp_path):
    from dcustom.toyworld.recipe import checkpoints

    for name, done in (("step-4", True), ("step-6", False), ("step-8.deleting", True), (".step-9.tmp", True)):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        if done:
            (tmp_path / "checkpoints" / name / "state.json").write_text("{}")
    # state.json is written last and a pruned folder is renamed before it is deleted: neither half is resumed
    assert checkpoints.latest(tmp_path) == tmp_path / "checkpoints" / "step-4"
    assert checkpoints.latest(tmp_path / "none") is None
