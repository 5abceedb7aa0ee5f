"""Image I/O for the training-free modules: read anything PIL reads, fit it to the model, grids."""

from __future__ import annotations

from pathlib import Path

from dcustom.errors import DcustomError


def read_image(path, what: str = "image"):
    """An RGB PIL image from `path`; transparent pixels are put on white. One clear error otherwise."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DcustomError(f"{what} file {str(p)!r} does not exist.")
    try:
        with Image.open(p) as img:
            img.load()
            return to_rgb(img)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise DcustomError(
            f"{what} file {str(p)!r} could not be read as an image ({type(exc).__name__}); "
            "accepted: PNG, JPEG, WebP, BMP, TIFF or GIF files."
        ) from None


def to_rgb(img):
    """RGB of any PIL mode: alpha is composited on white, palettes/greyscale/CMYK/16-bit converted."""
    from PIL import Image

    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = img.point(lambda v: v / 256).convert("L")
    elif img.mode == "F":
        img = img.convert("L")
    if img.mode == "P":
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def fit(img, width: int, height: int):
    """Centre-crop to the target aspect ratio, then resize (Lanczos), as StyleID preprocesses."""
    from PIL import Image

    w, h = img.size
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        left = (w - new_w) // 2
        img = img.crop((left, 0, left + new_w, h))
    elif w / h < target:
        new_h = max(1, round(w / target))
        top = (h - new_h) // 2
        img = img.crop((0, top, w, top + new_h))
    return img.resize((width, height), Image.LANCZOS)


def model_resolution(pipe, resolution: int | None = None) -> tuple[int, int]:
    """(height, width) in pixels the model draws by default (or `resolution` square)."""
    if resolution is not None:
        if resolution < 8 or resolution % 8:
            raise DcustomError(f"resolution must be a positive multiple of 8, got {resolution}.")
        return resolution, resolution
    size = pipe.unet.config.sample_size
    size = size[0] if isinstance(size, (list, tuple)) else size
    side = size * pipe.vae_scale_factor
    return side, side


def grid(images, pad: int = 4):
    """Images side by side on white, all resized to the first one's height."""
    from PIL import Image

    height = images[0].height
    tiles = [im if im.height == height else im.resize((round(im.width * height / im.height), height)) for im in images]
    out = Image.new("RGB", (sum(t.width for t in tiles) + pad * (len(tiles) + 1), height + 2 * pad), "white")
    x = pad
    for t in tiles:
        out.paste(t, (x, pad))
        x += t.width + pad
    return out
