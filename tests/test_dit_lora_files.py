"""SD3/FLUX LoRA files: the kohya/ComfyUI layout (original checkpoint names, q/k/v fused) is numerically the diffusers
file, both ways, for unequal ranks and alphas and for a dense fused LoRA as kohya sd-scripts trains it; `adapters
inspect|convert|merge` on both families."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from dcustom.adapters.dit import diffusers_factors, kohya_to_factors, save_dit_kohya_lora
from dcustom.adapters.files import dcustom_metadata, merged_linear_weights, read_metadata, save_diffusers_lora
from dcustom.adapters.load import load_adapter
from dcustom.families import FAMILIES
from dcustom.models import load_pipeline
from dcustom.trainers.peft_adapters import LoraAdapterConfig, lora_config

FUSED = {"flux": ("transformer_blocks.0.attn.to_{}", "lora_unet_double_blocks_0_img_attn_qkv"),
         "sd3": ("transformer_blocks.0.attn.add_{}_proj", "lora_unet_joint_blocks_0_context_block_attn_qkv")}


def random_lora(kind: str, seed: int = 0):
    """A pipeline with a LoRA of unequal ranks and alphas (k: rank 2, alpha 7; v: rank 3) and random B."""
    from peft import LoraConfig

    pipe = load_pipeline(f"tiny:{kind}", device="cpu")
    config = lora_config(LoraAdapterConfig(rank=4, alpha=8.0), FAMILIES[kind].lora_targets)
    config = LoraConfig(**{**config.to_dict(), "rank_pattern": {"to_k": 2, "to_v": 3}, "alpha_pattern": {"to_k": 7.0}})
    pipe.transformer.add_adapter(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.transformer.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return pipe


def deltas(factors: dict) -> dict:
    return {m: (B.double() @ A.double()) * s for m, (A, B, s) in factors.items()}


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_kohya_layout_equals_diffusers_file(kind, tmp_path):
    pipe = random_lora(kind)
    meta = dcustom_metadata("flow_lora", f"tiny:{kind}", kind, None, "x")
    diffusers_file = save_diffusers_lora(tmp_path, pipe, [], meta)
    kohya_file = save_dit_kohya_lora(tmp_path, pipe, kind, meta)
    ours = deltas(diffusers_factors(load_file(str(diffusers_file)), read_metadata(diffusers_file)))
    # 1. the fused module's update is exactly [ΔW_q; ΔW_k; ΔW_v] of the separate layers
    template, fused = FUSED[kind]
    raw = load_file(str(kohya_file))
    down, up, alpha = raw[f"{fused}.lora_down.weight"], raw[f"{fused}.lora_up.weight"], float(raw[f"{fused}.alpha"])
    fused_delta = (up.double() @ down.double()) * alpha / down.shape[0]
    separate = torch.cat([ours[template.format(p)] for p in "qkv"])
    fused_error = (fused_delta - separate).abs().max().item()
    assert fused_error < 1e-6, fused_error
    # ... which is what the fused base weight gets: W_qkv + ΔW split back equals peft's own merged q, k, v weights
    merged = merged_linear_weights(pipe.transformer)
    base = torch.cat([merged[template.format(p)][0] for p in "qkv"]).double()
    split = (base + fused_delta).split(base.shape[0] // 3)
    merge_error = max((s - merged[template.format(p)][1].double()).abs().max().item() for s, p in zip(split, "qkv"))
    assert merge_error < 1e-6, merge_error
    # 2. the whole kohya file, split back, equals the diffusers file module by module
    back = deltas(kohya_to_factors(raw, kind))
    assert back.keys() == ours.keys()
    file_error = max((back[m] - ours[m]).abs().max().item() for m in ours)
    assert file_error < 1e-6, file_error
    print(f"{kind}: fused qkv vs separate {fused_error:.2e}, merged {merge_error:.2e}, kohya vs diffusers {file_error:.2e}")


def test_dense_fused_lora_as_kohya_trains_it_splits_exactly(tmp_path):
    """sd-scripts trains one LoRA on the fused qkv (dense up): each part keeps the whole down and its rows of up."""
    g = torch.Generator().manual_seed(1)
    width, rank = 32, 5
    raw = {"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": torch.randn(rank, width, generator=g),
           "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": torch.randn(3 * width, rank, generator=g),
           "lora_unet_double_blocks_1_txt_attn_qkv.alpha": torch.tensor(3.0),
           "lora_unet_single_blocks_0_linear1.lora_down.weight": torch.randn(rank, width, generator=g),
           "lora_unet_single_blocks_0_linear1.lora_up.weight": torch.randn(7 * width, rank, generator=g)}
    factors = deltas(kohya_to_factors(raw, "flux"))
    qkv = torch.cat([factors[f"transformer_blocks.1.attn.add_{p}_proj"] for p in "qkv"])
    whole = raw["lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight"].double() @ \
        raw["lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight"].double() * 3.0 / rank
    assert (qkv - whole).abs().max() < 1e-6
    linear1 = torch.cat([factors[f"single_transformer_blocks.0.{m}"] for m in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")])
    assert linear1.shape == (7 * width, width)
    assert (linear1 - raw["lora_unet_single_blocks_0_linear1.lora_up.weight"].double()
            @ raw["lora_unet_single_blocks_0_linear1.lora_down.weight"].double()).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["flux", "sd3"])
def test_convert_inspect_merge_cli(cli, kind, tmp_path):
    pipe = random_lora(kind, seed=2)
    meta = dcustom_metadata("flow_lora", f"tiny:{kind}", kind, None, "diffusers")
    src = save_diffusers_lora(tmp_path, pipe, [], meta)
    code, out, err = cli("adapters", "convert", src, "--to", "kohya", "-o", tmp_path / "k.safetensors")
    assert code == 0, err
    code, out, err = cli("adapters", "convert", tmp_path / "k.safetensors", "--to", "diffusers", "-o", tmp_path / "d.safetensors")
    assert code == 0, err
    again = deltas(diffusers_factors(load_file(str(tmp_path / "d.safetensors")), read_metadata(tmp_path / "d.safetensors")))
    first = deltas(diffusers_factors(load_file(str(src)), read_metadata(src)))
    assert max((again[m] - first[m]).abs().max().item() for m in first) < 1e-6
    code, out, _ = cli("adapters", "inspect", tmp_path / "k.safetensors")
    assert code == 0 and f"family             {kind}" in out and "q/k/v fused" in out
    code, _, err = cli("adapters", "convert", tmp_path / "k.safetensors", "--to", "kohya", "-o", tmp_path / "x.safetensors")
    assert code != 0 and "already in kohya form" in err

    def render(p):
        g = torch.Generator().manual_seed(0)
        return p("a red circle", num_inference_steps=2, generator=g, output_type="pt", width=32, height=32,
                 max_sequence_length=16).images

    with_lora = load_pipeline(f"tiny:{kind}", device="cpu")
    load_adapter(with_lora, src)
    code, out, err = cli("adapters", "merge", "--model", f"tiny:{kind}", "--adapter", src, "-o", tmp_path / "merged")
    assert code == 0, err
    merged = load_pipeline(str(tmp_path / "merged"), device="cpu")
    assert type(merged).__name__ == type(with_lora).__name__
    assert (render(merged) - render(with_lora)).abs().max() < 1e-4


def test_wrong_family_kohya_file_refused(tmp_path):
    pipe = random_lora("sd3")
    path = save_dit_kohya_lora(tmp_path, pipe, "sd3", {})
    save_file(load_file(str(path)), str(tmp_path / "bare.safetensors"))  # no dcustom header: known by its names
    from dcustom.errors import DcustomError

    with pytest.raises(DcustomError, match=r"trained for Stable Diffusion 3/3.5 \(sd3\) but this pipeline is FLUX.1"):
        load_adapter(load_pipeline("tiny:flux", device="cpu"), tmp_path / "bare.safetensors")
