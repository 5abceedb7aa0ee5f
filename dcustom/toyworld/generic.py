"""Generic procedural images for the toy autoencoder: random polygons, ellipses and dots in any RGB
colour on random flat, gradient or two-colour textured backgrounds.

Why: an autoencoder trained only on the base renders learns the base palette and shapes, and then
cannot carry what it never saw — the held-out subjects' grey bodies, cyan eyes and black spots come
back purple or vanish. Stable Diffusion's VAE is generic because it is trained on all kinds of
images; this is the toy world's "all kinds of images". Nothing here draws a subject, a style or a
caption: the subjects stay out of everything the base model is trained on, and small details of
arbitrary colour (the skill the subjects need) are taught on random content instead.

Image i depends only on (seed, i), so the pool is the same whatever the number of render workers.
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw

from dcustom.toyworld.render import BIG, SIZE, SS

OFFSET = 7_777_777  # keeps generic seeds apart from base-pool seeds


def _colour(rng: random.Random) -> tuple[int, int, int]:
    roll = rng.random()
    if roll < 0.15:  # greys, black and white are as common in the world as saturated colours
        v = rng.randint(0, 255)
        return v, v, v
    return rng.randint(0, 255), rng.randint(0, 255), rng.randint(0, 255)


def _background(rng: random.Random) -> np.ndarray:
    a, b = np.array(_colour(rng), np.float32), np.array(_colour(rng), np.float32)
    kind = rng.choice(("flat", "flat", "gradient", "stripes", "checker", "dots"))
    yy, xx = np.mgrid[0:BIG, 0:BIG].astype(np.float32)
    if kind == "flat":
        return np.broadcast_to(a, (BIG, BIG, 3)).astype(np.uint8)
    if kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = ((xx - BIG / 2) * math.cos(angle) + (yy - BIG / 2) * math.sin(angle)) / BIG + 0.5
        t = np.clip(t, 0, 1)[..., None]
        return (a * (1 - t) + b * t).astype(np.uint8)
    period = rng.uniform(3, 16) * SS
    if kind == "stripes":
        angle = rng.uniform(0, math.pi)
        on = ((xx * math.cos(angle) + yy * math.sin(angle) + rng.uniform(0, period)) % period) < period / 2
    elif kind == "checker":
        on = ((np.floor((xx + rng.uniform(0, period)) / period) + np.floor((yy + rng.uniform(0, period)) / period)) % 2) == 0
    else:
        dx = (xx + rng.uniform(0, period)) % period - period / 2
        dy = (yy + rng.uniform(0, period)) % period - period / 2
        on = (dx * dx + dy * dy) > (rng.uniform(0.15, 0.4) * period) ** 2
    return np.where(on[..., None], a, b).astype(np.uint8)


def _polygon(rng: random.Random, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    kind = rng.choice(("ngon", "ellipse", "rect", "star", "blob"))
    rot = rng.uniform(0, 2 * math.pi)
    if kind == "ngon":
        n = rng.randint(3, 8)
        radii = [r] * n
    elif kind == "ellipse":
        n = 40
        aspect = rng.uniform(0.3, 1.0)
        radii = [r * aspect / math.sqrt((aspect * math.cos(2 * math.pi * i / n)) ** 2 + math.sin(2 * math.pi * i / n) ** 2)
                 for i in range(n)]
    elif kind == "rect":
        w, h = r * rng.uniform(0.2, 1.0), r * rng.uniform(0.2, 1.0)
        pts = [(-w, -h), (w, -h), (w, h), (-w, h)]
        return [(cx + x * math.cos(rot) - y * math.sin(rot), cy + x * math.sin(rot) + y * math.cos(rot)) for x, y in pts]
    elif kind == "star":
        n = rng.randint(4, 7) * 2
        inner = rng.uniform(0.3, 0.6)
        radii = [r if i % 2 == 0 else r * inner for i in range(n)]
    else:  # an irregular star-shaped blob
        n = rng.randint(5, 12)
        radii = [r * rng.uniform(0.5, 1.0) for _ in range(n)]
    n = len(radii)
    return [(cx + radii[i] * math.cos(rot + 2 * math.pi * i / n), cy + radii[i] * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def render_generic(seed: int, index: int) -> np.ndarray:
    """One 64x64 generic image, uint8 [64, 64, 3]."""
    rng = random.Random((seed + OFFSET) * 1_000_003 + index)
    canvas = Image.fromarray(_background(rng))
    draw = ImageDraw.Draw(canvas)
    for _ in range(rng.randint(1, 5)):  # large and medium objects, possibly overlapping
        r = rng.uniform(3, 28) * SS
        cx, cy = rng.uniform(0, BIG), rng.uniform(0, BIG)
        draw.polygon(_polygon(rng, cx, cy, r), fill=_colour(rng))
        for _ in range(rng.choice((0, 0, 1, 2, 4))):  # small details on the object: 1-4 px dots and bars
            d = rng.uniform(1.0, 3.5) * SS
            px, py = cx + rng.uniform(-r, r) * 0.7, cy + rng.uniform(-r, r) * 0.7
            draw.polygon(_polygon(rng, px, py, d), fill=_colour(rng))
    return np.asarray(canvas.resize((SIZE, SIZE), Image.BOX))


def _render_range(args) -> np.ndarray:
    seed, start, stop = args
    return np.stack([render_generic(seed, i) for i in range(start, stop)])


def render_generic_pool(size: int, seed: int, workers: int = 1) -> np.ndarray:
    """`size` generic images, uint8 [N, 64, 64, 3]."""
    if size <= 0:
        return np.empty((0, SIZE, SIZE, 3), np.uint8)
    chunk = 2000
    jobs = [(seed, s, min(size, s + chunk)) for s in range(0, size, chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            return np.concatenate(list(ex.map(_render_range, jobs)))
    return np.concatenate([_render_range(job) for job in jobs])
