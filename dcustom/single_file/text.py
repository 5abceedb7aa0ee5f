"""Text encoders in the layouts original checkpoints use.

Two layouts exist:
  Hugging Face CLIP (SD1.x text encoder, SDXL's CLIP-L): `<prefix>text_model.*`, the transformers
    module names with the `text_model.` level that transformers 5 dropped from CLIPTextModel.
  OpenCLIP (SD2.x ViT-H, SDXL's bigG): `<prefix>token_embedding.weight`, `positional_embedding`,
    `transformer.resblocks.N.{ln_1,attn,ln_2,mlp.c_fc,mlp.c_proj}`, `ln_final`, `text_projection`.
    Attention keeps q, k and v as one `in_proj_weight` [3*width, width] (rows q, then k, then v),
    and `text_projection` is applied as `x @ P`, i.e. the transpose of a Linear weight.
"""

from __future__ import annotations

from dcustom.errors import DcustomError

OPEN_CLIP_BLOCK = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "self_attn.out_proj": "attn.out_proj",
                   "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
QKV = {"self_attn.q_proj": "q", "self_attn.k_proj": "k", "self_attn.v_proj": "v"}
OPEN_CLIP_TOP = {"embeddings.token_embedding.weight": "token_embedding.weight",
                 "embeddings.position_embedding.weight": "positional_embedding",
                 "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}


def _text_model_state(encoder) -> dict:
    """The encoder's weights keyed without the `text_model.` level (present only in ...WithProjection)."""
    return {k.removeprefix("text_model."): v for k, v in encoder.state_dict().items()}


def hf_clip_to_ldm(encoder, prefix: str) -> dict:
    """A transformers CLIPTextModel as `<prefix>text_model.*` (the projection, if any, is not part of it).

    Original checkpoints also carry `embeddings.position_ids` (0..76), a buffer transformers 5 no
    longer saves; we write it so strict loaders find every key they expect."""
    import torch

    out = {f"{prefix}text_model.{k}": v for k, v in _text_model_state(encoder).items() if k != "text_projection.weight"}
    positions = encoder.config.max_position_embeddings
    out[f"{prefix}text_model.embeddings.position_ids"] = torch.arange(positions, dtype=torch.int64)[None]
    return out


def open_clip_to_ldm(encoder, prefix: str, append_identity_block: bool = False) -> dict:
    """A transformers CLIPTextModel(WithProjection) as OpenCLIP keys under `prefix`.

    append_identity_block: SD2 conditions on the penultimate OpenCLIP layer, so diffusers' SD2 text
    encoder is the original minus its last block (its loader skips `resblocks.23`). The original
    layout still has that block; we write it as zeros, which makes it an exact identity (pre-norm
    residual block whose every branch outputs 0), so a tool that does run it gets the same result.
    """
    import torch

    state = _text_model_state(encoder)
    out, qkv = {}, {}
    for key, value in state.items():
        if key in OPEN_CLIP_TOP:
            out[prefix + OPEN_CLIP_TOP[key]] = value
        elif key == "text_projection.weight":
            out[prefix + "text_projection"] = value.T.contiguous()
        elif key.startswith("encoder.layers."):
            _, _, n, rest = key.split(".", 3)
            module, _, kind = rest.rpartition(".")  # e.g. "self_attn.q_proj", "weight"
            if module in QKV:
                qkv.setdefault((int(n), kind), {})[QKV[module]] = value
            elif module in OPEN_CLIP_BLOCK:
                out[f"{prefix}transformer.resblocks.{n}.{OPEN_CLIP_BLOCK[module]}.{kind}"] = value
            else:
                raise DcustomError(f"single-file export does not know the text-encoder weight {key!r}.")
        else:
            raise DcustomError(f"single-file export does not know the text-encoder weight {key!r}.")
    for (n, kind), parts in qkv.items():
        out[f"{prefix}transformer.resblocks.{n}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    width = state["final_layer_norm.weight"].shape[0]
    like = state["final_layer_norm.weight"]
    if prefix + "text_projection" not in out:
        # CLIPTextModel has no projection; the original key exists and loaders size q/k/v splits by
        # its first dimension. SD2 conditions on hidden states, never on the projected vector.
        out[prefix + "text_projection"] = torch.eye(width, dtype=like.dtype, device=like.device)
    if append_identity_block:
        n = encoder.config.num_hidden_layers
        block = {k.split(".resblocks.0.", 1)[1]: v for k, v in out.items() if ".resblocks.0." in k}
        for name, value in block.items():
            out[f"{prefix}transformer.resblocks.{n}.{name}"] = torch.zeros_like(value)
    return out
