"""AdaIN statistics injection on the joint attention of MM-DiT transformers (SD3/3.5, FLUX.1).

StyleAligned (Hertz et al., CVPR 2024, "Style Aligned Image Generation via Shared Attention", §3) gives every
target image the style statistics of a reference generated in the same batch by AdaIN on its attention queries
and keys: q_t ← σ(q_r)·(q_t − μ(q_t))/σ(q_t) + μ(q_r), the same for k, per channel over the tokens. On a UNet this
rides on self-attention (`injection.py`); an MM-DiT has no self-attention of its own: image and text tokens attend
together (`transformer_blocks.N.attn`, FLUX's single-stream `single_transformer_blocks.N.attn`), with rotary
positions (FLUX) or a separate text stream (SD3) that a re-implemented processor would have to copy per family.
So the stock processor stays in charge and only the image-stream projections `attn.to_q` / `attn.to_k` are
re-normalised while it runs (forward hooks that live for one processor call). In FLUX's single-stream blocks
`to_q`/`to_k` see text and image tokens together, and the statistics are over both.

The rules of `hooks.py` hold: layers by regex over the transformer's `attn_processors` names (the family presets
`all_self`, `joint`, FLUX's `single`), gated by the timestep the transformer is called with, original processor
objects restored by identity, an inactive processor delegates to the original (bit-identical to stock).

    with joint_qk_adain(pipe, group=3):          # rows [reference, target, target] per CFG half
        images = pipe(["a neon drawing", "a cat", "a house"], ...).images
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional

from dcustom.errors import DcustomError
from dcustom.pipelines.adain import token_adain
from dcustom.pipelines.hooks import TimestepGate, attention_hooks, resolve_layers


def adain_to_reference(x, group: int):
    """Rows of `x` [B, N, C] in consecutive groups of `group` (row 0 of each is the reference): every other row gets
    its group's reference's per-channel mean and std over the tokens (StyleAligned's q/k AdaIN)."""
    import torch

    parts = []
    for rows in x.split(group):
        parts += [rows[:1], token_adain(rows[1:], rows[:1])]
    return torch.cat(parts)


class JointAdainProcessor:
    """Wraps one joint-attention layer's original processor; while the gate is active it AdaIN-normalises the
    queries and keys of the image stream to each group's reference row."""

    def __init__(self, name: str, original, gate: TimestepGate, group: int):
        self.name, self.original, self.gate, self.group = name, original, gate, group

    def __call__(self, attn, hidden_states, *args, **kwargs):
        if not self.gate.active() or hidden_states.shape[0] % self.group:
            return self.original(attn, hidden_states, *args, **kwargs)

        def renormalise(_module, _inputs, output):
            return adain_to_reference(output, self.group)

        handles = [attn.to_q.register_forward_hook(renormalise), attn.to_k.register_forward_hook(renormalise)]
        try:
            out = self.original(attn, hidden_states, *args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()
        self.gate.applied.add((self.name, self.gate.t))
        return out


@contextlib.contextmanager
def joint_qk_adain(pipe, group: int, layers="all_self", steps: Optional[Iterable] = None):
    """q/k AdaIN to the reference on the selected joint-attention layers of an SD3/FLUX pipeline for a block.

    `group`: images per prompt group (1 reference + targets; CFG halves are groups of their own); `steps`: the
    transformer timesteps at which it acts (None: all)."""
    from dcustom.families import denoiser
    from dcustom.models import family_of

    family = family_of(pipe)
    if not family.is_dit:
        raise DcustomError(f"joint-attention AdaIN is for SD3/FLUX transformers; this pipeline is {family.label}: use "
                           "StyleAligned shared attention (pipelines/style_aligned.py) on UNet models.")
    if group < 2:
        raise DcustomError(f"group: {group} image(s) per group leaves no target; accepted: 2 or more (a reference and targets).")
    transformer = denoiser(pipe)
    names = resolve_layers(transformer, layers, family)
    with attention_hooks(transformer, names, lambda n, o, g: JointAdainProcessor(n, o, g, group), TimestepGate(steps)) as gate:
        yield gate
