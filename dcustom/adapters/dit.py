"""LoRA files of MM-DiT transformers (SD3/3.5, FLUX.1) in the layout kohya sd-scripts and ComfyUI exchange.

That layout names each module as the ORIGINAL checkpoint does (`lora_unet_` + its dotted name with `_`):
FLUX (BFL) `double_blocks.N.img_attn.qkv`, `single_blocks.N.linear1`, ...; SD3 (MMDiT) `joint_blocks.N.x_block.
attn.qkv`, ... Those checkpoints keep q, k and v in one Linear (`qkv`; FLUX's single blocks also the MLP's input,
`linear1` = [q; k; v; mlp]), where diffusers has one Linear each. A LoRA on the separate layers is exactly one LoRA
on the fused layer:

    [ΔW_q; ΔW_k; ΔW_v] = blockdiag(s_q·B_q, s_k·B_k, s_v·B_v) @ [A_q; A_k; A_v]

(rank = the sum of the ranks; a part without a LoRA is a block of zero rows). With one scale s for every part the
file keeps the true alpha (alpha = s · rank); otherwise the scales are folded into the up weights (alpha = rank).
Back from a fused module, part i is rows_i of up against the down rows its columns use (all of them for a dense
up, as kohya trains it; its own block for ours), so both directions are exact.
"""

from __future__ import annotations

import re

from dcustom.errors import DcustomError

KOHYA_PREFIX = "lora_unet_"
# (diffusers module under `transformer.`, original module, part of the fused module or None), {n} = block index.
_QKV = ("q", "k", "v")
FLUX_NAMES = [
    *[(f"transformer_blocks.{{n}}.attn.to_{p}", "double_blocks.{n}.img_attn.qkv", p) for p in _QKV],
    *[(f"transformer_blocks.{{n}}.attn.add_{p}_proj", "double_blocks.{n}.txt_attn.qkv", p) for p in _QKV],
    *[(f"single_transformer_blocks.{{n}}.attn.to_{p}", "single_blocks.{n}.linear1", p) for p in _QKV],
    ("single_transformer_blocks.{n}.proj_mlp", "single_blocks.{n}.linear1", "mlp"),
    ("transformer_blocks.{n}.attn.to_out.0", "double_blocks.{n}.img_attn.proj", None),
    ("transformer_blocks.{n}.attn.to_add_out", "double_blocks.{n}.txt_attn.proj", None),
    ("transformer_blocks.{n}.ff.net.0.proj", "double_blocks.{n}.img_mlp.0", None),
    ("transformer_blocks.{n}.ff.net.2", "double_blocks.{n}.img_mlp.2", None),
    ("transformer_blocks.{n}.ff_context.net.0.proj", "double_blocks.{n}.txt_mlp.0", None),
    ("transformer_blocks.{n}.ff_context.net.2", "double_blocks.{n}.txt_mlp.2", None),
    ("transformer_blocks.{n}.norm1.linear", "double_blocks.{n}.img_mod.lin", None),
    ("transformer_blocks.{n}.norm1_context.linear", "double_blocks.{n}.txt_mod.lin", None),
    ("single_transformer_blocks.{n}.proj_out", "single_blocks.{n}.linear2", None),
    ("single_transformer_blocks.{n}.norm.linear", "single_blocks.{n}.modulation.lin", None),
    ("x_embedder", "img_in", None),
    ("context_embedder", "txt_in", None),
    ("time_text_embed.timestep_embedder.linear_1", "time_in.in_layer", None),
    ("time_text_embed.timestep_embedder.linear_2", "time_in.out_layer", None),
    ("time_text_embed.text_embedder.linear_1", "vector_in.in_layer", None),
    ("time_text_embed.text_embedder.linear_2", "vector_in.out_layer", None),
    ("time_text_embed.guidance_embedder.linear_1", "guidance_in.in_layer", None),
    ("time_text_embed.guidance_embedder.linear_2", "guidance_in.out_layer", None),
    ("proj_out", "final_layer.linear", None),
]
SD3_NAMES = [
    *[(f"transformer_blocks.{{n}}.attn.to_{p}", "joint_blocks.{n}.x_block.attn.qkv", p) for p in _QKV],
    *[(f"transformer_blocks.{{n}}.attn.add_{p}_proj", "joint_blocks.{n}.context_block.attn.qkv", p) for p in _QKV],
    *[(f"transformer_blocks.{{n}}.attn2.to_{p}", "joint_blocks.{n}.x_block.attn2.qkv", p) for p in _QKV],
    ("transformer_blocks.{n}.attn.to_out.0", "joint_blocks.{n}.x_block.attn.proj", None),
    ("transformer_blocks.{n}.attn.to_add_out", "joint_blocks.{n}.context_block.attn.proj", None),
    ("transformer_blocks.{n}.attn2.to_out.0", "joint_blocks.{n}.x_block.attn2.proj", None),
    ("transformer_blocks.{n}.ff.net.0.proj", "joint_blocks.{n}.x_block.mlp.fc1", None),
    ("transformer_blocks.{n}.ff.net.2", "joint_blocks.{n}.x_block.mlp.fc2", None),
    ("transformer_blocks.{n}.ff_context.net.0.proj", "joint_blocks.{n}.context_block.mlp.fc1", None),
    ("transformer_blocks.{n}.ff_context.net.2", "joint_blocks.{n}.context_block.mlp.fc2", None),
    ("transformer_blocks.{n}.norm1.linear", "joint_blocks.{n}.x_block.adaLN_modulation.1", None),
    ("context_embedder", "context_embedder", None),
    ("time_text_embed.timestep_embedder.linear_1", "t_embedder.mlp.0", None),
    ("time_text_embed.timestep_embedder.linear_2", "t_embedder.mlp.2", None),
    ("time_text_embed.text_embedder.linear_1", "y_embedder.mlp.0", None),
    ("time_text_embed.text_embedder.linear_2", "y_embedder.mlp.2", None),
    ("proj_out", "final_layer.linear", None),
]
NAMES = {"flux": FLUX_NAMES, "sd3": SD3_NAMES}
# Row blocks of a fused module, in order; FLUX's single-block MLP is 4x the attention width (mlp_ratio 4).
FUSED_PARTS = {"qkv": (("q", 1), ("k", 1), ("v", 1)), "linear1": (("q", 1), ("k", 1), ("v", 1), ("mlp", 4))}


def _pattern(template: str) -> re.Pattern:
    return re.compile(re.escape(template).replace(re.escape("{n}"), r"(\d+)") + "$")


def _to_original(family: str, module: str) -> tuple[str, str | None]:
    """diffusers module (under transformer.) -> (original module, fused part or None); one sentence if unmapped."""
    for theirs, original, part in NAMES[family]:
        m = _pattern(theirs).match(module)
        if m:
            return original.format(n=m.group(1)) if m.groups() else original, part
    raise DcustomError(f"LoRA module transformer.{module} has no place in the {family} checkpoint layout (its original "
                       "module swaps scale and shift); write the diffusers file only (write_kohya: false).")


def _from_kohya(family: str, name: str) -> tuple[str, list]:
    """kohya module name -> (original module, [(diffusers module, part)]) of every diffusers layer it holds."""
    for theirs, original, part in NAMES[family]:
        m = _pattern(KOHYA_PREFIX + original.replace(".", "_")).match(name)
        if m:
            n = m.group(1) if m.groups() else None
            group = [(t.format(n=n), p) for t, o, p in NAMES[family] if o == original] if part else [(theirs.format(n=n), None)]
            return original.format(n=n), group
    raise DcustomError(f"kohya module {name!r} is not a {family} transformer module; accepted: lora_unet_ + the original "
                       f"checkpoint's module names (e.g. {KOHYA_PREFIX}{NAMES[family][0][1].format(n=0).replace('.', '_')}).")


def family_from_keys(keys) -> str | None:
    """'flux', 'sd3' or None from a LoRA file's key names (for files without dcustom metadata)."""
    keys = list(keys)
    if any(k.startswith(("lora_unet_double_blocks_", "lora_unet_single_blocks_")) or "single_transformer_blocks." in k
           for k in keys):
        return "flux"
    if any(k.startswith("lora_unet_joint_blocks_") for k in keys):
        return "sd3"
    return None


def factors_to_kohya(factors: dict, family: str) -> dict:
    """{diffusers module: (A [r, in], B [out, r], scale)} -> kohya tensors (down, up, alpha per original module)."""
    import torch

    groups: dict[str, dict] = {}
    for module, (A, B, scale) in factors.items():
        original, part = _to_original(family, module)
        groups.setdefault(original, {})[part] = (A.float(), B.float(), float(scale))
    out = {}
    for original, parts in groups.items():
        name = KOHYA_PREFIX + original.replace(".", "_")
        if None in parts:  # a plain rename
            A, B, scale = parts[None]
            out.update({f"{name}.lora_down.weight": A, f"{name}.lora_up.weight": B,
                        f"{name}.alpha": torch.tensor(scale * A.shape[0])})
            continue
        layout = FUSED_PARTS["linear1" if original.endswith("linear1") else "qkv"]
        width = _attention_width(parts, layout)
        scales = {s for _, _, s in parts.values()}
        same = len(scales) == 1
        downs, ups, col = [], [], 0
        rank = sum(A.shape[0] for A, _, _ in parts.values())
        for part, factor in layout:
            rows = width * factor
            up = torch.zeros(rows, rank)
            if part in parts:
                A, B, scale = parts[part]
                if B.shape[0] != rows:
                    raise DcustomError(f"LoRA module for {original} part {part}: {B.shape[0]} output rows where the fused "
                                       f"layout expects {rows}; accepted: the {family} transformer's own widths.")
                up[:, col:col + A.shape[0]] = B if same else B * scale
                downs.append(A)
                col += A.shape[0]
            ups.append(up)
        alpha = (next(iter(scales)) if same else 1.0) * rank
        out.update({f"{name}.lora_down.weight": torch.cat(downs), f"{name}.lora_up.weight": torch.cat(ups),
                    f"{name}.alpha": torch.tensor(float(alpha))})
    return out


def _attention_width(parts: dict, layout) -> int:
    factor = dict(layout)
    part, (_, B, _) = next(iter(parts.items()))
    return B.shape[0] // factor[part]


def kohya_to_factors(tensors: dict, family: str) -> dict:
    """kohya tensors -> {diffusers module: (A, B, scale)}; fused modules split exactly (see the module doc)."""
    names = sorted({k.rsplit(".", 2)[0] for k in tensors if k.endswith((".lora_down.weight", ".lora_up.weight"))})
    unknown = [k for k in tensors if not k.endswith((".lora_down.weight", ".lora_up.weight", ".alpha"))]
    if unknown:
        raise DcustomError(f"kohya key {unknown[0]!r} is not a LoRA down/up weight or alpha; accepted: LoRA files "
                           "(DoRA and LoCon keys have no diffusers form for SD3/FLUX here).")
    out = {}
    for name in names:
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        rank = down.shape[0]
        scale = float(tensors[f"{name}.alpha"]) / rank if f"{name}.alpha" in tensors else 1.0
        original, group = _from_kohya(family, name)
        if group[0][1] is None:
            out[group[0][0]] = (down, up, scale)
            continue
        layout = FUSED_PARTS["linear1" if original.endswith("linear1") else "qkv"]
        width = up.shape[0] // sum(f for _, f in layout)
        modules = dict((p, m) for m, p in group)
        row = 0
        for part, factor in layout:
            block = up[row:row + width * factor]
            row += width * factor
            cols = block.abs().sum(dim=0).nonzero().flatten()
            if cols.numel() == 0:
                continue  # no LoRA on this part
            out[modules[part]] = (down[cols], block[:, cols], scale)
    return out


def _peft_factors(model, adapter_name: str) -> dict:
    """{module: (A, B, scale)} of a model's peft LoRA layers."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and adapter_name in layer.lora_A:
            out[name] = (layer.lora_A[adapter_name].weight.detach(), layer.lora_B[adapter_name].weight.detach(),
                         layer.scaling[adapter_name])
    return out


def save_dit_kohya_lora(folder, pipe, family: str, meta: dict, adapter_name: str = "default", name: str = None):
    """The transformer's LoRA as lora_kohya.safetensors in the original checkpoint's layout (q/k/v fused)."""
    from pathlib import Path

    from dcustom.adapters.files import KOHYA_LORA_NAME, save_tensors

    tensors = factors_to_kohya(_peft_factors(pipe.transformer, adapter_name), family)
    return save_tensors(tensors, Path(folder) / (name or KOHYA_LORA_NAME), {**meta, "dcustom.format": "kohya", "format": "pt"})


def diffusers_factors(tensors: dict, meta: dict) -> dict:
    """{module: (A, B, scale)} of a diffusers SD3/FLUX LoRA file (peft keys under `transformer.`), alpha from its
    lora_adapter_metadata (rank_pattern/alpha_pattern honoured as peft does), else scale 1."""
    import json

    config = json.loads(meta.get("lora_adapter_metadata", "{}"))
    prefix = "transformer."
    alpha = config.get(f"{prefix}lora_alpha")
    alphas, ranks = config.get(f"{prefix}alpha_pattern") or {}, config.get(f"{prefix}rank_pattern") or {}
    out = {}
    for key, A in tensors.items():
        if not key.endswith(".lora_A.weight"):
            if not key.endswith(".lora_B.weight"):
                raise DcustomError(f"key {key!r} is not a LoRA A/B weight of the transformer; accepted: SD3/FLUX LoRA "
                                   "files (DoRA magnitudes have no place in the fused kohya layout).")
            continue
        module = key[len(prefix):-len(".lora_A.weight")]
        B = tensors[f"{prefix}{module}.lora_B.weight"]
        a = next((v for p, v in alphas.items() if re.fullmatch(rf"(.*\.)?{p}", module)), alpha)
        r = next((v for p, v in ranks.items() if re.fullmatch(rf"(.*\.)?{p}", module)), A.shape[0])
        out[module] = (A, B, (a / r) if a is not None else 1.0)
    return out


def dit_diffusers_to_kohya(src, dst, family: str):
    from safetensors.torch import load_file

    from dcustom.adapters.files import read_metadata, save_tensors

    meta = read_metadata(src)
    tensors = factors_to_kohya(diffusers_factors(load_file(str(src)), meta), family)
    keep = {k: v for k, v in meta.items() if k.startswith("dcustom.")}
    return save_tensors(tensors, dst, {**keep, "dcustom.family": family, "dcustom.format": "kohya", "format": "pt"})


def dit_kohya_to_diffusers(src, dst, family: str):
    """kohya/ComfyUI SD3/FLUX LoRA -> the diffusers file (scales folded into B, so alpha = rank everywhere)."""
    import tempfile
    from pathlib import Path

    from diffusers import FluxPipeline, StableDiffusion3Pipeline
    from safetensors.torch import load_file

    from dcustom.adapters.files import DIFFUSERS_LORA_NAME, read_metadata, save_tensors

    meta = read_metadata(src)
    state = {}
    for module, (A, B, scale) in kohya_to_factors(load_file(str(src)), family).items():
        state[f"{module}.lora_A.weight"] = A.contiguous()
        state[f"{module}.lora_B.weight"] = (B * scale).contiguous()
    cls = FluxPipeline if family == "flux" else StableDiffusion3Pipeline
    with tempfile.TemporaryDirectory() as tmp:
        cls.save_lora_weights(tmp, transformer_lora_layers=state)
        written = Path(tmp) / DIFFUSERS_LORA_NAME
        tensors, theirs = load_file(str(written)), read_metadata(written)
    keep = {k: v for k, v in meta.items() if k.startswith("dcustom.")}
    return save_tensors(tensors, dst, {**theirs, **keep, "dcustom.family": family, "dcustom.format": "diffusers"})
