"""SD3 and FLUX single-file checkpoints: written in the community's original layout, loaded offline by load_pipeline."""

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dcustom.errors import DcustomError
from dcustom.models import family_of, load_pipeline
from dcustom.single_file import save_single_file, single_file_state
from dcustom.single_file.dit import DIT_PREFIX, transformer_to_original
from dcustom.single_file.dit_load import dit_family_of_keys

# The weights are compared bit for bit (_assert_same_weights). The images of two pipelines with identical weights
# matched exactly on earlier machines but differed by 2e-6 on one (SD3 and FLUX, repeatably), so the CPU's kernels,
# not the files, decide the last bits. A wrong config or component differs by far more.
SAME_IMAGE = 1e-5

COMPONENTS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# names the community's all-in-one files carry (ComfyUI, Stability's *_incl_clips*, BFL's transformer)
LAYOUT = {
    "flux": ["model.diffusion_model.double_blocks.1.img_attn.qkv.weight", "model.diffusion_model.single_blocks.1.linear1.weight",
             "model.diffusion_model.double_blocks.0.txt_attn.norm.key_norm.scale", "model.diffusion_model.guidance_in.in_layer.weight",
             "model.diffusion_model.final_layer.adaLN_modulation.1.weight", "first_stage_model.decoder.up.2.block.0.conv1.weight",
             "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding.weight",
             "text_encoders.t5xxl.transformer.shared.weight", "text_encoders.t5xxl.transformer.encoder.final_layer_norm.weight"],
    "sd3": ["model.diffusion_model.joint_blocks.1.x_block.attn.qkv.weight", "model.diffusion_model.pos_embed",
            "model.diffusion_model.joint_blocks.1.context_block.adaLN_modulation.1.weight", "model.diffusion_model.y_embedder.mlp.0.weight",
            "first_stage_model.encoder.down.0.block.0.conv1.weight",
            "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight",
            "text_encoders.clip_g.transformer.text_projection.weight", "text_encoders.t5xxl.transformer.shared.weight"],
}


def _tiny(kind):
    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    if kind == "sd3":  # SD3 pools CLIP-L unprojected: its layout has no CLIP-L projection to keep
        with torch.no_grad():
            pipe.text_encoder.text_projection.weight.copy_(torch.eye(pipe.text_encoder.config.hidden_size))
    return pipe


def _image(pipe, seed=0):
    return pipe(prompt="a red cat", num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16,
                generator=torch.Generator().manual_seed(seed)).images


def _assert_same_weights(ours, theirs):
    for name in COMPONENTS:
        if getattr(ours, name, None) is None:
            continue
        a, b = getattr(ours, name).state_dict(), getattr(theirs, name).state_dict()
        assert set(a) == set(b), name
        assert not [k for k in a if not torch.equal(a[k], b[k])], name


def _keys(path):
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


@pytest.mark.parametrize("kind,cls", [("sd3", "StableDiffusion3Pipeline"), ("flux", "FluxPipeline")])
def test_one_file_round_trip_draws_the_same_image(kind, cls, tmp_path):
    pipe = _tiny(kind)
    path = save_single_file(pipe, tmp_path / f"{kind}.safetensors")
    keys = _keys(path)
    assert set(LAYOUT[kind]) <= keys
    assert not any(".to_q." in k or "transformer_blocks." in k for k in keys)  # no diffusers names left
    assert dit_family_of_keys(keys) == kind
    again = load_pipeline(str(path), device="cpu")  # no config: the file's shapes are tiny:<kind>'s, built offline
    assert type(again).__name__ == cls and family_of(again).name == kind
    _assert_same_weights(pipe, again)
    assert np.abs(_image(pipe) - _image(again)).max() < SAME_IMAGE


def test_configs_from_a_given_folder_and_a_transformer_only_file(tmp_path):
    """BFL's flux1-dev.safetensors layout: bare transformer keys; VAE and text encoders come from the folder."""
    pipe = _tiny("flux")
    pipe.save_pretrained(tmp_path / "model")
    state = {k: v.contiguous() for k, v in transformer_to_original(pipe.transformer.state_dict(), "flux", prefix="").items()}
    save_file(state, str(tmp_path / "flux1-tiny.safetensors"))
    assert dit_family_of_keys(state) == "flux"
    again = load_pipeline(str(tmp_path / "flux1-tiny.safetensors"), device="cpu", config=str(tmp_path / "model"))
    _assert_same_weights(pipe, again)
    assert np.abs(_image(pipe) - _image(again)).max() < SAME_IMAGE
    with pytest.raises(DcustomError) as excinfo:  # a folder of configs only cannot give the other components
        load_pipeline(str(tmp_path / "flux1-tiny.safetensors"), config=str(_configs(tmp_path)))
    assert "does not hold the text_encoder and the folder" in _one_sentence(excinfo, tmp_path / "flux1-tiny.safetensors")


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_our_transformer_layout_is_what_diffusers_reads(kind):
    """diffusers' own converters map our file back to the same tensors. Its FLUX converter assumes FLUX.1's
    widths (3072, MLP 12288) when it splits `linear1`, so FLUX is checked on tensors of those heights."""
    from diffusers.loaders import single_file_utils as sfu

    state = _tiny(kind).transformer.state_dict()
    if kind == "flux":
        g = torch.Generator().manual_seed(0)
        height = lambda k: 12288 if k.endswith(("proj_mlp.weight", "proj_mlp.bias")) else 3072  # noqa: E731
        state = {k: torch.randn(height(k), 2, generator=g) if k.startswith("single_transformer_blocks.") and
                 (".attn.to_" in k or ".proj_mlp." in k) else v for k, v in state.items()}
        read = sfu.convert_flux_transformer_checkpoint_to_diffusers
    else:
        read = sfu.convert_sd3_transformer_checkpoint_to_diffusers
    back = read(transformer_to_original(state, kind))
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)


def test_family_detection_from_keys():
    assert dit_family_of_keys([DIT_PREFIX + "joint_blocks.0.x_block.attn.qkv.weight"]) == "sd3"
    assert dit_family_of_keys(["double_blocks.0.img_attn.qkv.weight", "single_blocks.0.linear1.weight"]) == "flux"
    assert dit_family_of_keys(["model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.x"]) is None


def test_generate_from_the_file_matches_the_tiny_model(cli, tmp_path):
    from PIL import Image

    save_single_file(_tiny("flux"), tmp_path / "flux.safetensors")
    args = ["generate", "--prompt", "a red circle", "--steps", "2", "--seed", "3"]
    code, ours, err = cli(*args, "--model", tmp_path / "flux.safetensors", "-o", tmp_path / "a")
    assert code == 0, err
    code, theirs, err = cli(*args, "--model", "tiny:flux", "-o", tmp_path / "b")
    assert code == 0, err
    a, b = (np.asarray(Image.open(p.strip()).convert("RGB")) for p in (ours, theirs))
    assert a.shape == (64, 64, 3) and np.array_equal(a, b)


# ------------------------------------------------------------------ refusals: one sentence naming the file


def _one_sentence(excinfo, path):
    message = str(excinfo.value)
    assert str(path) in message and message.endswith(".") and "\n" not in message
    return message


def test_truncated_files_are_refused(tmp_path):
    path = save_single_file(_tiny("flux"), tmp_path / "flux.safetensors")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys() if k != DIT_PREFIX + "single_blocks.1.linear2.weight"}
    save_file(state, str(tmp_path / "missing.safetensors"))
    with pytest.raises(DcustomError) as excinfo:
        load_pipeline(str(tmp_path / "missing.safetensors"), config=str(_configs(tmp_path)))
    assert "is not a complete FLUX.1 single file: it lacks the transformer weight " \
           "'model.diffusion_model.single_blocks.1.linear2.weight'" in _one_sentence(excinfo, tmp_path / "missing.safetensors")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DcustomError, match="is not a readable safetensors file") as excinfo:
        load_pipeline(str(cut))
    _one_sentence(excinfo, cut)


def _configs(tmp_path, kind="flux"):
    from dcustom.single_file.dit_load import write_configs

    return write_configs(load_pipeline(f"tiny:{kind}"), tmp_path / f"{kind}-configs")


def test_files_that_do_not_fit_are_refused(tmp_path):
    path = save_single_file(_tiny("flux"), tmp_path / "flux.safetensors")
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state[DIT_PREFIX + "img_in.weight"] = torch.zeros(32, 8)
    save_file(state, str(tmp_path / "other.safetensors"))
    with pytest.raises(DcustomError) as excinfo:  # not tiny, no config, nothing cached: says what to pass
        load_pipeline(str(tmp_path / "other.safetensors"))
    assert "whose architecture configs are not available offline; pass config=" in _one_sentence(
        excinfo, tmp_path / "other.safetensors")
    with pytest.raises(DcustomError) as excinfo:
        load_pipeline(str(tmp_path / "other.safetensors"), config=str(_configs(tmp_path)))
    assert "does not fit the FLUX.1 architecture" in _one_sentence(excinfo, tmp_path / "other.safetensors")
    assert "'img_in.weight' is [32, 8] in the file, [32, 16] expected" in str(excinfo.value)
    with pytest.raises(DcustomError) as excinfo:
        load_pipeline(str(path), config=str(_configs(tmp_path, "sd3")))
    assert "holds a StableDiffusion3Pipeline, but checkpoint" in _one_sentence(excinfo, path)


def test_foreign_files_and_unwritable_pipelines_are_refused(tmp_path):
    save_file({"encoder.layer.0.weight": torch.zeros(2)}, str(tmp_path / "bert.safetensors"))
    with pytest.raises(DcustomError, match="has no UNet weights .* no SD3/FLUX transformer .* accepted: a full "
                                           "SD1.x/2.x/SDXL, SD3/3.5 or FLUX.1 checkpoint") as excinfo:
        load_pipeline(str(tmp_path / "bert.safetensors"))
    _one_sentence(excinfo, tmp_path / "bert.safetensors")
    torch.save({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "flux.ckpt"))
    with pytest.raises(DcustomError, match="reads SD3/FLUX single files as .safetensors only"):
        load_pipeline(str(tmp_path / "flux.ckpt"))
    # tiny:sd3 as built has a random CLIP-L projection, which SD3's layout cannot hold
    with pytest.raises(DcustomError, match="CLIP-L has a text projection, which SD3's original layout does not apply"):
        single_file_state(load_pipeline("tiny:sd3"))


def test_adapters_merge_writes_a_flux_single_file(cli, tmp_path):
    """`adapters merge -o x.safetensors` on FLUX: the LoRA baked in, the file loads back and draws as the LoRA does."""
    from peft import LoraConfig

    from dcustom.adapters.files import dcustom_metadata, save_diffusers_lora
    from dcustom.adapters.load import load_adapter

    pipe = load_pipeline("tiny:flux", device="cpu")
    pipe.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "proj_mlp"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    src = save_diffusers_lora(tmp_path, pipe, [], dcustom_metadata("flow_lora", "tiny:flux", "flux", None, "x"))
    code, out, err = cli("adapters", "merge", "--model", "tiny:flux", "--adapter", src, "-o", tmp_path / "merged.safetensors")
    assert code == 0, err
    with_lora = load_pipeline("tiny:flux", device="cpu")
    load_adapter(with_lora, src)
    merged = load_pipeline(str(tmp_path / "merged.safetensors"), device="cpu")
    error = np.abs(_image(merged) - _image(with_lora)).max()
    print(f"merged single file vs LoRA applied: max |Δpixel| {error:.1e}")
    assert error < 1e-4
    assert np.abs(_image(merged) - _image(load_pipeline("tiny:flux", device="cpu"))).max() > 1e-3  # the LoRA is in it


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_released_size_architectures_map_both_ways_on_meta(kind):
    """FLUX.1-dev's transformer and SD3.5-medium's (dual attention in 13 blocks, RMS q/k norms), on the meta device
    (no memory; a small position table, whose size is no key): diffusers' converters take our names back to every
    diffusers key with its shape."""
    from accelerate import init_empty_weights
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from diffusers.loaders import single_file_utils as sfu

    with init_empty_weights():
        if kind == "flux":
            model, read = FluxTransformer2DModel(guidance_embeds=True), sfu.convert_flux_transformer_checkpoint_to_diffusers
        else:
            model = SD3Transformer2DModel(sample_size=128, num_layers=24, attention_head_dim=64, num_attention_heads=24,
                                          joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                                          out_channels=16, pos_embed_max_size=32, dual_attention_layers=tuple(range(13)),
                                          qk_norm="rms_norm")
            read = sfu.convert_sd3_transformer_checkpoint_to_diffusers
    state = model.state_dict()
    ours = transformer_to_original(state, kind)
    assert len(ours) == {"flux": 780, "sd3": 665}[kind]
    back = read(dict(ours))
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
