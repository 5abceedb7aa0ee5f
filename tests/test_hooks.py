"""Invariants of the attention hooks on tiny SD1.x and SDXL pipelines (CPU, fp32, 2-3 steps)."""

import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.models import family_of, load_pipeline
from dcustom.pipelines.features import FeatureStore
from dcustom.pipelines.hooks import (
    PassThroughProcessor,
    TimestepGate,
    attention_hooks,
    resolve_layers,
    sampling_timesteps,
    steps_in_window,
)
from dcustom.pipelines.injection import InjectionProcessor, RecordedSource, RecordProcessor, injection

SPECS = ["tiny:sd15", "tiny:sdxl"]


@pytest.fixture(scope="module", params=SPECS)
def pipe(request):
    torch.manual_seed(0)
    return load_pipeline(request.param, device="cpu")


def self_layers(pipe):
    return resolve_layers(pipe.unet, "all_self", family_of(pipe))


def sample(pipe, steps=2, guidance=2.0, seed=3, **kw):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return pipe(prompt="a red circle", num_inference_steps=steps, guidance_scale=guidance, generator=g,
                    height=32, width=32, output_type="latent", **kw).images


def test_inactive_and_record_only_hooks_are_bit_identical(pipe):
    stock = sample(pipe)
    layers = self_layers(pipe)
    with attention_hooks(pipe.unet, layers, PassThroughProcessor, TimestepGate()):
        assert torch.equal(sample(pipe), stock)
    store = FeatureStore(("q",), dtype=None)
    source = RecordedSource(style=store)
    with injection(pipe, layers, source, active_steps=set(), gamma=0.75, temperature=1.5) as gate:
        assert torch.equal(sample(pipe), stock)  # installed, never active
    assert gate.applied == set()
    rec = FeatureStore(("q", "k", "v"), dtype=None)
    gate = TimestepGate()
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), gate):
        assert torch.equal(sample(pipe), stock)  # recording is transparent
    assert len(rec.keys()) == 2 * len(layers)


def test_originals_restored_by_identity_even_after_an_exception(pipe):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    # A user's own processors (distinct objects per layer) must come back as the very same objects.
    pipe.unet.set_attn_processor({n: AttnProcessor() for n in pipe.unet.attn_processors})
    before = dict(pipe.unet.attn_processors)
    layers = self_layers(pipe)
    with attention_hooks(pipe.unet, layers, PassThroughProcessor, TimestepGate()):
        assert all(isinstance(pipe.unet.attn_processors[n], PassThroughProcessor) for n in layers)
        untouched = [n for n in before if n not in layers]
        assert all(pipe.unet.attn_processors[n] is before[n] for n in untouched)
    assert all(pipe.unet.attn_processors[n] is p for n, p in before.items())
    with pytest.raises(RuntimeError, match="boom"):
        with attention_hooks(pipe.unet, layers, PassThroughProcessor, TimestepGate()):
            sample(pipe, steps=1)
            raise RuntimeError("boom")
    after = pipe.unet.attn_processors
    assert all(after[n] is p for n, p in before.items())
    assert len(pipe.unet._forward_pre_hooks) == 0 and len(pipe.unet._forward_pre_hooks_with_kwargs) == 0
    pipe.unet.set_attn_processor(AttnProcessor2_0())


@pytest.mark.parametrize("steps,guidance", [(2, 1.0), (3, 2.0)])
def test_gating_uses_the_timestep_the_unet_is_called_with(pipe, steps, guidance):
    layers = self_layers(pipe)[:2]
    timesteps = sampling_timesteps(pipe, steps)
    active = steps_in_window(timesteps, 0.5, 1.0)
    assert 0 < len(active) < steps
    rec = FeatureStore(("k", "v"), dtype=None)
    gate = TimestepGate()
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), gate):
        sample(pipe, steps=steps, guidance=guidance)
    with injection(pipe, layers, RecordedSource(style=rec), active, temperature=1.5) as gate:
        sample(pipe, steps=steps, guidance=guidance)
    assert gate.applied == {(n, t) for n in layers for t in active}


def test_gating_with_cfg_as_two_unet_calls_per_step(pipe):
    """A hand-written loop calling the UNet twice per step gates exactly like the batched pipeline."""
    layers = self_layers(pipe)[:1]
    timesteps = sampling_timesteps(pipe, 3)
    active = steps_in_window(timesteps, 0.0, 0.5)
    unet = pipe.unet
    x = torch.randn(1, 4, 16, 16)
    cond = torch.randn(1, 77, unet.config.cross_attention_dim)
    extra = {}
    if unet.config.addition_embed_type == "text_time":
        extra["added_cond_kwargs"] = {"text_embeds": torch.randn(1, 32), "time_ids": torch.randn(1, 6)}
    rec = FeatureStore(("k", "v"), dtype=None)
    gate = TimestepGate(active)
    with attention_hooks(unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), gate), torch.no_grad():
        for t in timesteps:
            for _ in range(2):  # uncond, cond
                unet(x, torch.tensor(t), encoder_hidden_states=cond, **extra)
    assert gate.applied == {(n, t) for n in layers for t in active}
    assert rec.keys() == gate.applied


def test_injecting_a_runs_own_features_is_the_identity(pipe, guidance=2.0):
    layers = self_layers(pipe)
    stock = sample(pipe, guidance=guidance)
    rec = FeatureStore(("q", "k", "v"), dtype=None)
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), TimestepGate()):
        sample(pipe, guidance=guidance)
    source = RecordedSource(style=rec, content=rec)
    for gamma in (0.0, 1.0, 0.75):
        with injection(pipe, layers, source, gamma=gamma, temperature=1.0) as gate:
            out = sample(pipe, guidance=guidance)
        assert len(gate.applied) == 2 * len(layers)
        if gamma in (0.0, 1.0):  # the very same q, k, v through the same SDPA call: exact (measured: equal)
            assert torch.equal(out, stock)
        else:  # 0.75·q + 0.25·q need not round back to q; measured equal on CPU here, not guaranteed
            torch.testing.assert_close(out, stock, atol=1e-5, rtol=1e-5)


def test_foreign_features_change_the_output_and_batch_mismatch_raises(pipe):
    layers = self_layers(pipe)
    rec = FeatureStore(("q", "k", "v"), dtype=None)
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), TimestepGate()):
        sample(pipe, guidance=2.0, seed=11)  # CFG: recorded batch 2
    stock = sample(pipe, guidance=2.0)
    with injection(pipe, layers, RecordedSource(style=rec), temperature=1.5):
        assert (sample(pipe, guidance=2.0) - stock).abs().max() > 1e-4
    with pytest.raises(DcustomError, match="matches neither 1 nor the target batch 1"):
        with injection(pipe, layers, RecordedSource(style=rec)):
            sample(pipe, guidance=1.0)  # CFG off: target batch 1
    assert len(pipe.unet._forward_pre_hooks_with_kwargs) == 0


def test_missing_recorded_timestep_is_a_clear_error(pipe):
    layers = self_layers(pipe)[:1]
    rec = FeatureStore(("k", "v"), dtype=None)
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), TimestepGate()):
        sample(pipe, steps=2, guidance=1.0)
    with pytest.raises(DcustomError, match="same number of steps"):
        with injection(pipe, layers, RecordedSource(style=rec)):
            sample(pipe, steps=3, guidance=1.0)


def test_hooks_work_with_a_loaded_lora(pipe):
    from peft import LoraConfig

    layers = self_layers(pipe)
    base_rec = FeatureStore(("q",), dtype=None)
    with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, base_rec), TimestepGate()):
        sample(pipe, guidance=1.0)
    torch.manual_seed(1)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                     init_lora_weights=False), adapter_name="test_lora")
    try:
        stock = sample(pipe, guidance=2.0)
        with attention_hooks(pipe.unet, layers, PassThroughProcessor, TimestepGate()):
            assert torch.equal(sample(pipe, guidance=2.0), stock)
        rec = FeatureStore(("q", "k", "v"), dtype=None)
        with attention_hooks(pipe.unet, layers, lambda n, o, g: RecordProcessor(n, o, g, rec), TimestepGate()):
            sample(pipe, guidance=1.0)
        # the recorded projections are the LoRA-adapted ones
        key = sorted(rec.keys())[0]
        assert not torch.allclose(rec.get(*key, "q"), base_rec.get(*key, "q"))
        with injection(pipe, layers, RecordedSource(style=rec, content=rec), gamma=0.75, temperature=1.5) as gate:
            out = sample(pipe, guidance=2.0)
        assert len(gate.applied) == 2 * len(layers)
        assert not torch.allclose(out, stock)
    finally:
        pipe.unet.delete_adapters("test_lora")


def einsum_reference(attn, hidden, q_content, k_ref, v_ref, gamma, temperature, concat, reference_weight=1.0):
    """Ten lines of plain attention: the processor must agree with this. A reference weight w multiplies
    each reference token's unnormalised attention weight exp(logit)."""
    b, n, _ = hidden.shape
    h = attn.heads
    q = gamma * q_content + (1 - gamma) * attn.to_q(hidden)
    k, v = k_ref.expand(b, -1, -1), v_ref.expand(b, -1, -1)
    if concat:
        k, v = torch.cat([attn.to_k(hidden), k], 1), torch.cat([attn.to_v(hidden), v], 1)
    q, k, v = (x.reshape(b, x.shape[1], h, -1).permute(0, 2, 1, 3) for x in (q, k, v))
    weights = (torch.einsum("bhid,bhjd->bhij", q, k) * temperature / q.shape[-1] ** 0.5).exp()
    if concat:
        weights[..., n:] *= reference_weight
    weights = weights / weights.sum(-1, keepdim=True)
    out = torch.einsum("bhij,bhjd->bhid", weights, v).permute(0, 2, 1, 3).reshape(b, n, -1)
    return attn.to_out[0](out)


@pytest.mark.parametrize("concat, reference_weight", [(False, 1.0), (True, 1.0), (True, 0.3)])
def test_processor_agrees_with_an_einsum_reference(pipe, concat, reference_weight):
    name = self_layers(pipe)[0]
    attn = pipe.unet.get_submodule(name[: -len(".processor")])
    torch.manual_seed(0)
    dim = attn.to_q.in_features
    hidden = torch.randn(2, 16, dim)
    style_hidden, content_hidden = torch.randn(1, 16, dim), torch.randn(2, 16, dim)
    with torch.no_grad():
        store = FeatureStore(("q", "k", "v"), dtype=None)
        store.put(name, 5.0, q=attn.to_q(style_hidden), k=attn.to_k(style_hidden), v=attn.to_v(style_hidden))
        content = FeatureStore(("q",), dtype=None)
        content.put(name, 5.0, q=attn.to_q(content_hidden))
        gate = TimestepGate()
        gate.t = 5.0
        proc = InjectionProcessor(name, attn.processor, gate, RecordedSource(style=store, content=content),
                                  gamma=0.75, temperature=1.5, mode="concat" if concat else "replace",
                                  reference_weight=reference_weight)
        got = proc(attn, hidden)
        want = einsum_reference(attn, hidden, content.get(name, 5.0, "q"), store.get(name, 5.0, "k"),
                                store.get(name, 5.0, "v"), 0.75, 1.5, concat, reference_weight)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_layer_selection_by_name_with_clear_errors(pipe):
    fam = family_of(pipe)
    names = resolve_layers(pipe.unet, "all_self", fam)
    assert names and all(".attn1." in n for n in names)
    late = resolve_layers(pipe.unet, "decoder_self_late", fam)  # structural fallback on tiny UNets
    assert late and all(n.startswith("up_blocks.") and ".attn1." in n for n in late)
    with pytest.raises(DcustomError, match="selects no attention layer"):
        resolve_layers(pipe.unet, r"^nothing_here", fam)
    with pytest.raises(DcustomError, match="neither a preset"):
        resolve_layers(pipe.unet, "up_blocks.(", fam)
    with pytest.raises(DcustomError, match="not a plain self-attention layer"):
        with injection(pipe, resolve_layers(pipe.unet, "all_cross", fam), RecordedSource(style=FeatureStore())):
            pass


def _meta_unet(kind):
    from diffusers import UNet2DConditionModel

    configs = {
        "sd15": dict(block_out_channels=(320, 640, 1280, 1280),
                     down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                     up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, cross_attention_dim=768,
                     attention_head_dim=8, layers_per_block=2, sample_size=64),
        "sdxl": dict(block_out_channels=(320, 640, 1280),
                     down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                     up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                     transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
                     cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
                     projection_class_embeddings_input_dim=2816, use_linear_projection=True, layers_per_block=2,
                     sample_size=128),
    }
    with torch.device("meta"):
        return UNet2DConditionModel(**configs[kind])


def test_family_presets_match_the_real_sd15_and_sdxl_layer_names():
    """Built from the real configs on the meta device (no weights, no download)."""
    from dcustom.families import FAMILIES

    sd15 = _meta_unet("sd15")
    assert len(sd15.attn_processors) == 32
    late = resolve_layers(sd15, "decoder_self_late", FAMILIES["sd1"])
    # StyleID's LDM output blocks 6-11 = the six self-attentions of up_blocks.2 and up_blocks.3
    assert late == [f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor" for b in (2, 3) for a in range(3)]
    assert len(resolve_layers(sd15, "decoder_self", FAMILIES["sd1"])) == 9
    assert len(resolve_layers(sd15, "all_self", FAMILIES["sd1"])) == 16
    sdxl = _meta_unet("sdxl")
    assert len(sdxl.attn_processors) == 140
    assert len(resolve_layers(sdxl, "all_self", FAMILIES["sdxl"])) == 70
    assert len(resolve_layers(sdxl, "decoder_self", FAMILIES["sdxl"])) == 36  # up_blocks.0 (30) + up_blocks.1 (6)
    vsp = resolve_layers(sdxl, "decoder_self_late", FAMILIES["sdxl"])
    assert len(vsp) == 6 and all(n.startswith("up_blocks.1.") for n in vsp)
    style = resolve_layers(sdxl, "instantstyle_style", FAMILIES["sdxl"])
    assert style and all(n.startswith("up_blocks.0.attentions.1.") and ".attn2." in n for n in style)
