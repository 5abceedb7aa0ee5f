"""Adaptive instance normalisation: σ(y)·(x − μ(x))/σ(x) + μ(y), per sample and channel.

Used in three places: on the initial latent z_T (StyleID), on attention queries/keys over tokens
(StyleAligned), and as a plain function users can call. Statistics are computed in fp32 (variance
over thousands of tokens loses precision in fp16) with the biased estimator; when x and y have the
same number of elements the ratio σ(y)/σ(x) is the same for either estimator.
"""

from __future__ import annotations

from dcustom.errors import DcustomError


def mean_std(x, dims, eps: float = 0.0):
    xf = x.float()
    mean = xf.mean(dim=dims, keepdim=True)
    std = (xf.var(dim=dims, keepdim=True, unbiased=False) + eps).sqrt()
    return mean, std


def adain(x, y, dims, eps: float = 0.0, alpha: float = 1.0, match_std: bool = True):
    """Give each sample/channel of `x` the mean and std of `y` over `dims`.

    `y` has batch 1 (one style for all) or the batch of `x`. `alpha` blends with the input:
    alpha·AdaIN(x, y) + (1 − alpha)·x, a monotone strength control. `match_std=False` moves the
    mean only (x − μ(x) + μ(y)): the tone changes and the spatial contrast of x is kept.
    """
    if y.shape[0] not in (1, x.shape[0]):
        raise DcustomError(f"AdaIN: the style batch {y.shape[0]} matches neither 1 nor the content batch {x.shape[0]}.")
    mx, sx = mean_std(x, dims, eps)
    my, sy = mean_std(y, dims, eps)
    out = (x.float() - mx) / sx.clamp_min(1e-12) * sy + my if match_std else x.float() - mx + my
    if alpha != 1.0:
        out = alpha * out + (1.0 - alpha) * x.float()
    return out.to(x.dtype)


def latent_adain(z, z_style, eps: float = 0.0, alpha: float = 1.0, match_std: bool = True):
    """AdaIN of latents (B, C, H, W) per channel over H×W (StyleID's initial-latent AdaIN)."""
    return adain(z, z_style, dims=(-2, -1), eps=eps, alpha=alpha, match_std=match_std)


def token_adain(x, ref, eps: float = 1e-5):
    """AdaIN of attention features (B, tokens, channels) over tokens: per head and channel."""
    return adain(x, ref, dims=(-2,), eps=eps)
