import time

import numpy as np
import pytest
import torch

from dcustom.errors import DcustomError
from dcustom.models import load_pipeline


def _image(pipe, seed=0, steps=3):
    return pipe("a cat", num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.parametrize("kind,family,prediction", [("sd15", "sd1", "epsilon"), ("sd2", "sd2", "v_prediction"), ("sdxl", "sdxl", "epsilon")])
def test_tiny_specs_detect_family(kind, family, prediction):
    from dcustom.families import prediction_type
    from dcustom.models import family_of

    pipe = load_pipeline(f"tiny:{kind}")
    assert family_of(pipe).name == family
    assert prediction_type(pipe) == prediction
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32


def test_tiny_pipelines_are_deterministic_builds():
    a, b = load_pipeline("tiny:sd15"), load_pipeline("tiny:sd15")
    assert all(torch.equal(x, y) for x, y in zip(a.unet.parameters(), b.unet.parameters()))


def test_diffusers_folder_round_trip(tmp_path):
    pipe = load_pipeline("tiny:sd15")
    pipe.save_pretrained(tmp_path / "model")
    again = load_pipeline(str(tmp_path / "model"))
    assert np.abs(_image(pipe) - _image(again)).max() < 1e-5


def test_unknown_spec_lists_what_is_accepted():
    with pytest.raises(DcustomError) as err:
        load_pipeline("stable diffusion please")
    assert "is not recognised; accepted: 'tiny:sd15', 'tiny:sd2', 'tiny:sdxl', 'tiny:sd3', 'tiny:flux', 'builtin:toy'" in str(err.value)
    with pytest.raises(DcustomError, match="'tiny:sd4' is not a tiny pipeline; accepted: tiny:sd15, tiny:sd2, tiny:sdxl, tiny:sd3, tiny:flux"):
        load_pipeline("tiny:sd4")
    with pytest.raises(DcustomError, match="'builtin:flux' is not a built-in model; accepted: 'builtin:toy'"):
        load_pipeline("builtin:flux")


def test_missing_paths(tmp_path):
    with pytest.raises(DcustomError, match=r"checkpoint file '.*nowhere\.safetensors' does not exist"):
        load_pipeline(str(tmp_path / "nowhere.safetensors"))
    with pytest.raises(DcustomError, match=r"model path '\./no/such/folder' does not exist"):
        load_pipeline("./no/such/folder")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DcustomError, match="is not a diffusers model folder: it has no model_index.json"):
        load_pipeline(str(tmp_path / "empty"))


def test_corrupt_and_wrong_checkpoints(tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(DcustomError, match="is not a readable safetensors file"):
        load_pipeline(str(bad))
    from safetensors.torch import save_file

    lora_like = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.tensor(4.0)}, str(lora_like))
    with pytest.raises(DcustomError, match="has no UNet weights .* For a LoRA file use load_adapter instead"):
        load_pipeline(str(lora_like))
    pickle = tmp_path / "evil.ckpt"
    import pickle as pk

    pickle.write_bytes(pk.dumps(object()))
    with pytest.raises(DcustomError, match="could not be read as a weights-only .ckpt"):
        load_pipeline(str(pickle))


def test_hub_id_offline_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.monotonic()
    with pytest.raises(DcustomError) as err:
        load_pipeline("some-org/some-model-that-is-not-cached")
    assert time.monotonic() - start < 30
    assert "is not in the local Hugging Face cache and the hub cannot be reached (offline)" in str(err.value)


def test_builtin_toy_says_clearly_when_missing():
    from dcustom.models import toy_model_dir

    if toy_model_dir() is not None:
        pipe = load_pipeline("builtin:toy")
        assert pipe.unet is not None
        return
    with pytest.raises(DcustomError, match="builtin:toy is not shipped in this install yet"):
        load_pipeline("builtin:toy")


def test_toy_override_points_builtin_toy_at_a_candidate_folder(tmp_path, monkeypatch):
    from dcustom.models import TOY_OVERRIDE_ENV

    load_pipeline("tiny:sd15").save_pretrained(tmp_path / "candidate")
    monkeypatch.setenv(TOY_OVERRIDE_ENV, str(tmp_path / "candidate"))
    assert load_pipeline("builtin:toy").unet.config.sample_size == load_pipeline("tiny:sd15").unet.config.sample_size
    monkeypatch.setenv(TOY_OVERRIDE_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DcustomError, match="DCUSTOM_TOY_MODEL_DIR=.* is not a diffusers model folder"):
        load_pipeline("builtin:toy")


def test_bad_dtype():
    with pytest.raises(DcustomError, match="dtype 'fp8' is not known; accepted: auto, fp32, fp16, bf16"):
        load_pipeline("tiny:sd15", dtype="fp8")
