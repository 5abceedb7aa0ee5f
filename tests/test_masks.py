"""Masked (subject-weighted) loss: <image>.mask.png or the alpha channel weighs the denoising loss per
pixel; masks are validated like images; toy-world subject folders come with exact masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dcustom.data import MASK_SUFFIX, scan_images
from dcustom.trainers.denoising import mask_weights, per_sample_loss


def _image(folder, name, size=(32, 32), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    arr = rng.integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    if mode == "RGBA":
        arr[..., 3] = 0
        arr[8:24, 8:24, 3] = 255
    Image.fromarray(arr, mode).save(folder / name)
    return folder / name


def _mask(folder, name, size=(32, 32), mode="L", value=255, box=(8, 8, 24, 24)):
    m = Image.new(mode, size, 0 if mode != "RGB" else (0, 0, 0))
    if box:
        m.paste(value, box)
    m.save(folder / name)
    return folder / name


def test_per_sample_loss_with_weights_is_the_normalised_weighted_mean():
    pred, target = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)
    target[0, :, 0, 0] = 3.0  # one pixel of sample 0 has error 9, the rest 1
    w = torch.ones(2, 1, 2, 2)
    assert torch.equal(per_sample_loss(pred, target, w), per_sample_loss(pred, target))  # weight 1 changes nothing
    w[0, 0] = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    assert per_sample_loss(pred, target, w)[0].item() == pytest.approx(9.0)  # only the weighted pixel counts
    assert per_sample_loss(pred, target, 2 * w)[0].item() == pytest.approx(9.0)  # scale-free


def test_mask_weights_pool_the_mask_to_the_latent_grid_with_a_floor():
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (0, 0, 16, 16))  # the top-left quarter is the subject
    w = mask_weights(mask, 0.1, (4, 4))
    assert w.shape == (1, 4, 4)
    assert torch.allclose(w[0, :2, :2], torch.ones(2, 2)) and torch.allclose(w[0, 2:, 2:], torch.full((2, 2), 0.1))
    half = Image.new("L", (8, 8), 0)
    half.paste(255, (0, 0, 4, 8))  # half of a latent pixel's footprint
    assert mask_weights(half, 0.0, (1, 1)).item() == pytest.approx(0.5)


def test_scan_pairs_each_image_with_its_mask_and_never_trains_on_a_mask(tmp_path):
    _image(tmp_path, "a.png")
    _mask(tmp_path, "a" + MASK_SUFFIX)
    _image(tmp_path, "b.png", seed=1)
    report = scan_images(tmp_path, "sks", 16)
    by_name = {r.path.name: r for r in report.images}
    assert set(by_name) == {"a.png", "b.png"} and report.skipped == []
    assert by_name["a.png"].mask == tmp_path / "a.mask.png" and "mask: a.mask.png" in by_name["a.png"].notes
    assert by_name["b.png"].mask is None
    assert all(r.mask is None for r in scan_images(tmp_path, "sks", 16, masks=False).images)


@pytest.mark.parametrize("make_mask, reason", [
    (lambda d: _mask(d, "a.mask.png", size=(16, 16), box=(0, 0, 8, 8)),
     "its mask a.mask.png is 16x16 but the image is 32x32; a mask must have its image's size"),
    (lambda d: _mask(d, "a.mask.png", mode="RGB", value=(255, 0, 0)),
     "its mask a.mask.png is a colour image; a mask must be greyscale (white = subject, black = background)"),
    (lambda d: _mask(d, "a.mask.png", box=None), "its mask a.mask.png is all black: it marks nothing as the subject"),
    (lambda d: (d / "a.mask.png").write_bytes(b"not a png"), "its mask a.mask.png is unreadable or not an image"),
])
def test_a_bad_mask_skips_its_image_with_one_reason_and_leaves_the_folder_unchanged(tmp_path, make_mask, reason):
    _image(tmp_path, "a.png")
    _image(tmp_path, "b.png", seed=1)
    make_mask(tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    report = scan_images(tmp_path, "sks", 16)
    assert [r.path.name for r in report.images] == ["b.png"]
    assert [(p.name, why) for p, why in report.skipped] == [("a.png", report.skipped[0][1])]
    assert report.skipped[0][1].startswith(reason)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_grey_rgb_palette_and_16_bit_masks_are_accepted(tmp_path):
    from dcustom.data import open_mask

    for mode, value in (("RGB", (200, 200, 200)), ("P", 1), ("1", 1), ("I;16", 65535)):
        path = tmp_path / f"m-{mode.replace(';', '')}.png"
        m = Image.new(mode, (32, 32), 0)
        if mode == "P":
            m.putpalette([0, 0, 0, 255, 255, 255] + [0] * 762)
        m.paste(value, (8, 8, 24, 24))
        m.save(path)
        mask = open_mask(path, (32, 32))
        assert mask.mode == "L" and mask.getpixel((16, 16)) > 190 and mask.getpixel((0, 0)) == 0, mode


def test_alpha_channel_is_the_mask_only_when_asked(tmp_path):
    _image(tmp_path, "a.png", mode="RGBA")
    assert scan_images(tmp_path, "sks", 16).images[0].mask is None
    rec = scan_images(tmp_path, "sks", 16, alpha_mask=True).images[0]
    assert rec.mask == tmp_path / "a.png" and "mask: alpha channel" in rec.notes


def _cfg(images, out, **data):
    from dcustom.data import DataConfig
    from dcustom.trainers.adapter.config import LoraTrainConfig
    from dcustom.trainers.loop import LoopConfig

    loop = LoopConfig(output_dir=str(out), steps=3, batch_size=2, lr=1e-2, device="cpu", seed=3, checkpoint_every=0)
    return LoraTrainConfig(model="tiny:sd15", rank=4, train=loop, validation_prompts=[],
                           data=DataConfig(images=str(images), instance_prompt="sks dog", resolution=32, **data))


@pytest.fixture(scope="module")
def masked_folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("masked")
    for i in range(3):
        _image(d, f"{i}.png", seed=i)
    _mask(d, "0.mask.png")
    _mask(d, "1.mask.png", box=(0, 0, 16, 32))
    return d


def _lora(result):
    return {k: v.clone() for k, v in result.method.trainable_parameters().items()}


def test_masks_change_what_is_learned_and_weight_one_is_exactly_no_mask(masked_folder, tmp_path):
    from dcustom.trainers.adapter.trainer import train

    plain = _lora(train(_cfg(masked_folder, tmp_path / "plain", masks=False), progress=False))
    ignored = _lora(train(_cfg(masked_folder, tmp_path / "one", mask_outside_weight=1.0), progress=False))
    masked = _lora(train(_cfg(masked_folder, tmp_path / "masked", mask_outside_weight=0.0), progress=False))
    assert all(torch.equal(plain[k], ignored[k]) for k in plain)  # weight 1 outside = no mask, bit for bit
    assert max((plain[k] - masked[k]).abs().max().item() for k in plain) > 1e-4


def test_masked_training_resumes_exactly(masked_folder, tmp_path):
    from dcustom.trainers.adapter.trainer import train

    full = _lora(train(_cfg(masked_folder, tmp_path / "a"), progress=False))
    seen = []
    stop = lambda: sum(e["event"] == "step" for e in seen) >= 1  # noqa: E731
    train(_cfg(masked_folder, tmp_path / "b"), on_event=seen.append, should_stop=stop, progress=False)
    cfg = _cfg(masked_folder, tmp_path / "b")
    cfg.train.resume = "latest"
    resumed = _lora(train(cfg, progress=False))
    assert all(torch.allclose(full[k], resumed[k], atol=1e-6, rtol=0) for k in full)


def test_toy_subject_folder_has_exact_masks_that_the_trainer_uses(tmp_path):
    from dcustom.toyworld.render import render_subject
    from dcustom.toyworld.subjects import write_subject_examples

    folder, phrase = write_subject_examples("ladybug", tmp_path / "ladybug", n=3)
    assert phrase == "zwx circle"
    report = scan_images(folder, phrase, 32)
    assert len(report.images) == 3 and all(r.mask is not None for r in report.images)
    mask = np.asarray(Image.open(folder / "00.mask.png"))
    image = np.asarray(Image.open(folder / "00.png")).astype(int)
    assert 0.05 < (mask > 127).mean() < 0.8  # the subject covers part of the image
    assert "zwx circle" in (folder / "00.txt").read_text()
    # the same call writes the same files: the demo and the checks train on the same examples
    again, _ = write_subject_examples("ladybug", tmp_path / "again", n=3)
    assert np.array_equal(np.asarray(Image.open(again / "00.png")).astype(int), image)
    assert render_subject("ladybug", 1)[0][2].subject == "ladybug"
