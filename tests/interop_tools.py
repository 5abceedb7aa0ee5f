"""What other tools compute from our adapter files: their key mapping and merge formulas, re-implemented for tests.

Written from reading each tool's loader (via the project's code search; nothing copied):
  ComfyUI   comfy/lora.py: model_lora_keys_unet / model_lora_keys_clip (which file key names which model weight),
            load_lora (alpha, dora_scale, then the first adapter whose keys are present; `.diff` keys) and
            calculate_weight ("diff": W + strength * diff); comfy/weight_adapter/lora.py (LoRAAdapter.load's key
            forms, calculate_weight: scale = alpha / rank) and base.py weight_decompose (DoRA: an output-axis
            dora_scale is divided by the ORIGINAL weight's row norm + eps; an input-axis one by the updated weight's
            column norm). Forge copies this loader.
  A1111     extensions-builtin/Lora: networks.py (convert_diffusers_name_to_compvis, assign_network_names_to_compvis_modules,
            load_network's fallbacks, network_apply_weights incl. MultiheadAttention q/k/v/out), network.py
            (calc_scale = alpha / dim, finalize_updown, apply_weight_decompose: input axis only), network_lora.py,
            network_full.py.
  InvokeAI  model_manager/configs/lora.py + util/model_util.py lora_token_vector_length (the probe),
            patches/lora_conversions/sd_lora_conversion_utils.py (group by the key's first component),
            patches/layers/utils.py any_lora_layer_from_state_dict, lora_layer_base.py (scale), dora_layer.py,
            full_layer.py, layer_patcher.py _get_submodule (flattened keys walked greedily), and
            sdxl_lora_conversion_utils.py (Stability-named SDXL keys are converted, diffusers-named ones kept).
Each function returns the weights the tool would compute, named in that tool's model, so a test compares them
with the weights peft computes (our merged weights), translated into the same names.
"""

from __future__ import annotations

import copy
import re

import torch

# ------------------------------------------------------------------------------------------------------------------
# Our side: pipelines with adapters, the merged reference, our files
# ------------------------------------------------------------------------------------------------------------------
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
UNET_RANK, UNET_ALPHA, TE_RANK, TE_ALPHA = 4, 3.0, 2, 5.0  # alpha != rank everywhere: a tool that ignores it fails


def text_encoder_names(pipe) -> list[str]:
    return [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None) is not None]


def adapted_pipeline(kind: str, method: str, seed: int = 0, text_encoders: bool = True, pipe_factory=None):
    """(base pipeline, the same pipeline with a random non-zero `method` adapter named "default").

    method: lora (UNet + text encoders), dora (UNet DoRA + text-encoder LoRA), oft, boft (UNet)."""
    from peft import BOFTConfig, LoraConfig, OFTConfig

    from dcustom.adapters.boft_kernel import ensure_boft_kernel
    from dcustom.tiny import build_tiny_pipeline

    build = pipe_factory or (lambda: build_tiny_pipeline(kind, seed=seed))
    base = build()
    pipe = copy.deepcopy(base)
    g = torch.Generator().manual_seed(seed + 17)
    if method in ("lora", "dora"):
        pipe.unet.add_adapter(LoraConfig(r=UNET_RANK, lora_alpha=UNET_ALPHA, target_modules=UNET_TARGETS,
                                         init_lora_weights="gaussian", use_dora=method == "dora"))
        if text_encoders:
            for name in text_encoder_names(pipe):
                getattr(pipe, name).add_adapter(LoraConfig(r=TE_RANK, lora_alpha=TE_ALPHA, target_modules=TE_TARGETS,
                                                           init_lora_weights="gaussian"))
    elif method == "oft":
        pipe.unet.add_adapter(OFTConfig(r=0, oft_block_size=8, target_modules=UNET_TARGETS))
    elif method == "boft":
        ensure_boft_kernel()
        pipe.unet.add_adapter(BOFTConfig(boft_block_size=4, boft_n_butterfly_factor=2, target_modules=UNET_TARGETS))
    else:
        raise ValueError(method)
    with torch.no_grad():
        for component in ["unet", *text_encoder_names(pipe)]:
            for name, param in getattr(pipe, component).named_parameters():
                if "lora_B" in name:
                    param.copy_(0.2 * torch.randn(param.shape, generator=g))
                elif "lora_magnitude_vector" in name:
                    param.mul_(1 + 0.2 * torch.randn(param.shape, generator=g))
                elif "oft_R" in name or "boft_R" in name:
                    param.copy_(0.05 * torch.randn(param.shape, generator=g))
    return base, pipe


def probe_shaped_pipeline(kind: str):
    """A tiny pipeline with the real token widths InvokeAI's probe reads (SD1: 768; SDXL: 768 + 1280 text encoders,
    2048 cross-attention), for probe tests only (never run)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from dcustom.tiny import build_tiny_pipeline

    pipe = build_tiny_pipeline(kind)

    def encoder(width, projection=False):
        vocab = pipe.text_encoder.config.vocab_size
        config = CLIPTextConfig(hidden_size=width, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1,
                                vocab_size=vocab, bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1,
                                projection_dim=width)
        return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)

    unet_config = dict(pipe.unet.config)
    if kind == "sdxl":
        pipe.text_encoder, pipe.text_encoder_2 = encoder(768), encoder(1280, projection=True)
        unet_config.update(cross_attention_dim=2048, projection_class_embeddings_input_dim=6 * 8 + 1280)
    else:
        pipe.text_encoder = encoder(768)
        unet_config.update(cross_attention_dim=768)
    pipe.unet = UNet2DConditionModel.from_config(unet_config)
    return pipe


def merged_weights(pipe, adapter_name: str = "default") -> dict:
    """{component: {module: merged weight}} as peft computes it (the reference every tool must reproduce)."""
    from dcustom.adapters.files import merged_linear_weights

    out = {}
    for component in ["unet", *text_encoder_names(pipe)]:
        model = getattr(pipe, component)
        if adapter_name in (getattr(model, "peft_config", None) or {}):
            out[component] = {m: w for m, (_, w) in merged_linear_weights(model, adapter_name).items()}
    return out


def merged_pipeline(base, merged: dict):
    """A copy of the plain base pipeline whose adapted weights are replaced by the merged ones."""
    pipe = copy.deepcopy(base)
    for component, modules in merged.items():
        model = getattr(pipe, component)
        state = model.state_dict()
        for module, weight in modules.items():
            state[f"{module}.weight"] = weight
        model.load_state_dict(state)
    return pipe


def max_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| over max |b| (0 when both vanish)."""
    den = b.abs().max().item()
    return (a.float() - b.float()).abs().max().item() / den if den else (a - b).abs().max().item()


# ------------------------------------------------------------------------------------------------------------------
# Names in the original (LDM) layout, shared by ComfyUI and A1111
# ------------------------------------------------------------------------------------------------------------------
def diffusers_unet_to_ldm(unet) -> dict:
    """diffusers UNet key -> key under `model.diffusion_model.` (our converter, read back by diffusers' from_single_file)."""
    from dcustom.single_file import unet_to_ldm

    keys = {k: k for k in unet.state_dict()}
    return {v: k[len("model.diffusion_model."):] for k, v in unet_to_ldm(keys, unet.config).items()}


def hf_clip_state(encoder) -> dict:
    """A CLIP text encoder's weights named as in transformers 4 / the original HF layout (`text_model.` level)."""
    state = encoder.state_dict()
    return {k if k.startswith("text_model.") or k.startswith("text_projection") else f"text_model.{k}": v
            for k, v in state.items()}


# ------------------------------------------------------------------------------------------------------------------
# ComfyUI
# ------------------------------------------------------------------------------------------------------------------
COMFY_CLIP_MAP = {"mlp.fc1": "mlp_fc1", "mlp.fc2": "mlp_fc2", "self_attn.k_proj": "self_attn_k_proj",
                  "self_attn.q_proj": "self_attn_q_proj", "self_attn.v_proj": "self_attn_v_proj",
                  "self_attn.out_proj": "self_attn_out_proj"}
# LoRAAdapter.load: (up key, down key) suffix pairs in the order it tries them
COMFY_LORA_FORMS = [(".lora_up.weight", ".lora_down.weight"), ("_lora.up.weight", "_lora.down.weight"),
                    (".lora_B.weight", ".lora_A.weight"), (".lora.up.weight", ".lora.down.weight"),
                    (".lora_B", ".lora_A"), (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
                    (".lora_B.default.weight", ".lora_A.default.weight")]


def comfy_model(pipe) -> dict:
    """The weights ComfyUI's model holds for this pipeline, under ComfyUI's own keys."""
    from dcustom.single_file import unet_to_ldm

    state = {"diffusion_model." + k[len("model.diffusion_model."):]: v
             for k, v in unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config).items()}
    encoders = text_encoder_names(pipe)
    names = ["clip_l"] if len(encoders) == 1 else ["clip_l", "clip_g"]  # SD1: clip_l; SDXL: clip_l + clip_g
    for name, component in zip(names, encoders):
        state.update({f"{name}.transformer.{k}": v for k, v in hf_clip_state(getattr(pipe, component)).items()})
    return state


def comfy_key_map(pipe) -> dict:
    """file key stem -> ComfyUI model key, for the key forms model_lora_keys_unet / model_lora_keys_clip accept."""
    model_keys = list(comfy_model(pipe))
    key_map = {}
    for k in model_keys:
        if k.startswith("diffusion_model."):
            if k.endswith(".weight"):
                key_map["lora_unet_" + k[len("diffusion_model."):-len(".weight")].replace(".", "_")] = k
                key_map[k[:-len(".weight")]] = k
            else:
                key_map[k] = k
    for dkey, lkey in diffusers_unet_to_ldm(pipe.unet).items():
        if not dkey.endswith(".weight"):
            continue
        target, stem = "diffusion_model." + lkey, dkey[:-len(".weight")]
        key_map["lora_unet_" + stem.replace(".", "_")] = target
        key_map["lycoris_" + stem.replace(".", "_")] = target
        for prefix in ("", "unet."):  # diffusers' old attention-processor LoRA form only
            old = prefix + stem.replace(".to_", ".processor.to_")
            key_map[old[:-2] if old.endswith(".to_out.0") else old] = target
    for k in model_keys:
        if not k.startswith("diffusion_model.") and k.endswith(".weight"):
            key_map["text_encoders." + k[:-len(".weight")]] = k
    clip_l = any(k.startswith("clip_l.") for k in model_keys)
    for b in range(32):
        for module, short in COMFY_CLIP_MAP.items():
            for clip in ("clip_l", "clip_g"):
                k = f"{clip}.transformer.text_model.encoder.layers.{b}.{module}.weight"
                if k not in model_keys:
                    continue
                if clip == "clip_l":
                    for name in (f"lora_te_text_model_encoder_layers_{b}_{short}", f"lora_te1_text_model_encoder_layers_{b}_{short}",
                                 f"text_encoder.text_model.encoder.layers.{b}.{module}"):
                        key_map[name] = k
                elif clip_l:
                    key_map[f"lora_te2_text_model_encoder_layers_{b}_{short}"] = k
                    key_map[f"text_encoder_2.text_model.encoder.layers.{b}.{module}"] = k
                else:
                    key_map[f"lora_te_text_model_encoder_layers_{b}_{short}"] = k
                    key_map[f"text_encoder.text_model.encoder.layers.{b}.{module}"] = k
    return key_map


def comfy_load(lora: dict, key_map: dict) -> tuple[dict, set]:
    """ComfyUI's load_lora: ({model key: patch}, file keys it did not load)."""
    patches, loaded = {}, set()
    for x, target in key_map.items():
        alpha = dora = None
        if f"{x}.alpha" in lora:
            alpha = lora[f"{x}.alpha"].item()
            loaded.add(f"{x}.alpha")
        if f"{x}.dora_scale" in lora:
            dora = lora[f"{x}.dora_scale"]
            loaded.add(f"{x}.dora_scale")
        for up, down in COMFY_LORA_FORMS:
            if x + up in lora:
                patches[target] = ("lora", lora[x + up], lora[x + down], alpha, dora)
                loaded.update({x + up, x + down})
                break
        if f"{x}.oft_blocks" in lora and lora[f"{x}.oft_blocks"].ndim == 3:
            patches[target] = ("oft", lora[f"{x}.oft_blocks"], alpha, dora)
            loaded.add(f"{x}.oft_blocks")
        if f"{x}.diff" in lora:
            patches[target] = ("diff", lora[f"{x}.diff"])
            loaded.add(f"{x}.diff")
    return patches, set(lora) - loaded


def comfy_weight_decompose(dora_scale, weight, diff, alpha, strength):
    calc = weight + alpha * diff
    if dora_scale.shape[0] == calc.shape[0]:  # output axis: the ORIGINAL weight's row norm
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True).reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:  # input axis: the updated weight's column norm
        norm = calc.transpose(0, 1).reshape(calc.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(calc.shape[1], *[1] * (calc.dim() - 1)).transpose(0, 1)
    calc = calc * (dora_scale.float() / (norm + torch.finfo(weight.dtype).eps))
    return calc if strength == 1.0 else weight + strength * (calc - weight)


def comfy_calculate(weight, patch, strength: float = 1.0):
    """The patched weight ComfyUI computes (float32 working copy, as its model patcher does)."""
    w = weight.detach().float().clone()
    if patch[0] == "lora":
        _, up, down, alpha, dora = patch
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.float().flatten(1) @ down.float().flatten(1)).reshape(w.shape)
        if dora is not None:
            return comfy_weight_decompose(dora, w, diff, scale, strength)
        return w + strength * scale * diff
    if patch[0] == "diff":
        return w + strength * patch[1].float() if patch[1].shape == w.shape else w
    raise NotImplementedError(patch[0])


def comfy_apply(pipe, lora: dict) -> tuple[dict, set, dict]:
    """(patched weights {model key: weight}, unloaded file keys, {model key: patch}) for a file on `pipe`."""
    model = comfy_model(pipe)
    patches, unloaded = comfy_load(lora, comfy_key_map(pipe))
    return {k: comfy_calculate(model[k], p) for k, p in patches.items()}, unloaded, patches


def comfy_reference(pipe, merged: dict) -> dict:
    """Our merged weights under ComfyUI's model keys."""
    to_ldm = diffusers_unet_to_ldm(pipe.unet)
    clip = ["clip_l"] if len(text_encoder_names(pipe)) == 1 else ["clip_l", "clip_g"]
    out = {}
    for component, modules in merged.items():
        for module, weight in modules.items():
            if component == "unet":
                out["diffusion_model." + to_ldm[f"{module}.weight"]] = weight
            else:
                name = clip[text_encoder_names(pipe).index(component)]
                path = module if module.startswith("text_model.") else f"text_model.{module}"
                out[f"{name}.transformer.{path}.weight"] = weight
    return out


# ------------------------------------------------------------------------------------------------------------------
# A1111
# ------------------------------------------------------------------------------------------------------------------
A1111_RESNET = {"conv1": "in_layers_2", "conv2": "out_layers_3", "norm1": "in_layers_0", "norm2": "out_layers_0",
                "time_emb_proj": "emb_layers_1", "conv_shortcut": "skip_connection"}


def a1111_compvis_name(key: str, is_sd2: bool) -> str:
    """convert_diffusers_name_to_compvis: kohya (diffusers-named) module -> A1111's layer name."""
    m = re.match(r"lora_unet_conv_in(.*)", key)
    if m:
        return f"diffusion_model_input_blocks_0_0{m[1]}"
    m = re.match(r"lora_unet_conv_out(.*)", key)
    if m:
        return f"diffusion_model_out_2{m[1]}"
    m = re.match(r"lora_unet_time_embedding_linear_(\d+)(.*)", key)
    if m:
        return f"diffusion_model_time_embed_{int(m[1]) * 2 - 2}{m[2]}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_input_blocks_{1 + i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_middle_block_{1 if kind == 'attentions' else j * 2}_{rest}"
    m = re.match(r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)", key)
    if m:
        i, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        rest = A1111_RESNET.get(rest, rest) if kind == "resnets" else rest
        return f"diffusion_model_output_blocks_{i * 3 + j}_{1 if kind == 'attentions' else 0}_{rest}"
    m = re.match(r"lora_unet_down_blocks_(\d+)_downsamplers_0_conv", key)
    if m:
        return f"diffusion_model_input_blocks_{3 + int(m[1]) * 3}_0_op"
    m = re.match(r"lora_unet_up_blocks_(\d+)_upsamplers_0_conv", key)
    if m:
        i = int(m[1])
        return f"diffusion_model_output_blocks_{2 + i * 3}_{2 if i > 0 else 1}_conv"
    m = re.match(r"lora_te_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        if is_sd2:
            rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
            return f"model_transformer_resblocks_{m[1]}_{rest}"
        return f"transformer_text_model_encoder_layers_{m[1]}_{m[2]}"
    m = re.match(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", key)
    if m:
        rest = m[2].replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        return f"1_model_transformer_resblocks_{m[1]}_{rest}"
    return key


def a1111_layers(ldm_state: dict, family: str) -> dict:
    """network_layer_mapping: A1111 layer name -> (module path in the checkpoint, kind: linear | mha)."""
    layers = {}
    for key in ldm_state:
        if key.endswith(".in_proj_weight"):
            module, kind = key[: -len(".in_proj_weight")], "mha"
        elif key.endswith(".weight"):
            module, kind = key[: -len(".weight")], "linear"
        else:
            continue
        if module.startswith("model."):
            name = module[len("model."):]
        elif family == "sdxl" and module.startswith("conditioner.embedders."):
            i, _, rest = module[len("conditioner.embedders."):].partition(".")
            name = f"{i}_{rest}"
        elif module.startswith("cond_stage_model."):
            name = module[len("cond_stage_model."):]
        else:
            continue
        layers[name.replace(".", "_")] = (module, kind)
    return layers


def a1111_load(lora: dict, layers: dict, is_sd2: bool = False) -> tuple[dict, dict]:
    """load_network: ({layer key: {part: tensor}}, {file key: name tried} for keys that matched no layer)."""
    matched, failed = {}, {}
    for key_network, weight in lora.items():
        stem, _, part = key_network.partition(".")
        key = a1111_compvis_name(stem, is_sd2)
        found = key in layers
        if not found:
            m = re.match(r"(.*)_([qkv]_proj)$", key)
            found = bool(m) and m[1] in layers
        if not found and "lora_unet" in stem:
            key = stem.replace("lora_unet", "diffusion_model")
            found = key in layers
        elif not found and "lora_te1_text_model" in stem:
            key = stem.replace("lora_te1_text_model", "0_transformer_text_model")
            found = key in layers
            if not found:
                key = stem.replace("lora_te1_text_model", "transformer_text_model")
                found = key in layers
        if not found:
            failed[key_network] = key
            continue
        matched.setdefault(key, {})[part] = weight
    for key, parts in matched.items():
        if not ({"lora_up.weight", "lora_down.weight"} <= set(parts) or {"lora_A.weight", "lora_B.weight"} <= set(parts)
                or "diff" in parts):
            raise AssertionError(f"A1111: no module type accepts the keys of {key}: {sorted(parts)}")
    return matched, failed


def a1111_updown(parts: dict, weight: torch.Tensor, multiplier: float = 1.0) -> torch.Tensor:
    """calc_updown + finalize_updown of one LoRA / full module."""
    weight = weight.float()
    if "diff" in parts:
        updown, scale = parts["diff"].float(), 1.0
    else:
        up = parts.get("lora_up.weight", parts.get("lora_B.weight")).float()
        down = parts.get("lora_down.weight", parts.get("lora_A.weight")).float()
        updown = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
        scale = parts["alpha"].item() / down.shape[0] if "alpha" in parts else 1.0
    if "dora_scale" in parts:  # apply_weight_decompose: the column norm of the updated weight, always
        merged = updown + weight
        norm = merged.transpose(0, 1).reshape(merged.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(merged.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
        updown = merged * (parts["dora_scale"].float() / norm) - weight
    return updown * scale * multiplier


def a1111_apply(ldm_state: dict, lora: dict, family: str) -> tuple[dict, dict]:
    """(patched checkpoint weights, unmatched file keys) as A1111 computes them for a file."""
    layers = a1111_layers(ldm_state, family)
    is_sd2 = any(name.startswith("model_transformer_resblocks") for name in layers)
    matched, failed = a1111_load(lora, layers, is_sd2)
    out = {}
    mha_children = {f"{name}_out_proj" for name, (_, kind) in layers.items() if kind == "mha"}
    for name, (module, kind) in layers.items():
        if kind == "linear" and name in matched and name not in mha_children:
            w = ldm_state[f"{module}.weight"]
            out[f"{module}.weight"] = w.float() + a1111_updown(matched[name], w)
        elif kind == "mha":
            parts = [matched.get(f"{name}_{p}") for p in ("q_proj", "k_proj", "v_proj", "out_proj")]
            if all(p is not None for p in parts):
                qkv = ldm_state[f"{module}.in_proj_weight"]
                chunks = qkv.chunk(3, 0)
                out[f"{module}.in_proj_weight"] = qkv.float() + torch.vstack(
                    [a1111_updown(p, c) for p, c in zip(parts[:3], chunks)])
                w = ldm_state[f"{module}.out_proj.weight"]
                out[f"{module}.out_proj.weight"] = w.float() + a1111_updown(parts[3], w)
    return out, failed


# ------------------------------------------------------------------------------------------------------------------
# InvokeAI
# ------------------------------------------------------------------------------------------------------------------
INVOKE_PREFIXES = {"lora_te_", "lora_unet_", "lora_te1_", "lora_te2_", "lora_transformer_"}
INVOKE_SUFFIXES = {"to_k_lora.up.weight", "to_q_lora.down.weight", "lora_A.weight", "lora_B.weight", "lokr_w1",
                   "lokr_w2", "hada_w1_a", "hada_w2_a"}
INVOKE_BASES = {768: "sd-1", 1024: "sd-2", 1280: "sdxl", 2048: "sdxl"}
STABILITY_SDXL_STEMS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_0", "out_2")


class NotRecognised(Exception):
    pass


def invoke_token_vector_length(lora: dict):
    """lora_token_vector_length: the first attn2 to_k/to_v or text-encoder self-attention key's input width."""

    def width(key, tensor):
        if "." not in key:
            return None
        stem, leaf = key.split(".", 1)
        if leaf in ("lora_down.weight", "hada_w1_b", "hada_w2_b", "diff"):
            return tensor.shape[1]
        return None

    length = te1 = te2 = None
    for key, tensor in lora.items():
        if key.startswith("lora_unet_") and ("_attn2_to_k." in key or "_attn2_to_v." in key):
            length = width(key, tensor)
        elif key.startswith("lora_te") and "_self_attn_" in key:
            w = width(key, tensor)
            if key.startswith("lora_te_"):
                length = w
            elif key.startswith("lora_te1_"):
                te1 = w
            elif key.startswith("lora_te2_"):
                te2 = w
        if te1 is not None and te2 is not None:
            length = te1 + te2
        if length is not None:
            break
    return length


def invoke_probe(lora: dict) -> str:
    """The LyCORIS single-file LoRA config's checks: looks like a LoRA, then the base from the token width."""
    keys = list(lora)
    if not any(k.startswith(tuple(INVOKE_PREFIXES)) for k in keys) and not any(k.endswith(tuple(INVOKE_SUFFIXES)) for k in keys):
        raise NotRecognised("model does not match LyCORIS LoRA heuristics")
    length = invoke_token_vector_length(lora)
    if length not in INVOKE_BASES:
        raise NotRecognised(f"unrecognized token vector length {length}")
    return INVOKE_BASES[length]


def invoke_layers(lora: dict) -> dict:
    """Group by the key's first component and pick each group's layer type as any_lora_layer_from_state_dict does."""
    groups = {}
    for key, value in lora.items():
        stem, leaf = key.split(".", 1)
        groups.setdefault(stem, {})[leaf] = value
    layers = {}
    for stem, values in groups.items():
        if "dora_scale" in values:
            layers[stem] = ("dora", values)
        elif "lora_up.weight" in values:
            layers[stem] = ("lora", values)
        elif "diff" in values:
            layers[stem] = ("full", values)
        else:
            raise NotRecognised(f"Unsupported lora format: {sorted(values)}")
    return layers


def invoke_walk(flat: str, names: set) -> str:
    """layer_patcher._get_submodule for a flattened key: extend the current name with `_` until it is a submodule."""
    parts = flat.split("_")
    current, name = "", parts.pop(0)
    while parts:
        candidate = f"{current}.{name}" if current else name
        if candidate in names:
            current, name = candidate, parts.pop(0)
        else:
            name += "_" + parts.pop(0)
    final = f"{current}.{name}" if current else name
    if final not in names:
        raise AttributeError(final)
    return final


def invoke_weight_delta(kind: str, values: dict, weight: torch.Tensor) -> torch.Tensor:
    weight = weight.float()
    alpha = values["alpha"].item() if "alpha" in values else None
    if kind == "full":
        return values["diff"].float()
    up, down = values["lora_up.weight"].float(), values["lora_down.weight"].float()
    scale = alpha / down.shape[0] if alpha is not None else 1.0
    delta = (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)).reshape(weight.shape)
    if kind == "lora":
        return delta * scale
    direction = weight + delta * scale  # DoRA: the norm is over the output dim unless the magnitude is out-dim
    if "dora_magnitude" in values:
        norm = direction.reshape(direction.shape[0], -1).norm(dim=1).reshape(direction.shape[0], *[1] * (weight.dim() - 1))
        magnitude = values["dora_magnitude"].float().reshape(direction.shape[0], *[1] * (weight.dim() - 1))
    else:
        norm = direction.transpose(0, 1).reshape(direction.shape[1], -1).norm(dim=1, keepdim=True)
        norm = norm.reshape(direction.shape[1], *[1] * (weight.dim() - 1)).transpose(0, 1)
        magnitude = values["dora_scale"].float()
    return direction * (magnitude / norm) - weight


def invoke_models(pipe, family: str) -> dict:
    """prefix -> (module names, weights by module) of the models InvokeAI patches (text encoders in the
    transformers 4 layout InvokeAI runs, with the `text_model.` level)."""
    out = {"lora_unet_": ({n for n, _ in pipe.unet.named_modules() if n},
                          {k[: -len(".weight")]: v for k, v in pipe.unet.state_dict().items() if k.endswith(".weight")})}
    prefixes = ["lora_te_"] if family != "sdxl" else ["lora_te1_", "lora_te2_"]
    for prefix, component in zip(prefixes, text_encoder_names(pipe)):
        state = hf_clip_state(getattr(pipe, component))
        names = set()
        for key in state:
            parts = key.split(".")[:-1]
            names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
        out[prefix] = (names, {k[: -len(".weight")]: v for k, v in state.items() if k.endswith(".weight")})
    return out


def invoke_apply(pipe, family: str, lora: dict) -> tuple[dict, list]:
    """({(prefix, module): patched weight}, layer keys with no module) as InvokeAI patches the models."""
    if family == "sdxl":
        converted = [k for k in lora if k.startswith("lora_unet_") and k[len("lora_unet_"):].startswith(STABILITY_SDXL_STEMS)]
        if converted and len(converted) != sum(k.startswith("lora_unet_") for k in lora):
            raise NotRecognised("The SDXL LoRA could only be partially converted to diffusers format.")
        assert not converted, "Stability-named SDXL keys: not written by dcustom, not emulated here"
    models = invoke_models(pipe, family)
    out, missing = {}, []
    for stem, (kind, values) in invoke_layers(lora).items():
        prefix = next((p for p in models if stem.startswith(p)), None)
        if prefix is None:
            missing.append(stem)
            continue
        names, weights = models[prefix]
        try:
            module = invoke_walk(stem[len(prefix):], names)
        except AttributeError:
            missing.append(stem)
            continue
        out[(prefix, module)] = weights[module].float() + invoke_weight_delta(kind, values, weights[module])
    return out, missing


def invoke_reference(pipe, family: str, merged: dict) -> dict:
    prefixes = {"unet": "lora_unet_"}
    prefixes.update(zip(text_encoder_names(pipe), ["lora_te_"] if family != "sdxl" else ["lora_te1_", "lora_te2_"]))
    out = {}
    for component, modules in merged.items():
        for module, weight in modules.items():
            path = module if component == "unet" or module.startswith("text_model.") else f"text_model.{module}"
            out[(prefixes[component], path)] = weight
    return out


# ------------------------------------------------------------------------------------------------------------------
# diffusers with transformers 4 (the module names its CLIPTextModel has)
# ------------------------------------------------------------------------------------------------------------------
def transformers4_module_names(encoder) -> set:
    names = set()
    for key in hf_clip_state(encoder):
        parts = key.split(".")[:-1]
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def diffusers_text_encoder_modules(tensors: dict, component: str) -> set:
    """Module paths diffusers (any version) asks peft to find in `component` for a diffusers-format LoRA file:
    keys under `<component>.`, converted to peft's form, without the `.lora_A.weight`-style ending."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

    state = {k[len(component) + 1:]: v for k, v in tensors.items() if k.startswith(component + ".")}
    peft = convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    return {re.sub(r"\.(lora_A|lora_B)\.weight$|\.lora_magnitude_vector$", "", k) for k in peft}
