"""LoRA keys between the diffusers and the kohya/A1111 forms (what ComfyUI, Forge, A1111 and InvokeAI read).

diffusers' own `convert_state_dict_to_kohya` writes every module's alpha as its rank; here each module
keeps its true alpha (from the file's peft metadata), and DoRA magnitudes survive both ways.
"""

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

    from dcustom.adapters.files import magnitude_from_comfyui_dora_scale, magnitude_from_dora_scale, unet_lora_names

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
    return {c: unet_lora_names(sd) if c == "unet" else convert_state_dict_to_diffusers(sd) for c, sd in peft_groups.items()}


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
