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
