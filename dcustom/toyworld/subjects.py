"""Training folders for the held-out subjects: a few renders, their captions and their masks.

What a user of a subject trainer brings — "5 pictures of my thing" — made from the toy world, where the
renderer knows exactly which pixels are the subject, so every example also gets its `<name>.mask.png`
(white = subject) for masked training. The demo, the app's Train tab and the quality tests use it.
"""

from __future__ import annotations

from pathlib import Path

# Backgrounds the examples show; the checks then ask for the subject on the others (black, dotted,
# checkered), which it was never shown on.
TRAIN_BACKGROUNDS = ("white", "gray", "striped")

def trigger_phrase(name: str) -> str:
    """The words a trainer binds the subject to: its rare trigger token and its class word ("sks square")."""
    from dcustom.toyworld.grammar import SUBJECTS

    spec = next(s for s in SUBJECTS if s.name == name)
    return f"{spec.trigger} {spec.class_word}"

def write_subject_examples(name: str, folder: str | Path, n: int = 5, seed: int = 0,
                           backgrounds=TRAIN_BACKGROUNDS, masks: bool = True, thing: str | None = None) -> tuple[Path, str]:
    """Write n renders of subject `name` on `backgrounds` as 00.png, 00.txt (caption) and 00.mask.png ...
    into `folder`; returns (folder, trigger phrase). `thing` replaces the trigger phrase in the captions (a
    textual-inversion token such as "<robot>"). The same arguments always write the same files."""

    import numpy as np
    from PIL import Image

    from dcustom.toyworld.render import render_scene, render_subject

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    kept = 0
    for _, caption, scene in render_subject(name, 40 * n, seed=seed):
        if scene.background not in backgrounds:
            continue
        image, mask = render_scene(scene, with_mask=True)
        image.save(folder / f"{kept:02d}.png")
        if thing is not None:
            caption = caption.replace(trigger_phrase(name), thing)
        (folder / f"{kept:02d}.txt").write_text(caption + "\n")
        if masks:
            Image.fromarray((np.clip(mask, 0, 1) * 255).round().astype(np.uint8), "L").save(folder / f"{kept:02d}.mask.png")
        kept += 1
        if kept == n:
            return folder, trigger_phrase(name)
    raise ValueError(f"could not draw {n} views of {name!r} on {backgrounds}")
