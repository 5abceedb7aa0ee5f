"""Training images: validation up front, captions, aspect buckets, flips, latent/text caching.

Every file in the image folder is checked before training; bad ones are skipped with a listed
reason (unreadable, not an image, truncated, animated, too small, more than MAX_PIXELS pixels,
a caption that is not UTF-8 text) and convertible ones are converted in memory (CMYK, 16-bit,
alpha, palette, EXIF orientation). Nothing in the folder is ever written to. Config classes here
are torch-free.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from dcustom.config import opt
from dcustom.errors import DcustomError

CAPTION_SUFFIX = ".txt"
MASK_SUFFIX = ".mask.png"  # <image stem>.mask.png beside an image: its per-pixel loss weight (white = subject)
IGNORED_SUFFIXES = {CAPTION_SUFFIX, ".json", ".yaml", ".yml", ".md"}
# Pixel count above which an image is skipped before it is decoded: 8192 x 8192 (67 MP) holds any camera's
# photo, costs ~200 MB to decode, and stops small files that claim huge sizes (decompression bombs).
MAX_PIXELS = 8192 * 8192


@dataclass
class PriorConfig:
    enabled: bool = opt(False, "DreamBooth prior preservation with generated class images.")
    class_prompt: str = opt("a photo of a dog", "Prompt for the class images (the subject's class, without the trigger word).")
    class_prompts: list[str] = opt([], "Several prompts instead of class_prompt, class image i drawn from prompt i mod n: "
                                       "what the adapter must not change beyond the class (e.g. the model's other "
                                       "subjects), so the prior loss also holds those in place.")
    num_images: int = opt(100, "Class images generated once and cached.", ge=1)
    loss_weight: float = opt(1.0, "Weight of the prior loss.", ge=0)
    class_dir: Optional[str] = opt(None, "Folder of class images; null: a cache folder keyed by model, prompt and size.")
    sample_steps: int = opt(30, "Sampling steps used to generate class images.", ge=1)


@dataclass
class DataConfig:
    images: str = opt("examples/subject", "Folder of training images (jpg/png/webp...), optional same-name .txt captions.")
    instance_prompt: str = opt("a photo of sks dog", "Caption for images without a .txt file; include the trigger word.")
    caption_prefix: str = opt("", "Text put before every .txt caption (e.g. the trigger word).")
    resolution: Optional[int] = opt(None, "Training side length in pixels; null: the model's native size.", ge=8, le=8192)
    min_size: Optional[int] = opt(None, "Images whose shorter side is below this are skipped; null: half the resolution.", ge=1)
    buckets: bool = opt(True, "Aspect-ratio buckets (same area, multiples of the UNet stride) instead of square crops.")
    flip: bool = opt(True, "Random horizontal flips (cached as a second latent variant).")
    cache_latents: bool = opt(True, "Encode images with the VAE once instead of every step.")
    cache_text: bool = opt(True, "Encode captions once when the text encoder is frozen.")
    masks: bool = opt(True, "Use <image>.mask.png files beside the images as loss masks (white = subject, "
                            "black = background, grey in between).")
    alpha_mask: bool = opt(False, "Use an image's alpha channel as its mask when it has no .mask.png (kohya's "
                                  "alpha_mask); otherwise alpha is composited on white.")
    mask_outside_weight: float = opt(0.1, "Loss weight where a mask is black, relative to 1 where it is white: 0 "
                                          "learns only the subject, 1 ignores masks. Images without a mask weigh 1 "
                                          "everywhere.", ge=0, le=1)
    caption_dropout: float = opt(0.0, "Share of training draws that use the empty caption instead of the image's "
                                      "(kohya's caption_dropout_rate): the adapter also learns the unconditional "
                                      "branch that classifier-free guidance subtracts.", ge=0, lt=1)
    prior: PriorConfig = opt(PriorConfig(), "DreamBooth prior preservation.")


@dataclass
class ImageRecord:
    path: Path
    caption: str
    size: tuple  # (width, height) after orientation
    notes: list = field(default_factory=list)  # conversions applied, e.g. "CMYK -> RGB"
    mask: Optional[Path] = None  # its <stem>.mask.png, or the image itself when its alpha channel is the mask


@dataclass
class ScanReport:
    images: list  # ImageRecord
    skipped: list  # (path, reason)
    folder: Optional[Path] = None

    def summary(self) -> str:
        where = f" in {str(self.folder)!r}" if self.folder is not None else ""
        lines = [f"{len(self.images)} usable image(s){where}, {len(self.skipped)} skipped"]
        lines += [f"  skipped {p.name}: {why}" for p, why in self.skipped]
        lines += [f"  {r.path.name}: {'; '.join(r.notes)}" for r in self.images if r.notes]
        return "\n".join(lines)


class _Unusable(ValueError):
    """A reason of our own for skipping an image (re-raised as is, never re-worded)."""


def open_rgb(path: Path, max_pixels: int = MAX_PIXELS):
    """Open, fully decode and convert one image to 8-bit RGB; returns (image, notes) or raises ValueError(reason).

    The pixel count is checked from the header, before decoding: a tiny file may claim a huge image."""
    import struct
    import warnings

    from PIL import Image, ImageOps, UnidentifiedImageError

    notes = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our lower cap applies below
            opened = Image.open(path)
        with opened as im:
            if im.width * im.height > max_pixels:
                raise _Unusable(f"too many pixels ({im.width}x{im.height}); images up to {max_pixels:,} pixels "
                                f"({_side(max_pixels)}) are accepted")
            if getattr(im, "is_animated", False) and getattr(im, "n_frames", 1) > 1:
                raise _Unusable(f"animated image with {im.n_frames} frames; export one frame as PNG or JPEG")
            im.load()  # decoding here surfaces truncated files
            orientation = im.getexif().get(0x0112, 1)
            image = ImageOps.exif_transpose(im)
            if orientation not in (1, None):
                notes.append(f"EXIF orientation {orientation} applied")
            image = _to_rgb(image, notes)
    except _Unusable:
        raise
    except Image.DecompressionBombError:
        raise ValueError(f"too many pixels (Pillow refuses it as a decompression bomb); images up to {max_pixels:,} "
                         f"pixels ({_side(max_pixels)}) are accepted") from None
    except UnidentifiedImageError:
        raise ValueError("not an image file that Pillow can identify") from None
    except PermissionError:
        raise ValueError("unreadable (permission denied)") from None
    except (OSError, SyntaxError) as exc:
        text = str(exc)
        if "truncated" in text or "broken" in text or "cannot identify" in text or isinstance(exc, SyntaxError):
            raise ValueError(f"truncated or corrupt image data ({text})") from None
        raise ValueError(f"unreadable ({exc.strerror or text})") from None
    except (ValueError, TypeError, IndexError, KeyError, struct.error, MemoryError) as exc:
        # Malformed headers surface as all sorts of errors inside Pillow's decoders.
        raise ValueError(f"truncated or corrupt image data ({type(exc).__name__}: {str(exc)[:120]})") from None
    return image, notes


def _side(pixels: int) -> str:
    side = int(pixels ** 0.5)
    return f"{side}x{side}" if side * side == pixels else f"{pixels:,} pixels"


def read_caption(path: Path) -> str:
    """The text of a caption file, or ValueError(reason) when it is not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ValueError(f"its caption {path.name} is unreadable ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"its caption {path.name} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start}); "
                         "save it as UTF-8") from None
    if "\x00" in text:
        raise ValueError(f"its caption {path.name} holds binary data, not text")
    return text.strip()


def _to_rgb(image, notes: list):
    import numpy as np
    from PIL import Image

    mode = image.mode
    if mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale: scale to 8 bits (a plain convert would clip everything above 255 to white).
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        image = Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
        notes.append(f"{mode} 16-bit -> 8-bit")
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
        notes.append("alpha composited on white")
    if image.mode == "CMYK":
        notes.append("CMYK -> RGB")
    if image.mode != "RGB":
        image = image.convert("RGB")
    return image


def open_mask(path: Path, size: tuple, alpha: bool = False, max_pixels: int = MAX_PIXELS):
    """A loss mask as an 8-bit greyscale PIL image of `size` (width, height), or ValueError(reason).

    `path` is a .mask.png (greyscale, binary, palette or grey RGB; 16-bit scaled to 8) or, with alpha=True,
    an image whose alpha channel is the mask. Validated like an image: pixel cap before decoding, a
    decodable file, the image's size, grey (a colour mask is ambiguous), and something marked white."""
    import numpy as np
    from PIL import Image, ImageOps

    what = f"its alpha channel ({path.name})" if alpha else f"its mask {path.name}"
    try:
        with Image.open(path) as im:
            if im.width * im.height > max_pixels:
                raise ValueError(f"{what} has too many pixels ({im.width}x{im.height})")
            im.load()
            im = ImageOps.exif_transpose(im) if alpha else im  # an alpha mask turns with its own image
            if alpha:
                mask = im.convert("RGBA").getchannel("A")
            elif im.mode in ("I;16", "I;16B", "I;16L", "I"):
                arr = np.asarray(im, dtype=np.float64)
                mask = Image.fromarray(np.clip(arr / (65535.0 if arr.max() > 255 else 255.0) * 255 + 0.5, 0, 255)
                                       .astype(np.uint8), "L")
            else:
                rgb = np.asarray(im.convert("RGB"), dtype=np.int16)
                if int((rgb.max(axis=2) - rgb.min(axis=2)).max()) > 8:
                    raise ValueError(f"{what} is a colour image; a mask must be greyscale (white = subject, "
                                     "black = background)")
                mask = im.convert("L")
    except ValueError:
        raise
    except Exception as exc:  # whatever Pillow raises on a file it cannot decode
        raise ValueError(f"{what} is unreadable or not an image ({type(exc).__name__})") from None
    if mask.size != tuple(size):
        raise ValueError(f"{what} is {mask.width}x{mask.height} but the image is {size[0]}x{size[1]}; a mask must "
                         "have its image's size")
    if mask.getextrema()[1] == 0:
        raise ValueError(f"{what} is all black: it marks nothing as the subject")
    return mask


def _mask_for(path: Path, image_size: tuple, use_masks: bool, alpha_mask: bool) -> Optional[tuple[Path, bool]]:
    """(mask file, is-alpha) for an image, validated, or None; ValueError(reason) for a bad mask."""
    sidecar = path.with_name(path.stem + MASK_SUFFIX)
    if use_masks and sidecar.is_file():
        open_mask(sidecar, image_size)
        return sidecar, False
    if alpha_mask and _has_alpha(path):
        open_mask(path, image_size, alpha=True)
        return path, True
    return None


def _has_alpha(path: Path) -> bool:
    from PIL import Image

    with Image.open(path) as im:
        return im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info)


def scan_images(folder, instance_prompt: str, min_size: int, caption_prefix: str = "", masks: bool = True,
                alpha_mask: bool = False) -> ScanReport:
    """Validate every file in `folder` (and each image's mask); raises one clear error when nothing usable is left."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DcustomError(f"data.images: {str(folder)!r} is not a folder; pass a folder of training images.")
    images, skipped = [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or path.is_dir() or path.suffix.lower() in IGNORED_SUFFIXES:
            continue
        if path.name.lower().endswith(MASK_SUFFIX):  # a mask belongs to its image, it is no training image
            continue
        if not path.is_file():  # a FIFO would block the read forever; a dangling link cannot be read
            skipped.append((path, "a link to nothing" if path.is_symlink() else "not a regular file"))
            continue
        try:
            image, notes = open_rgb(path)
            caption = _caption_for(path, instance_prompt, caption_prefix, notes)
            mask = _mask_for(path, image.size, masks, alpha_mask)
        except ValueError as exc:
            skipped.append((path, str(exc)))
            continue
        if min(image.size) < min_size:
            skipped.append((path, f"too small ({image.width}x{image.height}); the shorter side must be at least {min_size} px"))
            continue
        if mask is not None:
            notes.append(f"mask: {'alpha channel' if mask[1] else mask[0].name}")
        images.append(ImageRecord(path, caption, image.size, notes, mask[0] if mask else None))
    if not images:
        reasons = "; ".join(f"{p.name}: {why}" for p, why in skipped[:5]) or "the folder has no image files"
        raise DcustomError(f"data.images: no usable training image in {str(folder)!r} ({reasons}); "
                           "accepted: RGB/greyscale/CMYK/16-bit PNG, JPEG, WebP, BMP or TIFF files of at least "
                           f"{min_size} px on the shorter side and at most {MAX_PIXELS:,} pixels.")
    return ScanReport(images, skipped, folder)


def _caption_for(path: Path, instance_prompt: str, caption_prefix: str, notes: list) -> str:
    caption_file = path.with_suffix(CAPTION_SUFFIX)
    if not caption_file.is_file():
        return instance_prompt
    text = read_caption(caption_file)
    if not text:  # an empty caption would train the subject on an unconditional prompt
        notes.append(f"caption {caption_file.name} is empty: data.instance_prompt used")
        return instance_prompt
    return (caption_prefix + " " + text).strip()


def make_buckets(resolution: int, multiple: int, max_ratio: float = 2.0) -> list[tuple[int, int]]:
    """(width, height) pairs of about resolution**2 pixels, sides multiples of `multiple`, ratio <= max_ratio."""
    out = set()
    w = multiple
    while w <= resolution * max_ratio:
        h = max(multiple, int(round(resolution * resolution / w / multiple)) * multiple)
        if max(w / h, h / w) <= max_ratio + 1e-6:
            out.add((w, h))
        w += multiple
    out.add((resolution, resolution))
    return sorted(out)


def nearest_bucket(size: tuple, buckets: list) -> tuple[int, int]:
    import math

    ratio = math.log(size[0] / size[1])
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def resize_crop(image, target: tuple):
    """Scale to cover `target` (w, h) then centre-crop: no stretching, no padding."""
    from PIL import Image

    tw, th = target
    scale = max(tw / image.width, th / image.height)
    size = (max(tw, round(image.width * scale)), max(th, round(image.height * scale)))
    image = image.resize(size, Image.Resampling.BICUBIC)
    left, top = (size[0] - tw) // 2, (size[1] - th) // 2
    return image.crop((left, top, left + tw, top + th)), (top, left)


def to_tensor(image):
    """PIL RGB -> float tensor [3, H, W] in [-1, 1] (what the VAE expects)."""
    import numpy as np
    import torch

    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def unet_stride(pipe) -> int:
    """Pixel multiple that every UNet level can halve: VAE factor x 2**(levels - 1). An MM-DiT transformer
    cuts its latents into 2x2 patches (SD3's patch_size, FLUX's packing): VAE factor x 2."""
    transformer = getattr(pipe, "transformer", None)
    if transformer is not None:
        return pipe.vae_scale_factor * max(2, getattr(transformer.config, "patch_size", 1))
    return pipe.vae_scale_factor * 2 ** (len(pipe.unet.config.block_out_channels) - 1)


def folder_digest(folder) -> str:
    """Hash of names, sizes and bytes of a folder: lets tests prove it was not modified."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode())
            h.update(p.read_bytes())
    return h.hexdigest()


def class_image_dir(cfg: PriorConfig, model_spec: str, resolution: int) -> Path:
    """Where class images live: the configured folder, or a cache folder keyed by what shapes them."""
    import os

    if cfg.class_dir:
        return Path(cfg.class_dir)
    prompts = "|".join(cfg.class_prompts) if cfg.class_prompts else cfg.class_prompt
    key = hashlib.sha256(f"{model_spec}|{prompts}|{resolution}|{cfg.sample_steps}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("DCUSTOM_CACHE", Path.home() / ".cache" / "dcustom"))
    return root / "class_images" / key


def class_prompt(cfg: PriorConfig, index: int) -> str:
    """The prompt of class image `index`: class_prompts cycled, else class_prompt."""
    return cfg.class_prompts[index % len(cfg.class_prompts)] if cfg.class_prompts else cfg.class_prompt


def ensure_class_images(pipe, cfg: PriorConfig, model_spec: str, resolution: int, seed: int = 0) -> list[Path]:
    """Generate the missing class images once with the base model (atomic writes) and return all of them."""
    import torch

    folder = class_image_dir(cfg, model_spec, resolution)
    folder.mkdir(parents=True, exist_ok=True)
    have = sorted(folder.glob("class-*.png"))
    for i in range(len(have), cfg.num_images):
        generator = torch.Generator(device="cpu").manual_seed(seed + i)
        with torch.no_grad():
            image = pipe(class_prompt(cfg, i), num_inference_steps=cfg.sample_steps, width=resolution, height=resolution,
                         generator=generator, guidance_scale=7.5).images[0]
        path = folder / f"class-{i:05d}.png"
        tmp = folder / f".class-{i:05d}.png.tmp"
        image.save(tmp, format="PNG")
        tmp.replace(path)
    return sorted(folder.glob("class-*.png"))[: cfg.num_images]
