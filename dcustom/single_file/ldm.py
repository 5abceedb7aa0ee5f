"""UNet and VAE weights in the original LDM (CompVis) layout, shared by SD1.x, SD2.x and SDXL.

diffusers only reads this layout (`from_single_file`); it has no writer, so the mapping below is
written from the two architectures' module names:
  UNet  `model.diffusion_model.*` (openaimodel: input_blocks / middle_block / output_blocks)
  VAE   `first_stage_model.*`     (encoder.down.i.block.j, decoder.up.k.block.j, mid.attn_1)
SD2/SDXL differ from SD1 only in ways the weights already carry: linear proj_in/proj_out (the
original uses nn.Linear there too), head sizes (config, not weights), deeper transformer stacks
(`transformer_blocks.N` stays inside the attention block's key) and SDXL's `label_emb`.
"""

from __future__ import annotations

from dcustom.errors import DcustomError

RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_resnet(rest: str) -> str:
    head, _, tail = rest.partition(".")  # e.g. "norm1", "weight"
    if head == "time_emb_proj" or head in RESNET and "." in rest:
        return RESNET[head] + "." + tail
    return rest


def unet_to_ldm(state: dict, config) -> dict:
    """diffusers UNet2DConditionModel state dict -> `model.diffusion_model.*` keys."""
    lpb = config.layers_per_block
    if not isinstance(lpb, int):
        raise DcustomError("single-file export needs the same layers_per_block in every UNet block.")
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = None
        if key.startswith("time_embedding.linear_"):
            new = key.replace("time_embedding.linear_1", "time_embed.0").replace("time_embedding.linear_2", "time_embed.2")
        elif key.startswith("add_embedding.linear_"):
            new = key.replace("add_embedding.linear_1", "label_emb.0.0").replace("add_embedding.linear_2", "label_emb.0.2")
        elif key.startswith("conv_in."):
            new = "input_blocks.0.0." + parts[-1]
        elif key.startswith("conv_norm_out."):
            new = "out.0." + parts[-1]
        elif key.startswith("conv_out."):
            new = "out.2." + parts[-1]
        elif parts[0] == "down_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            if kind == "resnets":
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.0.{_rename_resnet(rest)}"
            elif kind == "attentions":
                new = f"input_blocks.{1 + i * (lpb + 1) + j}.1.{rest}"
            elif kind == "downsamplers":
                new = f"input_blocks.{(i + 1) * (lpb + 1)}.0.op.{parts[-1]}"
        elif parts[0] == "mid_block":
            kind, j, rest = parts[1], int(parts[2]), ".".join(parts[3:])
            if kind == "resnets":
                new = f"middle_block.{0 if j == 0 else 2}.{_rename_resnet(rest)}"
            else:
                new = f"middle_block.1.{rest}"
        elif parts[0] == "up_blocks":
            i, kind, j, rest = int(parts[1]), parts[2], int(parts[3]), ".".join(parts[4:])
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in state)
            if kind == "resnets":
                new = f"output_blocks.{i * (lpb + 1) + j}.0.{_rename_resnet(rest)}"
            elif kind == "attentions":
                new = f"output_blocks.{i * (lpb + 1) + j}.1.{rest}"
            elif kind == "upsamplers":
                new = f"output_blocks.{i * (lpb + 1) + lpb}.{2 if has_attn else 1}.conv.{parts[-1]}"
        if new is None:
            raise DcustomError(f"single-file export does not know the UNet weight {key!r}.")
        out["model.diffusion_model." + new] = value
    return out


def _vae_rename(rest: str) -> str:
    if rest.startswith("conv_shortcut."):
        return rest.replace("conv_shortcut.", "nin_shortcut.", 1)
    return rest


def vae_to_ldm(state: dict, num_blocks: int) -> dict:
    """diffusers AutoencoderKL state dict -> `first_stage_model.*` keys (attention as 1x1 convs)."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        new = key
        side = parts[0]
        if len(parts) > 2 and parts[1] == "down_blocks":
            i, kind = int(parts[2]), parts[3]
            if kind == "resnets":
                new = f"{side}.down.{i}.block.{parts[4]}.{_vae_rename('.'.join(parts[5:]))}"
            else:
                new = f"{side}.down.{i}.downsample.conv.{parts[-1]}"
        elif len(parts) > 2 and parts[1] == "up_blocks":
            i, kind = int(parts[2]), parts[3]
            k = num_blocks - 1 - i
            if kind == "resnets":
                new = f"{side}.up.{k}.block.{parts[4]}.{_vae_rename('.'.join(parts[5:]))}"
            else:
                new = f"{side}.up.{k}.upsample.conv.{parts[-1]}"
        elif len(parts) > 2 and parts[1] == "mid_block":
            if parts[2] == "resnets":
                new = f"{side}.mid.block_{int(parts[3]) + 1}.{_vae_rename('.'.join(parts[4:]))}"
            else:
                rest = ".".join(parts[4:-1])
                new = f"{side}.mid.attn_1.{VAE_ATTN[rest]}.{parts[-1]}"
                if parts[-1] == "weight" and value.ndim == 2:
                    value = value[:, :, None, None]  # LDM stores these projections as 1x1 convs
        elif len(parts) > 1 and parts[1] == "conv_norm_out":
            new = f"{side}.norm_out.{parts[-1]}"
        out["first_stage_model." + new] = value
    return out
