"""Style injection (StyleID) end to end on tiny pipelines: sources agree, every switch matters, the
pipeline is stock afterwards. The toy-model quality check needs builtin:toy (skipped without it)."""

import json
from pathlib import Path

import numpy as np
import pytest
from quality_gate import PENDING
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


def texture_stats(images, judge):
    """Colour and texture statistics of images: RGB channel mean/std plus the Gram matrix of the
    judge's first conv block (normalised by its size)."""
    from dcustom.toyworld.judges import to_tensor

    x = to_tensor(images)
    with torch.no_grad():
        h = judge.net.body[:3]((x - 0.5) / 0.25)  # conv 5x5 -> group norm -> SiLU, 64x64x16
    h = h.flatten(2)
    gram = (h @ h.transpose(1, 2)) / h.shape[-1]
    colour = torch.cat([x.mean((2, 3)), x.std((2, 3))], 1)
    return torch.cat([colour * 4, gram.flatten(1) / 4], 1)  # comparable magnitudes


@pytest.mark.slow
@PENDING
@pytest.mark.skipif(toy_model_dir() is None, reason="builtin:toy is not shipped in this install (train it with 'bash scripts/toy/train_cpu.sh'); the quality check runs when it is")
def test_toy_model_style_transfer_keeps_content_and_moves_texture(tmp_path):
    from dcustom.toyworld.grammar import STYLES
    from dcustom.toyworld.judges import load_judge
    from dcustom.toyworld.render import grid, render_samples, render_style

    pipe = load_pipeline("builtin:toy", device="cpu")
    judge = load_judge("eval")
    contents = render_samples(50, seed=7, split="base")
    styles = [item for s in STYLES for item in render_style(s, 4, seed=11)]
    cache = InversionCache()
    config = StyleInjectionConfig(model="builtin:toy", steps=20)
    results, content_images, style_images = [], [], []
    for i, (content, _caption, scene) in enumerate(contents):
        style = styles[i % len(styles)][0]
        results.append(stylize(pipe, content, style, config, cache=cache).image)
        content_images.append(content)
        style_images.append(style)
    shapes = judge.predict(results)["shape"]["labels"]
    truth = [scene.labels()["shape"] for _, _, scene in contents]
    known = [(p, t) for p, t in zip(shapes, truth) if t is not None]
    kept = sum(p == t for p, t in known) / len(known)
    r, c, s = (texture_stats(x, judge) for x in (results, content_images, style_images))
    before = (c - s).norm(dim=1).mean().item()
    after = (r - s).norm(dim=1).mean().item()
    out = Path("runs/quality/style_injection")  # the README's grid and figures come from here
    out.mkdir(parents=True, exist_ok=True)
    grid([im for trio in zip(content_images[:8], style_images[:8], results[:8]) for im in trio], columns=3).save(
        out / "grid.png")
    figures = {"pairs": len(results), "steps": config.steps, "gamma": config.gamma, "temperature": config.temperature,
               "shape_kept": kept, "texture_distance_content": before, "texture_distance_result": after,
               "texture_distance_reduction": 1 - after / before}
    (out / "quality.json").write_text(json.dumps(figures, indent=2))
    print(f"toy style transfer: shape kept {kept:.1%} of {len(known)}; texture distance to style "
          f"{before:.3f} -> {after:.3f} ({1 - after / before:.1%} lower)")
    assert kept >= 0.90
    assert after <= 0.5 * before
