"""Checks on files uploaded through the UI: type, size in bytes and pixel count."""

from __future__ import annotations

import shutil
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

from dcustom.errors import DcustomError

IMAGE_FORMATS = {"PNG", "JPEG", "WEBP", "BMP"}


@dataclass(frozen=True)
class UploadLimits:
    max_bytes: int = 20 * 1024 * 1024  # per file
    max_pixels: int = 4096 * 4096  # width * height
    max_files: int = 50  # per training set


def check_image_file(path: str | Path, limits: UploadLimits, what: str = "upload") -> None:
    """Raise one clear sentence unless `path` is a complete, still image within the limits.

    Size and pixel count are read from the header before anything is decoded (a decompression bomb never is);
    then the image is decoded once, so a truncated file is refused here and not skipped later in training."""
    import warnings

    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    name = path.name
    size = path.stat().st_size
    accepted = f"accepted: {', '.join(sorted(IMAGE_FORMATS))} files"
    if size == 0:
        raise DcustomError(f"{what} {name!r}: is empty (0 bytes); {accepted}.")
    if size > limits.max_bytes:
        raise DcustomError(f"{what} {name!r}: is {size / 2**20:.1f} MiB; files up to {limits.max_bytes / 2**20:.0f} MiB are accepted.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own, lower limit applies
            opened = Image.open(path)
        with opened as image:
            fmt, (width, height) = image.format, image.size
            if width * height > limits.max_pixels:
                raise DcustomError(f"{what} {name!r}: has {width}x{height} pixels; images up to "
                                   f"{limits.max_pixels:,} pixels are accepted.")
            if fmt not in IMAGE_FORMATS:
                raise DcustomError(f"{what} {name!r}: is a {fmt} file; {accepted}.")
            frames = getattr(image, "n_frames", 1)
            if getattr(image, "is_animated", False) and frames > 1:
                raise DcustomError(f"{what} {name!r}: is animated ({frames} frames); accepted: still images (export one frame).")
            image.load()
    except UnidentifiedImageError:
        raise DcustomError(f"{what} {name!r}: is not an image; {accepted}.") from None
    except Image.DecompressionBombError:
        raise DcustomError(f"{what} {name!r}: has too many pixels; images up to {limits.max_pixels:,} pixels are accepted.") from None
    except (OSError, SyntaxError, ValueError, struct.error, IndexError, MemoryError):
        raise DcustomError(f"{what} {name!r}: is truncated or corrupt; {accepted} that open in an image viewer.") from None


def store_images(files: list, dest: Path, limits: UploadLimits, what: str = "upload") -> list[Path]:
    """Validate every file first, then copy them into `dest` (a fresh folder) under safe names."""
    paths = [Path(f if isinstance(f, (str, Path)) else getattr(f, "name", f)) for f in (files or [])]
    if not paths:
        raise DcustomError(f"{what}: no images were given; drop at least one PNG/JPEG/WEBP image.")
    if len(paths) > limits.max_files:
        raise DcustomError(f"{what}: {len(paths)} files were given; at most {limits.max_files} are accepted.")
    for p in paths:
        check_image_file(p, limits, what)
    dest.mkdir(parents=True, exist_ok=False)
    stored = []
    for i, p in enumerate(paths):
        target = dest / f"{i:03d}{p.suffix.lower() or '.png'}"
        shutil.copyfile(p, target)
        stored.append(target)
    return stored


def new_upload_folder(root: Path, prefix: str) -> Path:
    return root / f"{prefix}-{uuid.uuid4().hex[:10]}"
