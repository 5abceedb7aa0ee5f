"""Where results go: a folder is proven writable before any work is done; PNGs are written atomically
(torch-free)."""

from __future__ import annotations

import os
from pathlib import Path

from dcustom.errors import DcustomError


def writable_folder(path, key: str) -> Path:
    """Create folder `path` if needed and prove a file can be written in it; else one sentence naming `key`.

    A real write, not os.access: permission bits say nothing for root, read-only mounts or /sys.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise DcustomError(f"{key}: {str(path)!r} is a file, not a folder; accepted: a folder path (created if missing).")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".dcustom-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise DcustomError(f"{key}: cannot write to {str(path)!r} ({reason}); accepted: a folder you may write to.") from None
    return path


def save_png(image, path: Path, text: dict[str, str]) -> Path:
    """Write a PNG with text chunks, atomically (temp name, then rename)."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in text.items():
        info.add_text(key, value)
    tmp = path.with_name("." + path.name + ".tmp")
    image.save(tmp, format="PNG", pnginfo=info)
    tmp.replace(path)
    return path
