"""Small image folders for trainer tests (imported by test modules; not a test file)."""

from pathlib import Path

import numpy as np
from PIL import Image


def write_noise_images(folder: Path, sizes, seed: int) -> Path:
    """Uniform-noise RGB PNGs 0.png, 1.png, ... of the given (width, height) sizes; creates the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, (w, h) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder
