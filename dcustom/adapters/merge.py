"""Bake adapters into a model (`dcustom adapters merge`) and SVD-extract a LoRA from any adapter (`extract`)."""

from __future__ import annotations

from pathlib import Path

from dcustom.adapters.load import load_adapter, parse_adapter_spec
from dcustom.errors import DcustomError


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
