"""`dcustom adapters convert`: write an adapter in another form (kohya, diffusers, or full weight differences)."""

from __future__ import annotations

from pathlib import Path

from dcustom.adapters.files import DORA_FORM_COMFYUI, DORA_FORM_KEY, read_metadata
from dcustom.adapters.kohya import diffusers_to_kohya, kohya_to_diffusers
from dcustom.adapters.load import load_adapter, resolve_adapter
from dcustom.errors import DcustomError

CONVERT_TARGETS = ("kohya", "diffusers", "full")


def convert_lora(src, to: str, dst, model: str | None = None) -> Path:
    """Write `src` in another form: kohya (A1111/Forge/ComfyUI/InvokeAI keys), diffusers, or full (exact per-layer
    weight differences for any adapter, OFT/BOFT/DoRA included). DoRA to kohya and anything to full need the base
    weights: `model`, else the base model recorded in the file."""
    if to not in CONVERT_TARGETS:
        raise DcustomError(f"convert: --to {to!r} is not known; accepted: {', '.join(CONVERT_TARGETS)}.")
    kind, target = resolve_adapter(src)
    if to == "full":
        return _via_pipeline(src, target, kind, Path(dst), model, "full")
    if kind != "lora":
        raise DcustomError(f"convert: {str(src)!r} is a peft (OFT/BOFT) adapter; use '--to full' (exact, for "
                           "ComfyUI/Forge, A1111 and InvokeAI) or 'dcustom adapters extract' to get a LoRA.")
    meta = read_metadata(target)
    fmt = meta.get("dcustom.format") or ("kohya" if target.name.endswith("kohya.safetensors") else "")
    dit_family = _dit_family(target, meta)
    if dit_family is not None:
        return _convert_dit(target, to, Path(dst), dit_family)
    if to == "kohya":
        if fmt == "kohya":
            raise DcustomError(f"convert: {str(target)!r} is already in kohya form.")
        if _has_dora(target):  # ComfyUI's DoRA formula needs the base weights: go through a pipeline
            return _via_pipeline(src, target, kind, Path(dst), model, "kohya")
        return diffusers_to_kohya(target, Path(dst))
    if meta.get(DORA_FORM_KEY) == DORA_FORM_COMFYUI:
        from dcustom.models import family_of

        pipe = _base_pipeline(target, meta, model)
        return kohya_to_diffusers(target, Path(dst), family=family_of(pipe).name, pipe=pipe)
    return kohya_to_diffusers(target, Path(dst))


def _dit_family(target: Path, meta: dict):
    """'sd3' or 'flux' for an MM-DiT LoRA file (from its header, else its key names), None for UNet families."""
    from safetensors import safe_open

    from dcustom.adapters.dit import family_from_keys
    from dcustom.families import FAMILIES

    family = meta.get("dcustom.family")
    if family in FAMILIES:
        return family if FAMILIES[family].is_dit else None
    with safe_open(str(target), framework="pt") as f:
        return family_from_keys(f.keys())


def _convert_dit(target: Path, to: str, dst: Path, family: str) -> Path:
    """SD3/FLUX: diffusers <-> the original checkpoint's names with q/k/v fused (adapters/dit.py), exact both ways."""
    from dcustom.adapters.dit import dit_diffusers_to_kohya, dit_kohya_to_diffusers

    if to == "full":
        raise DcustomError(f"convert: --to full is for UNet families; {str(target)!r} is an {family} LoRA: use "
                           "--to kohya (exact for LoRA) for ComfyUI.")
    from safetensors import safe_open

    with safe_open(str(target), framework="pt") as f:
        is_kohya = any(k.startswith("lora_unet_") for k in f.keys())
    if is_kohya == (to == "kohya"):
        raise DcustomError(f"convert: {str(target)!r} is already in {to} form.")
    if _has_dora(target):
        raise DcustomError(f"convert: {str(target)!r} is a DoRA; its magnitudes have no place in the fused q/k/v "
                           f"modules of the {family} kohya layout, so only its diffusers file exists.")
    dst.parent.mkdir(parents=True, exist_ok=True)
    return (dit_diffusers_to_kohya if to == "kohya" else dit_kohya_to_diffusers)(target, dst, family)


def _has_dora(path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return any(k.endswith((".lora_magnitude_vector", ".dora_scale")) for k in f.keys())


def _base_pipeline(target: Path, meta: dict, model: str | None):
    from dcustom.models import load_pipeline

    base = model or meta.get("dcustom.base_model")
    if not base:
        raise DcustomError(f"convert: {str(target)!r} does not record its base model; give it with --model.")
    return load_pipeline(base, dtype="fp32", device="cpu")


def _via_pipeline(src, target: Path, kind: str, dst: Path, model: str | None, to: str) -> Path:
    """Load the base model, put the adapter on it, and write `to` (kohya or full) from the pipeline's peft layers."""
    from dcustom.adapters.files import dcustom_metadata, save_full_diff, save_kohya_lora
    from dcustom.models import family_of

    meta = read_metadata(target if kind == "lora" else target / "adapter_model.safetensors")
    pipe = _base_pipeline(target, meta, model)
    name = load_adapter(pipe, src, name="export")
    family = family_of(pipe).name
    keep = {k: v for k, v in meta.items()
            if k.startswith("dcustom.") and k not in (DORA_FORM_KEY, "dcustom.version", "dcustom.format")}
    out_meta = {**dcustom_metadata(meta.get("dcustom.method", "adapter"), meta.get("dcustom.base_model", model or ""),
                                   family, None, to), **keep, "dcustom.family": family, "dcustom.source": str(src)}
    dst.parent.mkdir(parents=True, exist_ok=True)
    if to == "full":
        return save_full_diff(dst.parent, pipe, family, out_meta, adapter_name=name, name=dst.name)
    tes = [te for te in ("text_encoder", "text_encoder_2")
           if name in (getattr(getattr(pipe, te, None), "peft_config", None) or {})]
    return save_kohya_lora(dst.parent, pipe, family, tes, out_meta, adapter_name=name, name=dst.name)
