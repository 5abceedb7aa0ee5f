"""Attention processors that record or inject self-attention features, and where features come from.

One injection processor covers the methods here:
- StyleID style injection: q̃ = γ·q_content + (1−γ)·q, K/V replaced by the style's, logits × T;
- MasaCtrl mutual self-attention: γ = 0, T = 1, K/V replaced by the reference's ("replace");
- MasaCtrl-Union / StyleAligned: attend to [own; reference] tokens ("concat"), optionally with the
  queries and keys AdaIN-normalised to the reference's (StyleAligned).

Features come from a `RecordedSource` (two passes: record during inversion, replay while sampling)
or an `InBatchSource` (the reference rides in the same batch, one explicit role per image).
`injection(pipe, layers, source, ...)` installs the processor for a block; each method's own context
manager (`style_injection`, `attention_injection`, `shared_attention`) is a few lines on top of it.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from dcustom.errors import DcustomError
from dcustom.pipelines.adain import token_adain
from dcustom.pipelines.features import FeatureStore
from dcustom.pipelines.hooks import HookProcessor, TimestepGate, attention_hooks, require_self_attention

MODES = ("replace", "concat")


def attend(attn, q, k, v, residual, temperature: float = 1.0, bias=None):
    """Multi-head attention of (B, N, C) projections through `attn`'s heads and output projection.

    Logits are multiplied by `temperature` before the usual 1/√d scale (StyleID's T); `bias` (one value
    per key, broadcast over queries and heads) is added to them after it.
    """
    import torch.nn.functional as F

    heads = attn.heads
    d = q.shape[-1] // heads

    def split(x):
        return x.reshape(x.shape[0], -1, heads, d).transpose(1, 2)

    qh, kh, vh = split(q), split(k), split(v)
    if attn.norm_q is not None:
        qh = attn.norm_q(qh)
    if attn.norm_k is not None:
        kh = attn.norm_k(kh)
    mask = None if bias is None else bias.to(qh.dtype).reshape(1, 1, 1, -1)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                         scale=attn.scale * temperature)
    out = out.transpose(1, 2).reshape(q.shape[0], -1, heads * d).to(q.dtype)
    out = attn.to_out[1](attn.to_out[0](out))
    if attn.residual_connection:
        out = out + residual
    return out / attn.rescale_output_factor


# ----------------------------------------------------------------------------- recording


class RecordProcessor(HookProcessor):
    """Stores this layer's q/k/v at the current timestep; the output still comes from the original."""

    def __init__(self, name, original, gate, store: FeatureStore):
        super().__init__(name, original, gate)
        self.store = store

    def hooked(self, attn, hidden_states, call):
        proj = {"q": attn.to_q, "k": attn.to_k, "v": attn.to_v}
        self.store.put(self.name, self.gate.t, **{kind: proj[kind](hidden_states) for kind in self.store.kinds})
        self.gate.applied.add((self.name, self.gate.t))
        return call()


# ----------------------------------------------------------------------------- feature sources


@dataclass
class Reference:
    """Reference tensors for the target rows of one attention call (already one row per target)."""

    rows: Optional[list[int]]  # target rows of the batch; None = every row
    k: object
    v: object
    q_content: object = None  # for query preservation (γ)
    q_style: object = None  # for query AdaIN (StyleAligned)


def _fit_batch(x, batch: int, what: str, layer: str):
    if x.shape[0] == batch:
        return x
    if x.shape[0] == 1:
        return x.expand(batch, *x.shape[1:])
    raise DcustomError(
        f"{what} recorded for layer {layer!r} has batch {x.shape[0]}, which matches neither 1 nor the target "
        f"batch {batch}; record the reference with the same guidance (CFG on/off) as the target, or with batch 1."
    )


class RecordedSource:
    """Two-pass source: K/V (and optionally q) from a style store, q from a content store."""

    def __init__(self, style: FeatureStore, content: Optional[FeatureStore] = None):
        self.style = style
        self.content = content

    def reference(self, layer, t, q, k, v, need_q_style=False) -> Reference:
        batch = q.shape[0]

        def fetch(store, kind, what):
            if not store.has(layer, t, kind):
                raise DcustomError(
                    f"no recorded {what} {kind!r} for layer {layer!r} at timestep {t:g}; record the reference with "
                    "the same number of steps, the same scheduler config and the same layers as the target run."
                )
            return _fit_batch(store.get(layer, t, kind, device=q.device, dtype=q.dtype), batch, f"the {what}", layer)

        return Reference(
            rows=None,
            k=fetch(self.style, "k", "style"),
            v=fetch(self.style, "v", "style"),
            q_content=fetch(self.content, "q", "content") if self.content is not None else None,
            q_style=fetch(self.style, "q", "style") if need_q_style else None,
        )


ROLES = ("target", "style", "content", "self")


class InBatchSource:
    """Single-pass source: each image of the batch has a role; CFG halves each use their own references.

    roles: e.g. ("content", "style", "target") — "target" rows are injected from the "style" row
    (and take the "content" row's query for γ); "style", "content" and "self" rows run unchanged.
    """

    def __init__(self, roles: Sequence[str]):
        roles = tuple(roles)
        bad = [r for r in roles if r not in ROLES]
        if bad:
            raise DcustomError(f"roles: {bad[0]!r} is not a role; accepted: {', '.join(ROLES)}.")
        if roles.count("style") != 1 or roles.count("content") > 1 or "target" not in roles:
            raise DcustomError(f"roles {roles}: need exactly one 'style', at most one 'content' and at least one 'target'.")
        self.roles = roles

    def reference(self, layer, t, q, k, v, need_q_style=False) -> Reference:
        import torch

        n, batch = len(self.roles), q.shape[0]
        if batch % n:
            raise DcustomError(
                f"layer {layer!r}: attention batch {batch} is not a multiple of the {n} image roles {self.roles}."
            )
        s, c = self.roles.index("style"), self.roles.index("content") if "content" in self.roles else None
        rows, style_rows, content_rows = [], [], []
        for chunk in range(0, batch, n):  # one chunk per CFG half (or per repeat)
            for i, role in enumerate(self.roles):
                if role == "target":
                    rows.append(chunk + i)
                    style_rows.append(chunk + s)
                    content_rows.append(chunk + (c if c is not None else i))
        si = torch.tensor(style_rows, device=q.device)
        return Reference(
            rows=rows,
            k=k[si],
            v=v[si],
            q_content=q[torch.tensor(content_rows, device=q.device)] if c is not None else None,
            q_style=q[si] if need_q_style else None,
        )


# ----------------------------------------------------------------------------- injection


class InjectionProcessor(HookProcessor):
    """Self-attention of target rows against reference K/V (see module doc for the methods)."""

    def __init__(self, name, original, gate, source, gamma: float = 0.0, temperature: float = 1.0,
                 mode: str = "replace", qk_adain: bool = False, reference_weight: float = 1.0):
        super().__init__(name, original, gate)
        if mode not in MODES:
            raise DcustomError(f"mode {mode!r} is not known; accepted: {', '.join(MODES)}.")
        if reference_weight <= 0:
            raise DcustomError(f"reference_weight must be positive, got {reference_weight}.")
        self.source, self.gamma, self.temperature, self.mode, self.qk_adain = source, gamma, temperature, mode, qk_adain
        self.reference_weight = reference_weight

    def hooked(self, attn, hidden_states, call):
        import torch

        q, k, v = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        ref = self.source.reference(self.name, self.gate.t, q, k, v, need_q_style=self.qk_adain)
        rows = ref.rows
        if rows is not None:
            index = torch.tensor(rows, device=q.device)
            q, k, v, states = q[index], k[index], v[index], hidden_states[index]
        else:
            states = hidden_states
        if self.gamma and ref.q_content is not None:
            q = self.gamma * ref.q_content + (1.0 - self.gamma) * q
        if self.qk_adain:
            q, k = token_adain(q, ref.q_style), token_adain(k, ref.k)
        bias = None
        if self.mode == "replace":
            keys, values = ref.k, ref.v
        else:
            keys, values = torch.cat([k, ref.k], dim=1), torch.cat([v, ref.v], dim=1)
            if self.reference_weight != 1.0:  # StyleAligned's shared-score shift: log w on the reference's logits
                bias = torch.cat([k.new_zeros(k.shape[1]), k.new_full((ref.k.shape[1],), math.log(self.reference_weight))])
        out = attend(attn, q, keys, values, states, self.temperature, bias)
        self.gate.applied.add((self.name, self.gate.t))
        if rows is None:
            return out
        others = [i for i in range(hidden_states.shape[0]) if i not in set(rows)]
        full = out.new_empty((hidden_states.shape[0],) + tuple(out.shape[1:]))
        full[index] = out
        if others:
            full[torch.tensor(others, device=q.device)] = call(hidden_states[torch.tensor(others, device=q.device)])
        return full


@contextlib.contextmanager
def injection(pipe, layers, source, active_steps=None, gamma: float = 0.0, temperature: float = 1.0,
              mode: str = "replace", qk_adain: bool = False, reference_weight: float = 1.0):
    """Install injection processors on `layers` (processor names), gated to `active_steps` timesteps.

    Yields the `TimestepGate`; `gate.applied` lists the (layer, timestep) pairs that were injected.
    """
    require_self_attention(pipe.unet, layers)
    gate = TimestepGate(active_steps)

    def make(name, original, g):
        return InjectionProcessor(name, original, g, source, gamma=gamma, temperature=temperature, mode=mode,
                                  qk_adain=qk_adain, reference_weight=reference_weight)

    with attention_hooks(pipe.unet, layers, make, gate):
        yield gate
