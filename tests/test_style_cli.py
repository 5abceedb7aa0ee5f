"""`dcustom style`: inputs of any size/mode, result + grid files, one-sentence errors."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from dcustom.cli import app
from dcustom.errors import DcustomError
from dcustom.pipelines.images import fit, read_image


def write_inputs(tmp_path):
    rng = np.random.RandomState(0)
    content = tmp_path / "content.png"
    Image.fromarray((rng.rand(90, 120, 4) * 255).astype("uint8"), "RGBA").save(content)  # RGBA, not square
    style = tmp_path / "style.jpg"
    Image.fromarray((rng.rand(40, 40) * 255).astype("uint8"), "L").save(style)  # greyscale JPEG, small
    return content, style


def test_style_command_writes_result_and_grid(tmp_path):
    content, style = write_inputs(tmp_path)
    out = tmp_path / "out" / "stylized.png"
    result = CliRunner().invoke(app, ["style", "--content", str(content), "--style", str(style), "--model", "tiny:sd15",
                                      "--steps", "2", "--gamma", "0.3", "--temperature", "1.2", "--seed", "1",
                                      "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "out" / "stylized-grid.png").is_file()
    with Image.open(out) as img:
        assert img.size == (64, 64)
        assert '"gamma": 0.3' in img.text["dcustom"]
    with Image.open(tmp_path / "out" / "stylized-grid.png") as g:
        assert g.width > 3 * 64 and g.height >= 64


def test_attention_injection_method_from_the_cli(tmp_path):
    content, style = write_inputs(tmp_path)
    out = tmp_path / "mutual.png"
    result = CliRunner().invoke(app, ["style", "--method", "attention_injection", "--content", str(content),
                                      "--style", str(style), "--model", "tiny:sdxl", "--steps", "2",
                                      "--output", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_style_command_errors_are_one_clear_sentence(tmp_path):
    content, style = write_inputs(tmp_path)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image at all")
    runner = CliRunner()
    r = runner.invoke(app, ["style", "--content", str(broken), "--style", str(style), "--model", "tiny:sd15"])
    assert r.exit_code == 2
    assert "content image file" in r.output and "could not be read as an image" in r.output
    r = runner.invoke(app, ["style", "--content", str(tmp_path / "missing.png"), "--style", str(style)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["style", "--method", "cartoonify", "--content", str(content), "--style", str(style)])
    assert r.exit_code == 2 and "style method 'cartoonify' is not known; accepted: style_injection, attention_injection" in r.output
    r = runner.invoke(app, ["style", "--content", str(content), "--style", str(style), "--gamma", "1.5"])
    assert r.exit_code == 2 and "gamma must be between 0 and 1" in r.output
    r = runner.invoke(app, ["style", "--content", str(content), "--style", str(style), "--set", "mode=blend"])
    assert r.exit_code == 2 and "mode 'blend' is not known" in r.output


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "CMYK", "I;16", "1"])
def test_any_image_mode_becomes_rgb_at_the_model_resolution(tmp_path, mode):
    rng = np.random.RandomState(1)
    base = Image.fromarray((rng.rand(50, 70, 3) * 255).astype("uint8"))
    img = base.convert("I;16") if mode == "I;16" else base.convert(mode)
    path = tmp_path / ("x.tiff" if mode in ("CMYK", "I;16") else "x.png")
    img.save(path)
    rgb = read_image(path, "style image")
    assert rgb.mode == "RGB" and rgb.size == (70, 50)
    fitted = fit(rgb, 64, 64)
    assert fitted.size == (64, 64)


def test_style_help_and_config_print_do_not_import_torch():
    code = ("import sys\nfrom typer.testing import CliRunner\nfrom dcustom.cli import app\n"
            "r = CliRunner().invoke(app, ['style', '--help'])\nassert r.exit_code == 0 and '--content' in r.output\n"
            "r = CliRunner().invoke(app, ['config', 'print', 'style_injection'])\nassert 'gamma: 0.75' in r.output\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_read_image_error_names_the_file(tmp_path):
    bad = tmp_path / "bad.jpg"
    bad.write_text("hello")
    with pytest.raises(DcustomError, match=r"style image file '.*bad.jpg' could not be read as an image"):
        read_image(bad, "style image")


def test_eval_style_runs_end_to_end_on_one_pair(tmp_path):
    import json

    from dcustom.models import toy_model_dir

    if toy_model_dir() is None:
        pytest.skip("builtin:toy is not shipped in this install")
    out = tmp_path / "eval"
    r = CliRunner().invoke(app, ["eval", "style", "--pairs", "1", "--cached-pairs", "1", "--methods", "style_id,adain",
                                 "--steps", "3", "--psnr-steps", "2,4", "--grid-contents", "1", "-o", str(out)])
    assert r.exit_code == 0, r.output
    report = json.loads((out / "style.json").read_text())
    assert set(report["methods"]) == {"style_id", "adain"} and set(report["inversion_psnr_db"]) == {"2", "4"}
    for m in report["methods"].values():
        assert 0 <= m["content_kept"] <= 1 and m["style_distance_ratio"] > 0 and m["cached_equals_uncached"]
    assert report["references"]["ideal"]["content_kept"] == 1.0
    assert all((out / name).is_file() for name in ("style_id.png", "methods.png", "content_x_style.png"))


def test_eval_style_errors_are_one_clear_sentence(tmp_path):
    runner = CliRunner()
    r = runner.invoke(app, ["eval", "style", "--methods", "style_id,cartoon", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--methods 'style_id,cartoon': accepted are style_id" in r.output
    r = runner.invoke(app, ["eval", "style", "--pairs", "2", "--cached-pairs", "3", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--cached-pairs between 0 and --pairs" in r.output
    r = runner.invoke(app, ["eval", "style", "--psnr-steps", "10,x", "-o", str(tmp_path)])
    assert r.exit_code == 2 and "--psnr-steps '10,x' must be comma-separated positive integers" in r.output
