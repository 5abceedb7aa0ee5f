"""A store of attention features (q/k/v) keyed by (layer, timestep), with fp16 and CPU offload."""

from __future__ import annotations

from typing import Iterable, Optional

KINDS = ("q", "k", "v")


class FeatureStore:
    """Recorded q/k/v per (layer, timestep), shapes (batch, tokens, channels).

    `dtype` (e.g. torch.float16) halves the memory; `offload="cpu"` keeps tensors off the
    accelerator until they are read back. Only `kinds` are kept: StyleID needs the content's q and
    the style's k and v, not all six.
    """

    def __init__(self, kinds: Iterable[str] = KINDS, dtype=None, offload: Optional[str] = None):
        kinds = tuple(kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad:
            raise ValueError(f"feature kinds {bad} are not known; accepted: q, k, v")
        self.kinds = kinds
        self.dtype = dtype
        self.offload = offload
        self.data: dict[tuple[str, float], dict[str, object]] = {}

    def put(self, layer: str, t: float, **tensors) -> None:
        slot = self.data.setdefault((layer, t), {})
        for kind in self.kinds:
            x = tensors[kind].detach()
            if self.dtype is not None:
                x = x.to(self.dtype)
            if self.offload is not None:
                x = x.to(self.offload)  # blocking: a non-blocking copy to pageable host memory may be read early
            slot[kind] = x

    def get(self, layer: str, t: float, kind: str, device=None, dtype=None):
        slot = self.data.get((layer, t))
        if slot is None or kind not in slot:
            raise KeyError(f"no recorded {kind!r} for layer {layer!r} at timestep {t}")
        x = slot[kind]
        return x.to(device=device or x.device, dtype=dtype or x.dtype, non_blocking=True)

    def has(self, layer: str, t: float, kind: str) -> bool:
        return kind in self.data.get((layer, t), {})

    def keys(self) -> set[tuple[str, float]]:
        return set(self.data)

    def nbytes(self) -> int:
        return sum(x.numel() * x.element_size() for slot in self.data.values() for x in slot.values())

    # -- (de)serialisation as flat safetensors dicts
    def to_tensors(self, prefix: str = "feat") -> dict:
        return {f"{prefix}|{layer}|{t!r}|{kind}": x.contiguous().cpu()
                for (layer, t), slot in self.data.items() for kind, x in slot.items()}

    @classmethod
    def from_tensors(cls, tensors: dict, kinds, dtype=None, offload=None, device=None, prefix: str = "feat"):
        store = cls(kinds, dtype=dtype, offload=offload)
        for key, x in tensors.items():
            head, layer, t, kind = key.split("|")
            if head != prefix:
                continue
            target = offload or device
            store.data.setdefault((layer, float(t)), {})[kind] = x.to(target) if target else x
        return store
