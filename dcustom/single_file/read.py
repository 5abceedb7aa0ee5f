"""Loading our exports back where diffusers' single-file reader needs help.

diffusers tells SDXL's two text encoders apart by width (CLIP-L 768, bigG 1280): when both have the
same width, as in tiny test pipelines, it loads the CLIP-L weights into text_encoder_2 as well and
leaves its projection unset. Real SDXL checkpoints never hit this; for the rest we convert the
second encoder by its key prefix with diffusers' own OpenCLIP converter and hand it in.
"""

from __future__ import annotations

from pathlib import Path

from dcustom.errors import DcustomError

CLIP_L_WIDTH_KEY = "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight"
OPEN_CLIP_PREFIX = "conditioner.embedders.1.model."


def sdxl_text_encoder_2_override(path: str | Path, config: str | Path, torch_dtype) -> dict:
    """{"text_encoder_2": model} when the checkpoint's two text encoders have the same width, else {}."""
    from safetensors import safe_open

    if Path(path).suffix.lower() != ".safetensors":
        return {}
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        width_key = OPEN_CLIP_PREFIX + "positional_embedding"
        if CLIP_L_WIDTH_KEY not in keys or width_key not in keys:
            return {}
        if f.get_slice(CLIP_L_WIDTH_KEY).get_shape()[-1] != f.get_slice(width_key).get_shape()[-1]:
            return {}
        checkpoint = {k: f.get_tensor(k) for k in keys if k.startswith(OPEN_CLIP_PREFIX)}
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    model = CLIPTextModelWithProjection(
        CLIPTextConfig.from_pretrained(str(config), subfolder="text_encoder_2", local_files_only=True))
    state = convert_open_clip_checkpoint(model, checkpoint, prefix=OPEN_CLIP_PREFIX)
    if not hasattr(model, "text_model"):  # transformers' flattened layout
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise DcustomError(f"checkpoint {str(path)!r}: its second text encoder does not fit the configs in "
                           f"{str(config)!r} ({str(exc).splitlines()[0]}); pass the configs of the model it was saved from.") from None
    return {"text_encoder_2": model.to(torch_dtype).eval()}
