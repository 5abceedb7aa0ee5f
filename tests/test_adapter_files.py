"""`dcustom adapters inspect|convert|merge|extract` and generation with --adapter, on tiny SD1.x."""

from __future__ import annotations


import pytest
from image_helpers import write_noise_images
import torch

from dcustom.adapters.load import load_adapter
from dcustom.data import DataConfig
from dcustom.models import load_pipeline
from dcustom.trainers.adapter.config import LoraTrainConfig, OftTrainConfig
from dcustom.trainers.adapter.trainer import train
from dcustom.trainers.loop import LoopConfig

PROMPT = "a photo of sks dog"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    images = write_noise_images(root / "imgs", [(32, 32)] * 2, seed=1)
    data = DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32)
    loop = dict(steps=1, lr=2e-2, device="cpu", checkpoint_every=0)
    lora = train(LoraTrainConfig(model="tiny:sd15", data=data, train=LoopConfig(output_dir=str(root / "lora"), **loop),
                                 rank=4, alpha=2.0, text_encoder_lora=True, text_encoder_rank=2,
                                 validation_prompts=[], sample_steps=2), progress=False)
    oft = train(OftTrainConfig(model="tiny:sd15", data=data, train=LoopConfig(output_dir=str(root / "oft"), **loop),
                               block_size=8, extract_rank=0, validation_prompts=[], sample_steps=2), progress=False)
    return root, lora, oft


def render(pipe):
    g = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=2, generator=g, output_type="pt", width=32, height=32).images


def with_adapter(path, scale=1.0):
    pipe = load_pipeline("tiny:sd15", device="cpu")
    load_adapter(pipe, path, scale=scale)
    return render(pipe)


def test_inspect_shows_true_alpha(cli, runs):
    root, _, _ = runs
    code, out, err = cli("adapters", "inspect", root / "lora" / "lora_kohya.safetensors")
    assert code == 0, err
    assert "format             kohya" in out and "alphas             [2.0]" in out and "family             sd1" in out
    code, out, _ = cli("adapters", "inspect", root / "oft")
    assert code == 0 and "peft_type          OFT" in out and "method             oft" in out


def test_convert_both_ways_keeps_output(cli, runs):
    root, _, _ = runs
    reference = with_adapter(root / "lora" / "pytorch_lora_weights.safetensors")
    code, out, err = cli("adapters", "convert", root / "lora" / "pytorch_lora_weights.safetensors", "--to", "kohya",
                         "-o", root / "k.safetensors")
    assert code == 0, err
    assert (with_adapter(root / "k.safetensors") - reference).abs().max() < 1e-5
    code, out, err = cli("adapters", "convert", root / "k.safetensors", "--to", "diffusers", "-o", root / "d.safetensors")
    assert code == 0, err
    assert (with_adapter(root / "d.safetensors") - reference).abs().max() < 1e-5
    code, _, err = cli("adapters", "convert", root / "oft", "--to", "kohya", "-o", root / "x.safetensors")
    assert code == 2 and "is a peft (OFT/BOFT) adapter; use '--to full'" in err and "'dcustom adapters extract'" in err


def test_merge_and_extract(cli, runs):
    root, _, _ = runs
    for adapter, name in ((f"{root / 'lora'}:0.5", "m_lora"), (str(root / "oft"), "m_oft")):
        code, out, err = cli("adapters", "merge", "-m", "tiny:sd15", "-a", adapter, "-o", root / name)
        assert code == 0, err
        path, _, weight = adapter.partition(":")
        expected = with_adapter(path, float(weight or 1.0))
        merged = load_pipeline(str(root / name), device="cpu")
        assert (render(merged) - expected).abs().max() < 1e-4, name
    code, out, err = cli("adapters", "merge", "-m", "tiny:sd15", "-a", f"{root / 'lora'}:0.5", "-o", root / "m.safetensors")
    assert code == 0, err  # one original-layout checkpoint, read back by diffusers' from_single_file
    single = load_pipeline(str(root / "m.safetensors"), device="cpu", config=str(root / "m_lora"))
    assert (render(single) - render(load_pipeline(str(root / "m_lora"), device="cpu"))).abs().max() == 0
    from safetensors.torch import save_file

    save_file({"<tok>": torch.randn(1, 32)}, str(root / "emb.safetensors"))
    code, out, err = cli("adapters", "merge", "-m", "tiny:sd15", "-a", root / "emb.safetensors", "-o", root / "te.safetensors")
    assert code != 0 and "a single-file checkpoint has no place for textual-inversion tokens" in err + out
    assert not (root / "te.safetensors").exists()
    code, out, err = cli("adapters", "extract", "-m", "tiny:sd15", "-a", root / "oft", "-r", "64", "-o", root / "e.safetensors")
    assert code == 0, err
    assert "relative error of the weight deltas (Frobenius): 0.0000" in out  # rank 64 >= every layer width: exact
    assert (with_adapter(root / "e.safetensors") - with_adapter(root / "oft")).abs().max() < 1e-4


def test_generate_with_adapter_option(cli, runs, tmp_path):
    root, _, _ = runs
    code, out, err = cli("generate", "-m", "tiny:sd15", "-p", PROMPT, "--steps", "2", "--seed", "0", "--width", "32",
                         "--height", "32", "-o", tmp_path, "--adapter", f"{root / 'lora'}:0.8", "--device", "cpu")
    assert code == 0, err
    assert len(list(tmp_path.glob("*.png"))) == 1


# --- DoRA in kohya/A1111 form --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dora_run(runs):
    root = runs[0]
    data = DataConfig(images=str(root / "imgs"), instance_prompt=PROMPT, resolution=32)
    result = train(LoraTrainConfig(model="tiny:sd15", data=data, rank=4, alpha=2.0, dora=True, validation_prompts=[],
                                   train=LoopConfig(output_dir=str(root / "dora"), steps=1, lr=2e-2, device="cpu",
                                                    checkpoint_every=0)), progress=False)
    return root / "dora" / "pytorch_lora_weights.safetensors", result


def test_kohya_dora_file_follows_comfyuis_dora_formula(cli, dora_run, tmp_path):
    """ComfyUI: W' = dora_scale * (W + s*B@A) / (||W||_row + eps) with the file's tensors and the base weights
    equals peft's merged weight (peft divides by ||W + s*B@A||_row: the file carries ComfyUI's form for that)."""
    from safetensors.torch import load_file

    from dcustom.adapters.files import kohya_module_name, merged_linear_weights, read_metadata

    diffusers_file, _ = dora_run
    code, _, err = cli("adapters", "convert", diffusers_file, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, err  # the base model comes from the file's header (tiny:sd15)
    assert read_metadata(tmp_path / "k.safetensors")["dcustom.dora_scale"] == "comfyui"
    tensors = load_file(str(tmp_path / "k.safetensors"))
    pipe = load_pipeline("tiny:sd15", device="cpu")
    name = load_adapter(pipe, diffusers_file)
    merged = {kohya_module_name("lora_unet", m): pair for m, pair in merged_linear_weights(pipe.unet, name).items()}
    assert merged and {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".dora_scale")} == set(merged)
    worst, non_square = 0.0, 0
    for module, (base, peft_weight) in merged.items():
        down, up = tensors[f"{module}.lora_down.weight"], tensors[f"{module}.lora_up.weight"]
        scale, magnitude = tensors[f"{module}.alpha"].item() / down.shape[0], tensors[f"{module}.dora_scale"]
        assert magnitude.shape == (base.shape[0], 1)  # output axis, as ComfyUI recognises it
        norm = base.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
        reference = magnitude * (base + scale * up @ down) / norm
        worst = max(worst, (reference - peft_weight).abs().max().item())
        non_square += base.shape[0] != base.shape[1]
    assert non_square > 0 and worst < 1e-5, worst


def test_kohya_dora_loads_like_the_diffusers_file(cli, dora_run, tmp_path):
    diffusers_file, _ = dora_run
    cli("adapters", "convert", diffusers_file, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    reference = with_adapter(diffusers_file)
    base = render(load_pipeline("tiny:sd15", device="cpu"))
    assert (reference - base).abs().max() > 1e-3
    # diffusers itself drops dora_scale from kohya files and loads a plain LoRA: visibly different output
    plain = load_pipeline("tiny:sd15", device="cpu")
    plain.load_lora_weights(str(tmp_path), weight_name="k.safetensors")
    assert not plain.unet.peft_config["default_0"].use_dora and (render(plain) - reference).abs().max() > 1e-4
    # dcustom's loader keeps the magnitudes (from ComfyUI's form, with the base weights: float rounding only),
    # and kohya -> diffusers conversion keeps them too
    assert (with_adapter(tmp_path / "k.safetensors") - reference).abs().max() < 1e-5
    code, _, err = cli("adapters", "convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert code == 0, err
    assert (with_adapter(tmp_path / "d.safetensors") - reference).abs().max() < 1e-5
    code, out, _ = cli("adapters", "inspect", tmp_path / "k.safetensors")
    assert code == 0 and "dora               48 modules, magnitude on the output axis" in out


def test_input_axis_dora_scale_is_refused(dora_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from dcustom.adapters.kohya import diffusers_to_kohya
    from dcustom.errors import DcustomError

    diffusers_file, _ = dora_run
    tensors = load_file(str(diffusers_to_kohya(diffusers_file, tmp_path / "k.safetensors")))
    key = next(k for k in tensors if k.endswith(".dora_scale"))
    tensors[key] = torch.ones(1, tensors[key.replace("dora_scale", "lora_down.weight")].shape[1])  # A1111's axis
    save_file(tensors, str(tmp_path / "input_axis.safetensors"))
    with pytest.raises(DcustomError, match=r"decomposes the input axis \(LyCORIS default, A1111\); peft DoRA needs the output axis"):
        load_adapter(load_pipeline("tiny:sd15", device="cpu"), tmp_path / "input_axis.safetensors")


# --- issue 19: the text-encoder alpha, which file is for which tool ----------------------------------------------------
@pytest.mark.parametrize("te_alpha,expected", [(None, 6.0), (1.5, 1.5)])
def test_text_encoder_lora_uses_the_configured_alpha(runs, tmp_path, te_alpha, expected):
    """The text-encoder LoRA's alpha is text_encoder_alpha, else alpha; never silently its rank (was forced to it)."""
    import json

    from safetensors.torch import load_file

    from dcustom.adapters.files import read_metadata

    root = runs[0]
    data = DataConfig(images=str(root / "imgs"), instance_prompt=PROMPT, resolution=32)
    result = train(LoraTrainConfig(model="tiny:sd15", data=data, rank=4, alpha=6.0, text_encoder_lora=True,
                                   text_encoder_rank=2, text_encoder_alpha=te_alpha, validation_prompts=[],
                                   train=LoopConfig(output_dir=str(tmp_path), steps=1, lr=2e-2, device="cpu",
                                                    checkpoint_every=0)), progress=False)
    assert result.method.pipe.text_encoder.peft_config["default"].lora_alpha == expected
    kohya = load_file(str(tmp_path / "lora_kohya.safetensors"))
    assert {v.item() for k, v in kohya.items() if k.startswith("lora_te_") and k.endswith(".alpha")} == {expected}
    assert {v.item() for k, v in kohya.items() if k.startswith("lora_unet_") and k.endswith(".alpha")} == {6.0}
    meta = read_metadata(tmp_path / "pytorch_lora_weights.safetensors")
    assert json.loads(meta["lora_adapter_metadata"])["text_encoder.lora_alpha"] == expected
    assert json.loads(meta["dcustom.config"])["text_encoder_alpha"] == te_alpha


def test_inspect_says_which_tools_each_file_is_for(cli, runs, tmp_path):
    from dcustom.errors import DcustomError

    root, _, _ = runs
    code, out, err = cli("adapters", "inspect", root / "lora" / "pytorch_lora_weights.safetensors")
    assert code == 0, err
    assert "use_with           diffusers pipe.load_lora_weights (transformers 4 and 5)" in out
    assert "not_for            ComfyUI/Forge, A1111, InvokeAI" in out and "lora_kohya.safetensors" in out
    code, out, _ = cli("adapters", "inspect", root / "lora" / "lora_kohya.safetensors")
    assert "use_with           diffusers (transformers 4 and 5), ComfyUI/Forge, A1111, InvokeAI, dcustom" in out
    code, out, _ = cli("adapters", "inspect", root / "oft")
    assert "not_for            ComfyUI/Forge, A1111, InvokeAI: use full_diff.safetensors" in out
    code, out, err = cli("adapters", "convert", root / "oft", "--to", "full", "-o", tmp_path / "full.safetensors")
    assert code == 0, err  # the base model comes from the folder's header
    code, out, _ = cli("adapters", "inspect", tmp_path / "full.safetensors")
    assert "use_with           ComfyUI/Forge, A1111, InvokeAI (exact weight differences)" in out
    with pytest.raises(DcustomError, match="holds full weight differences .* load the run's peft folder"):
        with_adapter(tmp_path / "full.safetensors")  # tests/test_interop_oft.py applies it as the tools do


def test_lora_beyond_attention_loads_every_layer(tmp_path):
    """A LoRA on attention, feed-forward, proj_in/out and resnet convs: diffusers renames only the attention keys
    and reads a file's form from its first key, so a mixed file loaded without its attention layers. Every
    trained tensor must come back from both the diffusers and the kohya file."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    images = write_noise_images(tmp_path / "imgs", [(32, 32)] * 2, seed=2)
    targets = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out", "conv1", "conv2"]
    cfg = LoraTrainConfig(model="tiny:sd15", data=DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32),
                          train=LoopConfig(output_dir=str(tmp_path / "run"), steps=2, lr=2e-2, device="cpu",
                                           checkpoint_every=0), rank=4, alpha=8.0, target_modules=targets,
                          init="gaussian", validation_prompts=[], sample_steps=2)
    run = train(cfg, progress=False)
    saved = load_file(str(run.run_dir / "pytorch_lora_weights.safetensors"))
    assert any(".to_q." in k for k in saved) and any(".conv1." in k for k in saved)
    for name in ("pytorch_lora_weights.safetensors", "lora_kohya.safetensors"):
        pipe = load_pipeline("tiny:sd15", device="cpu")
        load_adapter(pipe, run.run_dir / name)
        loaded = get_peft_model_state_dict(pipe.unet, adapter_name=pipe.unet.active_adapters()[0])
        assert len(loaded) == len(saved), (name, len(loaded), len(saved))
        ups = [k for k in loaded if k.endswith("lora_B.weight")]
        assert all(float(loaded[k].abs().max()) > 0 for k in ups), name
    reference = with_adapter(run.run_dir / "pytorch_lora_weights.safetensors")
    assert (with_adapter(run.run_dir / "lora_kohya.safetensors") - reference).abs().max() < 1e-5


def test_boft_on_convs_extracts_a_conv_lora_and_oft_refuses_them(tmp_path):
    """BOFT on resnet convs: the extracted kohya LoRA holds conv factors (LoCon form, down [r, in, kh, kw], up
    [out, r, 1, 1]) and, at full rank, draws as the BOFT adapter does. OFT on a conv is refused before training:
    peft merges OFT convolutions differently from how it runs them, so its exports would not draw as trained."""
    from safetensors.torch import load_file

    from dcustom.errors import DcustomError
    from dcustom.trainers.adapter.config import BoftTrainConfig

    images = write_noise_images(tmp_path / "imgs", [(32, 32)] * 2, seed=3)
    data = DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32)
    loop = dict(steps=2, lr=5e-2, device="cpu", checkpoint_every=0)
    cfg = BoftTrainConfig(model="tiny:sd15", data=data, train=LoopConfig(output_dir=str(tmp_path / "run"), **loop),
                          target_modules=["conv1", "conv2"], block_size=4, butterfly_factor=2, extract_rank=64,
                          validation_prompts=[], sample_steps=2)
    run = train(cfg, progress=False)
    extracted = load_file(str(run.run_dir / "lora_extracted_kohya.safetensors"))
    downs = {k: v for k, v in extracted.items() if k.endswith("conv1.lora_down.weight")}
    assert downs and all(v.dim() == 4 and v.shape[0] == 64 for v in downs.values())
    reference = with_adapter(run.run_dir)
    assert (with_adapter(run.run_dir / "lora_extracted_kohya.safetensors") - reference).abs().max() < 1e-3
    assert (reference - render(load_pipeline("tiny:sd15", device="cpu"))).abs().max() > 1e-3
    oft = OftTrainConfig(model="tiny:sd15", data=data, train=LoopConfig(output_dir=str(tmp_path / "oft"), **loop),
                         target_modules=["to_q", "conv1"], block_size=8, validation_prompts=[], sample_steps=2)
    with pytest.raises(DcustomError, match=r"target_modules: OFT on the convolution '.*conv1' is not supported"):
        train(oft, progress=False)
