"""SD3/3.5 and FLUX.1 weights in the original checkpoint layout, both ways.

The community's all-in-one files (ComfyUI's, Stability's `sd3_*_incl_clips*`) hold:
  transformer  `model.diffusion_model.*`  SD3 (MMDiT): `joint_blocks.N.{x_block,context_block}.attn.qkv`, ...
                                          FLUX (BFL): `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...
               (BFL's transformer-only files use the same names without the prefix)
  VAE          `first_stage_model.*`      the LDM layout of single_file/ldm.py
  CLIP-L       `text_encoders.clip_l.transformer.text_model.*`  Hugging Face names
  CLIP-G       `text_encoders.clip_g.transformer.text_model.*`  (SD3 only), + `text_projection.weight`
  T5           `text_encoders.t5xxl.transformer.*`              Hugging Face T5EncoderModel names
diffusers reads this layout (`single_file_utils.convert_{sd3,flux}_transformer_checkpoint_to_diffusers`) but
writes none of it. The transformer differs from diffusers' modules in three ways: q, k and v are one Linear
(`qkv`; FLUX's single blocks fuse the MLP input too, `linear1` = [q; k; v; mlp]); RMS-norm scales are named
`ln_q`/`query_norm.scale`; and every AdaLayerNormContinuous (the final layer, SD3's last context block) keeps
its modulation as (shift, scale) where diffusers has (scale, shift). `transformer_plan` states each original
tensor as the diffusers tensors it is made of; writing concatenates them, reading splits them by the sizes of
the module built from the configs, so the two directions are one table and exact inverses.
"""

from __future__ import annotations

import re

from dcustom.errors import DcustomError

DIT_PREFIX = "model.diffusion_model."
TEXT_PREFIXES = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
                 "t5xxl": "text_encoders.t5xxl.transformer."}
# pipeline attribute -> file text encoder, per family
TEXT_ENCODERS = {"sd3": {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
                 "flux": {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"}}
FUSED_ORDER = ("q", "k", "v", "mlp")
_BLOCK = r"transformer_blocks\.(\d+)\."
# (diffusers key regex, original key template with \1.. groups, fused part or None); first match wins.
SD3_RULES = [
    (r"pos_embed\.pos_embed", "pos_embed", None),
    (r"pos_embed\.proj\.(\w+)", r"x_embedder.proj.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"t_embedder.mlp.0.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"t_embedder.mlp.2.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"y_embedder.mlp.0.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"y_embedder.mlp.2.\1", None),
    (r"context_embedder\.(\w+)", r"context_embedder.\1", None),
    *[(_BLOCK + rf"attn\.to_{p}\.(\w+)", r"joint_blocks.\1.x_block.attn.qkv.\2", p) for p in "qkv"],
    *[(_BLOCK + rf"attn\.add_{p}_proj\.(\w+)", r"joint_blocks.\1.context_block.attn.qkv.\2", p) for p in "qkv"],
    *[(_BLOCK + rf"attn2\.to_{p}\.(\w+)", r"joint_blocks.\1.x_block.attn2.qkv.\2", p) for p in "qkv"],
    (_BLOCK + r"attn\.norm_q\.weight", r"joint_blocks.\1.x_block.attn.ln_q.weight", None),
    (_BLOCK + r"attn\.norm_k\.weight", r"joint_blocks.\1.x_block.attn.ln_k.weight", None),
    (_BLOCK + r"attn\.norm_added_q\.weight", r"joint_blocks.\1.context_block.attn.ln_q.weight", None),
    (_BLOCK + r"attn\.norm_added_k\.weight", r"joint_blocks.\1.context_block.attn.ln_k.weight", None),
    (_BLOCK + r"attn2\.norm_q\.weight", r"joint_blocks.\1.x_block.attn2.ln_q.weight", None),
    (_BLOCK + r"attn2\.norm_k\.weight", r"joint_blocks.\1.x_block.attn2.ln_k.weight", None),
    (_BLOCK + r"attn\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn.proj.\2", None),
    (_BLOCK + r"attn\.to_add_out\.(\w+)", r"joint_blocks.\1.context_block.attn.proj.\2", None),
    (_BLOCK + r"attn2\.to_out\.0\.(\w+)", r"joint_blocks.\1.x_block.attn2.proj.\2", None),
    (_BLOCK + r"norm1\.linear\.(\w+)", r"joint_blocks.\1.x_block.adaLN_modulation.1.\2", None),
    (_BLOCK + r"norm1_context\.linear\.(\w+)", r"joint_blocks.\1.context_block.adaLN_modulation.1.\2", None),
    (_BLOCK + r"ff\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc1.\2", None),
    (_BLOCK + r"ff\.net\.2\.(\w+)", r"joint_blocks.\1.x_block.mlp.fc2.\2", None),
    (_BLOCK + r"ff_context\.net\.0\.proj\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc1.\2", None),
    (_BLOCK + r"ff_context\.net\.2\.(\w+)", r"joint_blocks.\1.context_block.mlp.fc2.\2", None),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None),
]
_SINGLE = r"single_transformer_blocks\.(\d+)\."
FLUX_RULES = [
    (r"time_text_embed\.timestep_embedder\.linear_1\.(\w+)", r"time_in.in_layer.\1", None),
    (r"time_text_embed\.timestep_embedder\.linear_2\.(\w+)", r"time_in.out_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_1\.(\w+)", r"vector_in.in_layer.\1", None),
    (r"time_text_embed\.text_embedder\.linear_2\.(\w+)", r"vector_in.out_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_1\.(\w+)", r"guidance_in.in_layer.\1", None),
    (r"time_text_embed\.guidance_embedder\.linear_2\.(\w+)", r"guidance_in.out_layer.\1", None),
    (r"context_embedder\.(\w+)", r"txt_in.\1", None),
    (r"x_embedder\.(\w+)", r"img_in.\1", None),
    (_SINGLE + r"norm\.linear\.(\w+)", r"single_blocks.\1.modulation.lin.\2", None),
    *[(_SINGLE + rf"attn\.to_{p}\.(\w+)", r"single_blocks.\1.linear1.\2", p) for p in "qkv"],
    (_SINGLE + r"proj_mlp\.(\w+)", r"single_blocks.\1.linear1.\2", "mlp"),
    (_SINGLE + r"attn\.norm_q\.weight", r"single_blocks.\1.norm.query_norm.scale", None),
    (_SINGLE + r"attn\.norm_k\.weight", r"single_blocks.\1.norm.key_norm.scale", None),
    (_SINGLE + r"proj_out\.(\w+)", r"single_blocks.\1.linear2.\2", None),
    (_BLOCK + r"norm1\.linear\.(\w+)", r"double_blocks.\1.img_mod.lin.\2", None),
    (_BLOCK + r"norm1_context\.linear\.(\w+)", r"double_blocks.\1.txt_mod.lin.\2", None),
    *[(_BLOCK + rf"attn\.to_{p}\.(\w+)", r"double_blocks.\1.img_attn.qkv.\2", p) for p in "qkv"],
    *[(_BLOCK + rf"attn\.add_{p}_proj\.(\w+)", r"double_blocks.\1.txt_attn.qkv.\2", p) for p in "qkv"],
    (_BLOCK + r"attn\.norm_q\.weight", r"double_blocks.\1.img_attn.norm.query_norm.scale", None),
    (_BLOCK + r"attn\.norm_k\.weight", r"double_blocks.\1.img_attn.norm.key_norm.scale", None),
    (_BLOCK + r"attn\.norm_added_q\.weight", r"double_blocks.\1.txt_attn.norm.query_norm.scale", None),
    (_BLOCK + r"attn\.norm_added_k\.weight", r"double_blocks.\1.txt_attn.norm.key_norm.scale", None),
    (_BLOCK + r"attn\.to_out\.0\.(\w+)", r"double_blocks.\1.img_attn.proj.\2", None),
    (_BLOCK + r"attn\.to_add_out\.(\w+)", r"double_blocks.\1.txt_attn.proj.\2", None),
    (_BLOCK + r"ff\.net\.0\.proj\.(\w+)", r"double_blocks.\1.img_mlp.0.\2", None),
    (_BLOCK + r"ff\.net\.2\.(\w+)", r"double_blocks.\1.img_mlp.2.\2", None),
    (_BLOCK + r"ff_context\.net\.0\.proj\.(\w+)", r"double_blocks.\1.txt_mlp.0.\2", None),
    (_BLOCK + r"ff_context\.net\.2\.(\w+)", r"double_blocks.\1.txt_mlp.2.\2", None),
    (r"proj_out\.(\w+)", r"final_layer.linear.\1", None),
    (r"norm_out\.linear\.(\w+)", r"final_layer.adaLN_modulation.1.\1", None),
]
RULES = {"sd3": [(re.compile(a + "$"), b, p) for a, b, p in SD3_RULES],
         "flux": [(re.compile(a + "$"), b, p) for a, b, p in FLUX_RULES]}


def transformer_plan(family: str, keys) -> dict[str, tuple[list[str], bool]]:
    """original key -> ([diffusers keys, concatenated in this order along dim 0], halves swapped?).

    Swapped are the AdaLayerNormContinuous modulations: the final layer's, and SD3's last context block
    (`context_pre_only`, whose context stream ends there)."""
    keys = list(keys)
    last_joint = max((int(m.group(1)) for k in keys if (m := re.match(_BLOCK, k))), default=-1)
    parts: dict[str, list[tuple[int, str]]] = {}
    for key in keys:
        for pattern, template, part in RULES[family]:
            m = pattern.match(key)
            if m:
                parts.setdefault(m.expand(template), []).append((FUSED_ORDER.index(part) if part else 0, key))
                break
        else:
            raise DcustomError(f"the original {family.upper()} layout has no name for the transformer weight {key!r}.")
    plan = {}
    for original, members in parts.items():
        swap = original.startswith("final_layer.adaLN_modulation.") or (
            family == "sd3" and original.startswith(f"joint_blocks.{last_joint}.context_block.adaLN_modulation."))
        plan[original] = ([key for _, key in sorted(members)], swap)
    return plan


def _swap_halves(tensor):
    import torch

    first, second = tensor.chunk(2, dim=0)
    return torch.cat([second, first], dim=0)


def transformer_to_original(state: dict, family: str, prefix: str = DIT_PREFIX) -> dict:
    """A diffusers SD3Transformer2DModel / FluxTransformer2DModel state dict under original keys."""
    import torch

    out = {}
    for original, (members, swap) in transformer_plan(family, state).items():
        value = torch.cat([state[k] for k in members]) if len(members) > 1 else state[members[0]]
        out[prefix + original] = _swap_halves(value) if swap else value
    return out


def transformer_from_original(read, expected: dict, family: str) -> dict:
    """The diffusers state dict of a transformer whose expected tensors (key -> tensor or shape-bearing meta tensor)
    are given, from `read(original_key)` (the file's tensor without prefix; KeyError when absent)."""
    out = {}
    for original, (members, swap) in transformer_plan(family, expected).items():
        value = read(original)
        if swap:
            value = _swap_halves(value)
        sizes = [expected[k].shape[0] for k in members]
        if value.shape[0] != sum(sizes) or any(tuple(value.shape[1:]) != tuple(expected[k].shape[1:]) for k in members):
            want = [sum(sizes), *expected[members[0]].shape[1:]]
            raise ValueError(f"{original!r} is {list(value.shape)} in the file, {want} expected")
        for key, piece in zip(members, value.split(sizes) if len(members) > 1 else [value]):
            out[key] = piece
    return out


def text_encoder_to_original(encoder, prefix: str) -> dict:
    """A CLIP text model (its projection too, when it has one) or a T5 encoder under `prefix`, Hugging Face names."""
    from dcustom.single_file.text import hf_clip_to_ldm

    state = encoder.state_dict()
    if type(encoder).__name__.startswith("T5"):  # embed_tokens is shared.weight again (tied)
        return {prefix + k: v for k, v in state.items() if k != "encoder.embed_tokens.weight"}
    out = hf_clip_to_ldm(encoder, prefix)
    if "text_projection.weight" in state:
        out[prefix + "text_projection.weight"] = state["text_projection.weight"]
    return out


def dit_single_file_state(pipe, family: str) -> dict:
    """An SD3/FLUX pipeline as one all-in-one original-layout state dict (tensors shared with the pipeline)."""
    import torch

    from dcustom.single_file.ldm import vae_to_ldm

    if family == "sd3":
        projection = pipe.text_encoder.state_dict().get("text_projection.weight")
        if projection is not None and not torch.equal(projection, torch.eye(*projection.shape, dtype=projection.dtype,
                                                                                  device=projection.device)):
            raise DcustomError("this SD3 pipeline's CLIP-L has a text projection, which SD3's original layout does not "
                               "apply (it pools CLIP-L unprojected, and diffusers reads it back as identity): save it as "
                               "a diffusers folder with pipe.save_pretrained instead.")
    state = transformer_to_original(pipe.transformer.state_dict(), family)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    for attribute, name in TEXT_ENCODERS[family].items():
        state.update(text_encoder_to_original(getattr(pipe, attribute), TEXT_PREFIXES[name]))
    return state
