"""Style injection (StyleID) end to end on tiny pipelines: sources agree, every switch matters, the
pipeline is stock afterwards. The toy-model quality check needs builtin:toy (skipped without it)."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcustom.models import family_of, load_pipeline, toy_model_dir
from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps
from dcustom.pipelines.inversion import InversionCache, ddim_scheduler, invert, sample_from
from dcustom.pipelines.style_injection import StyleInjectionConfig, style_injection
from dcustom.pipelines.transfer import stylize

STEPS = 3


def image(seed, size=(64, 64)):
    return Image.fromarray((np.random.RandomState(seed).rand(size[1], size[0], 3) * 255).astype("uint8"))


@pytest.fixture(scope="module", params=["tiny:sd15", "tiny:sdxl"])
def pipe(request):
    return load_pipeline(request.param, device="cpu")


def cfg(**kw):
    return StyleInjectionConfig(steps=STEPS, feature_dtype="fp32", resolution=32, **kw)


def test_style_injection_differs_from_plain_sampling_and_each_switch_matters(pipe):
    cache = InversionCache()
    content, style = image(0, (80, 60)), image(1)
    base = stylize(pipe, content, style, cfg(), cache=cache)
    assert base.image.size == (32, 32) and base.latents.shape == (1, 4, 16, 16)
    timesteps = sampling_timesteps(pipe, STEPS, ddim_scheduler(pipe))
    assert base.applied == {(n, t) for n in base.layers for t in timesteps}
    assert base.timings["cache_hits"] == 0
    ablations = {
        "no injection (plain sampling from the AdaIN latent)": dict(inject_attention=False),
        "no initial AdaIN": dict(init_adain=False),
        "no query preservation": dict(gamma=0.0),
        "temperature 1": dict(temperature=1.0),
        "concat mode": dict(mode="concat"),
        "late window only": dict(step_start=0.5),
        "AdaIN on the way down instead of at z_T": dict(adain_at=0.5),
        "mean-only AdaIN": dict(adain_std=False),
    }
    for what, kw in ablations.items():
        other = stylize(pipe, content, style, cfg(**kw), cache=cache)
        assert (other.latents - base.latents).abs().max() > 1e-5, what
    # the second run of the same pair reuses both inversions
    again = stylize(pipe, content, style, cfg(), cache=cache)
    assert again.timings["cache_hits"] == 2
    assert torch.equal(again.latents, base.latents)


def test_in_batch_source_matches_recorded_source(pipe):
    """Replaying the references' inversion latents in the batch reproduces the recorded features."""
    content, style = image(2), image(3)
    recorded = stylize(pipe, content, style, cfg())
    in_batch = stylize(pipe, content, style, cfg(feature_source="in_batch"))
    assert in_batch.applied == recorded.applied
    torch.testing.assert_close(in_batch.latents, recorded.latents, atol=1e-4, rtol=1e-4)


def test_python_api_context_manager_leaves_the_pipeline_stock(pipe):
    layers = resolve_layers(pipe.unet, "decoder_self_late", family_of(pipe))
    before = dict(pipe.unet.attn_processors)
    scheduler = pipe.scheduler
    c = invert(pipe, image(4), steps=2, layers=layers, kinds=("q",), height=32, width=32)
    s = invert(pipe, image(5), steps=2, layers=layers, kinds=("k", "v"), height=32, width=32)
    with style_injection(pipe, c, s, layers) as run:
        stylized = sample_from(pipe, run.start_latent, steps=2)
    assert len(run.gate.applied) == 2 * len(layers)
    plain = sample_from(pipe, run.start_latent, steps=2)
    assert not torch.allclose(stylized, plain)
    assert pipe.scheduler is scheduler
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())


# ----------------------------------------------------------------------------- toy-model quality


@pytest.mark.slow
@pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install (train it with 'bash scripts/toy/train_cpu.sh'); the quality check runs when it is")
def test_toy_model_style_transfer_keeps_content_and_moves_style():
    """The first 24 pairs of `dcustom eval style` with StyleID's toy-world settings (style_eval.TONE):
    measured 0.917 kept and style distance ratio 0.318 (1 thread); the bars are 0.90 and 0.5 on 50 pairs."""
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.style_eval import TONE, score, style_pairs

    pipe = load_pipeline("builtin:toy", device="cpu", dtype="fp32")
    data = style_pairs(50)[:24]
    config = StyleInjectionConfig(steps=20, **TONE)
    images = [stylize(pipe, d[0], d[3], config, cache=InversionCache()).image for d in data]
    figures = score(images, data, load_judge("eval"))
    print(f"toy style transfer, 24 pairs: content kept {figures['content_kept']:.3f}, "
          f"style distance ratio {figures['style_distance_ratio']:.3f}")
    assert figures["content_kept"] >= 0.83  # 2 of 24 pairs below the measured 22
    assert figures["style_distance_ratio"] <= 0.40
