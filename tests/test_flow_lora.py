"""flow_lora on tiny SD3 and FLUX: 2 steps change only the LoRA, the diffusers file reproduces the trained output in a
fresh pipeline through diffusers' own loader, the kohya/ComfyUI file (original names, q/k/v fused) equals it, resume
is exact, wrong-family files are refused, and the objective's formulas hold."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from image_helpers import write_noise_images
import torch

from dcustom.adapters.files import read_metadata
from dcustom.adapters.load import load_adapter
from dcustom.config import load_config
from dcustom.data import DataConfig
from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.trainers.flow.config import FlowConfig, FlowLoraTrainConfig
from dcustom.trainers.flow.trainer import train
from dcustom.trainers.loop import LoopConfig

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """Three noise images, two aspect buckets (a batch of 2 may mix them)."""
    return write_noise_images(tmp_path_factory.mktemp("subject"), [(32, 32), (48, 32), (40, 32)], seed=5)


def make_cfg(kind, images, out, **kw):
    loop = dict(output_dir=str(out), steps=2, batch_size=2, lr=1e-2, device="cpu", seed=3, checkpoint_every=0)
    loop.update(kw.pop("train", {}))
    return FlowLoraTrainConfig(model=f"tiny:{kind}", data=DataConfig(images=str(images), instance_prompt=PROMPT,
                                                                     resolution=32),
                               train=LoopConfig(**loop), flow=FlowConfig(max_sequence_length=16),
                               validation_prompts=[PROMPT], sample_steps=2, **kw)


def render(pipe):
    pipe.transformer.eval()
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=g, output_type="pt", width=32, height=32,
                max_sequence_length=16).images


CASES = [("flux", dict(rank=4, alpha=8.0)), ("sd3", dict(rank=4, alpha=2.0)),
         ("flux", dict(rank=2, dora=True, data_cache=False))]


@pytest.mark.parametrize("kind,extra", CASES, ids=["flux", "sd3", "flux-dora-uncached"])
def test_train_changes_only_lora_and_files_reproduce(kind, extra, images, tmp_path):
    extra = dict(extra)
    uncached = extra.pop("data_cache", True) is False
    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    base_out = render(pipe)
    before = {n: p.detach().clone() for n, p in pipe.transformer.named_parameters()}
    others = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
              for name in ("vae", "text_encoder", "text_encoder_2")}
    cfg = make_cfg(kind, images, tmp_path / "run", **extra)
    if uncached:
        cfg.data.cache_latents = cfg.data.cache_text = False
    result = train(cfg, pipe=pipe, progress=False)
    assert result.status == "finished" and result.step == 2

    trainable = result.method.trainable_parameters()
    assert trainable and all("lora_" in n for n in trainable) and all(p.dtype == torch.float32 for p in trainable.values())
    for name, p in pipe.transformer.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, before[name.replace(".base_layer", "")]), name
    for name, state in others.items():
        assert all(torch.equal(v, state[k]) for k, v in getattr(pipe, name).state_dict().items()), name
    trained_out = render(pipe)
    assert (trained_out - base_out).abs().max() > 1e-3

    # the diffusers file through diffusers' own loader, in a fresh pipeline: the trained output exactly
    names = {Path(f).name for f in result.files}
    assert ("lora_kohya.safetensors" in names) != extra.get("dora", False)
    fresh = load_pipeline(f"tiny:{kind}", device="cpu")
    fresh.load_lora_weights(str(tmp_path / "run"), weight_name="pytorch_lora_weights.safetensors")
    assert torch.equal(render(fresh), trained_out)
    for f in result.files:  # and every file through dcustom's loader (the kohya one split back exactly)
        fresh = load_pipeline(f"tiny:{kind}", device="cpu")
        load_adapter(fresh, f)
        assert (render(fresh) - trained_out).abs().max().item() < 1e-6, f
    meta = read_metadata(tmp_path / "run" / "pytorch_lora_weights.safetensors")
    assert meta["dcustom.family"] == kind and meta["dcustom.method"] == "flow_lora"
    assert (tmp_path / "run" / "samples" / "step-2" / "00.png").is_file()


def test_resume_is_exact(images, tmp_path):
    full = train(make_cfg("flux", images, tmp_path / "a", train={"steps": 4}), progress=False)
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 2  # noqa: E731
    first = train(make_cfg("flux", images, tmp_path / "b", train={"steps": 4}), on_event=seen.append, should_stop=stop,
                  progress=False)
    assert first.status == "cancelled" and first.step == 2
    second = train(make_cfg("flux", images, tmp_path / "b", train={"steps": 4, "resume": "latest"}), progress=False)
    a, b = full.method.trainable_parameters(), second.method.trainable_parameters()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_wrong_family_refused_in_one_sentence(images, tmp_path):
    result = train(make_cfg("flux", images, tmp_path / "run", train={"steps": 1}), progress=False)
    for target, label in (("sd3", r"Stable Diffusion 3/3.5 \(sd3\)"), ("sd15", r"Stable Diffusion 1.x \(sd1\)")):
        with pytest.raises(DcustomError, match=rf"trained for FLUX.1 \(flux\) but this pipeline is {label}"):
            load_adapter(load_pipeline(f"tiny:{target}", device="cpu"), result.files[0])
    # a kohya FLUX file without dcustom metadata is recognised by its module names
    from safetensors.torch import load_file, save_file

    bare = tmp_path / "bare.safetensors"
    save_file(load_file(result.files[1]), str(bare))
    with pytest.raises(DcustomError, match=r"trained for FLUX.1 \(flux\) but this pipeline is Stable Diffusion 3"):
        load_adapter(load_pipeline("tiny:sd3", device="cpu"), bare)
    with pytest.raises(DcustomError, match="SD3/3.5 and FLUX.1 transformers: train it with 'dcustom train lora'"):
        train(make_cfg("sd15", images, tmp_path / "unet"), progress=False)


def test_objective_formulas():
    from types import SimpleNamespace

    from dcustom.trainers.flow.objective import resolution_shift, sample_sigmas, shift_sigmas

    s = torch.linspace(0.01, 0.99, 50)
    assert torch.allclose(shift_sigmas(s, 1.0), s)
    assert torch.all(shift_sigmas(s, 3.0) > s)  # shift > 1 spends more steps near noise
    config = SimpleNamespace(base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    assert math.isclose(resolution_shift(256, config), math.exp(0.5)) and math.isclose(resolution_shift(4096, config), math.exp(1.15))
    mu = 0.8
    assert torch.allclose(shift_sigmas(s, math.exp(mu)), math.exp(mu) / (math.exp(mu) + (1 / s - 1)))  # FLUX's sampler form
    torch.manual_seed(0)
    logit = torch.logit(sample_sigmas(20000, "logit_normal", 0.5, 2.0))
    assert abs(logit.mean().item() - 0.5) < 0.05 and abs(logit.std().item() - 2.0) < 0.05


def test_config_file_and_bad_values():
    cfg = load_config(FlowLoraTrainConfig, "configs/flow_lora.yaml")
    assert cfg.flow.sampling == "logit_normal" and cfg.target_modules == []
    with pytest.raises(DcustomError, match="flow.sampling"):
        load_config(FlowLoraTrainConfig, "configs/flow_lora.yaml", overrides=["flow.sampling=cosine"])
    with pytest.raises(DcustomError, match="prior preservation is not available in flow_lora"):
        load_config(FlowLoraTrainConfig, "configs/flow_lora.yaml", overrides=["data.prior.enabled=true"])


def test_unet_trainer_points_dit_models_to_flow_lora(images, tmp_path):
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.adapter.trainer import train as train_unet

    cfg = LoraTrainConfig(model="tiny:flux", data=DataConfig(images=str(images), resolution=32),
                          train=LoopConfig(output_dir=str(tmp_path / "r"), steps=1, device="cpu"))
    with pytest.raises(DcustomError, match="flow-matching transformer; train a LoRA on it with 'dcustom train flow_lora'"):
        train_unet(cfg, progress=False)
