"""Image-folder validation: every bad input is skipped with its reason, convertible ones are converted."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from dcustom.data import folder_digest, make_buckets, nearest_bucket, open_rgb, resize_crop, scan_images
from dcustom.errors import DcustomError


def _rgb(w=40, h=40, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture
def messy_folder(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    _rgb().save(d / "good.png")
    (d / "good.txt").write_text("a sks dog on grass")
    _rgb(seed=1).save(d / "plain.jpg")
    (d / "notes.bin").write_bytes(b"this is not an image at all" * 10)
    (d / "empty.png").write_bytes(b"")
    full = d / "full.jpg"
    _rgb(64, 64, seed=2).save(full, quality=95)
    (d / "truncated.jpg").write_bytes(full.read_bytes()[: len(full.read_bytes()) // 2])
    full.unlink()
    frames = [_rgb(seed=s) for s in (3, 4)]
    frames[0].save(d / "anim.gif", save_all=True, append_images=frames[1:], duration=100, loop=0)
    _rgb(seed=5).convert("CMYK").save(d / "cmyk.jpg")
    Image.fromarray((np.linspace(0, 65535, 40 * 40).reshape(40, 40)).astype(np.uint16)).save(d / "deep16.png")
    rgba = Image.new("RGBA", (40, 40), (255, 0, 0, 0))
    rgba.save(d / "alpha.png")
    rotated = _rgb(40, 30, seed=6)
    exif = rotated.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    rotated.save(d / "exif.jpg", exif=exif)
    _rgb(8, 8).save(d / "small.png")
    return d


def test_scan_reports_each_bad_kind_and_converts_the_rest(messy_folder):
    before = folder_digest(messy_folder)
    report = scan_images(messy_folder, "a photo of sks dog", min_size=16)
    reasons = {p.name: why for p, why in report.skipped}
    assert reasons["notes.bin"].startswith("not an image file")
    assert reasons["empty.png"].startswith("not an image file")
    assert reasons["truncated.jpg"].startswith("truncated or corrupt image data")
    assert reasons["anim.gif"].startswith("animated image with 2 frames")
    assert reasons["small.png"] == "too small (8x8); the shorter side must be at least 16 px"
    usable = {r.path.name: r for r in report.images}
    assert set(usable) == {"good.png", "plain.jpg", "cmyk.jpg", "deep16.png", "alpha.png", "exif.jpg"}
    assert usable["good.png"].caption == "a sks dog on grass"
    assert usable["plain.jpg"].caption == "a photo of sks dog"
    assert usable["exif.jpg"].size == (30, 40)  # EXIF orientation applied: width and height swap
    assert folder_digest(messy_folder) == before  # nothing in the input folder was touched
    assert "skipped anim.gif: animated" in report.summary()


def test_conversions_are_correct(messy_folder):
    deep, notes = open_rgb(messy_folder / "deep16.png")
    arr = np.asarray(deep)
    assert deep.mode == "RGB" and arr.min() == 0 and arr.max() == 255 and 100 < arr.mean() < 155  # scaled, not clipped
    assert any("16-bit" in n for n in notes)
    alpha, notes = open_rgb(messy_folder / "alpha.png")
    assert alpha.getpixel((0, 0)) == (255, 255, 255) and "alpha composited on white" in notes
    cmyk, notes = open_rgb(messy_folder / "cmyk.jpg")
    assert cmyk.mode == "RGB" and "CMYK -> RGB" in notes


def test_nothing_usable_is_one_clear_error(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "a.jpg").write_bytes(b"nope")
    with pytest.raises(DcustomError, match=r"data.images: no usable training image in .*a.jpg: not an image file"):
        scan_images(d, "x", 16)
    with pytest.raises(DcustomError, match="is not a folder"):
        scan_images(tmp_path / "missing", "x", 16)


def test_buckets_keep_area_and_stride():
    buckets = make_buckets(64, 8)
    assert (64, 64) in buckets
    for w, h in buckets:
        assert w % 8 == 0 and h % 8 == 0 and 0.5 <= w / h <= 2 and abs(w * h - 64 * 64) / (64 * 64) < 0.3
    wide = nearest_bucket((200, 100), buckets)
    assert wide[0] > wide[1]
    crop, _ = resize_crop(_rgb(100, 50), wide)
    assert crop.size == wide
