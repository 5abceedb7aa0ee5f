"""The base-training pool: rendered images, object masks and pre-drawn captions, reproducible from a seed.

Item i depends only on (seed, i), so the pool is identical whatever the number of render workers,
and re-rendering it on resume gives the same data. Only the "base" split is ever drawn.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np

from dcustom.toyworld.grammar import Scene, SceneRanges, caption, sample_scene

LATENT = 16  # mask resolution = latent resolution


def pool_scene(seed: int, index: int, ranges: SceneRanges) -> tuple[Scene, random.Random]:
    rng = random.Random(seed * 1_000_003 + index)
    return sample_scene(rng, "base", ranges), rng


def _render_range(args):
    from dcustom.toyworld.render import render_scene

    seed, start, stop, ranges, captions_per_image, detail = args
    images = np.empty((stop - start, 64, 64, 3), np.uint8)
    masks = np.empty((stop - start, LATENT, LATENT), np.float16)
    texts = []
    for k, i in enumerate(range(start, stop)):
        scene, rng = pool_scene(seed, i, ranges)
        image, mask = render_scene(scene, with_mask=True)
        images[k] = np.asarray(image)
        masks[k] = mask.reshape(LATENT, 64 // LATENT, LATENT, 64 // LATENT).mean(axis=(1, 3))
        texts.append([caption(scene, rng, detail) for _ in range(captions_per_image)])
    return images, masks, texts


@dataclass
class Pool:
    images: np.ndarray  # [N, 64, 64, 3] uint8
    masks: np.ndarray  # [N, 16, 16] float16: object coverage per latent pixel
    captions: list  # N lists of captions_per_image strings


def render_pool(size: int, seed: int, ranges: SceneRanges, captions_per_image: int, detail: float,
                workers: int = 1, log=None) -> Pool:
    chunk = 2000
    jobs = [(seed, s, min(size, s + chunk), ranges, captions_per_image, detail) for s in range(0, size, chunk)]
    if workers > 1 and len(jobs) > 1:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        # spawn: workers import only numpy/PIL code, never inherit torch/OpenMP or CUDA state.
        with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as ex:
            parts = list(ex.map(_render_range, jobs))
    else:
        parts = []
        for job in jobs:
            parts.append(_render_range(job))
            if log:
                log(f"rendered {job[2]}/{size}")
    return Pool(np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]),
                [t for p in parts for t in p[2]])
