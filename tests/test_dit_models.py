"""tiny:sd3 and tiny:flux: real diffusers MM-DiT pipelines (CLIP + T5, flow matching) built offline."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from dcustom.errors import DcustomError
from dcustom.models import family_of, load_pipeline


@pytest.mark.parametrize("kind,cls,encoders", [("sd3", "StableDiffusion3Pipeline", 3), ("flux", "FluxPipeline", 2)])
def test_tiny_dit_family_and_components(kind, cls, encoders):
    from dcustom.families import denoiser

    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    family = family_of(pipe)
    assert type(pipe).__name__ == cls and family.name == kind and family.objective == "flow" and family.is_dit
    assert len(family.text_encoders) == encoders
    assert type(getattr(pipe, family.text_encoders[-1])).__name__ == "T5EncoderModel"
    assert denoiser(pipe) is pipe.transformer
    if kind == "flux":
        assert pipe.transformer.config.guidance_embeds  # FLUX.1-dev's distilled guidance input
    # the T5 tokenizer keeps every tiny word one token and still reads anything else
    t5 = pipe.tokenizer_3 if kind == "sd3" else pipe.tokenizer_2
    assert t5.tokenize("a photo of sks dog") == ["▁a", "▁photo", "▁of", "▁sks", "▁dog"]
    assert t5.decode(t5("zq!").input_ids, skip_special_tokens=True) == "zq!"


def test_tiny_dit_builds_are_deterministic():
    a, b = load_pipeline("tiny:flux"), load_pipeline("tiny:flux")
    assert all(torch.equal(x, y) for x, y in zip(a.transformer.parameters(), b.transformer.parameters()))


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_generate_on_dit_families(cli, tmp_path, kind):
    args = ["generate", "--model", f"tiny:{kind}", "--prompt", "a red circle", "--steps", "3"]
    code, out, err = cli(*args, "--seed", "1", "-o", tmp_path / "a")
    assert code == 0, err
    code, again, _ = cli(*args, "--seed", "1", "-o", tmp_path / "b")
    code, other, _ = cli(*args, "--seed", "2", "-o", tmp_path / "c")
    assert np.array_equal(_pixels(out.strip()), _pixels(again.strip()))
    assert np.abs(_pixels(out.strip()) - _pixels(other.strip())).mean() > 1.0
    image = Image.open(out.strip())
    assert image.size == (64, 64) and json.loads(image.text["dcustom"])["model"] == f"tiny:{kind}"


def test_ddpm_sampler_refused_on_flow_models(tmp_path):
    from dcustom.generate import generate
    from dcustom.generate_config import GenerateConfig

    with pytest.raises(DcustomError, match="flow-matching model .* accepted: default"):
        generate(GenerateConfig(model="tiny:flux", scheduler="ddim", steps=2, output_dir=str(tmp_path)))


def test_dit_single_file_without_configs_is_refused_in_one_sentence(tmp_path):
    """A FLUX.1 file that is not tiny:flux's, with no config= and nothing cached: one sentence on what to pass
    (loading, layout and the other refusals: tests/test_dit_single_file.py)."""
    from safetensors.torch import save_file

    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(3, 1)}, str(tmp_path / "flux1-dev.safetensors"))
    with pytest.raises(DcustomError, match="is a FLUX.1 single file whose architecture configs are not available offline"):
        load_pipeline(str(tmp_path / "flux1-dev.safetensors"))


def test_diffusers_folder_round_trip(tmp_path):
    pipe = load_pipeline("tiny:sd3")
    pipe.save_pretrained(tmp_path / "model")
    again = load_pipeline(str(tmp_path / "model"))
    assert type(again).__name__ == "StableDiffusion3Pipeline" and family_of(again).name == "sd3"
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    kw = dict(prompt="a cat", num_inference_steps=2, height=32, width=32, output_type="np", max_sequence_length=16)
    assert np.abs(pipe(generator=g(), **kw).images - again(generator=g(), **kw).images).max() < 1e-5
