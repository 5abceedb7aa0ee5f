"""Seeded procedural renderer: a `Scene` -> a 64x64 RGB PIL image (and the object's mask).

Everything is drawn at 4x resolution and box-filtered down, so edges are anti-aliased. The same
scene always gives the same pixels (texture phase and colour jitter come from `scene.seed`).
"""

from __future__ import annotations

import math
import random

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from dcustom.toyworld.grammar import (
    SUBJECTS,
    Scene,
    SceneRanges,
    caption,
    sample_scene,
    scene_for,
)

SIZE = 64
SS = 4  # supersampling factor
BIG = SIZE * SS

PALETTE = {
    "red": (220, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 230),
    "yellow": (240, 210, 25),
    "purple": (150, 45, 195),
    "orange": (250, 135, 20),
}


def _jitter(rgb, rng: random.Random, amount: int = 14):
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in rgb)


# ---------------------------------------------------------------- shapes (unit coordinates, radius 1)
def _regular(n: int, radius: float = 1.0, start: float = -90.0):
    return [(radius * math.cos(math.radians(start + 360 * i / n)), radius * math.sin(math.radians(start + 360 * i / n)))
            for i in range(n)]


def _star(points=5, outer=1.0, inner=0.42):
    pts = []
    for i in range(points * 2):
        r = outer if i % 2 == 0 else inner
        a = math.radians(-90 + 180 * i / points)
        pts.append((r * math.cos(a), r * math.sin(a)))
    return pts


def _rect(x0, y0, x1, y1):
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _circle(cx, cy, r, n=40):
    return [(cx + x * r, cy + y * r) for x, y in _regular(n)]


SHAPE_POLYGONS = {
    "circle": _regular(48),
    "square": _rect(-0.8, -0.8, 0.8, 0.8),
    "triangle": [(x, y + 0.2) for x, y in _regular(3, 1.1)],
    "star": _star(),
    "cross": [(-0.3, -0.95), (0.3, -0.95), (0.3, -0.3), (0.95, -0.3), (0.95, 0.3), (0.3, 0.3), (0.3, 0.95),
              (-0.3, 0.95), (-0.3, 0.3), (-0.95, 0.3), (-0.95, -0.3), (-0.3, -0.3)],
    "diamond": [(0, -1.0), (0.65, 0), (0, 1.0), (-0.65, 0)],
}

# Subjects: lists of (polygon, rgb) in unit coordinates, drawn in order.
SUBJECT_PARTS = {
    "robot": [
        (_rect(-0.04, -0.98, 0.04, -0.62), (70, 70, 80)),
        (_circle(0, -0.9, 0.11), (225, 30, 30)),
        (_rect(-0.42, -0.66, 0.42, -0.12), (195, 195, 205)),
        (_circle(-0.18, -0.4, 0.1), (0, 225, 230)),
        (_circle(0.18, -0.4, 0.1), (0, 225, 230)),
        (_rect(-0.62, -0.06, 0.62, 0.92), (135, 135, 150)),
        (_rect(-0.28, 0.12, 0.28, 0.5), (250, 140, 20)),
    ],
    "ladybug": [
        (_circle(0, -0.62, 0.34), (20, 20, 20)),
        (_circle(0, 0.12, 0.78), (215, 25, 25)),
        (_rect(-0.04, -0.62, 0.04, 0.9), (20, 20, 20)),
        (_circle(-0.38, -0.1, 0.14), (20, 20, 20)),
        (_circle(0.38, -0.1, 0.14), (20, 20, 20)),
        (_circle(-0.36, 0.42, 0.13), (20, 20, 20)),
        (_circle(0.36, 0.42, 0.13), (20, 20, 20)),
    ],
    "pine": [
        (_rect(-0.13, 0.55, 0.13, 0.98), (120, 70, 30)),
        ([(-0.85, 0.6), (0.85, 0.6), (0, -0.05)], (20, 105, 45)),
        ([(-0.68, 0.22), (0.68, 0.22), (0, -0.5)], (25, 120, 50)),
        ([(-0.5, -0.18), (0.5, -0.18), (0, -0.98)], (30, 135, 55)),
    ],
}
assert set(SUBJECT_PARTS) == {s.name for s in SUBJECTS}


def _place(points, scene: Scene):
    """Unit-coordinate polygon -> supersampled pixel coordinates (flip, rotate, scale, translate)."""
    a = math.radians(scene.angle)
    ca, sa = math.cos(a), math.sin(a)
    half = scene.size / 2 * SS
    out = []
    for x, y in points:
        if scene.flip:
            x = -x
        xr, yr = x * ca - y * sa, x * sa + y * ca
        out.append((scene.x * SS + xr * half, scene.y * SS + yr * half))
    return out


def object_parts(scene: Scene):
    """The object's polygons in supersampled pixels with their colours."""
    rng = random.Random(scene.seed * 7 + 1)
    if scene.subject is not None:
        return [(_place(poly, scene), _jitter(rgb, rng, 6)) for poly, rgb in SUBJECT_PARTS[scene.subject]]
    return [(_place(SHAPE_POLYGONS[scene.shape], scene), _jitter(PALETTE[scene.colour], rng))]


# ---------------------------------------------------------------- backgrounds
def background_array(name: str, seed: int) -> np.ndarray:
    """A supersampled background, uint8 [BIG, BIG, 3]."""
    rng = random.Random(seed * 13 + 5)
    yy, xx = np.mgrid[0:BIG, 0:BIG]
    if name in ("white", "black", "gray"):
        level = {"white": 242, "black": 18, "gray": 128}[name] + rng.randint(-8, 8)
        return np.full((BIG, BIG, 3), level, np.uint8)
    light, dark = 215 + rng.randint(-10, 10), 95 + rng.randint(-10, 10)
    if name == "striped":
        period = rng.uniform(7, 11) * SS
        direction = rng.choice(((1, 0), (0, 1), (0.7071, 0.7071), (0.7071, -0.7071)))
        phase = rng.uniform(0, period)
        on = ((xx * direction[0] + yy * direction[1] + phase) % period) < period / 2
    elif name == "checkered":
        cell = rng.uniform(7, 10) * SS
        ox, oy = rng.uniform(0, cell), rng.uniform(0, cell)
        on = ((np.floor((xx + ox) / cell) + np.floor((yy + oy) / cell)) % 2) == 0
    elif name == "dotted":
        light = 232 + rng.randint(-8, 8)
        spacing = rng.uniform(8, 10) * SS
        ox, oy = rng.uniform(0, spacing), rng.uniform(0, spacing)
        dx = (xx + ox) % spacing - spacing / 2
        dy = (yy + oy) % spacing - spacing / 2
        on = (dx * dx + dy * dy) > (1.6 * SS) ** 2
    else:
        raise ValueError(f"unknown background {name!r}")
    img = np.where(on[..., None], light, dark).astype(np.uint8)
    return np.repeat(img, 3, axis=2) if img.shape[2] == 1 else img


# ---------------------------------------------------------------- styles (held out of base training)
def _draw_parts(canvas: Image.Image, parts, outline=None, width=0, fill=True):
    draw = ImageDraw.Draw(canvas)
    for poly, rgb in parts:
        draw.polygon(poly, fill=rgb if fill else None, outline=outline or (rgb if not fill else None),
                     width=width)


def _render_style(scene: Scene, parts) -> Image.Image:
    if scene.style == "mosaic":
        plain = Image.fromarray(background_array(scene.background, scene.seed))
        _draw_parts(plain, parts)
        small = plain.resize((SIZE // 4, SIZE // 4), Image.BOX).resize((BIG, BIG), Image.NEAREST)
        arr = np.array(small)
        grout = (np.arange(BIG) % (4 * SS)) < SS
        arr[grout, :, :] = (40, 40, 45)
        arr[:, grout, :] = (40, 40, 45)
        return Image.fromarray(arr)
    if scene.style == "sketch":
        yy, xx = np.mgrid[0:BIG, 0:BIG]
        paper = np.empty((BIG, BIG, 3), np.uint8)
        paper[:] = (246, 240, 222)
        paper[((xx + yy) % (6 * SS)) < SS // 2] = (205, 200, 190)  # faint hatching
        canvas = Image.fromarray(paper)
        washed = [(poly, tuple(int(0.55 * c + 0.45 * 246) for c in rgb)) for poly, rgb in parts]
        _draw_parts(canvas, washed)
        draw = ImageDraw.Draw(canvas)
        for poly, _ in parts:
            draw.polygon(poly, outline=(55, 55, 60), width=2 * SS)
        return canvas
    if scene.style == "neon":
        canvas = Image.new("RGB", (BIG, BIG), (12, 10, 38))
        glow = Image.new("RGB", (BIG, BIG), (0, 0, 0))
        draw = ImageDraw.Draw(glow)
        for poly, rgb in parts:
            bright = tuple(min(255, int(c * 1.1 + 40)) for c in rgb)
            draw.polygon(poly, outline=bright, width=3 * SS)
        blurred = glow.filter(ImageFilter.GaussianBlur(4 * SS))
        arr = np.clip(np.array(canvas, np.int32) + 2 * np.array(blurred, np.int32) + np.array(glow, np.int32), 0, 255)
        return Image.fromarray(arr.astype(np.uint8))
    raise ValueError(f"unknown style {scene.style!r}")


# ---------------------------------------------------------------- public entry points
def render_scene(scene: Scene, with_mask: bool = False):
    """The 64x64 RGB image of `scene` (and, with_mask, its object-coverage mask in [0, 1], 64x64 float32)."""
    parts = object_parts(scene)
    if scene.style is not None:
        big = _render_style(scene, parts)
    else:
        big = Image.fromarray(background_array(scene.background, scene.seed))
        _draw_parts(big, parts)
    image = big.resize((SIZE, SIZE), Image.BOX)
    if not with_mask:
        return image
    mask = Image.new("L", (BIG, BIG), 0)
    draw = ImageDraw.Draw(mask)
    for poly, _ in parts:
        draw.polygon(poly, fill=255)
    return image, np.asarray(mask.resize((SIZE, SIZE), Image.BOX), np.float32) / 255.0


def render_samples(n: int, seed: int, split: str = "base", ranges: SceneRanges | None = None, detail: float = 0.3):
    """n (image, caption, scene) triples drawn from `split`, reproducible from `seed`."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = sample_scene(rng, split, ranges)
        out.append((render_scene(scene), caption(scene, rng, detail), scene))
    return out


def render_caption(text: str, seed: int = 0):
    """Render an image matching a caption of the grammar (unnamed attributes drawn from `seed`)."""
    from dcustom.toyworld.grammar import parse_caption, scene_from_attributes

    attrs = parse_caption(text)
    if not attrs:
        raise ValueError(f"caption {text!r} names no shape, colour, background, subject or style of the toy world")
    return render_scene(scene_from_attributes(attrs, random.Random(seed)))


def render_attributes(shape=None, colour=None, background="white", **kwargs):
    """Render explicit attributes (see grammar.scene_for for the keywords)."""
    return render_scene(scene_for(shape, colour, background, **kwargs))


def render_subject(name: str, n: int, seed: int = 0):
    """n (image, caption, scene) views of held-out subject `name`: varied pose, size, flip, background."""
    from dataclasses import replace

    from dcustom.toyworld.grammar import SUBJECT_NAMES

    if name not in SUBJECT_NAMES:
        raise ValueError(f"unknown subject {name!r}; accepted: {', '.join(SUBJECT_NAMES)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = replace(sample_scene(rng, "subject"), subject=name)
        out.append((render_scene(scene), caption(scene, rng), scene))
    return out


def render_style(style: str, n: int, seed: int = 0):
    """n (image, caption, scene) images in held-out style `style` (random shapes and colours)."""
    from dataclasses import replace

    from dcustom.toyworld.grammar import STYLES

    if style not in STYLES:
        raise ValueError(f"unknown style {style!r}; accepted: {', '.join(STYLES)}")
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        scene = replace(sample_scene(rng, "style"), style=style)
        out.append((render_scene(scene), caption(scene, rng), scene))
    return out


def grid(images, columns: int = 8, pad: int = 2) -> Image.Image:
    """Tile images into one PIL image (white gutters)."""
    images = list(images)
    w, h = images[0].size
    rows = max(1, math.ceil(len(images) / columns))
    cols = min(columns, len(images))
    sheet = Image.new("RGB", (cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    for i, im in enumerate(images):
        sheet.paste(im.convert("RGB"), (pad + (i % columns) * (w + pad), pad + (i // columns) * (h + pad)))
    return sheet
