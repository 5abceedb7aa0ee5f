"""StyleAligned shared attention: concat + q/k AdaIN to the reference, identity when the target is the reference."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcustom.models import load_pipeline
from dcustom.pipelines.style_aligned import shared_attention, style_aligned_generate


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline("tiny:sd15", device="cpu")


def run(pipe, prompts, seed=0, same_noise=False):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn((1 if same_noise else len(prompts), 4, 16, 16), generator=g)
    latents = latents.expand(len(prompts), -1, -1, -1).contiguous()
    with torch.no_grad():
        return pipe(prompt=prompts, num_inference_steps=2, guidance_scale=2.0, latents=latents, height=32, width=32,
                    output_type="latent").images


def test_shared_attention_with_itself_is_the_identity(pipe):
    """Same prompt, same noise: AdaIN to identical statistics and [k; k] attention change nothing."""
    prompts = ["a red circle"] * 3
    stock = run(pipe, prompts, same_noise=True)
    with shared_attention(pipe, n_targets=2, steps=2) as gate:
        out = run(pipe, prompts, same_noise=True)
    assert gate.applied
    torch.testing.assert_close(out, stock, atol=1e-4, rtol=1e-4)


def test_targets_change_the_reference_does_not(pipe):
    prompts = ["a red circle on a striped background", "a blue square", "a green star"]
    stock = run(pipe, prompts)
    with shared_attention(pipe, n_targets=2, steps=2):
        shared = run(pipe, prompts)
    with shared_attention(pipe, n_targets=2, steps=2, qk_adain=False):
        no_adain = run(pipe, prompts)
    torch.testing.assert_close(shared[0], stock[0], atol=1e-5, rtol=1e-5)
    assert (shared[1:] - stock[1:]).abs().max() > 1e-5
    assert (shared[1:] - no_adain[1:]).abs().max() > 1e-6  # the q/k AdaIN switch matters


def test_style_aligned_generate_from_a_style_image(pipe):
    style = Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8"))
    out = style_aligned_generate(pipe, ["a cat", "a dog"], steps=2, guidance=2.0, style_image=style,
                                 height=32, width=32, output_type="latent")
    assert out.shape == (3, 4, 16, 16)
    assert len(pipe.unet._forward_pre_hooks_with_kwargs) == 0


def _ddim_plain(pipe, seeds, steps, guidance):
    """Plain generation as `dcustom generate --scheduler ddim` runs it (dcustom.generate.run_pipeline)."""
    from dcustom.generate import run_pipeline, set_scheduler
    from dcustom.generate_config import GenerateConfig

    original = pipe.scheduler
    set_scheduler(pipe, "ddim")
    try:
        cfg = GenerateConfig(prompt="a red circle", steps=steps, guidance=guidance, scheduler="ddim")
        return run_pipeline(pipe, cfg, seeds)
    finally:
        pipe.scheduler = original


def test_generate_with_style_reference_off_is_plain_generation_and_on_leaves_no_hooks(pipe):
    from dcustom.pipelines.inversion import InversionCache
    from dcustom.pipelines.style_aligned import generate_with_style_reference

    style = Image.fromarray((np.random.RandomState(1).rand(64, 64, 3) * 255).astype("uint8"))
    seeds, steps = [5, 6], 3
    plain = [np.asarray(im) for im in _ddim_plain(pipe, seeds, steps, 4.0)]
    for reference, strength in ((None, 1.0), (style, 0.0)):
        off = generate_with_style_reference(pipe, "a red circle", reference, seeds=seeds, steps=steps, guidance=4.0,
                                            strength=strength)
        assert all(np.array_equal(a, np.asarray(b)) for a, b in zip(plain, off.images))  # bit-identical
    assert off.settings["attended_steps"] == 0

    processors = dict(pipe.unet.attn_processors)
    scheduler = pipe.scheduler
    cache, ticks = InversionCache(), []
    on = generate_with_style_reference(pipe, "a red circle", style, seeds=seeds, steps=steps, guidance=4.0,
                                       strength=1.0, cache=cache, on_step=lambda done, total: ticks.append((done, total)))
    assert len(on.images) == 2 and on.images[0].size == (64, 64)
    assert all(np.abs(a.astype(int) - np.asarray(b, dtype=int)).max() > 0 for a, b in zip(plain, on.images))
    assert on.settings["attended_steps"] == steps and on.settings["inversion"]["cache_hit"] is False
    assert ticks[-1] == (2 * steps, 2 * steps)  # inversion + sampling steps
    # Nothing left behind: the very processor objects, the scheduler, no forward pre-hook.
    assert all(pipe.unet.attn_processors[n] is p for n, p in processors.items())
    assert pipe.scheduler is scheduler and len(pipe.unet._forward_pre_hooks_with_kwargs) == 0

    # Strength = the fraction of steps that attend: 1 of 3 steps lands between off and full.
    partial = generate_with_style_reference(pipe, "a red circle", style, seeds=seeds, steps=steps, guidance=4.0,
                                            strength=0.2, cache=cache)
    assert partial.settings["attended_steps"] == 1 and partial.settings["inversion"]["cache_hit"] is True
    assert not np.array_equal(np.asarray(partial.images[0]), np.asarray(on.images[0]))
    assert not np.array_equal(np.asarray(partial.images[0]), plain[0])


def test_generate_with_style_reference_refuses_a_strength_out_of_range(pipe):
    from dcustom.errors import DcustomError
    from dcustom.pipelines.style_aligned import generate_with_style_reference

    with pytest.raises(DcustomError, match="style strength must be between 0 and 1 .* got 1.5"):
        generate_with_style_reference(pipe, "a cat", None, seeds=[0], steps=2, strength=1.5)
