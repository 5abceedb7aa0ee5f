"""Writing adapter files: diffusers LoRA, kohya/A1111 LoRA with true alpha, peft folders, merged UNet."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from dcustom.errors import DcustomError

DIFFUSERS_LORA_NAME = "pytorch_lora_weights.safetensors"
KOHYA_LORA_NAME = "lora_kohya.safetensors"
EXTRACTED_LORA_NAME = "lora_extracted_kohya.safetensors"
FULL_DIFF_NAME = "full_diff.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
MERGED_UNET_DIR = "unet_merged"
# kohya prefixes per pipeline component; SD1/SD2 use "lora_te", SDXL numbers its two encoders.
KOHYA_TE_PREFIX = {"sd": {"text_encoder": "lora_te"}, "sdxl": {"text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}}


def dcustom_metadata(method: str, base_model: str, family: str, config: dict | None, fmt: str, **extra) -> dict:
    """String metadata every dcustom safetensors header carries."""
    from dcustom.version import __version__

    meta = {"dcustom.version": __version__, "dcustom.method": method, "dcustom.base_model": base_model,
            "dcustom.family": family, "dcustom.format": fmt}
    if config is not None:
        meta["dcustom.config"] = json.dumps(config, sort_keys=True, default=str)
    meta.update({f"dcustom.{k}": str(v) for k, v in extra.items()})
    return meta


def read_metadata(path) -> dict:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise DcustomError(f"adapter file {str(path)!r} is not a readable safetensors file ({exc}).") from None


def save_tensors(tensors: dict, path: Path, metadata: dict) -> Path:
    """safetensors write to a temp name then rename: a good file is never replaced by a partial one."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    tmp.replace(path)
    return path


def _peft_state(model, adapter_name: str = "default") -> dict:
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(model, adapter_name=adapter_name)


def save_diffusers_lora(folder: Path, pipe, text_encoders: list[str], meta: dict, adapter_name: str = "default") -> Path:
    """`pytorch_lora_weights.safetensors` as `pipe.load_lora_weights` reads it, with the peft config (true alpha).

    SD3/FLUX pipelines keep their LoRA on `transformer` under peft's own key names (`transformer.<module>.lora_A`),
    the form their diffusers loaders and training scripts use; UNet pipelines under diffusers' names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from safetensors.torch import load_file

    if getattr(pipe, "transformer", None) is not None:
        kwargs = {"transformer_lora_layers": _peft_state(pipe.transformer, adapter_name),
                  "transformer_lora_adapter_metadata": portable_lora_config(pipe.transformer.peft_config[adapter_name])}
    else:
        kwargs = {"unet_lora_layers": unet_lora_names(_peft_state(pipe.unet, adapter_name)),
                  "unet_lora_adapter_metadata": portable_lora_config(pipe.unet.peft_config[adapter_name])}
    for name in text_encoders:
        model = getattr(pipe, name)
        state = convert_state_dict_to_diffusers(_peft_state(model, adapter_name))
        kwargs[f"{name}_lora_layers"] = with_text_model_level(state) if _is_flat_clip(model) else state
        kwargs[f"{name}_lora_adapter_metadata"] = portable_lora_config(model.peft_config[adapter_name])
    with tempfile.TemporaryDirectory() as tmp:
        type(pipe).save_lora_weights(tmp, **kwargs)
        written = Path(tmp) / DIFFUSERS_LORA_NAME
        tensors, theirs = load_file(str(written)), read_metadata(written)
    return save_tensors(tensors, Path(folder) / DIFFUSERS_LORA_NAME, {**theirs, **meta})


def unet_lora_names(state: dict) -> dict:
    """A UNet LoRA state under diffusers' names where every key has one (attention-only: `to_q.lora.down`), else
    under peft's names throughout. diffusers renames only attention keys and its loader decides the file's form
    from the first key alone, so a mixed file (e.g. `proj_in.lora_A` beside `to_q.lora.down`) silently loads
    without the attention layers; peft's names everywhere load in full."""
    from diffusers.utils import convert_state_dict_to_diffusers

    converted = convert_state_dict_to_diffusers(dict(state))
    return state if any(".lora_A." in k or ".lora_B." in k for k in converted) else converted


# LoraConfig fields every peft diffusers supports knows (0.17 included); others are written only when not default.
PORTABLE_LORA_FIELDS = ("r", "lora_alpha", "target_modules", "alpha_pattern", "rank_pattern", "use_dora", "use_rslora",
                        "lora_dropout", "bias", "init_lora_weights", "fan_in_fan_out")
BOOKKEEPING_FIELDS = ("peft_type", "task_type", "peft_version", "base_model_name_or_path", "revision", "inference_mode",
                      "auto_mapping")


def portable_lora_config(config) -> dict:
    """The LoraConfig as diffusers stores it in the file (its `lora_adapter_metadata`), without the fields only the
    peft version that wrote it knows: diffusers calls LoraConfig(**metadata), and an older peft (e.g. 0.17, common
    with transformers 4) refuses unknown keyword arguments, so the whole file would fail to load."""
    from peft import LoraConfig

    full, default = config.to_dict(), LoraConfig().to_dict()
    out = {}
    for key, value in full.items():
        if key in PORTABLE_LORA_FIELDS or (key not in BOOKKEEPING_FIELDS and value != default.get(key)):
            out[key] = sorted(value) if isinstance(value, set) else value
    return out


CLIP_TOP_LEVELS = ("embeddings.", "encoder.", "final_layer_norm.")


def _is_flat_clip(model) -> bool:
    """transformers 5's CLIPTextModel: no `text_model.` level (transformers 4 and ...WithProjection keep it)."""
    return type(model).__name__.startswith("CLIPText") and not hasattr(model, "text_model")


def with_text_model_level(state: dict) -> dict:
    """CLIP module keys in the canonical form every tool reads (`text_model.encoder.layers.N...`).

    transformers 5 dropped the `text_model.` level from CLIPTextModel, so a file written from its module
    names says `encoder.layers.N...`; diffusers with transformers 4 rejects that and ComfyUI maps none of it.
    diffusers with transformers 5 strips the level again when loading."""
    return {f"text_model.{k}" if k.startswith(CLIP_TOP_LEVELS) else k: v for k, v in state.items()}


def canonical_diffusers_lora(tensors: dict) -> dict:
    """A diffusers LoRA file's keys with the text encoders in the canonical `text_model.` form: reads files written
    from transformers 5 module names (`text_encoder.encoder.layers.*`, as dcustom once did) and canonical ones alike."""
    out = {}
    for key, value in tensors.items():
        component, dot, rest = key.partition(".")
        if dot and component.startswith("text_encoder") and rest.startswith(CLIP_TOP_LEVELS):
            key = f"{component}.text_model.{rest}"
        out[key] = value
    return out


def kohya_module_name(prefix: str, module: str) -> str:
    """'lora_unet' + 'down_blocks.1.attentions.0...to_q' -> 'lora_unet_down_blocks_1_attentions_0_..._to_q'."""
    return f"{prefix}_{module.replace('.', '_')}"


def peft_to_kohya(state: dict, prefix: str, alpha_of, text_model: bool = False, dora_scale_of=None) -> dict:
    """peft LoRA keys of one component -> kohya keys with each module's TRUE alpha.

    `alpha_of(module_name)` gives the alpha peft used for that module (lora_alpha or alpha_pattern).
    transformers 5 CLIP modules lack the `text_model.` level that A1111/ComfyUI keys keep: re-add it.
    `dora_scale_of(module_name, magnitude)` writes a DoRA magnitude (default: peft's own value on the output axis).
    """
    import torch

    out = {}
    for key, value in state.items():
        if ".lora_A." in key or ".lora_B." in key:
            module, rest = key.split(".lora_A." if ".lora_A." in key else ".lora_B.", 1)
            path = ("text_model." + module) if text_model and not module.startswith("text_model.") else module
            name = kohya_module_name(prefix, path)
            out[f"{name}.{'lora_down' if '.lora_A.' in key else 'lora_up'}.{rest}"] = value
            if ".lora_A." in key:
                out[f"{name}.alpha"] = torch.tensor(float(alpha_of(module)))
        elif key.endswith(".lora_magnitude_vector"):
            module = key[: -len(".lora_magnitude_vector")]
            path = ("text_model." + module) if text_model and not module.startswith("text_model.") else module
            scale = dora_scale_of(module, value) if dora_scale_of else dora_scale_from_magnitude(value)
            out[f"{kohya_module_name(prefix, path)}.dora_scale"] = scale
    return out


def dora_scale_from_magnitude(magnitude):
    """peft's DoRA magnitude -> kohya/LyCORIS `dora_scale` on the OUTPUT axis: [out, 1] (Linear), [out, 1, 1, 1] (Conv).

    peft normalises each output row: W' = m * (W + s*B@A) / ||W + s*B@A||_row. LyCORIS (wd_on_out) and ComfyUI
    recognise that axis by dora_scale.shape[0] == out_features; a flat [out] vector would broadcast wrongly there.
    """
    if magnitude.ndim == 1:  # Linear: [out]
        return magnitude.reshape(-1, 1)
    return magnitude.reshape(magnitude.numel(), *[1] * (magnitude.ndim - 1))  # Conv: [1, out, 1, 1]


# ComfyUI (and Forge, which copies its loader) divides an output-axis dora_scale by the ORIGINAL weight's row
# norm plus float32 eps; peft divides its magnitude by the UPDATED weight's row norm. A file written for ComfyUI
# therefore carries m * (||W|| + eps) / ||W + s*B@A|| so that ComfyUI computes peft's weight exactly.
DORA_FORM_KEY = "dcustom.dora_scale"
DORA_FORM_COMFYUI = "comfyui"


def comfyui_dora_scale(base_weight, delta, magnitude):
    """peft magnitude [out] -> the [out, 1] dora_scale with which ComfyUI's formula gives peft's weight.

    base_weight: W [out, in]; delta: s * B @ A (the LoRA update at its scale)."""
    import torch

    if base_weight.ndim != 2:
        raise DcustomError(f"DoRA export for ComfyUI handles Linear layers; got a weight of shape {list(base_weight.shape)}.")
    W = base_weight.float()
    eps = torch.finfo(torch.float32).eps
    scale = magnitude.float().reshape(-1) * (W.norm(dim=1) + eps) / (W + delta.float()).norm(dim=1)
    return scale.reshape(-1, 1)


def magnitude_from_comfyui_dora_scale(scale, base_weight, delta):
    """Inverse of comfyui_dora_scale: the peft magnitude [out] a ComfyUI-form dora_scale stands for."""
    import torch

    W = base_weight.float()
    eps = torch.finfo(torch.float32).eps
    return scale.float().reshape(-1) * (W + delta.float()).norm(dim=1) / (W.norm(dim=1) + eps)


def lora_delta(layer, adapter_name: str):
    """s * B @ A of one peft LoRA Linear layer (its update before any DoRA rescaling)."""
    A = layer.lora_A[adapter_name].weight.float()
    B = layer.lora_B[adapter_name].weight.float()
    return (B @ A) * layer.scaling[adapter_name]


def magnitude_from_dora_scale(scale, where: str):
    """Inverse of dora_scale_from_magnitude; refuses the input-axis form ([1, in]) peft cannot express."""
    if scale.ndim == 1:
        return scale  # diffusers' own convert_state_dict_to_kohya writes the flat peft vector
    if all(d == 1 for d in scale.shape[1:]) and not (scale.shape[0] == 1 and scale.ndim == 2):
        return scale.reshape(-1) if scale.ndim == 2 else scale.reshape(1, -1, *[1] * (scale.ndim - 2))
    raise DcustomError(f"{where}: dora_scale of shape {list(scale.shape)} decomposes the input axis (LyCORIS default, "
                       "A1111); peft DoRA needs the output axis ([out, 1]); accepted: output-axis DoRA files.")


def lora_alpha_lookup(peft_config):
    """module name -> alpha, honouring peft's alpha_pattern like peft itself does (suffix match)."""
    import re

    def alpha_of(module: str) -> float:
        for pattern, value in (peft_config.alpha_pattern or {}).items():
            if re.fullmatch(rf"(.*\.)?{pattern}", module):
                return value
        return peft_config.lora_alpha

    return alpha_of


def save_kohya_lora(folder: Path, pipe, family: str, text_encoders: list[str], meta: dict, adapter_name: str = "default",
                    name: str = KOHYA_LORA_NAME) -> Path:
    """A1111/Forge/ComfyUI/InvokeAI LoRA: kohya keys, true per-module alpha (diffusers' converter writes alpha=rank).

    DoRA magnitudes are written in the form ComfyUI/Forge need to compute peft's weights exactly (see
    comfyui_dora_scale), computed from the pipeline's base weights; the header records that form."""
    tensors, dora = {}, False
    prefixes = KOHYA_TE_PREFIX["sdxl" if family == "sdxl" else "sd"]
    for component, prefix in [("unet", "lora_unet"), *[(te, prefixes[te]) for te in text_encoders]]:
        model = getattr(pipe, component)

        def for_comfyui(module, magnitude, model=model):
            layer = model.get_submodule(module)
            return comfyui_dora_scale(layer.get_base_layer().weight, lora_delta(layer, adapter_name), magnitude)

        part = peft_to_kohya(_peft_state(model, adapter_name), prefix, lora_alpha_lookup(model.peft_config[adapter_name]),
                             text_model=component != "unet", dora_scale_of=for_comfyui)
        dora = dora or any(k.endswith(".dora_scale") for k in part)
        tensors.update(part)
    extra = {DORA_FORM_KEY: DORA_FORM_COMFYUI} if dora else {}
    return save_tensors(tensors, Path(folder) / name, {**meta, "dcustom.format": "kohya", "format": "pt", **extra})


def save_peft_folder(folder: Path, model, meta: dict, adapter_name: str = "default") -> Path:
    """peft layout (adapter_model.safetensors + adapter_config.json) for any peft tuner (OFT, BOFT, LoRA)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.peft_config[adapter_name].save_pretrained(str(folder))
    save_tensors(_peft_state(model, adapter_name), folder / PEFT_WEIGHTS, {**meta, "format": "pt"})
    return folder


def merged_linear_weights(model, adapter_name: str = "default") -> dict:
    """{module name: (base weight, merged weight)} for every adapted Linear, leaving the model as it was.

    peft's merge() writes into the base weight; we copy the base first and restore it bit-exactly
    afterwards instead of trusting unmerge() (an OFT inverse is only accurate to ~1e-6).
    """
    import torch
    from peft.tuners.tuners_utils import BaseTunerLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter_name not in getattr(module, "active_adapters", []):
            continue
        base = module.get_base_layer()
        original = base.weight.detach().clone()
        with torch.no_grad():
            module.merge(adapter_names=[adapter_name])
            merged = base.weight.detach().clone()
            module.merged_adapters.clear()
            base.weight.copy_(original)
        out[name] = (original, merged)
    return out


def save_merged_unet(folder: Path, unet, meta: dict, adapter_name: str = "default") -> Path:
    """A plain UNet folder with the adapter baked in: `UNet2DConditionModel.from_pretrained(folder)` loads it."""
    merged = merged_linear_weights(unet, adapter_name)
    state = {}
    for key, value in unet.state_dict().items():
        if "base_layer." not in key and not _is_adapter_key(key):
            state[key] = value
    for name, (_, weight) in merged.items():
        state[f"{name}.weight"] = weight
        bias_key = f"{name}.base_layer.bias"
        if bias_key in unet.state_dict():
            state[f"{name}.bias"] = unet.state_dict()[bias_key]
    out = Path(folder) / MERGED_UNET_DIR
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(dict(unet.config), indent=2, default=list))
    save_tensors(state, out / "diffusion_pytorch_model.safetensors", {**meta, "dcustom.format": "merged_unet", "format": "pt"})
    return out


def _is_adapter_key(key: str) -> bool:
    markers = (".lora_", ".oft_", ".boft_", "lora_magnitude_vector")
    return any(m in key for m in markers)


def svd_lora_from_merged(merged: dict, rank: int) -> tuple[dict, dict]:
    """LoRA factors (peft-style module names) of merged - base per module, by truncated SVD.

    Returns ({module: (down [r, in], up [out, r])}, {module: relative Frobenius error of the delta}). A conv
    weight [out, in, kh, kw] is factored as the matrix [out, in*kh*kw] and comes back in kohya's conv LoRA form
    (LoCon): down [r, in, kh, kw], up [out, r, 1, 1].
    """
    import torch

    factors, errors = {}, {}
    for name, (base, weight) in merged.items():
        full = (weight - base).float()
        delta = full.reshape(full.shape[0], -1)
        U, S, Vh = torch.linalg.svd(delta, full_matrices=False)
        r = min(rank, S.numel())
        up = torch.zeros(delta.shape[0], rank)
        down = torch.zeros(rank, delta.shape[1])
        # Zero-padded to one rank everywhere: diffusers' kohya loader mishandles per-module alpha patterns
        # on cross-attention to_k/to_v, so a uniform rank with alpha = rank keeps every module at scale 1.
        up[:, :r] = U[:, :r] * S[:r]
        down[:r] = Vh[:r]
        approx = up @ down
        denom = delta.norm().item()
        errors[name] = (delta - approx).norm().item() / denom if denom > 0 else 0.0
        if full.dim() == 4:
            down, up = down.reshape(rank, *full.shape[1:]), up.reshape(*up.shape, 1, 1)
        factors[name] = (down.contiguous(), up.contiguous())
    return factors, errors


def full_diff_state(pipe, family: str, adapter_name: str = "default") -> dict:
    """`<kohya module>.diff` = merged weight - base weight for every Linear the adapter changes (UNet and text
    encoders): the LyCORIS "full" layout, which ComfyUI/Forge, A1111 and InvokeAI add to the weight as it is."""
    prefixes = {"unet": "lora_unet", **KOHYA_TE_PREFIX["sdxl" if family == "sdxl" else "sd"]}
    tensors = {}
    for component, prefix in prefixes.items():
        model = getattr(pipe, component, None)
        if model is None or adapter_name not in (getattr(model, "peft_config", None) or {}):
            continue
        for module, (base, weight) in merged_linear_weights(model, adapter_name).items():
            path = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
            tensors[f"{kohya_module_name(prefix, path)}.diff"] = (weight.float() - base.float()).contiguous()
    if not tensors:
        raise DcustomError(f"full-diff export: the pipeline has no adapter named {adapter_name!r} on any Linear layer.")
    return tensors


def save_full_diff(folder: Path, pipe, family: str, meta: dict, adapter_name: str = "default",
                   name: str = FULL_DIFF_NAME) -> Path:
    """Exact export of any adapter (OFT, BOFT, DoRA, LoRA) for ComfyUI/Forge, A1111 and InvokeAI: per-layer weight
    differences in float32 (as large as the adapted layers themselves)."""
    tensors = full_diff_state(pipe, family, adapter_name)
    return save_tensors(tensors, Path(folder) / name, {**meta, "dcustom.format": "kohya-full-diff", "format": "pt"})


def save_extracted_lora(folder: Path, unet, rank: int, meta: dict, adapter_name: str = "default",
                        name: str = EXTRACTED_LORA_NAME) -> tuple[Path, float]:
    """kohya LoRA approximating any adapter (OFT, BOFT, ...) on the UNet; returns (path, relative error).

    alpha = rank, so the file applies the SVD factors at scale 1. The error is the Frobenius norm of
    (delta - extracted) over the norm of delta, summed over all modules; the header also records the
    worst single module and its own relative error (one module can be far worse than the total).
    """
    import torch

    merged = merged_linear_weights(unet, adapter_name)
    factors, errors = svd_lora_from_merged(merged, rank)
    tensors, num, den = {}, 0.0, 0.0
    for module, (down, up) in factors.items():
        base, weight = merged[module]
        delta = (weight - base).float()
        num += ((delta.reshape(delta.shape[0], -1) - up.flatten(1) @ down.flatten(1)).norm() ** 2).item()
        den += (delta.norm() ** 2).item()
        key = kohya_module_name("lora_unet", module)
        tensors[f"{key}.lora_down.weight"] = down
        tensors[f"{key}.lora_up.weight"] = up
        tensors[f"{key}.alpha"] = torch.tensor(float(down.shape[0]))
    rel = (num / den) ** 0.5 if den > 0 else 0.0
    worst = max(errors, key=errors.get) if errors else ""
    path = save_tensors(tensors, Path(folder) / name, {**meta, "dcustom.format": "kohya", "format": "pt",
                                                     "dcustom.extracted_rank": str(rank),
                                                     "dcustom.extraction_rel_error": f"{rel:.6g}",
                                                     "dcustom.extraction_worst_module": worst,
                                                     "dcustom.extraction_worst_rel_error": f"{errors.get(worst, 0.0):.6g}"})
    return path, rel
