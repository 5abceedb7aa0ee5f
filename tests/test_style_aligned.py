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
