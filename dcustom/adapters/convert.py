"""Convert LoRA files between the diffusers and kohya/A1111 forms; merge adapters into a model; extract LoRA."""

from __future__ import annotations

import json
import re
from pathlib import Path

from dcustom.adapters.files import (
    DORA_FORM_COMFYUI,
    DORA_FORM_KEY,
    KOHYA_TE_PREFIX,
    dora_scale_from_magnitude,
    kohya_module_name,
    read_metadata,
    save_tensors,
)
from dcustom.adapters.load import load_adapter, parse_adapter_spec, resolve_adapter
from dcustom.errors import DcustomError

# diffusers-format key endings -> (kohya part); the first matching marker wins.
_DOWN_UP = [(".lora.down.weight", "lora_down"), (".lora.up.weight", "lora_up"),
            (".lora_linear_layer.down.weight", "lora_down"), (".lora_linear_layer.up.weight", "lora_up"),
            (".lora_A.weight", "lora_down"), (".lora_B.weight", "lora_up")]


def _alpha_lookup(meta: dict, component: str):
    """alpha for a module of `component` from diffusers' lora_adapter_metadata; None = unknown (alpha = rank)."""
    lam = json.loads(meta.get("lora_adapter_metadata", "{}"))
    base = lam.get(f"{component}.lora_alpha")
    patterns = lam.get(f"{component}.alpha_pattern") or {}

    def alpha_of(module: str):
        for pattern, value in patterns.items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return value
        return base

    return alpha_of


def _module_and_part(rest: str):
    """'<module>.lora.down.weight' -> (module, 'lora_down'); DoRA magnitude -> (module, 'dora_scale'); else (rest, None)."""
    if rest.endswith(".lora_magnitude_vector"):
        return rest[: -len(".lora_magnitude_vector")], "dora_scale"
    for marker, part in _DOWN_UP:
        if rest.endswith(marker):
            return rest[: -len(marker)], part
    return rest, None


def diffusers_to_kohya(src: Path, dst: Path) -> Path:
    """diffusers LoRA file -> kohya keys with each module's true alpha (from the file's peft metadata)."""
    import torch
    from safetensors.torch import load_file

    meta = read_metadata(src)
    tensors = load_file(str(src))
    family = meta.get("dcustom.family") or ("sdxl" if any(k.startswith("text_encoder_2.") for k in tensors) else "sd1")
    te_prefix = KOHYA_TE_PREFIX["sdxl" if family == "sdxl" else "sd"]
    out = {}
    for key, value in tensors.items():
        component, rest = key.split(".", 1)
        module, part = _module_and_part(rest)
        if part is None:
            raise DcustomError(f"convert: key {key!r} of {str(src)!r} is not a LoRA down/up weight or DoRA magnitude; "
                               "accepted: a diffusers LoRA file.")
        if component == "unet":
            name = kohya_module_name("lora_unet", module)
        elif component in te_prefix:
            path = module if module.startswith("text_model.") else "text_model." + module
            name = kohya_module_name(te_prefix[component], path)
        else:
            raise DcustomError(f"convert: component {component!r} in {str(src)!r} has no kohya prefix; accepted: unet, text_encoder, text_encoder_2.")
        if part == "dora_scale":  # DoRA: peft's magnitude goes on the output axis
            out[f"{name}.dora_scale"] = dora_scale_from_magnitude(value)
            continue
        out[f"{name}.{part}.weight"] = value
        if part == "lora_down":
            alpha = _alpha_lookup(meta, component)(module)
            out[f"{name}.alpha"] = torch.tensor(float(alpha if alpha is not None else value.shape[0]))
    keep = {k: v for k, v in meta.items() if k.startswith("dcustom.")}
    return save_tensors(out, dst, {**keep, "dcustom.format": "kohya", "format": "pt"})


def kohya_to_diffusers(src: Path, dst: Path, family: str | None = None, pipe=None) -> Path:
    """Any LoRA diffusers reads (kohya/A1111 keys) -> diffusers file; per-module alpha folded into the up weights.

    A DoRA file written for ComfyUI (header `dcustom.dora_scale: comfyui`) needs the base weights to recover
    peft's magnitudes: pass `pipe` (the base pipeline, as the adapter will be applied to it)."""
    import tempfile

    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from safetensors.torch import load_file

    meta = read_metadata(src)
    raw = load_file(str(src))
    keys = list(raw)
    family = family or meta.get("dcustom.family") or ("sdxl" if any(k.startswith("lora_te2_") for k in keys) else "sd1")
    cls = StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline
    with _quiet_diffusers():  # it warns that it drops dora_scale; the magnitudes are added back below
        state, alphas = cls.lora_state_dict(str(src))
    alphas = alphas or {}
    for key in list(state):
        if key.endswith("up.weight"):
            down = key[: -len("up.weight")] + "down.weight"
            alpha = alphas.get(down + ".alpha") or alphas.get(key[: -len(".up.weight")] + ".alpha")
            if alpha is not None:
                state[key] = state[key] * (float(alpha) / state[down].shape[0])  # scale alpha/r, saved at alpha = r
    groups = {}
    for key, value in state.items():
        component, rest = key.split(".", 1)
        groups.setdefault(component, {})[rest] = value
    if any(k.endswith(".dora_scale") for k in raw):
        comfyui_form = meta.get(DORA_FORM_KEY) == DORA_FORM_COMFYUI
        if comfyui_form and pipe is None:
            raise DcustomError(f"{str(src)!r} holds DoRA magnitudes in ComfyUI's form, which depend on the base weights; "
                               "give the base model (--model) to convert it.")
        groups = _with_dora_magnitudes(groups, raw, cls, str(src), pipe if comfyui_form else None)
    kwargs = {f"{c}_lora_layers": sd for c, sd in groups.items()}
    with tempfile.TemporaryDirectory() as tmp:
        cls.save_lora_weights(tmp, **kwargs)
        written = Path(tmp) / "pytorch_lora_weights.safetensors"
        tensors, theirs = load_file(str(written)), read_metadata(written)
    keep = {k: v for k, v in meta.items() if k.startswith("dcustom.")}
    return save_tensors(tensors, dst, {**theirs, **keep, "dcustom.format": "diffusers"})


def is_kohya_dora(path) -> bool:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
    return any(k.endswith(".dora_scale") for k in keys) and any(k.startswith(("lora_unet_", "lora_te")) for k in keys)


def _quiet_diffusers():
    import contextlib

    from diffusers.utils import logging as dlogging

    @contextlib.contextmanager
    def quiet():
        level = dlogging.get_verbosity()
        dlogging.set_verbosity_error()
        try:
            yield
        finally:
            dlogging.set_verbosity(level)

    return quiet()


def _peft_module_path(cls, kohya_name: str, raw: dict) -> tuple[str, str]:
    """(component, peft module path) diffusers' own kohya reader gives one kohya module name."""
    from diffusers.utils import convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    one = {f"{kohya_name}.lora_down.weight": raw[f"{kohya_name}.lora_down.weight"],
           f"{kohya_name}.lora_up.weight": raw[f"{kohya_name}.lora_up.weight"]}
    state, _ = cls.lora_state_dict(one)
    down = next(k for k in state if ".down." in k or "lora_A" in k)
    component, rest = down.split(".", 1)
    to_peft = convert_unet_state_dict_to_peft if component == "unet" else convert_state_dict_to_peft
    (peft_key,) = to_peft({rest: state[down]})
    return component, peft_key[: -len(".lora_A.weight")]


def _with_dora_magnitudes(groups: dict, raw: dict, cls, where: str, pipe=None) -> dict:
    """diffusers drops `dora_scale` from kohya files (SD/SDXL loaders), so re-attach each magnitude as peft's
    `lora_magnitude_vector`, in the same key form our own diffusers DoRA files have. With `pipe`, the scales are
    in ComfyUI's form and are turned back into peft magnitudes with the pipeline's base weights."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft, convert_unet_state_dict_to_peft

    from dcustom.adapters.files import magnitude_from_comfyui_dora_scale, magnitude_from_dora_scale

    peft_groups = {c: (convert_unet_state_dict_to_peft if c == "unet" else convert_state_dict_to_peft)(dict(sd))
                   for c, sd in groups.items()}
    with _quiet_diffusers():
        for key, scale in raw.items():
            if not key.endswith(".dora_scale"):
                continue
            name = key[: -len(".dora_scale")]
            if f"{name}.lora_down.weight" not in raw:
                raise DcustomError(f"{where}: {key!r} has no {name}.lora_down.weight beside it; accepted: DoRA on LoRA modules.")
            component, module = _peft_module_path(cls, name, raw)
            if pipe is None:
                magnitude = magnitude_from_dora_scale(scale, where)
            else:
                magnitude = magnitude_from_comfyui_dora_scale(scale, _base_weight(pipe, component, module, where),
                                                              _kohya_delta(raw, name))
            peft_groups[component][f"{module}.lora_magnitude_vector"] = magnitude
    return {c: convert_state_dict_to_diffusers(sd) for c, sd in peft_groups.items()}


def _base_weight(pipe, component: str, module: str, where: str):
    """The base (un-adapted) weight of `module` in a pipeline component, under any peft layers already loaded."""
    model = getattr(pipe, component)
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise DcustomError(f"{where}: module {module!r} of its {component} is not in this pipeline; made for another model.") from None
    base = layer.get_base_layer() if hasattr(layer, "get_base_layer") else layer
    return base.weight.detach()


def _kohya_delta(raw: dict, name: str):
    """(alpha / rank) * up @ down of one kohya module."""
    down, up = raw[f"{name}.lora_down.weight"].float(), raw[f"{name}.lora_up.weight"].float()
    alpha = float(raw[f"{name}.alpha"]) if f"{name}.alpha" in raw else down.shape[0]
    return (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)) * (alpha / down.shape[0])


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


def merge_into_model(model: str, adapters: list[str], out_dir, dtype: str = "fp32") -> Path:
    """Load `model`, apply 'path[:weight]' adapters, bake them into the weights and save a diffusers
    folder, or one original-layout checkpoint when `out_dir` ends in .safetensors (A1111/Forge/ComfyUI)."""
    from dcustom.models import load_pipeline

    pipe = load_pipeline(model, dtype=dtype, device="cpu")
    for spec in adapters:
        path, weight = parse_adapter_spec(spec)
        load_adapter(pipe, path, scale=weight)
    pipe.fuse_lora()  # merges every peft tuner layer (LoRA, OFT, BOFT) at the weights set above
    pipe.unload_lora_weights()  # removes the adapter modules, keeping the fused weights
    out = Path(out_dir)
    if out.suffix == ".safetensors":
        return _merged_single_file(pipe, out)
    tmp = out.with_name(out.name + ".tmp")
    pipe.save_pretrained(str(tmp))
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


def _merged_single_file(pipe, out: Path) -> Path:
    from dcustom.single_file import save_single_file

    tokenizers = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if any(len(t) > t.vocab_size for t in tokenizers):
        raise DcustomError(f"--out {str(out)!r}: a single-file checkpoint has no place for textual-inversion tokens; "
                           "merge the LoRA/OFT adapters into it and ship the embedding file beside it, or write a "
                           "diffusers folder (an --out without .safetensors).")
    out.parent.mkdir(parents=True, exist_ok=True)
    save_single_file(pipe, out)  # writes a temp file, then renames: a failed export leaves no partial file
    return out


def extract_lora(model: str, adapter: str, rank: int, out_file) -> tuple[Path, float]:
    """SVD-extract a kohya LoRA (UNet) from any adapter (OFT/BOFT/LoRA) on `model`."""
    from dcustom.adapters.files import dcustom_metadata, save_extracted_lora
    from dcustom.models import family_of, load_pipeline

    pipe = load_pipeline(model, dtype="fp32", device="cpu")
    name = load_adapter(pipe, adapter, name="extract")
    meta = dcustom_metadata("extracted-lora", model, family_of(pipe).name, None, "kohya", source=adapter)
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    return save_extracted_lora(out_file.parent, pipe.unet, rank, meta, adapter_name=name, name=out_file.name)
