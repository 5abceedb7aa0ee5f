"""Textual-inversion embeddings and single-file checkpoints x tools (issue 19).

diffusers with transformers 5 is covered by tests/test_embeddings.py (both files, SD1 and SDXL, through
`pipe.load_textual_inversion`) and tests/test_single_file.py (`from_single_file` reads our checkpoints back bit for
bit; key counts equal the released SD2.1/SDXL files); transformers 4 by scripts/interop/t4_check.py. Here: which
tensor ComfyUI, A1111 and InvokeAI take from each embedding file, for which text encoder, written from their loaders
(ComfyUI sd1_clip.load_embed, A1111 textual_inversion.create_embedding_from_data, InvokeAI
configs/textual_inversion.py probe + backend/textual_inversion.py), and ComfyUI's OpenCLIP -> transformers rename
(utils.clip_text_transformers_convert) applied to our SDXL checkpoint.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dcustom.adapters.embeddings import A1111_DIR, EMBEDDINGS_NAME, save_embedding

# real widths: the tools pick encoders (and InvokeAI the base model) by them
WIDTHS = {"sd1": {"text_encoder": 768}, "sdxl": {"text_encoder": 768, "text_encoder_2": 1280}}
ENCODER_KEY = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}  # ComfyUI's embedding_key per encoder


@pytest.fixture(params=["sd1", "sdxl"])
def embedding(request, tmp_path):
    family = request.param
    g = torch.Generator().manual_seed(3)
    vectors = {enc: torch.randn(2, width, generator=g) for enc, width in WIDTHS[family].items()}
    save_embedding(tmp_path, "<toy-subject>", vectors, family, {"dcustom.family": family})
    return family, vectors, {"diffusers": load_file(str(tmp_path / EMBEDDINGS_NAME)),
                             "a1111": load_file(str(tmp_path / A1111_DIR / "toy-subject.safetensors"))}


def comfy_embedding(state: dict, embed_key: str, width: int):
    """load_embed: string_to_param, else the encoder's key (clip_l / clip_g), else the first tensor; vectors of
    another width are ignored when the embedding is applied."""
    if "string_to_param" in state:
        out = next(iter(state["string_to_param"].values()))
    elif embed_key in state:
        out = state[embed_key]
    else:
        out = next(iter(state.values()))
    return out if out.shape[-1] == width else None


def a1111_embedding(state: dict):
    """create_embedding_from_data: {encoder key: vectors} for SDXL pairs, else the single tensor of the file."""
    if "clip_g" in state and "clip_l" in state:
        return {"clip_l": state["clip_l"], "clip_g": state["clip_g"]}
    assert len(state) == 1, "embedding file has multiple terms in it"
    out = next(iter(state.values()))
    return {"*": out.unsqueeze(0) if out.ndim == 1 else out}


def invoke_base(state: dict) -> str:
    """The TI probe's base: the token width from emb_params / clip_g, else the FIRST dimension of the first tensor."""
    if "emb_params" in state:
        dim = state["emb_params"].shape[-1]
    elif "clip_g" in state:
        dim = state["clip_g"].shape[-1]
    else:
        dim = next(iter(state.values())).shape[0]
    bases = {768: "sd-1", 1024: "sd-2", 1280: "sdxl"}
    if dim not in bases:
        raise ValueError(f"unrecognized token dimension {dim}")
    return bases[dim]


def invoke_vectors(state: dict, width: int):
    """TextualInversionModelRaw.from_checkpoint + the patcher's choice for SDXL (the vectors of the encoder's width)."""
    if "emb_params" in state:
        first, second = state["emb_params"], None
    elif "clip_g" in state and "clip_l" in state:
        first, second = state["clip_g"], state["clip_l"]
    else:
        first, second = next(iter(state.values())), None
    if second is not None and second.shape[-1] == width:
        return second
    return first if first.shape[-1] == width else None


@pytest.mark.parametrize("file", ["diffusers", "a1111"])
def test_comfyui_reads_our_vectors_for_every_encoder(embedding, file):
    family, vectors, states = embedding
    for encoder, v in vectors.items():
        assert torch.equal(comfy_embedding(states[file], ENCODER_KEY[encoder], v.shape[-1]), v), encoder


@pytest.mark.parametrize("file", ["diffusers", "a1111"])
def test_a1111_reads_our_vectors_for_every_encoder(embedding, file):
    family, vectors, states = embedding
    got = a1111_embedding(states[file])
    if family == "sdxl":
        assert torch.equal(got["clip_l"], vectors["text_encoder"]) and torch.equal(got["clip_g"], vectors["text_encoder_2"])
    else:
        assert torch.equal(got["*"], vectors["text_encoder"])


def test_invokeai_reads_the_a1111_file(embedding):
    family, vectors, states = embedding
    assert invoke_base(states["a1111"]) == ("sdxl" if family == "sdxl" else "sd-1")
    for encoder, v in vectors.items():
        assert torch.equal(invoke_vectors(states["a1111"], v.shape[-1]), v), encoder


def test_invokeai_probe_misreads_the_sd1_diffusers_file(embedding):
    """Refused for InvokeAI: its probe takes a diffusers-concept tensor's FIRST dimension as the token width
    (old single-vector files were 1-D), so an SD1 learned_embeds [n, 768] is not recognised: use a1111/<word>."""
    family, vectors, states = embedding
    if family == "sdxl":  # the SDXL file is the clip_l/clip_g pair: recognised as the A1111 form is
        assert invoke_base(states["diffusers"]) == "sdxl"
        return
    with pytest.raises(ValueError, match="unrecognized token dimension 2"):
        invoke_base(states["diffusers"])


# --- single-file checkpoints ----------------------------------------------------------------------------------------
def open_clip_to_transformers(state: dict, prefix_from: str, prefix_to: str) -> dict:
    """ComfyUI's rename of an OpenCLIP text encoder into transformers' names: in_proj rows q, k, v; the projection
    matrix transposed into a Linear weight."""
    renames = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
               "attn.out_proj": "self_attn.out_proj"}
    top = {"positional_embedding": "embeddings.position_embedding.weight",
           "token_embedding.weight": "embeddings.token_embedding.weight",
           "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias"}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix_from):
            continue
        rest = key[len(prefix_from):]
        if rest in top:
            out[f"{prefix_to}text_model.{top[rest]}"] = value
        elif rest == "text_projection":
            out[f"{prefix_to}text_projection.weight"] = value.transpose(0, 1).contiguous()
        elif rest.startswith("transformer.resblocks."):
            n, module = rest[len("transformer.resblocks."):].split(".", 1)
            module, _, kind = module.rpartition(".")
            if module == "attn" and kind.startswith("in_proj_"):
                third = value.shape[0] // 3
                for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                    out[f"{prefix_to}text_model.encoder.layers.{n}.self_attn.{proj}.{kind[len('in_proj_'):]}"] = value[i * third:(i + 1) * third]
            else:
                out[f"{prefix_to}text_model.encoder.layers.{n}.{renames[module]}.{kind}"] = value
    return out


def test_comfyui_reads_both_text_encoders_of_our_sdxl_checkpoint(tmp_path):
    from dcustom.models import load_pipeline
    from dcustom.single_file import save_single_file

    pipe = load_pipeline("tiny:sdxl", device="cpu")
    save_single_file(pipe, tmp_path / "m.safetensors")
    ckpt = load_file(str(tmp_path / "m.safetensors"))
    clip_g = open_clip_to_transformers(ckpt, "conditioner.embedders.1.model.", "clip_g.transformer.")
    ours_g = {f"clip_g.transformer.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()}
    assert set(clip_g) == set(ours_g) and all(torch.equal(clip_g[k], ours_g[k]) for k in ours_g)
    clip_l = {k.replace("conditioner.embedders.0.transformer.", "clip_l.transformer.", 1): v for k, v in ckpt.items()
              if k.startswith("conditioner.embedders.0.transformer.") and not k.endswith("position_ids")}
    ours_l = {f"clip_l.transformer.text_model.{k}": v for k, v in pipe.text_encoder.state_dict().items()}
    assert set(clip_l) == set(ours_l) and all(torch.equal(clip_l[k], ours_l[k]) for k in ours_l)
