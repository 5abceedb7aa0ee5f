"""Attention injection (MasaCtrl-style mutual self-attention, Cao et al., ICCV 2023).

In the late decoder self-attention layers, from a start step on, the target's queries attend to a
reference's keys and values ("replace"), or to [own; reference] tokens ("concat", MasaCtrl-Union).
The reference rides in the same batch with an explicit role per image, so any pipeline call works:

    with attention_injection(pipe, roles=("style", "target"), steps=50):
        pipe(prompt=["a cat", "a cat in armour"], num_inference_steps=50, ...)

For a real reference image, replay its inversion trajectory into its row (`inversion.replay_callback`),
as MasaCtrl's `ref_intermediate_latents` and StyleAligned's notebook do; `run(cfg)` (`dcustom style
--method attention_injection`) does that for a content and a style image. Defaults: layers
`decoder_self_late` (MasaCtrl's start_layer 10 of 16 on SD1.x), steps from 4/50 on.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

from dcustom.config import opt
from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps, steps_in_window
from dcustom.pipelines.injection import InBatchSource, injection
from dcustom.pipelines.transfer import StyleTransferConfig, run_transfer


@dataclass
class AttentionInjectionConfig(StyleTransferConfig):
    """MasaCtrl-style mutual self-attention: the target's queries attend to the reference's K/V in the
    late decoder layers from a start step on ('concat' attends to [own; reference])."""

    method: str = opt("attention_injection", "Method id; always 'attention_injection'.")
    gamma: float = opt(0.0, "Query preservation γ (MasaCtrl uses none: 0).")
    temperature: float = opt(1.0, "Attention temperature T (MasaCtrl: 1).")
    step_start: float = opt(0.08, "Inject from this fraction of the steps on (MasaCtrl skips the first 4 of 50: 0.08).")
    init_adain: bool = opt(False, "Give the content's inverted latent the style latent's channel mean/std (off in MasaCtrl).")
    feature_source: str = opt("in_batch", "'in_batch' (MasaCtrl: the reference rides in the batch, its latent replayed from its inversion) or 'recorded'.")


@contextlib.contextmanager
def attention_injection(pipe, roles: Sequence[str] = ("style", "target"), steps: int = 50,
                        layers="decoder_self_late", step_start: float = 0.08, step_end: float = 1.0,
                        mode: str = "replace", gamma: float = 0.0, temperature: float = 1.0, scheduler=None):
    """Mutual self-attention for a pipeline call whose images have `roles` (see InBatchSource).

    `steps` and `scheduler` (default: the pipeline's) define the schedule the step window is a
    fraction of. Yields the gate; `gate.applied` lists the (layer, timestep) pairs injected.
    """
    from dcustom.models import family_of

    names = resolve_layers(pipe.unet, layers, family_of(pipe))
    active = steps_in_window(sampling_timesteps(pipe, steps, scheduler), step_start, step_end)
    with injection(pipe, names, InBatchSource(roles), active, gamma=gamma, temperature=temperature, mode=mode) as gate:
        yield gate


def run(cfg: AttentionInjectionConfig, pipe=None, cache=None, on_step=None) -> str:
    """`dcustom style --method attention_injection`: write result + grid; returns the result path."""
    return run_transfer(cfg, pipe=pipe, cache=cache, on_step=on_step)
