"""Hooks on the joint attention of tiny SD3 and FLUX transformers: layers by name, AdaIN statistics injection
(StyleAligned's q/k AdaIN) acts only on targets and only when gated on, and leaves the stock pipeline bit-identical."""

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.models import family_of, load_pipeline
from dcustom.pipelines.hooks import PassThroughProcessor, TimestepGate, attention_hooks, resolve_layers
from dcustom.pipelines.joint_adain import adain_to_reference, joint_qk_adain

PROMPTS = ["a neon drawing", "a red circle", "a blue square"]


@pytest.fixture(scope="module", params=["sd3", "flux"])
def pipe(request):
    return load_pipeline(f"tiny:{request.param}", device="cpu")


def sample(pipe, steps=2):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        return pipe(prompt=PROMPTS, num_inference_steps=steps, guidance_scale=2.0, generator=g, height=32, width=32,
                    output_type="latent", max_sequence_length=16).images


def test_layer_presets_select_joint_attention_by_name(pipe):
    names = resolve_layers(pipe.transformer, "all_self", family_of(pipe))
    assert names == list(pipe.transformer.attn_processors) and len(names) == (4 if family_of(pipe).name == "flux" else 2)
    assert resolve_layers(pipe.transformer, "joint", family_of(pipe)) == ["transformer_blocks.0.attn.processor",
                                                                         "transformer_blocks.1.attn.processor"]
    if family_of(pipe).name == "flux":
        assert resolve_layers(pipe.transformer, "single", family_of(pipe))[0] == "single_transformer_blocks.0.attn.processor"
    with pytest.raises(DcustomError, match="selects no attention layer"):
        resolve_layers(pipe.transformer, r"^up_blocks\.", family_of(pipe))


def test_off_is_bit_identical_and_originals_come_back_by_identity(pipe):
    stock = sample(pipe)
    originals = dict(pipe.transformer.attn_processors)
    names = list(originals)
    with attention_hooks(pipe.transformer, names, PassThroughProcessor, TimestepGate()):
        assert torch.equal(sample(pipe), stock)
    with joint_qk_adain(pipe, group=3, steps=set()) as gate:  # installed, never active
        assert torch.equal(sample(pipe), stock)
    assert gate.applied == set()
    with pytest.raises(RuntimeError, match="boom"):
        with joint_qk_adain(pipe, group=3):
            raise RuntimeError("boom")
    after = pipe.transformer.attn_processors
    assert all(after[n] is originals[n] for n in names)
    assert torch.equal(sample(pipe), stock)


def test_active_adain_changes_targets_not_the_reference(pipe):
    stock = sample(pipe)
    with joint_qk_adain(pipe, group=3) as gate:
        styled = sample(pipe)
    layers = set(resolve_layers(pipe.transformer, "all_self", family_of(pipe)))
    assert {name for name, _ in gate.applied} == layers and len({t for _, t in gate.applied}) == 2  # every layer, both steps
    assert torch.allclose(styled[0], stock[0], atol=1e-5)  # the reference row is left as it is
    assert (styled[1:] - stock[1:]).abs().max() > 1e-3


def test_adain_to_reference_gives_targets_the_reference_statistics():
    torch.manual_seed(0)
    x = torch.randn(6, 20, 8) * torch.arange(1, 7).view(6, 1, 1) + 3
    y = adain_to_reference(x, 3)
    assert torch.equal(y[0], x[0]) and torch.equal(y[3], x[3])
    for ref, targets in ((0, (1, 2)), (3, (4, 5))):
        for t in targets:
            assert torch.allclose(y[t].mean(0), x[ref].mean(0), atol=1e-5)
            assert torch.allclose(y[t].std(0), x[ref].std(0), atol=1e-4)


def test_unet_pipelines_are_refused():
    with pytest.raises(DcustomError, match="joint-attention AdaIN is for SD3/FLUX transformers"):
        with joint_qk_adain(load_pipeline("tiny:sd15", device="cpu"), group=2):
            pass
