"""Style injection (StyleID, Chung, Hyun & Heo, CVPR 2024) on a stock diffusers pipeline.

Algorithm (as the official code does it): DDIM-invert content and style with the empty prompt at
guidance 1, recording the content's self-attention queries and the style's keys and values in the
late decoder layers; start from the content's z_T with the style's per-channel latent statistics
(initial-latent AdaIN); sample with DDIM at the same step count while, in those layers,
q̃ = γ·q_content + (1−γ)·q, K/V = the style's, and logits are multiplied by T. Defaults: γ 0.75,
T 1.5, 50 steps, SD1.x `up_blocks.2`/`up_blocks.3` self-attention (LDM output blocks 6–11).

Python API::

    content = invert(pipe, content_img, steps=50, layers=layers, kinds=("q",))
    style = invert(pipe, style_img, steps=50, layers=layers, kinds=("k", "v"))
    with style_injection(pipe, content, style, layers) as m:
        latents = sample_from(pipe, m.start_latent, steps=50)
    # outside the block the pipeline is stock again

`stylize(pipe, content_img, style_img, StyleInjectionConfig())` (dcustom.pipelines.transfer) does all of it;
`run(cfg)` is `dcustom style --method style_injection`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

from dcustom.config import opt
from dcustom.pipelines.adain import latent_adain
from dcustom.pipelines.hooks import TimestepGate, sampling_timesteps, steps_in_window
from dcustom.pipelines.injection import RecordedSource, injection
from dcustom.pipelines.transfer import StyleTransferConfig, run_transfer


@dataclass
class StyleInjectionConfig(StyleTransferConfig):
    """StyleID (Chung et al., CVPR 2024): content queries blended with γ, style K/V injected into the
    late decoder self-attention, attention temperature T, initial-latent AdaIN. Paper defaults."""

    method: str = opt("style_injection", "Method id; always 'style_injection'.")


@dataclass
class InjectionRun:
    start_latent: object
    gate: TimestepGate
    layers: list


@contextlib.contextmanager
def style_injection(pipe, content, style, layers, gamma: float = 0.75, temperature: float = 1.5,
                    init_adain: bool = True, step_start: float = 0.0, step_end: float = 1.0,
                    mode: str = "replace"):
    """StyleID around a sampling call: `content` and `style` are `Inversion`s recorded on `layers`.

    The content inversion needs q recorded when γ > 0; the style inversion needs k and v.
    Yields an `InjectionRun` with the start latent (AdaIN'd z_T when `init_adain`).
    """
    from dcustom.pipelines.inversion import ddim_scheduler

    if content.steps != style.steps:
        raise ValueError(f"content was inverted in {content.steps} steps and style in {style.steps}; use the same count.")
    start = latent_adain(content.zT, style.zT) if init_adain else content.zT
    timesteps = sampling_timesteps(pipe, content.steps, ddim_scheduler(pipe))
    active = steps_in_window(timesteps, step_start, step_end)
    source = RecordedSource(style=style.features, content=content.features if gamma > 0 else None)
    with injection(pipe, layers, source, active, gamma=gamma, temperature=temperature, mode=mode) as gate:
        yield InjectionRun(start, gate, list(layers))


def run(cfg: StyleInjectionConfig, pipe=None, cache=None, on_step=None) -> str:
    """`dcustom style --method style_injection`: stylize cfg.content with cfg.style, write result + grid."""
    return run_transfer(cfg, pipe=pipe, cache=cache, on_step=on_step)
