"""LoRA / DoRA / OFT / BOFT on tiny SD1.x, SD2.x (v-prediction) and SDXL pipelines: train 2 steps,
weights change where they should and only there, saved files reproduce the trained output in a
fresh pipeline (diffusers, kohya and peft forms), resume is exact, the CLI drives the same code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from image_helpers import write_noise_images
import torch

from dcustom.adapters.files import read_metadata
from dcustom.adapters.load import adapter_summary, load_adapter
from dcustom.data import DataConfig, PriorConfig
from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.trainers.adapter.config import BoftTrainConfig, LoraTrainConfig, OftTrainConfig
from dcustom.trainers.adapter.trainer import train
from dcustom.trainers.loop import LoopConfig

CONFIGS = {"lora": LoraTrainConfig, "oft": OftTrainConfig, "boft": BoftTrainConfig}
PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = write_noise_images(tmp_path_factory.mktemp("subject"), [(32, 32), (48, 32), (32, 40)], seed=0)
    (d / "0.txt").write_text("sks dog on a red background")
    return d


def make_cfg(method, kind, images, out, **kw):
    loop = dict(output_dir=str(out), steps=2, batch_size=2, lr=1e-2, device="cpu", seed=3, checkpoint_every=0)
    loop.update(kw.pop("train", {}))
    data = dict(images=str(images), instance_prompt=PROMPT, resolution=32)
    data.update(kw.pop("data", {}))
    return CONFIGS[method](model=f"tiny:{kind}", data=DataConfig(**data), train=LoopConfig(**loop),
                           validation_prompts=[PROMPT], sample_steps=2, **kw)


def render(pipe):
    pipe.unet.eval()
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=g, output_type="pt", width=32, height=32).images


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


CASES = [
    ("lora", "sd15", dict(alpha=8.0, rank=4)),  # alpha != rank: the true alpha must survive every format
    ("lora", "sdxl", dict(alpha=2.0, rank=4, text_encoder_lora=True, text_encoder_rank=2)),
    ("lora", "sd2", dict(rank=4, dora=True, min_snr_gamma=None, noise_offset=0.05,
                         data={"cache_latents": False, "cache_text": False})),
    ("oft", "sd15", dict(block_size=8, extract_rank=8, train={"gradient_checkpointing": True})),
    ("oft", "sdxl", dict(block_size=8, extract_rank=8, write_merged=True)),
    ("boft", "sd2", dict(block_size=4, extract_rank=8)),
    ("boft", "sdxl", dict(block_size=4, extract_rank=8)),
]


@pytest.mark.parametrize("method,kind,extra", CASES, ids=[f"{m}-{k}" for m, k, _ in CASES])
def test_train_save_and_reload_reproduces_output(method, kind, extra, images, tmp_path):
    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    base_out = render(pipe)
    frozen_before = {n: p.detach().clone() for n, p in pipe.unet.named_parameters()}
    vae_before = snapshot(pipe.vae)
    cfg = make_cfg(method, kind, images, tmp_path / "run", **extra)
    result = train(cfg, pipe=pipe, progress=False)
    assert result.status == "finished" and result.step == 2

    # Adapter weights moved; every base weight (UNet, VAE, text encoders) is bit-identical.
    trainable = dict(result.method.trainable_parameters())
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    changed = 0
    for name, p in pipe.unet.named_parameters():
        base_name = name.replace(".base_layer", "")
        if p.requires_grad:
            changed += 1
        elif base_name in frozen_before:
            assert torch.equal(p, frozen_before[base_name]), name
    assert changed > 0
    assert all(torch.equal(v, vae_before[k]) for k, v in pipe.vae.state_dict().items())
    trained_out = render(pipe)
    assert (trained_out - base_out).abs().max() > 1e-3  # the adapter does something

    # Every written file reproduces the trained pipeline in a fresh one.
    for f in result.files:
        if Path(f).name == "unet_merged":
            continue  # a full UNet, checked below
        fresh = load_pipeline(f"tiny:{kind}", device="cpu")
        load_adapter(fresh, f)
        diff = (render(fresh) - trained_out).abs().max().item()
        name = Path(f).name
        if name.startswith("lora_extracted"):
            assert diff < 0.5 * (trained_out - base_out).abs().max().item(), (name, diff)
        else:
            assert diff < 1e-5, (name, diff)
        meta = adapter_summary(f)
        assert meta["method"].startswith(method) and meta["family"] == result.method.family.name
    names = {Path(f).name for f in result.files}
    if method == "lora":
        assert "pytorch_lora_weights.safetensors" in names
        assert ("lora_kohya.safetensors" in names) != extra.get("dora", False)
        meta = read_metadata(tmp_path / "run" / "pytorch_lora_weights.safetensors")
        assert json.loads(meta["dcustom.config"])["alpha"] == extra.get("alpha", 16.0)
        if "lora_kohya.safetensors" in names:
            assert adapter_summary(tmp_path / "run" / "lora_kohya.safetensors")["alphas"] == sorted(
                {extra["alpha"]} | ({float(extra["text_encoder_rank"])} if extra.get("text_encoder_lora") else set()))
    else:
        assert {"unet", "lora_extracted_kohya.safetensors"} <= names
        assert result.method.extraction_error < 1.0
    if extra.get("write_merged"):
        from diffusers import UNet2DConditionModel

        fresh = load_pipeline(f"tiny:{kind}", device="cpu")
        fresh.unet = UNet2DConditionModel.from_pretrained(str(tmp_path / "run" / "unet_merged"))
        assert (render(fresh) - trained_out).abs().max().item() < 1e-4
    assert (tmp_path / "run" / "config.yaml").is_file() and list((tmp_path / "run" / "samples").rglob("*.png"))


def test_resume_is_exact_through_the_adapter_trainer(images, tmp_path):
    full = train(make_cfg("lora", "sd15", images, tmp_path / "a", train={"steps": 4}), progress=False)
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 2  # noqa: E731
    first = train(make_cfg("lora", "sd15", images, tmp_path / "b", train={"steps": 4}), on_event=seen.append,
                  should_stop=stop, progress=False)
    assert first.status == "cancelled" and first.step == 2
    second = train(make_cfg("lora", "sd15", images, tmp_path / "b", train={"steps": 4, "resume": "latest"}), progress=False)
    a, b = full.method.trainable_parameters(), second.method.trainable_parameters()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k


def test_wrong_family_is_refused_naming_both(images, tmp_path):
    result = train(make_cfg("lora", "sd15", images, tmp_path / "run", train={"steps": 1}), progress=False)
    xl = load_pipeline("tiny:sdxl", device="cpu")
    with pytest.raises(DcustomError, match=r"trained for Stable Diffusion 1.x \(sd1\) but this pipeline is Stable Diffusion XL \(sdxl\)"):
        load_adapter(xl, result.files[0])


def test_stacking_two_loras_with_weights(images, tmp_path):
    r1 = train(make_cfg("lora", "sd15", images, tmp_path / "one", train={"steps": 1}), progress=False)
    r2 = train(make_cfg("lora", "sd15", images, tmp_path / "two", train={"steps": 1, "seed": 9}), progress=False)
    pipe = load_pipeline("tiny:sd15", device="cpu")
    load_adapter(pipe, r1.files[0], scale=0.5)
    load_adapter(pipe, r2.files[0], scale=0.7)
    stacked = render(pipe)
    pipe.fuse_lora()
    assert (render(pipe) - stacked).abs().max() < 1e-4
    assert getattr(pipe, "_dcustom_adapter_scales") == {"adapter_0": 0.5, "adapter_1": 0.7}


def test_prior_class_images_generated_once(images, tmp_path):
    prior = dict(prior=PriorConfig(enabled=True, class_prompt="a photo of a dog", num_images=2, sample_steps=2,
                                   class_dir=str(tmp_path / "class")))
    train(make_cfg("lora", "sd15", images, tmp_path / "r1", data=prior, train={"steps": 1}), progress=False)
    made = sorted((tmp_path / "class").glob("class-*.png"))
    stamps = [p.stat().st_mtime_ns for p in made]
    assert len(made) == 2
    train(make_cfg("lora", "sd15", images, tmp_path / "r2", data=prior, train={"steps": 1}), progress=False)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "class").glob("class-*.png"))] == stamps


def test_prior_with_several_class_prompts(images, tmp_path):
    """class_prompts: class image i comes from prompt i mod n, is captioned with it, and they key their own cache."""
    from types import SimpleNamespace

    from dcustom.data import class_image_dir, class_prompt
    from dcustom.trainers.denoising import DenoisingObjective

    prompts = ["a photo of a dog", "a photo of a cat on grass"]
    prior = PriorConfig(enabled=True, class_prompts=prompts, num_images=3, sample_steps=2)
    assert [class_prompt(prior, i) for i in range(3)] == [prompts[0], prompts[1], prompts[0]]
    single = PriorConfig(enabled=True, class_prompt=prompts[0], num_images=3, sample_steps=2)
    assert class_image_dir(prior, "tiny:sd15", 32) != class_image_dir(single, "tiny:sd15", 32)
    prior.class_dir = str(tmp_path / "class")
    cfg = make_cfg("lora", "sd15", images, tmp_path / "r", data=dict(prior=prior), train={"steps": 1})
    train(cfg, progress=False)
    assert len(sorted((tmp_path / "class").glob("class-*.png"))) == 3
    objective = DenoisingObjective("tiny:sd15", cfg.data, None, 0.0, pipe=load_pipeline("tiny:sd15", device="cpu"))
    objective.load(SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, cfg=SimpleNamespace(seed=0)))
    assert [e.caption for e in objective.prepare_class_examples()] == [prompts[0], prompts[1], prompts[0]]


def test_caption_dropout_trains_on_the_empty_caption_and_resumes_exactly(images, tmp_path):
    """data.caption_dropout: about that share of draws use "" (cached with the captions), drawn from the loop's
    seeded RNG, so a resumed run matches a straight one; at 0 no draw happens (older runs are unchanged)."""
    from types import SimpleNamespace

    from dcustom.trainers.denoising import DenoisingObjective

    data = DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32, caption_dropout=0.3)
    objective = DenoisingObjective("tiny:sd15", data, None, 0.0, pipe=load_pipeline("tiny:sd15", device="cpu"))
    objective.load(SimpleNamespace(device=torch.device("cpu"), weight_dtype=torch.float32, cfg=SimpleNamespace(seed=0)))
    examples = objective.prepare_examples()
    objective.cache_text()
    assert "" in objective.text_cache
    torch.manual_seed(0)
    drawn = [c for _ in range(400) for c in objective._captions(examples)]
    assert 0.25 < drawn.count("") / len(drawn) < 0.35
    assert {c for c in drawn if c} == {ex.caption for ex in examples}
    objective.data.caption_dropout = 0.0
    state = torch.get_rng_state()
    assert objective._captions(examples) == [ex.caption for ex in examples]
    assert torch.equal(torch.get_rng_state(), state)

    dropout = {"caption_dropout": 0.5}
    full = train(make_cfg("lora", "sd15", images, tmp_path / "a", data=dropout, train={"steps": 4}), progress=False)
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 2  # noqa: E731
    train(make_cfg("lora", "sd15", images, tmp_path / "b", data=dropout, train={"steps": 4}), on_event=seen.append,
          should_stop=stop, progress=False)
    second = train(make_cfg("lora", "sd15", images, tmp_path / "b", data=dropout, train={"steps": 4, "resume": "latest"}),
                   progress=False)
    plain = train(make_cfg("lora", "sd15", images, tmp_path / "c", train={"steps": 4}), progress=False)
    a, b, c = (r.method.trainable_parameters() for r in (full, second, plain))
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=0), k
    assert any(not torch.allclose(a[k], c[k]) for k in a)


def test_keep_prompts_hold_the_base_prediction_without_the_trigger(images, tmp_path):
    """keep_prompts: the added loss is 0 while the adapter is the identity, and training with it leaves the
    prediction for a kept prompt closer to the base model's than training without it (measured: 0.19 of the drift)."""
    from dcustom.trainers.erasure.conditioning import encode, predict

    base = load_pipeline("tiny:sd15", device="cpu")
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 4, 4), torch.tensor([300, 700])
    kept = encode(base, ["a cat"]).repeat(2)
    with torch.no_grad():
        reference = predict(base.unet, x, t, kept)

    def drift(**kw):
        cfg = make_cfg("lora", "sd15", images, tmp_path / str(len(kw)), rank=4, train={"steps": 6}, **kw)
        result = train(cfg, progress=False)
        with torch.no_grad():
            return (predict(result.method.pipe.unet, x, t, kept) - reference).pow(2).mean().item(), result

    free, _ = drift()
    held, result = drift(keep_prompts=["", "a cat"], keep_weight=20.0)
    assert held < 0.5 * free
    objective = result.method.objective
    assert {"", "a cat"} <= set(objective.text_cache)
    for module in result.method.pipe.unet.modules():
        if hasattr(module, "lora_B"):
            for b in module.lora_B.values():
                torch.nn.init.zeros_(b.weight)
    with torch.no_grad():
        assert objective._kept_prompt_drift(x, t, None).abs().max() == 0


def test_bad_settings_get_clear_messages(images, tmp_path):
    with pytest.raises(DcustomError, match=r"block_size: 5 does not divide the input width 64 of UNet layer .down_blocks.1.attentions.0"):
        train(make_cfg("oft", "sd15", images, tmp_path / "x", block_size=5), progress=False)
    with pytest.raises(DcustomError, match=r"target_modules: 'nope' matches no UNet layer"):
        train(make_cfg("lora", "sd15", images, tmp_path / "y", target_modules=["nope"]), progress=False)
    with pytest.raises(DcustomError, match=r"data.resolution: 30 is not a multiple of 4"):
        train(make_cfg("lora", "sd15", images, tmp_path / "z", data={"resolution": 30}), progress=False)


@pytest.mark.parametrize("method", ["lora", "oft", "boft"])
def test_cli_trains_each_method(method, cli, images, tmp_path):
    root = Path(__file__).resolve().parent.parent
    code, out, err = cli("train", method, "--config", root / "configs" / f"{method}.yaml",
                         "--set", "model=tiny:sd15", "--set", f"data.images={images}", "--set", "data.resolution=32",
                         "--set", f"train.output_dir={tmp_path / 'run'}", "--set", "train.steps=2",
                         "--set", "train.device=cpu", "--set", "sample_steps=2", "--set", "train.warmup_steps=0",
                         *(["--set", "block_size=8", "--set", "extract_rank=4"] if method == "oft" else []),
                         *(["--set", "extract_rank=4"] if method == "boft" else []))
    assert code == 0, err
    assert f"finished at step 2: {tmp_path / 'run'}" in out
    events = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events if e["event"] == "step"] == ["step", "step"] and events[-1]["event"] == "end"
