"""The toy world's vocabulary: attributes, synonyms, captions, and what is held out of base training.

Torch-free and numpy-free. A `Scene` is the ground truth of one image; `caption(scene, rng)` writes
one of many captions for it and `parse_caption(text)` reads the attributes back, so any prompt made
from this grammar can be judged.

Held out from base training on purpose (the base sampler `sample_scene(..., split="base")` never
produces them, and a test checks it):
- SUBJECTS: composite objects with a rare trigger word, for personalization (DreamBooth, LoRA, TI);
- STYLES: whole-image renderings (mosaic tiles, pencil sketch, neon glow), for style transfer;
- HELDOUT_COMBOS: shape x colour pairs, for compositional checks (both words are known, the pair is not);
- ERASURE_CONCEPT: a concept the base *does* learn (the colour purple), designated for erasure tests,
  so "erased" has something to remove; evaluation reports how often the judge still sees it.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, replace

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUNDS = ("white", "black", "gray", "striped", "dotted", "checkered")

SYNONYMS: dict[str, tuple[str, ...]] = {
    # shapes
    "circle": ("circle", "disc", "ball"),
    "square": ("square", "box", "block"),
    "triangle": ("triangle", "pyramid"),
    "star": ("star", "pentagram"),
    "cross": ("cross", "plus"),
    "diamond": ("diamond", "rhombus"),
    # colours
    "red": ("red", "scarlet", "crimson"),
    "green": ("green", "emerald"),
    "blue": ("blue", "azure"),
    "yellow": ("yellow", "golden"),
    "purple": ("purple", "violet"),
    "orange": ("orange", "amber"),
    # backgrounds
    "white": ("white", "light"),
    "black": ("black", "dark"),
    "gray": ("gray", "grey"),
    "striped": ("striped", "stripy", "lined"),
    "dotted": ("dotted", "spotted"),
    "checkered": ("checkered", "checked", "chequered"),
}

SIZE_WORDS = {"small": ("small", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}


@dataclass(frozen=True)
class Subject:
    name: str  # identity label used by the judges' subject head
    trigger: str  # rare token a personalization method binds
    class_word: str  # the base shape word it resembles (for class / prior-preservation prompts)
    description: str


SUBJECTS = (
    Subject("robot", "sks", "square", "a gray boxy robot: square head with two cyan eyes, red antenna ball, orange chest panel"),
    Subject("ladybug", "zwx", "circle", "a red ladybug seen from above: black head, centre line and four black spots"),
    Subject("pine", "qrv", "triangle", "a pine tree: three stacked dark-green triangles on a brown trunk"),
)
SUBJECT_NAMES = tuple(s.name for s in SUBJECTS)
STYLES = ("mosaic", "sketch", "neon")
STYLE_WORDS = {"mosaic": ("mosaic", "tiled"), "sketch": ("sketch", "pencil"), "neon": ("neon", "glowing")}
HELDOUT_COMBOS = (("circle", "green"), ("square", "orange"), ("triangle", "blue"), ("star", "red"))
ERASURE_CONCEPT = ("colour", "purple")

# Judge heads and their classes. "none" marks "no subject" / "no style"; labels that do not apply
# (shape of a subject, background under a style) are not scored.
HEADS: dict[str, tuple[str, ...]] = {
    "shape": SHAPES,
    "colour": COLOURS,
    "background": BACKGROUNDS,
    "subject": ("none",) + SUBJECT_NAMES,
    "style": ("none",) + STYLES,
}


@dataclass(frozen=True)
class Scene:
    """Ground truth of one image. Geometry is in pixels of a 64x64 canvas (floats)."""

    shape: str | None  # None when the object is a subject
    colour: str | None
    background: str
    x: float
    y: float
    size: float  # object diameter in pixels
    angle: float = 0.0  # degrees
    flip: bool = False
    subject: str | None = None
    style: str | None = None
    seed: int = 0  # texture phase, colour jitter

    def labels(self) -> dict[str, str | None]:
        """Per-head ground truth; None where the head does not apply."""
        return {
            "shape": self.shape,
            "colour": self.colour,
            "background": None if self.style else self.background,
            "subject": self.subject or "none",
            "style": self.style or "none",
        }

    @property
    def size_word(self) -> str | None:
        return "small" if self.size < 26 else "large" if self.size > 40 else None

    @property
    def position_word(self) -> str:
        dx, dy = self.x - 32, self.y - 32
        if max(abs(dx), abs(dy)) < 6:
            return "center"
        if abs(dx) >= abs(dy):
            return "left" if dx < 0 else "right"
        return "top" if dy < 0 else "bottom"


@dataclass(frozen=True)
class SceneRanges:
    """How big, where and how rotated objects are; the base recipe uses larger objects than judges."""

    min_size: float = 20.0
    max_size: float = 48.0
    max_angle: float = 15.0


JUDGE_RANGES = SceneRanges(min_size=18.0, max_size=50.0)


def _geometry(rng: random.Random, ranges: SceneRanges) -> dict:
    size = rng.uniform(ranges.min_size, ranges.max_size)
    margin = size / 2 + 1
    return dict(
        size=size,
        x=rng.uniform(margin, 64 - margin),
        y=rng.uniform(margin, 64 - margin),
        angle=rng.uniform(-ranges.max_angle, ranges.max_angle),
        seed=rng.randrange(2**31),
    )


def base_combos() -> list[tuple[str, str]]:
    """Shape x colour pairs the base model trains on (all but HELDOUT_COMBOS)."""
    return [(s, c) for s in SHAPES for c in COLOURS if (s, c) not in HELDOUT_COMBOS]


def sample_scene(rng: random.Random, split: str = "base", ranges: SceneRanges | None = None) -> Scene:
    """Draw a scene. split: "base" (what train-base sees), "heldout_combo", "subject", "style",
    or "judge" (everything, as the judges must recognise it all)."""
    ranges = ranges or SceneRanges()
    if split == "base":
        shape, colour = rng.choice(base_combos())
        return Scene(shape, colour, rng.choice(BACKGROUNDS), **_geometry(rng, ranges))
    if split == "heldout_combo":
        shape, colour = rng.choice(HELDOUT_COMBOS)
        return Scene(shape, colour, rng.choice(BACKGROUNDS), **_geometry(rng, ranges))
    if split == "subject":
        geo = _geometry(rng, SceneRanges(max(ranges.min_size, 26.0), max(ranges.max_size, 30.0), 20.0))
        return Scene(None, None, rng.choice(BACKGROUNDS), flip=rng.random() < 0.5,
                     subject=rng.choice(SUBJECT_NAMES), **geo)
    if split == "style":
        geo = _geometry(rng, SceneRanges(max(ranges.min_size, 28.0), max(ranges.max_size, 32.0), ranges.max_angle))
        return Scene(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(BACKGROUNDS),
                     style=rng.choice(STYLES), **geo)
    if split == "judge":
        roll = rng.random()
        sub = "base" if roll < 0.6 else "subject" if roll < 0.8 else "style"
        if sub == "base":  # the judges see every shape x colour pair, held-out ones included
            return Scene(rng.choice(SHAPES), rng.choice(COLOURS), rng.choice(BACKGROUNDS), **_geometry(rng, ranges))
        return sample_scene(rng, sub, ranges)
    raise ValueError(f"unknown split {split!r}; accepted: base, heldout_combo, subject, style, judge")


def is_heldout(scene: Scene) -> bool:
    """True if base training must never see this scene."""
    return scene.subject is not None or scene.style is not None or (scene.shape, scene.colour) in HELDOUT_COMBOS


def _word(rng: random.Random, key: str) -> str:
    return rng.choice(SYNONYMS[key])


def caption(scene: Scene, rng: random.Random, detail: float = 0.3) -> str:
    """One caption for `scene`; synonyms, templates and optional size/position words vary with rng."""
    bg = _word(rng, scene.background)
    if scene.subject is not None:
        subj = next(s for s in SUBJECTS if s.name == scene.subject)
        thing = f"{subj.trigger} {subj.class_word}"
        return rng.choice((f"a {thing} on a {bg} background", f"a photo of a {thing} on a {bg} background",
                           f"a {thing}, {bg} background"))
    shape, colour = _word(rng, scene.shape), _word(rng, scene.colour)
    if scene.style is not None:
        style = rng.choice(STYLE_WORDS[scene.style])
        return rng.choice((f"a {colour} {shape} in {style} style", f"a {style} drawing of a {colour} {shape}"))
    size = ""
    if scene.size_word and rng.random() < detail:
        size = rng.choice(SIZE_WORDS[scene.size_word]) + " "
    where = ""
    if rng.random() < detail:
        where = " " + POSITION_WORDS[scene.position_word]
    templates = (
        f"a {size}{colour} {shape}{where} on a {bg} background",
        f"a {size}{colour} {shape}{where} on a {bg} background",
        f"{size}{colour} {shape}{where}, {bg} background",
        f"a picture of a {size}{colour} {shape}{where} on a {bg} background",
        f"a {bg} background with a {size}{colour} {shape}{where}",
        f"a {size}{shape} that is {colour}{where}, on a {bg} background",
    )
    return rng.choice(templates)


_LOOKUP: dict[str, tuple[str, str]] = {}
for _head, _classes in (("shape", SHAPES), ("colour", COLOURS), ("background", BACKGROUNDS)):
    for _cls in _classes:
        for _syn in SYNONYMS[_cls]:
            _LOOKUP[_syn] = (_head, _cls)
for _s in SUBJECTS:
    _LOOKUP[_s.trigger] = ("subject", _s.name)
for _style, _words in STYLE_WORDS.items():
    for _w in _words:
        _LOOKUP[_w] = ("style", _style)


def parse_caption(text: str) -> dict[str, str]:
    """Attributes named in a caption: {head: class}; a subject's class word is not a shape."""
    found: dict[str, str] = {}
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _LOOKUP:
            head, cls = _LOOKUP[word]
            found.setdefault(head, cls)
    if "subject" in found:
        found.pop("shape", None)
    if "style" in found:
        found.pop("background", None)
    return found


def vocabulary() -> list[str]:
    """Every word captions can use, plus the subject triggers (which the base never trains on)."""
    words = set()
    for syns in SYNONYMS.values():
        words.update(syns)
    for syns in SIZE_WORDS.values():
        words.update(syns)
    for phrase in POSITION_WORDS.values():
        words.update(phrase.split())
    for syns in STYLE_WORDS.values():
        words.update(syns)
    for s in SUBJECTS:
        words.update((s.trigger, s.class_word, s.name))
    words.update("a an the of on in at with that is picture photo drawing style background".split())
    return sorted(words)


def scene_for(shape: str | None = None, colour: str | None = None, background: str = "white", *,
              subject: str | None = None, style: str | None = None, size: float = 40.0,
              x: float = 32.0, y: float = 32.0, angle: float = 0.0, seed: int = 0) -> Scene:
    """A scene from explicit attributes (validated)."""
    if subject is not None and subject not in SUBJECT_NAMES:
        raise ValueError(f"unknown subject {subject!r}; accepted: {', '.join(SUBJECT_NAMES)}")
    if style is not None and style not in STYLES:
        raise ValueError(f"unknown style {style!r}; accepted: {', '.join(STYLES)}")
    if subject is None:
        if shape not in SHAPES or colour not in COLOURS:
            raise ValueError(f"shape must be one of {SHAPES} and colour one of {COLOURS}; got {shape!r}, {colour!r}")
        if background not in BACKGROUNDS:
            raise ValueError(f"unknown background {background!r}; accepted: {', '.join(BACKGROUNDS)}")
    return Scene(shape if subject is None else None, colour if subject is None else None, background,
                 x=x, y=y, size=size, angle=angle, subject=subject, style=style, seed=seed)


def scene_from_attributes(attrs: dict[str, str], rng: random.Random, ranges: SceneRanges | None = None) -> Scene:
    """A random scene that satisfies parsed caption attributes (missing ones drawn at random)."""
    ranges = ranges or SceneRanges()
    if "subject" in attrs:
        base = sample_scene(rng, "subject", ranges)
        return replace(base, subject=attrs["subject"], background=attrs.get("background", base.background))
    shape = attrs.get("shape") or rng.choice(SHAPES)
    colour = attrs.get("colour") or rng.choice(COLOURS)
    background = attrs.get("background") or rng.choice(BACKGROUNDS)
    return Scene(shape, colour, background, style=attrs.get("style"), **_geometry(rng, ranges))
