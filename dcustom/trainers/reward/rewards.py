"""Rewards: differentiable callables `(images, prompts) -> [B]` and their held-out counterparts.

`images` are [B, 3, H, W] floats in [0, 1] that carry the sampler's gradient; a training reward
must keep it (no `torch.no_grad`, no uint8 casts, no PIL on the gradient path). Each registered
reward also names how it is *evaluated*: an analytic oracle computed on the pixels a user would
save, or a second, independent model (J_eval for the toy world). The hacking gap is the training
reward's gain minus the evaluation reward's gain.

    name             training reward (differentiable)               evaluation counterpart
    colourfulness    Hasler-Suesstrunk M on float pixels (0-255)    same formula on the saved uint8 image
    compressibility  -(total variation + high-frequency energy)     -(JPEG size in kB, quality 95)
    aesthetic        MLP head on L2-normalised CLIP image features   a second head/CLIP if given, else none
    clip_score       100 * cos(CLIP image, CLIP text) (PickScore-   a second CLIP model if given, else none
                     style with PickScore weights)
    toy_attribute    log p_J_train(head = value), e.g. colour=red    log p_J_eval(head = value)
    toy_alignment    sum of log p_J_train(attribute named in the     same with J_eval
                     prompt) over the prompt's attributes

`build_reward(name, options, device)` returns a `Reward`; `build_eval_reward(...)` its counterpart
(or None).
"""

from __future__ import annotations

import io
from typing import Callable, Optional

from dcustom.errors import DcustomError
from dcustom.trainers.reward.base import Reward


# -- analytic rewards ---------------------------------------------------------------------------

def colourfulness(images):
    """Hasler & Suesstrunk (2003) colourfulness on a 0-255 scale: sigma_rgyb + 0.3 mu_rgyb, per image."""
    x = images.float() * 255.0
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    rg = (r - g).flatten(1)
    yb = (0.5 * (r + g) - b).flatten(1)
    std = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-6).sqrt()
    mean = (rg.mean(1).pow(2) + yb.mean(1).pow(2) + 1e-6).sqrt()
    return std + 0.3 * mean


def colourfulness_oracle(images):
    """The same formula on the 8-bit image a user saves (rounded), without gradient."""
    import torch

    with torch.no_grad():
        return colourfulness(torch.round(images.detach().float().clamp(0, 1) * 255) / 255)


def compressibility_proxy(images, hf_weight: float = 1.0):
    """-(mean |horizontal/vertical differences| + hf_weight * mean |x - 3x3 box blur|), x on 0-255.

    Both terms grow with the high-frequency content that makes JPEG files large.
    """
    import torch.nn.functional as F

    x = images.float() * 255.0
    tv = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1) + (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
    blurred = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    hf = (x - blurred).abs().flatten(1).mean(1)
    return -(tv + hf_weight * hf)


def jpeg_kilobytes(images, quality: int = 95):
    """Size in kB of each image saved as JPEG (the non-differentiable oracle of compressibility)."""
    import numpy as np
    import torch
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for a in arr:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(a)).save(buf, format="JPEG", quality=quality)
        sizes.append(buf.tell() / 1000.0)
    return torch.tensor(sizes, device=images.device)


# -- registry -----------------------------------------------------------------------------------

def _colourfulness(options, device):
    return Reward("colourfulness", lambda images, prompts: colourfulness(images))


def _colourfulness_eval(options, device):
    return Reward("colourfulness_oracle", lambda images, prompts: colourfulness_oracle(images), differentiable=False)


def _compressibility(options, device):
    weight = float(options.get("hf_weight", 1.0))
    return Reward("compressibility", lambda images, prompts: compressibility_proxy(images, weight))


def _compressibility_eval(options, device):
    quality = int(options.get("jpeg_quality", 95))
    return Reward("neg_jpeg_kb", lambda images, prompts: -jpeg_kilobytes(images, quality), differentiable=False)


def _aesthetic(options, device):
    from dcustom.trainers.reward.clip_rewards import aesthetic_reward

    return aesthetic_reward(options.get("clip_path"), options.get("head_path"), device)


def _aesthetic_eval(options, device):
    from dcustom.trainers.reward.clip_rewards import aesthetic_reward

    if not options.get("eval_head_path"):
        return None
    return aesthetic_reward(options.get("eval_clip_path") or options.get("clip_path"), options["eval_head_path"], device)


def _clip_score(options, device):
    from dcustom.trainers.reward.clip_rewards import clip_score_reward

    return clip_score_reward(options.get("clip_path"), device)


def _clip_score_eval(options, device):
    from dcustom.trainers.reward.clip_rewards import clip_score_reward

    return clip_score_reward(options["eval_clip_path"], device) if options.get("eval_clip_path") else None


def _toy(kind: str, judge: str):
    def build(options, device):
        from dcustom.trainers.reward.toy_rewards import toy_reward

        return toy_reward(kind, judge, options, device)

    return build


REWARDS: dict[str, tuple[Callable, Optional[Callable], str]] = {
    "colourfulness": (_colourfulness, _colourfulness_eval, "Hasler-Suesstrunk colourfulness; oracle on uint8 pixels."),
    "compressibility": (_compressibility, _compressibility_eval, "-(TV + high-frequency energy); oracle -JPEG kB."),
    "aesthetic": (_aesthetic, _aesthetic_eval, "CLIP image features + MLP head from local weights (LAION layout)."),
    "clip_score": (_clip_score, _clip_score_eval, "100 x cosine of CLIP image and text features (local CLIPModel)."),
    "toy_attribute": (_toy("attribute", "train"), _toy("attribute", "eval"), "log p of one attribute under J_train."),
    "toy_alignment": (_toy("alignment", "train"), _toy("alignment", "eval"), "log p of the prompt's attributes under J_train."),
}


def _check(name: str):
    if name not in REWARDS:
        raise DcustomError(f"reward.name: {name!r} is not known; accepted: {', '.join(REWARDS)}.")


def build_reward(name: str, options: dict | None = None, device="cpu") -> Reward:
    _check(name)
    return REWARDS[name][0](dict(options or {}), device)


def build_eval_reward(name: str, options: dict | None = None, device="cpu") -> Optional[Reward]:
    _check(name)
    factory = REWARDS[name][1]
    return None if factory is None else factory(dict(options or {}), device)
