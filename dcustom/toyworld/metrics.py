"""Metrics on judge features: subject similarity (the DINO analog), toy-FID, diversity, attribute accuracy."""

from __future__ import annotations

import torch


def _judge(judge):
    from dcustom.toyworld.judges import load_judge

    return load_judge(judge) if isinstance(judge, str) else judge


def subject_similarity(images_a, images_b, judge="eval") -> float:
    """Mean cosine similarity between every image of a and every image of b, on judge features."""
    j = _judge(judge)
    fa = torch.nn.functional.normalize(j.features(images_a).double(), dim=1)
    fb = torch.nn.functional.normalize(j.features(images_b).double(), dim=1)
    return float((fa @ fb.T).mean())


def _sqrtm_trace(s1: torch.Tensor, s2: torch.Tensor) -> torch.Tensor:
    """trace(sqrtm(s1 @ s2)) for symmetric PSD s1, s2, via sqrt(s1) s2 sqrt(s1) (symmetric, same eigenvalues)."""
    vals, vecs = torch.linalg.eigh(s1)
    root = vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T
    inner = root @ s2 @ root
    return torch.linalg.eigvalsh((inner + inner.T) / 2).clamp(min=0).sqrt().sum()


def frechet_distance(fa: torch.Tensor, fb: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets [N, D]."""
    fa, fb = fa.double(), fb.double()
    mu_a, mu_b = fa.mean(0), fb.mean(0)
    cov_a = torch.cov(fa.T) if len(fa) > 1 else torch.zeros(fa.shape[1], fa.shape[1], dtype=fa.dtype)
    cov_b = torch.cov(fb.T) if len(fb) > 1 else torch.zeros(fb.shape[1], fb.shape[1], dtype=fb.dtype)
    value = (mu_a - mu_b).pow(2).sum() + torch.trace(cov_a) + torch.trace(cov_b) - 2 * _sqrtm_trace(cov_a, cov_b)
    return float(value.clamp(min=0))


def toy_fid(images_a, images_b, judge="eval") -> float:
    """FID computed on the judge's penultimate features (lower = closer distributions)."""
    j = _judge(judge)
    return frechet_distance(j.features(images_a), j.features(images_b))


def diversity(groups, judge="eval") -> float:
    """Mean pairwise cosine distance of features within each group (e.g. one prompt, many seeds), averaged."""
    j = _judge(judge)
    values = []
    for images in groups:
        if len(images) < 2:
            continue
        f = torch.nn.functional.normalize(j.features(images).double(), dim=1)
        sim = f @ f.T
        n = len(f)
        values.append(float((1 - sim)[~torch.eye(n, dtype=torch.bool)].mean()))
    return sum(values) / len(values) if values else float("nan")


def attribute_accuracy(predictions: dict, expected: list[dict]) -> dict:
    """Per-head accuracy of judge predictions against expected attributes, and prompt accuracy (all right).

    `expected[i]` maps head -> class for image i (heads a prompt does not name are not scored).
    """
    hits: dict[str, list[bool]] = {}
    prompt_ok = []
    for i, attrs in enumerate(expected):
        ok = True
        for head, cls in attrs.items():
            if head not in predictions:
                continue
            hit = predictions[head]["labels"][i] == cls
            hits.setdefault(head, []).append(hit)
            ok = ok and hit
        prompt_ok.append(ok)
    from dcustom.toyworld.grammar import HEADS

    out = {head: sum(hits[head]) / len(hits[head]) for head in HEADS if head in hits}
    out["prompt"] = sum(prompt_ok) / len(prompt_ok) if prompt_ok else float("nan")
    return out
