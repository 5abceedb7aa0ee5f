"""`load_adapter(pipe, path, scale)`: put any adapter file dcustom writes (or a kohya/diffusers LoRA) on a pipeline.

Several calls stack: each adapter gets its own name and weight; LoRA weights combine through
diffusers' `set_adapters`. `fuse=True` bakes the active LoRAs into the weights (faster sampling).
"""

from __future__ import annotations

import json
from pathlib import Path

from dcustom.adapters.files import DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME, PEFT_CONFIG, PEFT_WEIGHTS, read_metadata
from dcustom.errors import DcustomError


def parse_adapter_spec(spec: str) -> tuple[str, float]:
    """'path' or 'path:weight' -> (path, weight)."""
    path, sep, weight = str(spec).rpartition(":")
    if sep and path and not Path(spec).exists():
        try:
            return path, float(weight)
        except ValueError:
            pass
    return str(spec), 1.0


def resolve_adapter(path) -> tuple[str, Path]:
    """(kind, file or folder): kind is 'lora' (any file diffusers reads as LoRA) or 'peft' (a peft folder)."""
    p = Path(path)
    if p.is_dir():
        for candidate in (p / DIFFUSERS_LORA_NAME, p / KOHYA_LORA_NAME):
            if candidate.is_file():
                return "lora", candidate
        for folder in (p / "unet", p):
            if (folder / PEFT_CONFIG).is_file() and (folder / PEFT_WEIGHTS).is_file():
                return "peft", folder
        raise DcustomError(f"adapter folder {str(p)!r} holds no adapter; accepted: {DIFFUSERS_LORA_NAME}, {KOHYA_LORA_NAME}, "
                           f"or a peft folder with {PEFT_CONFIG} and {PEFT_WEIGHTS} (or unet/ holding them).")
    if p.is_file():
        if p.suffix != ".safetensors":
            raise DcustomError(f"adapter file {str(p)!r} is not a .safetensors file; accepted: .safetensors LoRA files or adapter folders.")
        return "lora", p
    raise DcustomError(f"adapter {str(p)!r} does not exist.")


# Key fragments of every adapter layout we read (diffusers/peft/kohya LoRA and DoRA, peft OFT/BOFT).
ADAPTER_KEY_MARKS = ("lora_", "lora.", "dora_scale", "oft_", "boft_")
NOT_AN_ADAPTER = ("accepted: a LoRA (diffusers or kohya keys), a peft OFT/BOFT folder, a dcustom run folder or a "
                  "textual-inversion embedding")


def file_kind(path: Path) -> str:
    """'adapter', 'embedding' or 'unreadable' from a .safetensors file's key names (its header only); one
    sentence for a readable file that is neither."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # damage: the readers that follow explain it in their own words
        return "unreadable"
    if any(mark in k for k in keys for mark in ADAPTER_KEY_MARKS):
        return "adapter"
    if len(keys) == 1 or {"clip_l", "clip_g"} <= set(keys):  # the embedding forms read_embedding accepts
        return "embedding"
    if not keys:
        raise DcustomError(f"{str(path)!r} holds no tensors; {NOT_AN_ADAPTER}.")
    raise DcustomError(f"{str(path)!r} is neither an adapter nor an embedding: none of its {len(keys)} tensors "
                       f"(e.g. {sorted(keys)[0]!r}) has LoRA, OFT or BOFT keys; {NOT_AN_ADAPTER}.")


def check_family(pipe, meta: dict, where: str) -> None:
    from dcustom.families import FAMILIES
    from dcustom.models import family_of

    trained_for = meta.get("dcustom.family") or _family_from_file_keys(where)
    here = family_of(pipe)
    if trained_for and trained_for != here.name:
        label = FAMILIES[trained_for].label if trained_for in FAMILIES else trained_for
        raise DcustomError(f"adapter {where!r} was trained for {label} ({trained_for}) but this pipeline is "
                           f"{here.label} ({here.name}); load it on a {label} model.")


def _family_from_file_keys(where: str):
    """'flux' or 'sd3' for a LoRA file without dcustom metadata whose keys name that family's modules, else None."""
    from safetensors import safe_open

    from dcustom.adapters.dit import family_from_keys

    path = Path(where)
    if not (path.is_file() and path.suffix == ".safetensors"):
        return None
    with safe_open(str(path), framework="pt") as f:
        return family_from_keys(f.keys())


def _adapter_names(pipe) -> list[str]:
    from dcustom.families import denoiser

    names = []
    for model in (denoiser(pipe), getattr(pipe, "text_encoder", None), getattr(pipe, "text_encoder_2", None)):
        if model is not None and getattr(model, "peft_config", None):
            names += [n for n in model.peft_config if n not in names]
    return names


def load_adapter(pipe, path, scale: float = 1.0, name: str | None = None, fuse: bool = False) -> str:
    """Load one adapter onto `pipe` (stacking on earlier ones) with weight `scale`; returns its adapter name.
    Textual-inversion embeddings load too (a file, or learned_embeds*.safetensors in the folder, e.g. beside a
    pivotal-tuning LoRA); an embedding alone returns its prompt word(s)."""
    from dcustom.adapters.embeddings import pending_for

    if Path(path).is_file() and Path(path).suffix == ".safetensors":
        file_kind(Path(path))  # a file that is neither adapter nor embedding gets its own sentence
    embeddings = pending_for(pipe, path)  # validated now, loaded after the adapter
    if embeddings is not None and not embeddings.has_adapter:
        return embeddings.apply(pipe)
    kind, target = resolve_adapter(path)
    weights_file = target if kind == "lora" else target / PEFT_WEIGHTS
    meta = read_metadata(weights_file)
    check_family(pipe, meta, str(path))
    existing = _adapter_names(pipe)
    name = name or f"adapter_{len(existing)}"
    if name in existing:
        raise DcustomError(f"adapter name {name!r} is already loaded on this pipeline; pick another name.")
    if kind == "lora":
        _load_lora(pipe, target, name)
    else:
        _load_peft(pipe, target, name, scale)
    lora_names = _lora_names(pipe)
    if lora_names:
        # Remember every LoRA's weight on the pipeline: set_adapters needs the whole list each time.
        scales = getattr(pipe, "_dcustom_adapter_scales", {})
        scales[name] = scale
        pipe._dcustom_adapter_scales = scales
        pipe.set_adapters(lora_names, adapter_weights=[scales.get(n, 1.0) for n in lora_names])
    if fuse:
        pipe.fuse_lora(adapter_names=lora_names or None)
    if embeddings is not None:
        embeddings.apply(pipe)
    return name


def apply_adapters(pipe, specs: list[str]) -> None:
    """Make exactly `specs` ('path[:weight]') the pipeline's adapters, reusing what is already loaded."""
    current = getattr(pipe, "_dcustom_adapter_specs", [])
    if list(specs) == current:
        return
    if current:
        pipe.unload_lora_weights()  # removes every peft layer (LoRA, OFT, BOFT) from the UNet and text encoders
        pipe._dcustom_adapter_scales = {}
        from dcustom.adapters.embeddings import unload_embeddings

        unload_embeddings(pipe)  # and the textual-inversion tokens the previous specs added
    pipe._dcustom_adapter_specs = []
    for spec in specs:
        path, weight = parse_adapter_spec(spec)
        load_adapter(pipe, path, scale=weight)
    pipe._dcustom_adapter_specs = list(specs)


def _lora_names(pipe) -> list[str]:
    from peft import LoraConfig

    from dcustom.families import denoiser

    cfgs = getattr(denoiser(pipe), "peft_config", {}) or {}
    return [n for n, c in cfgs.items() if isinstance(c, LoraConfig)]


def _load_lora(pipe, file: Path, name: str) -> None:
    from dcustom.adapters.kohya import is_kohya_dora

    if _is_full_diff(file):
        raise DcustomError(f"adapter {str(file)!r} holds full weight differences (`.diff`), an export for ComfyUI/Forge, "
                           "A1111 and InvokeAI; in dcustom load the run's peft folder or diffusers file instead.")

    from dcustom.models import family_of

    family = family_of(pipe)
    if family.is_dit and _is_kohya(file):
        # the original checkpoint's names with q/k/v fused: split exactly into diffusers' layers (adapters/dit.py)
        import tempfile

        from dcustom.adapters.dit import dit_kohya_to_diffusers

        with tempfile.TemporaryDirectory() as tmp:
            converted = dit_kohya_to_diffusers(file, Path(tmp) / DIFFUSERS_LORA_NAME, family.name)
            return _load_lora_file(pipe, converted, name, shown=file)
    if is_kohya_dora(file):
        # diffusers' SD/SDXL readers drop `dora_scale` (a plain LoRA, wrong output): go through our diffusers form
        import tempfile

        from dcustom.adapters.kohya import kohya_to_diffusers

        with tempfile.TemporaryDirectory() as tmp:
            try:
                converted = kohya_to_diffusers(file, Path(tmp) / DIFFUSERS_LORA_NAME, family=family.name, pipe=pipe)
            except (ValueError, KeyError, RuntimeError, StopIteration) as exc:
                raise DcustomError(f"adapter {str(file)!r}: its kohya DoRA keys do not convert for this "
                                   f"{family.label} pipeline ({str(exc).strip()[:200] or type(exc).__name__}).") from None
            return _load_lora_file(pipe, converted, name, shown=file)
    if _has_flat_text_encoder_keys(file):
        # written from transformers 5 module names (`text_encoder.encoder.layers.*`): diffusers with transformers 4
        # rejects those, so load the canonical `text_model.` form, which every diffusers version reads
        import tempfile

        from safetensors.torch import load_file

        from dcustom.adapters.files import canonical_diffusers_lora, save_tensors

        with tempfile.TemporaryDirectory() as tmp:
            fixed = save_tensors(canonical_diffusers_lora(load_file(str(file))), Path(tmp) / DIFFUSERS_LORA_NAME,
                                 read_metadata(file))
            return _load_lora_file(pipe, fixed, name, shown=file)
    _load_lora_file(pipe, file, name, shown=file)


def _is_kohya(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return any(k.startswith("lora_unet_") for k in f.keys())


def _is_full_diff(file: Path) -> bool:
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        return any(k.endswith(".diff") for k in f.keys())


def _has_flat_text_encoder_keys(file: Path) -> bool:
    from safetensors import safe_open

    from dcustom.adapters.files import CLIP_TOP_LEVELS

    with safe_open(str(file), framework="pt") as f:
        for key in f.keys():
            component, _, rest = key.partition(".")
            if component.startswith("text_encoder") and rest.startswith(CLIP_TOP_LEVELS):
                return True
    return False


def _load_lora_file(pipe, file: Path, name: str, shown: Path) -> None:
    try:
        pipe.load_lora_weights(str(file.parent), weight_name=file.name, adapter_name=name)
    except DcustomError:
        raise
    except (ValueError, RuntimeError, KeyError) as exc:
        from dcustom.models import family_of

        first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise DcustomError(f"adapter {str(shown)!r} does not fit this {family_of(pipe).label} pipeline ({first}); "
                           "it was probably made for another model family.") from None


def _load_peft(pipe, folder: Path, name: str, scale: float) -> None:
    """peft folder (OFT, BOFT, LoRA ...) injected into the UNet with `inject_adapter_in_model`."""
    from peft import PeftConfig, set_peft_model_state_dict
    from safetensors.torch import load_file

    if scale != 1.0:
        raise DcustomError(f"adapter {str(folder)!r}: OFT/BOFT adapters are rotations and load at weight 1 only; "
                           "use its extracted LoRA (lora_extracted_kohya.safetensors) for a weighted mix.")
    config = PeftConfig.from_pretrained(str(folder))
    if getattr(config, "peft_type", None) == "BOFT":
        from dcustom.adapters.boft_kernel import ensure_boft_kernel

        ensure_boft_kernel()  # else peft builds 1 butterfly factor and the saved weights do not fit
    state = load_file(str(folder / PEFT_WEIGHTS))
    try:
        config.inference_mode = True  # loaded adapters are not trained further
        pipe.unet.add_adapter(config, adapter_name=name)  # diffusers' wrapper of peft's inject_adapter_in_model
        result = set_peft_model_state_dict(pipe.unet, state, adapter_name=name)
    except (ValueError, RuntimeError) as exc:
        raise DcustomError(f"adapter {str(folder)!r} does not fit this pipeline's UNet ({str(exc).splitlines()[0][:300]}).") from None
    unexpected = getattr(result, "unexpected_keys", None)
    if unexpected:
        raise DcustomError(f"adapter {str(folder)!r} has weights this UNet lacks (e.g. {unexpected[0]!r}); made for another model.")
    pipe.unet.to(pipe.device)
    pipe.unet.set_adapter(list(pipe.unet.peft_config))


def adapter_summary(path) -> dict:
    """What a file or folder holds: format, method, family, tensors, parameters, rank/alpha (for `inspect`)."""
    from safetensors import safe_open

    from dcustom.adapters.embeddings import SUFFIXES, embedding_files, embedding_summary

    p = Path(path)
    if p.is_file() and (p.suffix in SUFFIXES[1:] or (p.suffix == ".safetensors" and file_kind(p) == "embedding")):
        return embedding_summary(p)  # .pt/.bin are read with weights_only=True there
    if p.is_dir() and embedding_files(p):
        try:
            resolve_adapter(p)
        except DcustomError:
            return embedding_summary(p)  # a textual-inversion run folder without an adapter beside it
    kind, target = resolve_adapter(path)
    weights_file = target if kind == "lora" else target / PEFT_WEIGHTS
    meta = read_metadata(weights_file)
    with safe_open(str(weights_file), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: f.get_slice(k).get_shape() for k in keys}
    params = sum(_numel(s) for s in shapes.values())
    out = {"path": str(weights_file), "format": meta.get("dcustom.format") or _guess_format(keys), "tensors": len(keys),
           "parameters": params, "method": meta.get("dcustom.method", "unknown"),
           "family": meta.get("dcustom.family", "unknown"), "base_model": meta.get("dcustom.base_model", "unknown"),
           "dcustom_version": meta.get("dcustom.version", "-")}
    # DoRA: peft's magnitude is always per output; a kohya dora_scale is per output when shaped [out, 1(, 1, 1)]
    dora = {k: s for k, s in shapes.items() if k.endswith((".dora_scale", ".lora_magnitude_vector"))}
    if dora:
        output_axis = all(k.endswith(".lora_magnitude_vector") or len(s) == 1 or (s[0] != 1 and all(d == 1 for d in s[1:]))
                          for k, s in dora.items())
        out["dora"] = f"{len(dora)} modules, magnitude on the {'output' if output_axis else 'input'} axis"
    ranks = sorted({s[0] for k, s in shapes.items() if k.endswith((".lora_down.weight", ".lora_A.weight"))})
    if ranks:
        out["ranks"] = ranks
    if any(k.endswith(".alpha") for k in keys):
        from safetensors.torch import load_file

        tensors = load_file(str(weights_file))
        alphas = sorted({round(float(v), 6) for k, v in tensors.items() if k.endswith(".alpha")})
        out["alphas"] = alphas
    elif "lora_adapter_metadata" in meta:
        lam = json.loads(meta["lora_adapter_metadata"])
        alphas = sorted({v for k, v in lam.items() if k.endswith("lora_alpha")})
        out["alphas"] = alphas
    if kind == "peft":
        cfg = json.loads((target / PEFT_CONFIG).read_text())
        out["peft_type"] = cfg.get("peft_type")
    for extra in ("dcustom.extracted_rank", "dcustom.extraction_rel_error", "dcustom.extraction_worst_module",
                  "dcustom.extraction_worst_rel_error"):
        if extra in meta:
            out[extra.split(".", 1)[1]] = meta[extra]
    if out["family"] == "unknown":
        from dcustom.adapters.dit import family_from_keys

        out["family"] = family_from_keys(keys) or "unknown"
    if out["family"] in ("sd3", "flux"):
        out["use_with"], out["not_for"] = dit_tools_for(out["format"], out["family"])
    else:
        out["use_with"], out["not_for"] = tools_for(kind, out["format"], keys, meta)
    return out


def dit_tools_for(fmt: str, family: str) -> tuple[str, str]:
    """(tools, not for) of an SD3/FLUX LoRA: the diffusers file or the original-checkpoint (kohya/ComfyUI) layout."""
    pipeline = "FluxPipeline" if family == "flux" else "StableDiffusion3Pipeline"
    if fmt.startswith("kohya"):
        return (f"ComfyUI, kohya sd-scripts, dcustom (original {family} module names, q/k/v fused)",
                f"diffusers {pipeline}.load_lora_weights at other than the released model's widths: use the diffusers "
                "file (dcustom adapters convert <file> --to diffusers)")
    return (f"diffusers {pipeline}.load_lora_weights; dcustom",
            f"tools that read the original {family} checkpoint's names (kohya sd-scripts): lora_kohya.safetensors ({KOHYA_HINT})")


KOHYA_HINT = "dcustom adapters convert <run> --to kohya"
FULL_HINT = "dcustom adapters convert <run> --to full"


def tools_for(kind: str, fmt: str, keys: list, meta: dict) -> tuple[str, str]:
    """(tools that compute this file's weights as peft does, tools it is not for and what to use there instead).

    Backed by tests/test_interop_*.py, which apply each tool's key mapping and merge formula to our files."""
    from dcustom.adapters.files import DORA_FORM_COMFYUI, DORA_FORM_KEY

    dora = any(k.endswith((".dora_scale", ".lora_magnitude_vector")) for k in keys)
    if kind == "peft":
        return ("dcustom; peft (unet.add_adapter + set_peft_model_state_dict) with diffusers",
                f"ComfyUI/Forge, A1111, InvokeAI: use full_diff.safetensors (exact; {FULL_HINT}) or "
                "lora_extracted_kohya.safetensors (approximate)")
    if fmt == "kohya-full-diff" or any(k.endswith(".diff") for k in keys):
        return ("ComfyUI/Forge, A1111, InvokeAI (exact weight differences)",
                "diffusers pipe.load_lora_weights and dcustom (no .diff keys): use the peft folder or diffusers file")
    if fmt.startswith("kohya"):
        if "dcustom.extraction_rel_error" in meta:
            worst = meta.get("dcustom.extraction_worst_rel_error", "?")
            return (f"diffusers (transformers 4 and 5), ComfyUI/Forge, A1111, InvokeAI, dcustom: APPROXIMATE "
                    f"(rank-{meta.get('dcustom.extracted_rank', '?')} SVD; worst module off by {worst} of its change)",
                    f"exact elsewhere: full_diff.safetensors ({FULL_HINT})")
        if not dora:
            return "diffusers (transformers 4 and 5), ComfyUI/Forge, A1111, InvokeAI, dcustom", "-"
        if meta.get(DORA_FORM_KEY) == DORA_FORM_COMFYUI:
            return ("ComfyUI/Forge and dcustom (DoRA magnitudes in ComfyUI's form)",
                    "diffusers (drops dora_scale: use the diffusers file); A1111 and InvokeAI (read dora_scale per "
                    f"input column: use {FULL_HINT})")
        return ("dcustom, LyCORIS (DoRA magnitudes in peft's output-axis form)",
                f"ComfyUI/Forge (normalises by the original weight: rewrite with {KOHYA_HINT} from the diffusers file); "
                f"diffusers (drops dora_scale); A1111 and InvokeAI (input-axis DoRA): use {FULL_HINT}")
    if fmt.startswith("diffusers"):
        flat = any(k.split(".", 1)[0].startswith("text_encoder") and k.split(".", 1)[1].startswith(("encoder.", "embeddings."))
                   for k in keys if "." in k)
        also = ("; its text-encoder keys lack `text_model.` (written from transformers 5 names): diffusers with "
                "transformers 4 rejects them, dcustom reads them" if flat else "")
        return (f"diffusers pipe.load_lora_weights (transformers 4 and 5{', with use_dora' if dora else ''}); dcustom{also}",
                (f"ComfyUI/Forge: {KOHYA_HINT} (ComfyUI's DoRA form); A1111, InvokeAI: {FULL_HINT}" if dora else
                 f"ComfyUI/Forge, A1111, InvokeAI (they map none of its UNet keys): use lora_kohya.safetensors ({KOHYA_HINT})"))
    return "dcustom", "-"


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _guess_format(keys: list[str]) -> str:
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        return "kohya"
    if any(k.startswith(("unet.", "text_encoder", "transformer.")) for k in keys):
        return "diffusers"
    return "peft"
