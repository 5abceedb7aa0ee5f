"""Attention injection (MasaCtrl-style) with the reference in the batch: roles, CFG halves, windows."""

import numpy as np
import pytest
import torch
from PIL import Image

from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.pipelines.attention_injection import AttentionInjectionConfig, attention_injection
from dcustom.pipelines.hooks import sampling_timesteps, steps_in_window
from dcustom.pipelines.transfer import stylize


@pytest.fixture(scope="module", params=["tiny:sd15", "tiny:sdxl"])
def pipe(request):
    return load_pipeline(request.param, device="cpu")


def run(pipe, prompts, guidance, seed=0, steps=2, same_noise=False):
    g = torch.Generator().manual_seed(seed)
    shape = (1 if same_noise else len(prompts), 4, 16, 16)
    latents = torch.randn(shape, generator=g).expand(len(prompts), -1, -1, -1).contiguous()
    with torch.no_grad():
        return pipe(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance, latents=latents,
                    height=32, width=32, output_type="latent").images


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_reference_row_is_untouched_and_gating_is_exact(pipe, guidance):
    prompts = ["a red circle", "a blue square"]
    stock = run(pipe, prompts, guidance)
    timesteps = sampling_timesteps(pipe, 2)
    with attention_injection(pipe, roles=("style", "target"), steps=2, step_start=0.5) as gate:
        out = run(pipe, prompts, guidance)
    names = {n for n, _ in gate.applied}
    assert gate.applied == {(n, t) for n in names for t in steps_in_window(timesteps, 0.5, 1.0)}
    torch.testing.assert_close(out[0], stock[0], atol=1e-5, rtol=1e-5)  # the reference runs stock
    assert (out[1] - stock[1]).abs().max() > 1e-5  # the target attended to the reference


def test_concat_with_itself_as_reference_is_the_identity(pipe):
    """Attending to [k; k] with [v; v] gives the same softmax average as attending to k, v."""
    prompts = ["a red circle", "a red circle"]
    stock = run(pipe, prompts, 2.0, same_noise=True)
    with attention_injection(pipe, roles=("style", "target"), steps=2, step_start=0.0, mode="concat") as gate:
        out = run(pipe, prompts, 2.0, same_noise=True)
    assert gate.applied
    torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_roles_that_do_not_fit_the_batch_raise(pipe):
    with pytest.raises(DcustomError, match="not a multiple of the 3 image roles"):
        with attention_injection(pipe, roles=("style", "target", "target"), steps=2, step_start=0.0):
            run(pipe, ["a", "b"], 1.0)
    with pytest.raises(DcustomError, match="is not a role"):
        with attention_injection(pipe, roles=("style", "painting")):
            pass
    assert len(pipe.unet._forward_pre_hooks_with_kwargs) == 0


def test_attention_injection_transfer_in_batch_matches_recorded(pipe):
    rng = np.random.RandomState(0)
    content = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    style = Image.fromarray((rng.rand(64, 64, 3) * 255).astype("uint8"))
    base = AttentionInjectionConfig(steps=3, feature_dtype="fp32", resolution=32)
    in_batch = stylize(pipe, content, style, base)
    recorded = stylize(pipe, content, style, AttentionInjectionConfig(steps=3, feature_dtype="fp32", resolution=32,
                                                                      feature_source="recorded"))
    assert len({t for _, t in in_batch.applied}) == 2  # MasaCtrl skips the first 8% of steps: 1 of 3 here
    assert in_batch.applied == recorded.applied
    torch.testing.assert_close(in_batch.latents, recorded.latents, atol=1e-4, rtol=1e-4)
