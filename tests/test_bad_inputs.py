"""Bad input, as a careless user or an attacker would give it: images, captions, configs, CLI arguments,
output folders, adapter / embedding / checkpoint files and app uploads.

Every case asserts its exact outcome: the input is used (maybe converted, with a note), skipped with its
reason while the run goes on, or refused with one sentence naming the file or key and what is accepted.
Around that: no traceback reaches the user (the CLI prints one `error:` line), inputs are byte-identical
afterwards, no finished output is overwritten, and nothing in a file is ever unpickled (payloads that
would create a marker file if run leave no marker). Masks (`<image>.mask.png`) do not exist yet, so they
have no cases here.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import re
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from image_helpers import write_noise_images
from PIL import Image

from dcustom.data import MAX_PIXELS, folder_digest, scan_images
from dcustom.errors import DcustomError

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "a photo of sks dog"


# --- helpers -------------------------------------------------------------------------------------
def run_cli(*args):
    """The CLI in-process: (exit code, stdout, stderr); no traceback may reach the user."""
    from typer.testing import CliRunner

    from dcustom.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stdout + result.stderr
    return result.exit_code, result.stdout, result.stderr


def error_line(err: str) -> str:
    """The one `error:` line of a refused command: a single sentence."""
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, err
    sentence = lines[0][len("error: "):]
    assert sentence.endswith("."), sentence
    return sentence


def digest(path: Path) -> str:
    path = Path(path)
    return folder_digest(path) if path.is_dir() else hashlib.sha256(path.read_bytes()).hexdigest()


def png_header_bomb(path: Path, width: int, height: int) -> Path:
    """A valid 1-bit PNG of width x height black pixels: kilobytes on disk, gigabytes once decoded as RGB."""
    row = bytes(1 + (width + 7) // 8)  # filter byte + packed pixels
    packer = zlib.compressobj(9)
    data = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.compress(row * (height % 1000))
    data += packer.flush()

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


class Payload:
    """Unpickling this creates `marker`: proof that a file's code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def noise(w=40, h=40, seed=0, mode="RGB"):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)


@pytest.fixture(scope="module")
def bombs(tmp_path_factory):
    d = tmp_path_factory.mktemp("bombs")
    return {"pillow_refuses": png_header_bomb(d / "pillow_refuses.png", 20000, 20000),
            "under_pillow_limit": png_header_bomb(d / "under_pillow_limit.png", 12000, 12000)}


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_noise_images(tmp_path_factory.mktemp("subject"), [(32, 32), (32, 32)], seed=0)


def lora_yaml(path: Path, images: Path, out: Path, **changes) -> Path:
    """configs/lora.yaml made tiny (1 step, rank 2, 32 px, CPU) plus `changes` ({'a.b': value})."""
    data = yaml.safe_load((ROOT / "configs" / "lora.yaml").read_text())
    tiny = {"model": "tiny:sd15", "rank": 2, "alpha": 2.0, "sample_steps": 1, "validation_prompts": [PROMPT],
            "data.images": str(images), "data.instance_prompt": PROMPT, "data.resolution": 32, "train.steps": 1,
            "train.device": "cpu", "train.output_dir": str(out), "train.checkpoint_every": 0, "train.warmup_steps": 0,
            "write_kohya": False}
    for key, value in {**tiny, **changes}.items():
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            target = target.setdefault(part, {})
        target[parts[-1]] = value
    path.write_text(yaml.safe_dump(data))
    return path


def lora_cfg(images: Path, out: Path, **train):
    from dcustom.data import DataConfig
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.loop import LoopConfig

    loop = dict(output_dir=str(out), steps=1, lr=1e-2, device="cpu", seed=3, checkpoint_every=0, warmup_steps=0)
    loop.update(train)
    return LoraTrainConfig(model="tiny:sd15", rank=2, alpha=2.0, write_kohya=False, sample_steps=1,
                           validation_prompts=[PROMPT], train=LoopConfig(**loop),
                           data=DataConfig(images=str(images), instance_prompt=PROMPT, resolution=32))


# === images ======================================================================================
def make_bad_image(kind: str, d: Path, bombs: dict) -> Path:
    if kind == "not_an_image":
        (d / "notes.png").write_text("this is not a picture")
        return d / "notes.png"
    if kind == "zero_bytes":
        (d / "empty.jpg").write_bytes(b"")
        return d / "empty.jpg"
    if kind == "truncated_png":
        noise(64, 64).save(d / "full.png")
        data = (d / "full.png").read_bytes()
        (d / "full.png").unlink()
        (d / "cut.png").write_bytes(data[: len(data) // 2])
        return d / "cut.png"
    if kind == "truncated_jpeg":
        noise(64, 64).save(d / "full.jpg", quality=95)
        data = (d / "full.jpg").read_bytes()
        (d / "full.jpg").unlink()
        (d / "cut.jpg").write_bytes(data[: len(data) // 2])
        return d / "cut.jpg"
    if kind == "animated_gif":
        frames = [noise(seed=s) for s in (1, 2)]
        frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
        return d / "anim.gif"
    if kind == "too_small":
        noise(8, 8).save(d / "tiny.png")
        return d / "tiny.png"
    if kind in bombs:
        shutil.copy(bombs[kind], d / f"{kind}.png")
        return d / f"{kind}.png"
    if kind == "dangling_link":
        (d / "gone.png").symlink_to(d / "nowhere.png")
        return d / "gone.png"
    if kind == "fifo":
        os.mkfifo(d / "pipe.png")
        return d / "pipe.png"
    if kind == "heic_bytes":
        (d / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + os.urandom(200))
        return d / "photo.heic"
    if kind == "caption_not_utf8":
        noise().save(d / "a.png")
        (d / "a.txt").write_bytes("un caf\xe9 au lait".encode("latin-1"))
        return d / "a.png"
    if kind == "caption_binary":
        noise().save(d / "b.png")
        (d / "b.txt").write_bytes(b"sks\x00\x01\x02dog")
        return d / "b.png"
    raise AssertionError(kind)


SKIPPED = [
    ("not_an_image", "not an image file that Pillow can identify"),
    ("zero_bytes", "not an image file that Pillow can identify"),
    ("truncated_png", "truncated or corrupt image data"),
    ("truncated_jpeg", "truncated or corrupt image data"),
    ("animated_gif", "animated image with 2 frames; export one frame as PNG or JPEG"),
    ("too_small", "too small (8x8); the shorter side must be at least 16 px"),
    ("pillow_refuses", f"too many pixels (Pillow refuses it as a decompression bomb); images up to {MAX_PIXELS:,} pixels (8192x8192) are accepted"),
    ("under_pillow_limit", f"too many pixels (12000x12000); images up to {MAX_PIXELS:,} pixels (8192x8192) are accepted"),
    ("dangling_link", "a link to nothing"),
    ("fifo", "not a regular file"),
    ("heic_bytes", "not an image file that Pillow can identify"),
    ("caption_not_utf8", "its caption a.txt is not UTF-8 text (byte 0xe9 at offset 6); save it as UTF-8"),
    ("caption_binary", "its caption b.txt holds binary data, not text"),
]


@pytest.mark.parametrize("kind,reason", SKIPPED, ids=[k for k, _ in SKIPPED])
def test_bad_image_is_skipped_with_its_reason_and_the_rest_used(kind, reason, tmp_path, bombs):
    d = tmp_path / "imgs"
    d.mkdir()
    noise(seed=9).save(d / "good.png")
    bad = make_bad_image(kind, d, bombs)
    before = digest(d) if kind != "fifo" else None
    report = scan_images(d, PROMPT, min_size=16)
    assert [r.path.name for r in report.images] == ["good.png"]
    assert [(p.name, why.split(" (")[0] if kind.startswith("truncated") else why) for p, why in report.skipped] == [(bad.name, reason)]
    assert f"1 usable image(s) in {str(d)!r}, 1 skipped" in report.summary()
    if before is not None:
        assert digest(d) == before


def test_image_just_under_pillows_limit_is_skipped_before_decoding(bombs, tmp_path):
    """12000x12000 in a few KB: Pillow only warns, and decoding it would take ~860 MB; we never decode it."""
    import resource

    d = tmp_path / "imgs"
    d.mkdir()
    shutil.copy(bombs["under_pillow_limit"], d / "big.png")
    noise().save(d / "ok.png")
    assert (d / "big.png").stat().st_size < 200_000
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    report = scan_images(d, PROMPT, min_size=16)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak < 100_000
    assert [p.name for p, _ in report.skipped] == ["big.png"] and len(report.images) == 1


CONVERTED = [
    ("cmyk.jpg", lambda p: noise(seed=1).convert("CMYK").save(p), "CMYK -> RGB"),
    ("deep16.png", lambda p: Image.fromarray(np.linspace(0, 65535, 1600).reshape(40, 40).astype(np.uint16)).save(p), "16-bit -> 8-bit"),
    ("alpha.png", lambda p: Image.new("RGBA", (40, 40), (255, 0, 0, 0)).save(p), "alpha composited on white"),
    ("palette.png", lambda p: noise(seed=2).convert("P").save(p, transparency=0), "alpha composited on white"),
]


@pytest.mark.parametrize("name,write,note", CONVERTED, ids=[c[0] for c in CONVERTED])
def test_convertible_image_is_used_with_a_note(name, write, note, tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    write(d / name)
    before = digest(d)
    report = scan_images(d, PROMPT, min_size=16)
    (record,) = report.images
    assert record.path.name == name and any(note in n for n in record.notes), record.notes
    assert f"{name}: " in report.summary() and digest(d) == before


def test_empty_caption_uses_the_instance_prompt_with_a_note(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    noise().save(d / "a.png")
    (d / "a.txt").write_text("  \n")
    (record,) = scan_images(d, PROMPT, min_size=16).images
    assert record.caption == PROMPT and record.notes == ["caption a.txt is empty: data.instance_prompt used"]


def test_caption_with_a_byte_order_mark_is_read_without_it(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    noise().save(d / "a.png")
    (d / "a.txt").write_bytes("\ufeffsks dog on grass\n".encode("utf-8"))
    (record,) = scan_images(d, PROMPT, min_size=16, caption_prefix="").images
    assert record.caption == "sks dog on grass"


def test_hidden_files_subfolders_and_sidecars_are_ignored_not_skipped(tmp_path):
    d = tmp_path / "imgs"
    (d / "sub").mkdir(parents=True)
    noise().save(d / "a.png")
    noise().save(d / "sub" / "b.png")
    (d / ".DS_Store").write_bytes(os.urandom(64))
    (d / "meta.json").write_text("{}")
    report = scan_images(d, PROMPT, min_size=16)
    assert [r.path.name for r in report.images] == ["a.png"] and report.skipped == []


@pytest.mark.parametrize("what", ["missing", "a_file", "empty", "all_bad"])
def test_image_folder_without_usable_images_is_one_sentence(what, tmp_path):
    folder = tmp_path / "imgs"
    if what == "a_file":
        folder.write_text("x")
    elif what in ("empty", "all_bad"):
        folder.mkdir()
    if what == "all_bad":
        (folder / "x.png").write_text("nope")
        noise(8, 8).save(folder / "y.png")
    with pytest.raises(DcustomError) as err:
        scan_images(folder, PROMPT, min_size=16)
    message = str(err.value)
    if what in ("missing", "a_file"):
        assert message == f"data.images: {str(folder)!r} is not a folder; pass a folder of training images."
    else:
        reasons = "the folder has no image files" if what == "empty" else \
            "x.png: not an image file that Pillow can identify; y.png: too small (8x8); the shorter side must be at least 16 px"
        assert message.startswith(f"data.images: no usable training image in {str(folder)!r} ({reasons}); accepted: ")
        assert message.endswith(f"at most {MAX_PIXELS:,} pixels.")


def test_training_goes_on_past_a_bomb_says_how_many_images_it_used_and_warns_of_long_captions(images, bombs, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(images, d)
    shutil.copy(bombs["pillow_refuses"], d / "bomb.png")
    (d / "0.txt").write_text(" ".join(["sks dog"] * 60))  # 120 words: longer than CLIP's 77 tokens
    before = digest(d)
    code, out, err = run_cli("train", "lora", "--config", lora_yaml(tmp_path / "c.yaml", d, tmp_path / "run"))
    assert code == 0, err
    assert f"used 2 image(s) from {d}" in out and f"skipped {d / 'bomb.png'}: too many pixels" in out
    assert f"training on 2 image(s) from {str(d)!r} (1 skipped)" in err
    assert "1 caption(s) are longer than the text encoder's 77 tokens (e.g. 0.png: 122 tokens); the rest of each is ignored." in err
    assert digest(d) == before and (tmp_path / "run" / "pytorch_lora_weights.safetensors").is_file()


# === configs =====================================================================================
BAD_VALUES = [
    ("rank", 0, "rank: 0 is not valid; accepted: an integer >= 1."),
    ("alpha", -1.0, "alpha: -1.0 is not valid; accepted: a number > 0."),
    ("dropout", 1.5, "dropout: 1.5 is not valid; accepted: a number >= 0 and < 1."),
    ("train.lr", -0.001, "train.lr: -0.001 is not valid; accepted: a number > 0."),
    ("train.steps", 0, "train.steps: 0 is not valid; accepted: an integer >= 1."),
    ("train.batch_size", 0, "train.batch_size: 0 is not valid; accepted: an integer >= 1."),
    ("train.seed", -5, "train.seed: -5 is not valid; accepted: an integer >= 0 and <= 2147483647."),
    ("train.keep_checkpoints", -1, "train.keep_checkpoints: -1 is not valid; accepted: an integer >= 0."),
    ("train.lr_scheduler", "wavy", "train.lr_scheduler: 'wavy' is not known; accepted: constant, constant_with_warmup, linear, cosine, cosine_with_restarts, polynomial."),
    ("train.mixed_precision", "fp8", "train.mixed_precision: 'fp8' is not known; accepted: auto, no, fp16, bf16."),
    ("train.optimizer", "sgd", "train.optimizer: 'sgd' is not known; accepted: auto, adamw, adamw8bit."),
    ("data.resolution", 4, "data.resolution: 4 is not valid; accepted: an integer >= 8 and <= 8192."),
    ("min_snr_gamma", 0.0, "min_snr_gamma: 0.0 is not valid; accepted: a number > 0."),
]


@pytest.mark.parametrize("key,value,message", BAD_VALUES, ids=[k for k, _, _ in BAD_VALUES])
def test_config_check_and_train_refuse_the_same_bad_value(key, value, message, images, tmp_path):
    path = lora_yaml(tmp_path / "bad.yaml", images, tmp_path / "run", **{key: value})
    before = digest(path)
    code, _, err = run_cli("config", "check", path)
    assert code == 2 and error_line(err) == f"{path}: {message}"
    code, _, err = run_cli("train", "lora", "--config", path)
    assert code == 2 and error_line(err) == f"{path}: {message}"
    assert not (tmp_path / "run").exists() and digest(path) == before  # refused before any work


CROSS_KEY = [
    ("train.device", "gpu", "train: device 'gpu' is not known; accepted: auto, cpu, cuda, cuda:N, mps."),
    ("target_modules", [], "target_modules is empty; name at least one UNet layer, e.g. [to_q, to_k, to_v, to_out.0]."),
]


@pytest.mark.parametrize("key,value,message", CROSS_KEY, ids=[k for k, _, _ in CROSS_KEY])
def test_checks_across_keys_agree_between_check_and_train(key, value, message, images, tmp_path):
    path = lora_yaml(tmp_path / "bad.yaml", images, tmp_path / "run", **{key: value})
    for args in (("config", "check", path), ("train", "lora", "--config", path)):
        code, _, err = run_cli(*args)
        assert code == 2 and error_line(err).endswith(message), err
        assert error_line(err).startswith(str(path))


@pytest.mark.parametrize("text", ["", "# only a comment\n\n"], ids=["empty", "comments_only"])
def test_empty_yaml_is_refused_by_check_and_by_train(text, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # training on the defaults would write runs/run here
    path = tmp_path / "empty.yaml"
    path.write_text(text)
    message = f"config file {str(path)!r} is empty; accepted: a YAML mapping of keys to values (`dcustom config print <method>` writes one)."
    for args in (("config", "check", path), ("train", "lora", "--config", path)):
        code, _, err = run_cli(*args)
        assert code == 2 and error_line(err) == message
    assert [p.name for p in tmp_path.iterdir()] == ["empty.yaml"] and path.read_text() == text


BAD_FILES = [
    ("list", "- a\n- b\n", "config file {p!r} must hold a mapping of keys to values."),
    ("syntax", "rank: [1,\n", "config file {p!r} is not valid YAML at line 2."),
    ("latin1", "model: caf\xe9\n", "config file {p!r} is not UTF-8 text; accepted: a YAML file."),
    ("unknown_key", "method: lora\nranks: 4\n", "{p}: unknown key 'ranks'; allowed keys: method, model, data, train, target_modules, "),
    ("wrong_type", "method: lora\nrank: four\n", "{p}: rank: 'four' is not valid; expected an integer."),
    ("nested_type", "method: lora\ntrain: 5\n", "{p}: train: 5 is not valid; expected a mapping (LoopConfig)."),
    ("method_mismatch", "method: oft\n", "{p}: method 'oft' does not match the command's method 'lora'."),
]


@pytest.mark.parametrize("name,text,message", BAD_FILES, ids=[b[0] for b in BAD_FILES])
def test_bad_config_file_is_one_sentence_naming_it(name, text, message, tmp_path):
    path = tmp_path / "c.yaml"
    path.write_bytes(text.encode("latin-1"))
    code, _, err = run_cli("train", "lora", "--config", path)
    expected = message.format(p=str(path))
    assert code == 2 and (error_line(err) == expected or (expected.endswith(" ") and error_line(err).startswith(expected)))


def test_config_check_without_a_method_key_or_on_a_folder(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("rank: 4\n")
    code, _, err = run_cli("config", "check", path)
    assert code == 2 and error_line(err) == f"{path}: has no 'method:' key naming what it configures."
    code, _, err = run_cli("config", "check", tmp_path)
    assert code == 2 and error_line(err) == f"config file {str(tmp_path)!r} is a folder; accepted: a YAML file."


def test_a_bad_set_value_is_blamed_on_the_override_not_the_file(images, tmp_path):
    path = lora_yaml(tmp_path / "good.yaml", images, tmp_path / "run")
    code, _, err = run_cli("train", "lora", "--config", path, "--set", "rank=0")
    assert code == 2 and error_line(err) == "override rank: 0 is not valid; accepted: an integer >= 1."
    code, _, err = run_cli("train", "lora", "--config", path, "--set", "train.device=tpu")
    assert code == 2 and error_line(err) == "override train.device=tpu: device 'tpu' is not known; accepted: auto, cpu, cuda, cuda:N, mps."
    code, _, err = run_cli("generate", "--style-ref", path, "--style-strength", "2")
    assert code == 2 and error_line(err) == "override style_strength=2.0: style_strength must be between 0 and 1, got 2.0."


def test_the_python_api_gets_the_same_value_checks(images, tmp_path):
    from dcustom.trainers.adapter.trainer import train

    cfg = lora_cfg(images, tmp_path / "run")
    cfg.rank = 0
    with pytest.raises(DcustomError, match=r"^rank: 0 is not valid; accepted: an integer >= 1\.$"):
        train(cfg, progress=False)
    assert not (tmp_path / "run").exists()


# === CLI arguments ===============================================================================
CLI_CASES = [
    (("train", "lora", "--no-such-flag"), "No such option: --no-such-flag"),
    (("train", "lora", "--set", "rank"), "override 'rank' must look like key=value or a.b=value."),
    (("train", "lora", "--set", "train.speed=2"), "override 'train.speed=2': unknown key 'train.speed'; allowed keys here: "),
    (("train", "nope"), "train method 'nope' is not known; accepted: erasure, lora, oft, boft, flow_lora, textual_inversion, reward."),
    (("generate", "--count", "0"), "override count=0: count must be at least 1, got 0."),
    (("generate", "--steps", "many"), "Invalid value for '--steps'"),
    (("generate", "--width", "50"), "override width=50: width must be a positive multiple of 8, got 50."),
    (("generate", "-m", "tiny:sd15", "--steps", "1", "--adapter", "/no/such/adapter.safetensors"),
     "adapter '/no/such/adapter.safetensors' does not exist."),
    (("adapters", "inspect", "/no/such/file.safetensors"), "adapter '/no/such/file.safetensors' does not exist."),
    (("style", "--content", "/no/such.png", "--style", "/no/such.png"), "content image file '/no/such.png' does not exist."),
]


@pytest.mark.parametrize("args,message", CLI_CASES, ids=[" ".join(a[:3]) for a, _ in CLI_CASES])
def test_bad_cli_arguments_get_one_line(args, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a command that did work would write here
    code, out, err = run_cli(*args)
    assert code == 2 and message in err, err
    if message[0].islower():
        assert message in error_line(err)
    assert list(tmp_path.iterdir()) in ([], [tmp_path / "outputs"])


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(monkeypatch):
    """Not a known kind of bad input (here a registry that breaks): one line, exit 1; --debug lets it through."""
    from typer.testing import CliRunner

    from dcustom import registry
    from dcustom.cli import app

    def broken(*_args, **_kw):
        raise RuntimeError("the registry broke")

    monkeypatch.setattr(registry, "get_method", broken)
    code, _, err = run_cli("config", "print", "lora")
    assert code == 1 and error_line(err) == ("unexpected RuntimeError: the registry broke (not a known kind of bad input; "
                                              "run again with --debug for the traceback and report it).")
    result = CliRunner().invoke(app, ["--debug", "config", "print", "lora"])
    assert isinstance(result.exception, RuntimeError)


def test_the_installed_command_prints_no_traceback(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "empty.yaml"
    path.write_text("")
    result = subprocess.run([sys.executable, "-m", "dcustom.cli", "train", "lora", "--config", str(path)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert error_line(result.stderr).startswith(f"config file {str(path)!r} is empty")


# === output folders ==============================================================================
NOT_WRITABLE = Path("/sys/dcustom-test-output")


def _sys_is_read_only() -> bool:
    try:
        NOT_WRITABLE.mkdir()
    except OSError:
        return True
    NOT_WRITABLE.rmdir()
    return False


OUTPUTS = [
    ("a_file", "train.output_dir: {out!r} is a file, not a folder; accepted: a folder path (created if missing)."),
    ("under_a_file", "train.output_dir: cannot write to {out!r} (Not a directory); accepted: a folder you may write to."),
    ("not_writable", "train.output_dir: cannot write to {out!r} (Operation not permitted); accepted: a folder you may write to."),
    ("the_image_folder", "train.output_dir: {out!r} is inside data.images {images!r}, which dcustom never writes to; accepted: a run folder outside the image folder."),
    ("inside_the_image_folder", "train.output_dir: {out!r} is inside data.images {images!r}, which dcustom never writes to; accepted: a run folder outside the image folder."),
]


@pytest.mark.parametrize("kind,message", OUTPUTS, ids=[k for k, _ in OUTPUTS])
def test_training_output_folder_problems_are_refused_before_any_work(kind, message, images, tmp_path):
    d = tmp_path / "imgs"
    shutil.copytree(images, d)
    out = {"a_file": tmp_path / "taken", "under_a_file": tmp_path / "taken" / "run", "not_writable": NOT_WRITABLE,
           "the_image_folder": d, "inside_the_image_folder": d / "run"}[kind]
    if kind == "not_writable" and not _sys_is_read_only():
        pytest.skip("/sys is writable here")
    (tmp_path / "taken").write_text("my notes")
    before = digest(d)
    code, _, err = run_cli("train", "lora", "--config", lora_yaml(tmp_path / "c.yaml", d, out))
    assert code == 2 and error_line(err) == message.format(out=str(out), images=str(d))
    assert "training on" not in err  # refused before the images were read or the model loaded
    assert digest(d) == before and (tmp_path / "taken").read_text() == "my notes"


@pytest.mark.parametrize("kind", ["a_file", "not_writable"])
def test_generate_checks_its_output_folder_before_loading_or_sampling(kind, tmp_path):
    out = tmp_path / "taken" if kind == "a_file" else NOT_WRITABLE
    if kind == "not_writable" and not _sys_is_read_only():
        pytest.skip("/sys is writable here")
    (tmp_path / "taken").write_text("my notes")
    code, _, err = run_cli("generate", "-m", "tiny:sd15", "-p", "a cat", "--steps", "1", "--count", "4", "-o", out)
    reason = "is a file, not a folder; accepted: a folder path (created if missing)." if kind == "a_file" else \
        "cannot write to '/sys/dcustom-test-output' (Operation not permitted); accepted: a folder you may write to."
    assert code == 2 and error_line(err).startswith("output_dir: ") and error_line(err).endswith(reason)
    assert "loading" not in err and (tmp_path / "taken").read_text() == "my notes"


@pytest.fixture(scope="module")
def finished(images, tmp_path_factory):
    """A finished LoRA run with a checkpoint at step 1 (2 steps)."""
    from dcustom.trainers.adapter.trainer import train

    root = tmp_path_factory.mktemp("finished")
    result = train(lora_cfg(images, root / "run", steps=2, checkpoint_every=1), progress=False)
    assert result.status == "finished"
    return root / "run"


def test_a_new_run_never_overwrites_a_finished_one(finished, images, tmp_path, caplog):
    from dcustom.trainers.adapter.trainer import train

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    before = digest(run)
    with caplog.at_level(logging.WARNING, logger="dcustom.train"):
        second = train(lora_cfg(images, run), progress=False)
        third = train(lora_cfg(images, run), progress=False)
    assert second.run_dir == tmp_path / "run-2" and third.run_dir == tmp_path / "run-3"
    assert digest(run) == before  # adapter files, config.yaml and events.jsonl untouched
    assert (f"train.output_dir {str(run)!r} holds a finished run, which is never overwritten; this run writes to "
            f"{str(tmp_path / 'run-2')!r} (set train.resume to continue that run instead).") in caplog.messages
    recorded = yaml.safe_load((tmp_path / "run-2" / "config.yaml").read_text())
    assert recorded["train"]["output_dir"] == str(tmp_path / "run-2")
    assert (tmp_path / "run-3" / "pytorch_lora_weights.safetensors").is_file()


def test_resume_continues_a_finished_run_in_its_own_folder(finished, images, tmp_path):
    from dcustom.trainers.adapter.trainer import train

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    result = train(lora_cfg(images, run, steps=3, checkpoint_every=1, resume="latest"), progress=False)
    assert result.run_dir == run and result.step == 3 and not (tmp_path / "run-2").exists()


def test_the_cli_says_where_the_new_run_went(finished, images, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    code, out, err = run_cli("train", "lora", "--config", lora_yaml(tmp_path / "c.yaml", images, run))
    assert code == 0 and f"finished at step 1: {tmp_path / 'run-2'}" in out
    assert f"holds a finished run, which is never overwritten; this run writes to {str(tmp_path / 'run-2')!r}" in err


def test_uce_erasure_never_overwrites_a_finished_run(tmp_path, tiny_pipe):
    from dcustom.config import from_dict
    from dcustom.trainers.erasure.config import ErasureTrainConfig
    from dcustom.trainers.erasure.run import run

    cfg = from_dict(ErasureTrainConfig, dict(model="tiny:sd15", erase=["star"], preserve=["circle"], templates=["a {}"],
                                             train={"output_dir": str(tmp_path / "run"), "device": "cpu"}))
    pipe = tiny_pipe("sd15")
    first = run(cfg, pipe=pipe)
    before = digest(first.run_dir)
    second = run(cfg, pipe=tiny_pipe("sd15"))
    assert second.run_dir == tmp_path / "run-2" and digest(tmp_path / "run") == before


def test_adapters_convert_never_overwrites_its_output(finished, tmp_path):
    taken = tmp_path / "k.safetensors"
    taken.write_bytes(b"an earlier export")
    code, _, err = run_cli("adapters", "convert", finished / "pytorch_lora_weights.safetensors", "--to", "kohya", "-o", taken)
    assert code == 2 and error_line(err) == (f"--out {str(taken)!r} already exists, and dcustom never overwrites a finished "
                                             "file or folder; accepted: a new name (or remove the old one first).")
    assert taken.read_bytes() == b"an earlier export"


@pytest.fixture(scope="module")
def style_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("style_in")
    noise(48, 40, seed=1).save(d / "content.png")
    noise(40, 40, seed=2).save(d / "style.png")
    return d


def test_style_never_overwrites_an_earlier_result(style_inputs, tmp_path):
    out = tmp_path / "out" / "result.png"
    args = ("style", "--content", style_inputs / "content.png", "--style", style_inputs / "style.png", "-m", "tiny:sd15",
            "--steps", "1", "--device", "cpu", "-o", out)
    assert run_cli(*args)[0] == 0
    first, grid = digest(out), digest(out.with_name("result-grid.png"))
    code, stdout, err = run_cli(*args)
    assert code == 0 and stdout.split() == [str(out.with_name("result-2.png")), str(out.with_name("result-2-grid.png"))]
    assert f"{out} exists; writing {out.with_name('result-2.png')} (results are never overwritten)" in err
    assert digest(out) == first and digest(out.with_name("result-grid.png")) == grid
    assert {p.name for p in (tmp_path / "out").iterdir()} == {"result.png", "result-grid.png", "result-2.png", "result-2-grid.png"}


def test_style_output_that_is_a_folder_is_refused(style_inputs, tmp_path):
    code, _, err = run_cli("style", "--content", style_inputs / "content.png", "--style", style_inputs / "style.png",
                           "-m", "tiny:sd15", "-o", tmp_path)
    assert code == 2 and error_line(err) == (f"output: {str(tmp_path)!r} is a folder; accepted: a .png file path such as "
                                             f"{str(tmp_path / 'result.png')!r}.")


# === adapter and embedding files =================================================================
def test_inspect_refuses_a_safetensors_file_that_is_no_adapter(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.out.weight": torch.zeros(4, 4), "model.diffusion_model.out.bias": torch.zeros(4)}, str(path))
    before = digest(path)
    code, out, err = run_cli("adapters", "inspect", path)
    assert code == 2 and out == ""
    assert error_line(err) == (f"{str(path)!r} is neither an adapter nor an embedding: none of its 2 tensors "
                               "(e.g. 'model.diffusion_model.out.bias') has LoRA, OFT or BOFT keys; accepted: a LoRA "
                               "(diffusers or kohya keys), a peft OFT/BOFT folder, a dcustom run folder or a "
                               "textual-inversion embedding.")
    assert digest(path) == before


def test_load_adapter_does_not_misread_a_non_adapter_as_an_embedding(tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    from dcustom.adapters.load import load_adapter

    path = tmp_path / "weights.safetensors"
    save_file({"a.weight": torch.zeros(4, 4), "b.weight": torch.zeros(4, 4)}, str(path))
    with pytest.raises(DcustomError, match=r"is neither an adapter nor an embedding: none of its 2 tensors \(e\.g\. 'a\.weight'\)"):
        load_adapter(tiny_pipe("sd15"), path)


def test_inspect_reads_a1111_pt_embeddings_with_weights_only(tmp_path):
    path = tmp_path / "my-style.pt"
    torch.save({"name": "my-style", "string_to_param": {"*": torch.randn(2, 32)}}, path)
    code, out, err = run_cli("adapters", "inspect", path)
    assert code == 0, err
    assert "token              my-style" in out and "vectors            2" in out and "'text_encoder': 32" in out


def test_a_pickle_with_code_is_never_run_when_inspected_or_loaded(tmp_path, tiny_pipe):
    from dcustom.adapters.load import load_adapter

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"string_to_param": {"*": Payload(marker)}}, protocol=2))
    code, _, err = run_cli("adapters", "inspect", path)
    assert code == 2 and "contains Python objects other than tensors" in error_line(err) and "never unpickles" in err
    with pytest.raises(DcustomError, match="never unpickles"):
        load_adapter(tiny_pipe("sd15"), path)
    assert not marker.exists()


DAMAGED = [  # (file, bytes, what inspect says, what load_adapter says)
    ("garbage.safetensors", os.urandom(300), "is not a readable safetensors file", "is not a readable safetensors file"),
    ("empty.safetensors", b"", "is not a readable safetensors file", "is empty (0 bytes)"),
    ("old_lora.bin", b"PK\x03\x04 not really a zip", "is not a readable PyTorch file", "is not a readable PyTorch file"),
]


@pytest.mark.parametrize("name,data,shown,loaded", DAMAGED, ids=[d[0] for d in DAMAGED])
def test_damaged_adapter_file_is_one_sentence(name, data, shown, loaded, tmp_path, tiny_pipe):
    from dcustom.adapters.load import load_adapter

    path = tmp_path / name
    path.write_bytes(data)
    code, _, err = run_cli("adapters", "inspect", path)
    assert code == 2 and str(path) in error_line(err) and shown in error_line(err)
    with pytest.raises(DcustomError, match=re.escape(loaded)):
        load_adapter(tiny_pipe("sd15"), path)
    assert path.read_bytes() == data


EMBEDDINGS = [
    ("nan", {"<tok>": torch.tensor([[float("nan")] * 32])}, "contains NaN or infinite values; the file is damaged."),
    ("wrong_dim", {"<tok>": torch.zeros(1, 768)}, "vectors have dimension 768 but this pipeline's text_encoder expects 32"),
    ("sdxl_on_sd1", {"clip_l": torch.zeros(1, 32), "clip_g": torch.zeros(1, 32)}, "is an SDXL embedding (clip_l + clip_g) but this pipeline is"),
    ("integer", {"<tok>": torch.zeros(1, 32, dtype=torch.int64)}, "is a torch.int64 tensor, not float vectors"),
    ("existing_word", {"dog": torch.zeros(1, 32)}, "token 'dog' already exists in this pipeline's tokenizer as a word of its vocabulary"),
]


@pytest.mark.parametrize("name,tensors,message", EMBEDDINGS, ids=[e[0] for e in EMBEDDINGS])
def test_bad_embedding_is_refused_and_the_pipeline_unchanged(name, tensors, message, tmp_path, tiny_pipe):
    from safetensors.torch import save_file

    from dcustom.adapters.load import load_adapter

    path = tmp_path / "emb.safetensors"
    save_file(tensors, str(path))
    pipe = tiny_pipe("sd15")
    vocab = len(pipe.tokenizer)
    with pytest.raises(DcustomError) as err:
        load_adapter(pipe, path)
    assert message in str(err.value) and str(path) in str(err.value)
    assert len(pipe.tokenizer) == vocab


@pytest.mark.parametrize("what", ["missing", "empty_folder"])
def test_adapter_path_that_holds_nothing(what, tmp_path, tiny_pipe):
    from dcustom.adapters.load import load_adapter

    path = tmp_path / ("nothing.safetensors" if what == "missing" else "folder")
    if what == "empty_folder":
        path.mkdir()
        (path / "notes.txt").write_text("hi")
    expected = f"adapter {str(path)!r} does not exist." if what == "missing" else \
        f"adapter folder {str(path)!r} holds no adapter; accepted: "
    with pytest.raises(DcustomError) as err:
        load_adapter(tiny_pipe("sd15"), path)
    assert str(err.value).startswith(expected)


# === checkpoints =================================================================================
class Fit:
    """A tiny method that draws from torch, Python and NumPy RNGs, so a resume must restore all three."""

    def setup(self, ctx):
        g = torch.Generator().manual_seed(0)
        self.w = torch.nn.Parameter(torch.zeros(3))
        return [torch.randn(3, generator=g) for _ in range(5)]

    def trainable_parameters(self):
        return {"w": self.w}

    def training_step(self, batch, step):
        x = torch.stack(batch)
        jitter = torch.randn_like(x) * 0.1 + random.random() * 0.01 + float(np.random.rand()) * 0.01
        return ((x + jitter - self.w) ** 2).mean()

    def after_optimizer_step(self, step):
        pass

    def save(self, folder):
        from safetensors.torch import save_file

        path = Path(folder) / "w.safetensors"
        save_file({"w": self.w.detach().clone()}, str(path))
        return [path]


def loop_cfg(out: Path, **kw):
    from dcustom.trainers.loop import LoopConfig

    base = dict(output_dir=str(out), steps=3, lr=0.1, device="cpu", checkpoint_every=1, keep_checkpoints=0,
                warmup_steps=0, lr_scheduler="constant", seed=1)
    base.update(kw)
    return LoopConfig(**base)


@pytest.fixture
def ckpt_run(tmp_path):
    """A cancelled-then-continuable run: checkpoints step-1 and step-2 (steps=3 finishes at 3)."""
    from dcustom.trainers.loop import run_training

    run_training(Fit(), loop_cfg(tmp_path / "run"), progress=False)
    return tmp_path / "run"


def test_checkpoints_hold_no_pickle_and_resume_is_exact(tmp_path):
    from dcustom.trainers.loop import run_training

    full = Fit()
    run_training(full, loop_cfg(tmp_path / "a", steps=4), progress=False)
    steps = []
    first = run_training(Fit(), loop_cfg(tmp_path / "b", steps=4), progress=False, on_event=steps.append,
                         should_stop=lambda: sum(e["event"] == "step" for e in steps) >= 2)
    assert first.status == "cancelled"
    ckpt = tmp_path / "b" / "checkpoints" / "step-2"
    assert sorted(p.name for p in ckpt.iterdir()) == ["optimizer.pt", "rng.json", "state.json", "trainable.safetensors", "w.safetensors"]
    json.loads((ckpt / "rng.json").read_text())
    torch.load(ckpt / "optimizer.pt", weights_only=True)
    second = Fit()
    run_training(second, loop_cfg(tmp_path / "b", steps=4, resume="latest"), progress=False)
    assert torch.equal(full.w, second.w)  # bit for bit: torch, Python and NumPy RNGs all came back


def test_an_old_checkpoint_with_a_pickled_rng_is_refused_without_running_it(ckpt_run, tmp_path):
    from dcustom.trainers.loop import run_training

    ckpt = ckpt_run / "checkpoints" / "step-2"
    (ckpt / "rng.json").unlink()
    marker = tmp_path / "pwned"
    (ckpt / "rng.pkl").write_bytes(pickle.dumps([Payload(marker)], protocol=2))
    before = digest(ckpt)
    with pytest.raises(DcustomError) as err:
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume=str(ckpt)), progress=False)
    assert str(err.value) == (f"resume: checkpoint {str(ckpt)!r} was written by an older dcustom that kept its RNG state as a "
                              "pickle (rng.pkl), which is never loaded because unpickling can run code; resume from a "
                              "checkpoint written by this version or start the run again.")
    assert not marker.exists() and digest(ckpt) == before


def test_an_optimizer_file_with_code_is_refused_without_running_it(ckpt_run, tmp_path):
    from dcustom.trainers.loop import run_training

    ckpt = ckpt_run / "checkpoints" / "step-2"
    marker = tmp_path / "pwned"
    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"optimizer": Payload(marker)}, protocol=2))
    with pytest.raises(DcustomError, match=r"optimizer\.pt holds Python objects other than tensors, which dcustom never unpickles"):
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest"), progress=False)
    assert not marker.exists()


def test_a_half_deleted_checkpoint_is_not_listed_and_resume_takes_the_complete_one(ckpt_run):
    from dcustom.trainers.loop import run_training
    from dcustom.trainers.run_folder import checkpoint_dirs

    (ckpt_run / "checkpoints" / "step-2" / "trainable.safetensors").unlink()  # what a kill mid-delete left
    assert [p.name for p in checkpoint_dirs(ckpt_run)] == ["step-1"]
    with pytest.raises(DcustomError, match=r"resume: '.*step-2' is not a checkpoint folder; .* \(this run has: step-1\)\."):
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="2"), progress=False)
    result = run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest", keep_checkpoints=1), progress=False)
    assert result.step == 4
    assert [p.name for p in (ckpt_run / "checkpoints").iterdir()] == ["step-3"]  # the half one was cleared too


def test_a_kill_during_pruning_leaves_nothing_listed_and_it_is_cleared_next_time(ckpt_run):
    from dcustom.trainers.loop import run_training
    from dcustom.trainers.run_folder import checkpoint_dirs

    ckpts = ckpt_run / "checkpoints"
    (ckpts / "step-1").rename(ckpts / "step-1.deleting")  # pruning renames first, then deletes
    assert [p.name for p in checkpoint_dirs(ckpt_run)] == ["step-2"]
    run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest"), progress=False)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step-2", "step-3"]


@pytest.mark.parametrize("damage", ["rng_json", "state_json", "trainable"])
def test_a_damaged_checkpoint_is_one_sentence(damage, ckpt_run):
    from dcustom.trainers.loop import run_training

    ckpt = ckpt_run / "checkpoints" / "step-2"
    name = {"rng_json": "rng.json", "state_json": "state.json", "trainable": "trainable.safetensors"}[damage]
    (ckpt / name).write_text('{"ranks": [{"torch": "not base64!"}]}' if damage == "rng_json" else "{trunc")
    message = "trainable.safetensors is damaged" if damage == "trainable" else "state.json or rng.json is damaged"
    with pytest.raises(DcustomError, match=rf"^resume: checkpoint '.*step-2': {message} \(.*\); resume from another checkpoint\.$"):
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest"), progress=False)


def test_a_checkpoint_of_another_method_is_refused(ckpt_run):
    from safetensors.torch import save_file

    from dcustom.trainers.loop import run_training

    ckpt = ckpt_run / "checkpoints" / "step-2"
    save_file({"other": torch.zeros(3)}, str(ckpt / "trainable.safetensors"))
    with pytest.raises(DcustomError, match=r"lacks trainable parameter 'w'; it was made by a different method or config\.$"):
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest"), progress=False)
    save_file({"w": torch.zeros(5)}, str(ckpt / "trainable.safetensors"))
    with pytest.raises(DcustomError, match=r"trainable parameter 'w' has shape \[5\] there but \[3\] here"):
        run_training(Fit(), loop_cfg(ckpt_run, steps=4, resume="latest"), progress=False)


def test_resume_latest_without_checkpoints(tmp_path):
    from dcustom.trainers.loop import run_training

    with pytest.raises(DcustomError, match=r"^resume: 'latest' found no checkpoint under '.*checkpoints'\.$"):
        run_training(Fit(), loop_cfg(tmp_path / "fresh", resume="latest"), progress=False)


# === prompts =====================================================================================
def test_a_prompt_longer_than_the_text_encoder_warns_once_with_the_count(tmp_path, caplog, tiny_pipe):
    from dcustom.generate import generate
    from dcustom.generate_config import GenerateConfig

    long_prompt = " ".join(["cat"] * 1512)
    cfg = GenerateConfig(model="tiny:sd15", prompt=long_prompt, negative_prompt="blurry", steps=1, seed=0,
                         output_dir=str(tmp_path), width=32, height=32)
    with caplog.at_level(logging.WARNING, logger="dcustom.generate"):
        paths = generate(cfg, pipe=tiny_pipe("sd15"))
    assert len(paths) == 1 and paths[0].is_file()
    assert caplog.messages == ["prompt has 1,514 tokens but the text encoder reads only the first 77 (start and end "
                               "included); the rest is ignored, so shorten it or put what matters first."]


# === app uploads =================================================================================
def upload_cases(d: Path, bombs: dict) -> dict:
    from dcustom.app.uploads import UploadLimits

    noise(64, 64).save(d / "good.png")
    (d / "notes.png").write_text("not an image")
    (d / "empty.png").write_bytes(b"")
    (d / "big.png").write_bytes(os.urandom(2 * 2**20))
    Image.new("RGB", (600, 600), (10, 20, 30)).save(d / "many_pixels.png")
    shutil.copy(bombs["pillow_refuses"], d / "bomb.png")
    noise().save(d / "still.gif")
    frames = [noise(seed=s) for s in (1, 2)]
    frames[0].save(d / "anim.png", save_all=True, append_images=frames[1:], duration=100)
    full = (d / "good.png").read_bytes()
    (d / "cut.png").write_bytes(full[: len(full) // 2])
    return UploadLimits(max_bytes=2**20, max_pixels=512 * 512, max_files=3)


UPLOADS = [
    ("notes.png", "training image 'notes.png': is not an image; accepted: BMP, JPEG, PNG, WEBP files."),
    ("empty.png", "training image 'empty.png': is empty (0 bytes); accepted: BMP, JPEG, PNG, WEBP files."),
    ("big.png", "training image 'big.png': is 2.0 MiB; files up to 1 MiB are accepted."),
    ("many_pixels.png", "training image 'many_pixels.png': has 600x600 pixels; images up to 262,144 pixels are accepted."),
    ("bomb.png", "training image 'bomb.png': has too many pixels; images up to 262,144 pixels are accepted."),
    ("still.gif", "training image 'still.gif': is a GIF file; accepted: BMP, JPEG, PNG, WEBP files."),
    ("anim.png", "training image 'anim.png': is animated (2 frames); accepted: still images (export one frame)."),
    ("cut.png", "training image 'cut.png': is truncated or corrupt; accepted: BMP, JPEG, PNG, WEBP files that open in an image viewer."),
]


@pytest.mark.parametrize("name,message", UPLOADS, ids=[u[0] for u in UPLOADS])
def test_bad_upload_refuses_the_whole_set_and_stores_nothing(name, message, tmp_path, bombs):
    from dcustom.app.uploads import store_images

    d = tmp_path / "in"
    d.mkdir()
    limits = upload_cases(d, bombs)
    before = digest(d)
    with pytest.raises(DcustomError) as err:
        store_images([d / "good.png", d / name], tmp_path / "stored", limits, "training image")
    assert str(err.value) == message
    assert not (tmp_path / "stored").exists() and digest(d) == before


def test_a_pillow_sized_bomb_upload_is_refused_too(tmp_path, bombs):
    from dcustom.app.uploads import UploadLimits, check_image_file

    with pytest.raises(DcustomError, match=r"has too many pixels; images up to 1,000,000,000 pixels are accepted\.$"):
        check_image_file(bombs["pillow_refuses"], UploadLimits(max_pixels=10**9), "upload")


@pytest.mark.parametrize("count", [0, 4])
def test_upload_count_outside_the_limits(count, tmp_path, bombs):
    from dcustom.app.uploads import store_images

    d = tmp_path / "in"
    d.mkdir()
    limits = upload_cases(d, bombs)
    message = ("training image: no images were given; drop at least one PNG/JPEG/WEBP image." if count == 0 else
               "training image: 4 files were given; at most 3 are accepted.")
    with pytest.raises(DcustomError, match=f"^{message}$"):
        store_images([d / "good.png"] * count, tmp_path / "stored", limits, "training image")


def test_good_uploads_are_copied_under_safe_names_and_left_as_they_were(tmp_path, bombs):
    from dcustom.app.uploads import store_images

    d = tmp_path / "in"
    d.mkdir()
    limits = upload_cases(d, bombs)
    noise(seed=3).save(d / "../in/Weird name; rm -rf.JPG", format="JPEG")
    before = digest(d)
    stored = store_images([d / "good.png", d / "Weird name; rm -rf.JPG"], tmp_path / "stored", limits, "training image")
    assert [p.name for p in stored] == ["000.png", "001.jpg"]
    assert stored[1].read_bytes() == (d / "Weird name; rm -rf.JPG").read_bytes() and digest(d) == before
