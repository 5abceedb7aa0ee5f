import json

import numpy as np
import pytest
from PIL import Image


def _pixels(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_generate_writes_reproducible_pngs(cli, tmp_path, kind):
    args = ["generate", "--model", f"tiny:{kind}", "--prompt", "a cat", "--steps", "4"]
    code, out, err = cli(*args, "--seed", "1", "-o", tmp_path / "a")
    assert code == 0, err
    first = out.strip().splitlines()
    assert len(first) == 1 and first[0].endswith(".png")
    code, out2, _ = cli(*args, "--seed", "1", "-o", tmp_path / "b")
    code, out3, _ = cli(*args, "--seed", "2", "-o", tmp_path / "c")
    same, other = out2.strip(), out3.strip()
    assert np.array_equal(_pixels(first[0]), _pixels(same)), "same seed must give the same image"
    assert np.abs(_pixels(first[0]) - _pixels(other)).mean() > 1.0, "different seeds must differ"

    image = Image.open(first[0])
    assert image.size == (64, 64)
    params = json.loads(image.text["dcustom"])
    assert params["seed"] == 1 and params["prompt"] == "a cat" and params["steps"] == 4
    assert "Seed: 1" in image.text["parameters"] and image.text["parameters"].startswith("a cat")


def test_generate_count_scheduler_and_no_overwrite(cli, tmp_path):
    args = ["generate", "--model", "tiny:sd15", "-p", "a red circle", "--steps", "3", "--seed", "5",
            "--count", "2", "--scheduler", "dpmpp_2m", "--width", "48", "--height", "32", "-o", tmp_path]
    code, out, err = cli(*args)
    assert code == 0, err
    paths = out.strip().splitlines()
    assert [p.rsplit("/", 1)[1] for p in paths] == ["00000-5.png", "00001-6.png"]
    assert Image.open(paths[0]).size == (48, 32)
    code, out, _ = cli(*args)
    assert out.strip().splitlines()[0].endswith("00002-5.png"), "a second run must not overwrite the first"


def test_generate_bad_inputs_have_clear_messages(cli, tmp_path):
    code, _, err = cli("generate", "--model", "tiny:sd15", "--scheduler", "warp", "-o", tmp_path)
    assert code == 2 and "scheduler 'warp' is not known; accepted: default, ddim" in err
    code, _, err = cli("generate", "--set", "steps=many")
    assert code == 2 and "override steps: 'many' is not valid; expected an integer" in err
    code, _, err = cli("generate", "--width", "50")
    assert code == 2 and "width must be a positive multiple of 8, got 50" in err
    code, _, err = cli("generate", "--model", "nonsense", "-o", tmp_path)
    assert code == 2 and "model spec 'nonsense' is not recognised; accepted:" in err


def test_generate_with_a_style_reference(cli, tmp_path):
    """--style-ref makes the images attend to the reference while sampled; the PNG says so and with what."""
    reference = tmp_path / "style.png"
    Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype("uint8")).save(reference)
    args = ["generate", "--model", "tiny:sd15", "-p", "a cat", "--steps", "3", "--seed", "4", "--scheduler", "ddim"]
    code, plain, err = cli(*args, "-o", tmp_path / "plain")
    assert code == 0, err
    code, styled, err = cli(*args, "--style-ref", reference, "--style-strength", "0.5", "-o", tmp_path / "styled")
    assert code == 0, err
    image = Image.open(styled.strip())
    params = json.loads(image.text["dcustom"])
    assert params["style_ref"] == str(reference) and params["style_strength"] == 0.5
    used = params["style_reference"]
    assert used["strength"] == 0.5 and used["attended_steps"] == 2 and used["sampler"] == "ddim"
    assert used["sha256"] and "shared attention" in used["method"]
    assert "Style reference: style.png, Style strength: 0.5" in image.text["parameters"]
    assert np.abs(_pixels(plain.strip()) - _pixels(styled.strip())).max() > 0

    code, zero, err = cli(*args, "--style-ref", reference, "--style-strength", "0", "-o", tmp_path / "zero")
    assert code == 0, err
    assert np.array_equal(_pixels(plain.strip()), _pixels(zero.strip())), "strength 0 must be plain DDIM sampling"


def test_generate_style_reference_bad_inputs(cli, tmp_path):
    code, _, err = cli("generate", "--model", "tiny:sd15", "--style-ref", tmp_path / "missing.png", "-o", tmp_path)
    assert code == 2 and f"style reference image (style_ref) file '{tmp_path / 'missing.png'}' does not exist." in err
    assert "loading" not in err  # refused before the model loads
    not_image = tmp_path / "notes.png"
    not_image.write_text("not a picture")
    code, _, err = cli("generate", "--model", "tiny:sd15", "--style-ref", not_image, "-o", tmp_path)
    assert code == 2 and "could not be read as an image" in err
    code, _, err = cli("generate", "--style-ref", not_image, "--style-strength", "2")
    assert code == 2 and "style_strength must be between 0 and 1, got 2.0" in err
    code, _, err = cli("generate", "--style-ref", not_image, "--scheduler", "euler")
    assert code == 2 and "scheduler 'euler' cannot be used with a style reference" in err
