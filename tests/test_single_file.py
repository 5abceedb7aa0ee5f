"""Single-file (original LDM layout) export for SD1.x, SD2.x and SDXL, read back by diffusers."""

import numpy as np
import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.models import load_pipeline
from dcustom.single_file import save_single_file, single_file_state

# The weights are compared bit for bit (_assert_same_weights). The images of two pipelines with identical weights
# matched exactly on earlier machines but differed by 2e-6 on one (SD3 and FLUX, repeatably), so the CPU's kernels,
# not the files, decide the last bits. A wrong config or component differs by far more.
SAME_IMAGE = 1e-5

TEXT_ENCODERS = ("text_encoder", "text_encoder_2")


def _image(pipe, steps=2, seed=0):
    return pipe("a red cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed),
                output_type="np").images


def _assert_same_weights(ours, theirs):
    for name in ("unet", "vae", *TEXT_ENCODERS):
        if getattr(ours, name, None) is None:
            assert getattr(theirs, name, None) is None
            continue
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert set(a) == set(b), name
        different = [k for k in a if not torch.equal(a[k], b[k].reshape(a[k].shape))]
        assert not different, f"{name}: {different[:5]}"


def _save_and_reload(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "configs")  # the offline architecture configs for from_single_file
    path = save_single_file(pipe, tmp_path / "model.safetensors", metadata={"dcustom.base": "test"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["configs", "model.safetensors"]  # no temp file left
    return load_pipeline(str(path), config=str(tmp_path / "configs"))


@pytest.mark.parametrize("kind", ["sd15", "sd2", "sdxl"])
def test_single_file_round_trip(kind, tmp_path):
    from dcustom.families import prediction_type
    from dcustom.models import family_of

    pipe = load_pipeline(f"tiny:{kind}")
    again = _save_and_reload(pipe, tmp_path)
    assert type(again) is type(pipe) and family_of(again).name == family_of(pipe).name
    assert prediction_type(again) == prediction_type(pipe)
    _assert_same_weights(pipe, again)
    assert np.abs(_image(pipe) - _image(again)).max() < SAME_IMAGE


def test_sd2_text_encoder_is_written_as_open_clip_with_the_dropped_last_block():
    pipe = load_pipeline("tiny:sd2")
    state = single_file_state(pipe)
    te = pipe.text_encoder.state_dict()
    n, p = pipe.text_encoder.config.num_hidden_layers, "cond_stage_model.model."
    assert not any(k.startswith("cond_stage_model.transformer.") for k in state)
    qkv = torch.cat([te[f"encoder.layers.1.self_attn.{x}_proj.weight"] for x in "qkv"])
    assert torch.equal(state[p + "transformer.resblocks.1.attn.in_proj_weight"], qkv)
    assert torch.equal(state[p + "transformer.resblocks.0.mlp.c_proj.bias"], te["encoder.layers.0.mlp.fc2.bias"])
    assert torch.equal(state[p + "positional_embedding"], te["embeddings.position_embedding.weight"])
    # The original runs one more block than diffusers keeps (SD2 conditions on the penultimate layer).
    extra = {k for k in state if f".resblocks.{n}." in k}
    assert len(extra) == 12 and all(not state[k].any() for k in extra)
    assert not any(f".resblocks.{n + 1}." in k for k in state)
    assert state[p + "text_projection"].shape == (32, 32)
    assert "v_pred" in state and state["v_pred"].numel() == 0


def test_sd2_appended_block_is_an_exact_identity():
    """A tool that runs all original blocks (last layer instead of penultimate) gets the same states."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    pipe = load_pipeline("tiny:sd2")
    config = pipe.text_encoder.config.to_dict()
    deeper = CLIPTextModel(CLIPTextConfig(**{**config, "num_hidden_layers": config["num_hidden_layers"] + 1}))
    converted = convert_open_clip_checkpoint(deeper, single_file_state(pipe), prefix="cond_stage_model.model.")
    deeper.load_state_dict({k.removeprefix("text_model."): v for k, v in converted.items()}, strict=True)
    ids = pipe.tokenizer(["a red cat on a striped background"], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(deeper(ids).last_hidden_state, pipe.text_encoder(ids).last_hidden_state)


def test_sdxl_layout_has_both_text_encoders_and_label_emb():
    pipe = load_pipeline("tiny:sdxl")
    state = single_file_state(pipe)
    te2 = pipe.text_encoder_2.state_dict()
    assert torch.equal(state["conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"],
                       pipe.text_encoder.state_dict()["final_layer_norm.weight"])
    assert torch.equal(state["conditioner.embedders.1.model.text_projection"], te2["text_projection.weight"].T)
    assert torch.equal(state["model.diffusion_model.label_emb.0.2.weight"], pipe.unet.state_dict()["add_embedding.linear_2.weight"])
    n = pipe.text_encoder_2.config.num_hidden_layers
    assert any(f"embedders.1.model.transformer.resblocks.{n - 1}." in k for k in state)
    assert not any(f"embedders.1.model.transformer.resblocks.{n}." in k for k in state)  # SDXL keeps every block
    assert not any(k.startswith("cond_stage_model.") for k in state) and "v_pred" not in state


def _sdxl_with_distinct_text_widths():
    """tiny:sdxl with a wider second text encoder, as real SDXL has (CLIP-L 768, bigG 1280)."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    base = load_pipeline("tiny:sdxl")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        te2_config = {**base.text_encoder_2.config.to_dict(), "hidden_size": 48, "intermediate_size": 64, "projection_dim": 40}
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_config))
        unet = UNet2DConditionModel.from_config({**base.unet.config, "cross_attention_dim": 32 + 48,
                                                 "projection_class_embeddings_input_dim": 6 * 8 + 40})
    pipe = StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet, scheduler=base.scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_sdxl_with_distinct_text_widths_loads_with_plain_diffusers(tmp_path):
    """No dcustom help on the way back: diffusers' own from_single_file routes every component."""
    from diffusers import StableDiffusionXLPipeline

    from dcustom.single_file.read import sdxl_text_encoder_2_override

    pipe = _sdxl_with_distinct_text_widths()
    pipe.save_pretrained(tmp_path / "configs")
    path = save_single_file(pipe, tmp_path / "model.safetensors")
    assert sdxl_text_encoder_2_override(path, tmp_path / "configs", torch.float32) == {}
    again = StableDiffusionXLPipeline.from_single_file(str(path), config=str(tmp_path / "configs"), local_files_only=True)
    again.set_progress_bar_config(disable=True)
    _assert_same_weights(pipe, again)
    assert np.abs(_image(pipe) - _image(again)).max() < SAME_IMAGE


def test_single_file_export_refuses_other_pipelines(tmp_path):
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    pipe = DDPMPipeline(unet=UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4,
                                         down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D")), scheduler=DDPMScheduler())
    with pytest.raises(DcustomError) as err:
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert str(err.value) == ("single-file export supports SD1.x, SD2.x, SDXL, SD3/3.5 and FLUX.1 pipelines; this one is "
                              "a DDPMPipeline: save it as a diffusers folder with pipe.save_pretrained instead.")
    assert list(tmp_path.iterdir()) == []


def test_real_size_architectures_give_the_key_counts_of_the_released_checkpoints():
    """SD2.1 / SDXL-base shapes on the meta device (no memory): 686 and 1680 UNet keys, 248 VAE keys,
    196 + position_ids CLIP-L keys, as in the released files; diffusers' reader maps ours back."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    from dcustom.single_file import unet_to_ldm, vae_to_ldm
    from dcustom.single_file.text import hf_clip_to_ldm, open_clip_to_ldm

    with init_empty_weights():
        sd2 = UNet2DConditionModel(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True)
        sdxl = UNet2DConditionModel(
            block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
            attention_head_dim=(5, 10, 20), cross_attention_dim=2048, addition_embed_type="text_time",
            addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816, use_linear_projection=True)
        vae = AutoencoderKL(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                            up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2)
        vit_h = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_attention_heads=16,
                                             num_hidden_layers=23, hidden_act="gelu"))
        clip_l = CLIPTextModel(CLIPTextConfig())
    for unet, count in ((sd2, 686), (sdxl, 1680)):
        ldm = unet_to_ldm(unet.state_dict(), unet.config)
        assert len(ldm) == count
        assert set(convert_ldm_unet_checkpoint(ldm, dict(unet.config))) == set(unet.state_dict())
    ldm = unet_to_ldm(sdxl.state_dict(), sdxl.config)
    assert ldm["model.diffusion_model.input_blocks.7.1.transformer_blocks.9.attn2.to_k.weight"].shape == (1280, 2048)
    assert ldm["model.diffusion_model.output_blocks.2.2.conv.weight"].shape == (1280, 1280, 3, 3)
    ldm = vae_to_ldm(vae.state_dict(), 4)
    assert len(ldm) == 248 and set(convert_ldm_vae_checkpoint(ldm, dict(vae.config))) == set(vae.state_dict())
    assert len(hf_clip_to_ldm(clip_l, "cond_stage_model.transformer.")) == 197
    text = open_clip_to_ldm(vit_h, "cond_stage_model.model.", append_identity_block=True)
    assert {int(k.split(".")[4]) for k in text if ".resblocks." in k} == set(range(24))  # ViT-H has 24 blocks


def test_single_file_export_refuses_unmerged_adapters(tmp_path):
    from peft import LoraConfig

    pipe = load_pipeline("tiny:sd15")
    pipe.unet.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    with pytest.raises(DcustomError, match=r"the pipeline's unet has unmerged adapters \(peft layers\): merge them first"):
        save_single_file(pipe, tmp_path / "x.safetensors")
    assert list(tmp_path.iterdir()) == []
