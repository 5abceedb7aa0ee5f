"""Attention injection (MasaCtrl-style mutual self-attention, Cao et al., ICCV 2023).

In the late decoder self-attention layers, from a start step on, the target's queries attend to a
reference's keys and values ("replace"), or to [own; reference] tokens ("concat", MasaCtrl-Union).
The reference rides in the same batch with an explicit role per image, so any pipeline call works:

    with attention_injection(pipe, roles=("style", "target"), steps=50):
        pipe(prompt=["a cat", "a cat in armour"], num_inference_steps=50, ...)

For a real reference image, replay its inversion trajectory into its row (`replay_callback`), as
MasaCtrl's `ref_intermediate_latents` and StyleAligned's notebook do. Defaults: layers
`decoder_self_late` (MasaCtrl's start_layer 10 of 16 on SD1.x), steps from 4/50 on.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

from dcustom.pipelines.hooks import resolve_layers, sampling_timesteps, steps_in_window
from dcustom.pipelines.injection import InBatchSource


@contextlib.contextmanager
def attention_injection(pipe, roles: Sequence[str] = ("style", "target"), steps: int = 50,
                        layers="decoder_self_late", step_start: float = 0.08, step_end: float = 1.0,
                        mode: str = "replace", gamma: float = 0.0, temperature: float = 1.0, scheduler=None):
    """Mutual self-attention for a pipeline call whose images have `roles` (see InBatchSource).

    `steps` and `scheduler` (default: the pipeline's) define the schedule the step window is a
    fraction of. Yields the gate; `gate.applied` lists the (layer, timestep) pairs injected.
    """
    from dcustom.models import family_of
    from dcustom.pipelines.style_injection import injection

    names = resolve_layers(pipe.unet, layers, family_of(pipe))
    active = steps_in_window(sampling_timesteps(pipe, steps, scheduler), step_start, step_end)
    with injection(pipe, names, InBatchSource(roles), active, gamma=gamma, temperature=temperature, mode=mode) as gate:
        yield gate


def replay_callback(rows_to_inversions: dict, timesteps: Sequence[float]):
    """`callback_on_step_end` that puts row r of the latents back on its inversion trajectory
    before every UNet call (rows_to_inversions: {row: Inversion})."""

    def callback(_pipe, i, _t, tensors):
        latents = tensors["latents"]
        if i + 1 < len(timesteps):
            for row, inv in rows_to_inversions.items():
                latents[row] = inv.input_at(timesteps[i + 1])[0].to(latents.dtype)
        return {"latents": latents}

    return callback


def run(cfg, pipe=None, cache=None, on_step=None) -> str:
    """`dcustom style --method attention_injection`: write result + grid; returns the result path."""
    from dcustom.pipelines.transfer import run_transfer

    return run_transfer(cfg, pipe=pipe, cache=cache, on_step=on_step)
