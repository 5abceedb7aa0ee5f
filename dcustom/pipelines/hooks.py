"""Attention-processor hooks for stock diffusers UNets and MM-DiT transformers (SD3, FLUX).

The rules every training-free module here follows (docs/architecture.md, "Hooks"):
- layers are selected by regex over `unet.attn_processors` names, never by counting calls;
- a hook is gated by the timestep the UNet is *called with* (a forward pre-hook writes it into a
  `TimestepGate`), never by a step counter, so CFG in one or two calls, extra UNet calls and any
  step count all gate the same way;
- the original processor objects are snapshotted and restored by identity in `finally`;
- an inactive hook delegates to the original processor object, so "off" is bit-identical to stock.
"""

from __future__ import annotations

import contextlib
import math
import re
from typing import Callable, Iterable, Optional

from dcustom.errors import DcustomError

PROCESSOR_SUFFIX = ".processor"


# ----------------------------------------------------------------------------- timestep gate


def timestep_key(t) -> float:
    """The key a timestep is stored under: its exact value as a float (works for 981 and 0.981)."""
    if hasattr(t, "flatten"):
        t = t.flatten()[0].item() if t.numel() else float("nan")
    return float(t)


class TimestepGate:
    """Holds the timestep of the UNet call in progress and which timesteps are active.

    `steps=None` means every timestep. `applied` collects (layer, timestep) pairs that hooks
    actually acted on, so tests and users can check gating exactly.
    """

    def __init__(self, steps: Optional[Iterable] = None, enabled: bool = True):
        self.t: Optional[float] = None
        self.steps = None if steps is None else {timestep_key(s) for s in steps}
        self.enabled = enabled
        self.applied: set[tuple[str, float]] = set()

    def active(self) -> bool:
        if not self.enabled or self.t is None:
            return False
        return self.steps is None or self.t in self.steps

    def unet_pre_hook(self, module, args, kwargs):
        # UNet2DConditionModel.forward(sample, timestep, encoder_hidden_states, ...)
        t = args[1] if len(args) > 1 else kwargs.get("timestep")
        self.t = None if t is None else timestep_key(t)
        return None


def sampling_timesteps(pipe, steps: int, scheduler=None) -> list[float]:
    """The timesteps, in calling order, that `scheduler` (default: a fresh copy of the pipeline's)
    visits at `steps` steps; the pipeline's own scheduler state is not touched."""
    source = scheduler if scheduler is not None else pipe.scheduler
    sched = type(source).from_config(source.config)
    sched.set_timesteps(steps)
    return [timestep_key(t) for t in sched.timesteps]


def steps_in_window(timesteps: list[float], start: float = 0.0, end: float = 1.0) -> set[float]:
    """Timesteps of sampling steps i with start <= i/N < end (fractions of the schedule, in order).

    MasaCtrl's "skip the first 4 of 50 steps" is window (0.08, 1.0).
    """
    if not (0.0 <= start <= end <= 1.0):
        raise DcustomError(f"step window ({start}, {end}) is not valid; expected 0 <= start <= end <= 1.")
    n = len(timesteps)
    first, last = math.ceil(start * n - 1e-9), math.ceil(end * n - 1e-9)
    return {timesteps[i] for i in range(first, last)}


# ----------------------------------------------------------------------------- layer selection


def _structural_late_decoder(names: list[str]) -> list[str]:
    """Self-attention of the last (highest-resolution) up block that has attention."""
    blocks = sorted({int(m.group(1)) for n in names if (m := re.match(r"^up_blocks\.(\d+)\.", n))})
    if not blocks:
        return []
    last = blocks[-1]
    return [n for n in names if n.startswith(f"up_blocks.{last}.") and ".attn1." in n]


# Used when a family preset matches nothing on a small, non-standard UNet (tiny test models, the
# toy model): the same intent, defined by structure rather than by the real model's block index.
STRUCTURAL_FALLBACKS: dict[str, Callable[[list[str]], list[str]]] = {
    "decoder_self_late": _structural_late_decoder,
}


def resolve_layers(unet, layers, family=None) -> list[str]:
    """Processor names selected by `layers`: a preset name of the family, a regex, or a list of them.

    Names are `unet.attn_processors` keys (they end in ".processor"). A selection that matches
    nothing raises, naming what exists.
    """
    names = list(unet.attn_processors)
    specs = [layers] if isinstance(layers, str) else list(layers)
    if not specs:
        raise DcustomError("layers: the selection is empty; give a preset name or a regex over attention layer names.")
    presets = dict(getattr(family, "layer_presets", {}) or {})
    chosen: list[str] = []
    for spec in specs:
        if spec in presets:
            found = [n for n in names if re.search(presets[spec], n)]
            if not found and spec in STRUCTURAL_FALLBACKS:
                found = STRUCTURAL_FALLBACKS[spec](names)
        else:
            try:
                pattern = re.compile(spec)
            except re.error as exc:
                raise DcustomError(
                    f"layers: {spec!r} is neither a preset ({', '.join(sorted(presets)) or 'none'}) nor a valid regex ({exc})."
                ) from None
            found = [n for n in names if pattern.search(n)]
        if not found:
            blocks = sorted({n.split(".transformer_blocks")[0] for n in names})
            raise DcustomError(
                f"layers: {spec!r} selects no attention layer of this UNet; presets: "
                f"{', '.join(sorted(presets)) or 'none'}; attention blocks here: {', '.join(blocks)}."
            )
        chosen.extend(n for n in found if n not in chosen)
    return [n for n in names if n in chosen]  # UNet order


def attention_module(unet, processor_name: str):
    return unet.get_submodule(processor_name[: -len(PROCESSOR_SUFFIX)])


def require_self_attention(unet, names: list[str]) -> None:
    """Reject layers our self-attention processors cannot handle (cross-attention, group/spatial norm)."""
    for name in names:
        attn = attention_module(unet, name)
        if attn.is_cross_attention or attn.group_norm is not None or attn.spatial_norm is not None:
            raise DcustomError(
                f"layers: {name!r} is not a plain self-attention layer (cross-attention or normed); "
                "select self-attention layers (names containing 'attn1')."
            )


# ----------------------------------------------------------------------------- processors


class HookProcessor:
    """Base attention processor: wraps the layer's original processor and delegates when inactive.

    Subclasses implement `hooked(attn, hidden_states, call)`; it is only called for active,
    plain self-attention calls. `call()` runs the original processor with exactly the arguments
    this processor received.
    """

    def __init__(self, name: str, original, gate: TimestepGate):
        self.name = name
        self.original = original
        self.gate = gate

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, temb=None,
                 ip_adapter_masks=None, **kwargs):
        extra = dict(kwargs)
        if temb is not None:
            extra["temb"] = temb
        if ip_adapter_masks is not None:
            extra["ip_adapter_masks"] = ip_adapter_masks

        def call(states=hidden_states):
            if args:  # called positionally: FLUX's attention passes image_rotary_emb as the fifth argument
                return self.original(attn, states, encoder_hidden_states, attention_mask, *args, **extra)
            return self.original(attn, states, encoder_hidden_states=encoder_hidden_states,
                                 attention_mask=attention_mask, **extra)

        # joint attention (SD3/FLUX: text tokens arrive as encoder_hidden_states) is not self-attention: delegate
        if (not self.gate.active() or encoder_hidden_states is not None or attention_mask is not None
                or hidden_states.ndim != 3):
            return call()
        return self.hooked(attn, hidden_states, call)

    def hooked(self, attn, hidden_states, call):  # pragma: no cover - overridden
        return call()


class PassThroughProcessor(HookProcessor):
    """Installed but never acting: used to prove that installation alone changes nothing."""


# ----------------------------------------------------------------------------- context manager


@contextlib.contextmanager
def attention_hooks(unet, layers: list[str], make_processor: Callable, gate: TimestepGate):
    """Install `make_processor(name, original, gate)` on `layers` for the duration of the block.

    Untouched layers keep their very objects; on exit (normal or exception) the forward pre-hook is
    removed and every original processor object is put back.
    """
    original = dict(unet.attn_processors)
    unknown = [n for n in layers if n not in original]
    if unknown:
        raise DcustomError(f"layers: {unknown[0]!r} is not an attention processor name of this UNet.")
    installed = dict(original)
    for name in layers:
        installed[name] = make_processor(name, original[name], gate)
    handle = unet.register_forward_pre_hook(gate.unet_pre_hook, with_kwargs=True)
    try:
        unet.set_attn_processor(dict(installed))  # set_attn_processor pops from the dict it is given
        yield gate
    finally:
        handle.remove()
        gate.t = None
        unet.set_attn_processor(dict(original))
