"""Write an SD1.x / SD2.x / SDXL / SD3 / FLUX.1 pipeline as one original-layout checkpoint, as A1111/Forge/ComfyUI read it.

Where each component goes (diffusers' `from_single_file` reads every one of these back):
  family  UNet                     VAE                  text encoder(s)
  sd1     model.diffusion_model.*  first_stage_model.*  cond_stage_model.transformer.text_model.* (HF CLIP)
  sd2     same                     same                 cond_stage_model.model.* (OpenCLIP, + the dropped last block)
  sdxl    same (+ label_emb)       same                 conditioner.embedders.0.transformer.text_model.* (HF CLIP-L)
                                                        conditioner.embedders.1.model.* (OpenCLIP bigG)
SD3/3.5 and FLUX.1 (transformer, VAE, CLIP and T5 keys): see single_file/dit.py, read back by single_file/dit_load.py.
v-prediction pipelines also get the `v_pred` marker key. The scheduler, tokenizers and configs are not
stored: loaders take them from the family's reference configs (`load_pipeline(path, config=folder)`).
"""

from __future__ import annotations

from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.single_file.dit import dit_single_file_state
from dcustom.single_file.ldm import unet_to_ldm, vae_to_ldm
from dcustom.single_file.text import hf_clip_to_ldm, open_clip_to_ldm

DIT_FAMILIES = ("sd3", "flux")
__all__ = ["save_single_file", "single_file_state", "unet_to_ldm", "vae_to_ldm"]


def single_file_state(pipe) -> dict:
    """The pipeline's weights under original-checkpoint keys (tensors shared with the pipeline)."""
    from dcustom.models import family_of

    _refuse_unmerged_adapters(pipe)
    if all(getattr(pipe, name, None) is not None for name in ("transformer", "vae", "text_encoder")):
        family = family_of(pipe)
        if family.name in DIT_FAMILIES:
            return dit_single_file_state(pipe, family.name)
    if not all(getattr(pipe, name, None) is not None for name in ("unet", "vae", "text_encoder")):
        raise DcustomError(
            f"single-file export supports SD1.x, SD2.x, SDXL, SD3/3.5 and FLUX.1 pipelines; this one is a "
            f"{type(pipe).__name__}: save it as a diffusers folder with pipe.save_pretrained instead."
        )
    family = family_of(pipe)
    text = {
        "sd1": lambda: hf_clip_to_ldm(pipe.text_encoder, "cond_stage_model.transformer."),
        "sd2": lambda: open_clip_to_ldm(pipe.text_encoder, "cond_stage_model.model.", append_identity_block=True),
        "sdxl": lambda: {**hf_clip_to_ldm(pipe.text_encoder, "conditioner.embedders.0.transformer."),
                         **open_clip_to_ldm(pipe.text_encoder_2, "conditioner.embedders.1.model.")},
    }
    if family.name not in text:  # a family added to families.py without a layout here
        raise DcustomError(f"single-file export supports SD1.x, SD2.x and SDXL pipelines; this one is {family.label}: "
                           "save it as a diffusers folder with pipe.save_pretrained instead.")
    state = unet_to_ldm(pipe.unet.state_dict(), pipe.unet.config)
    state.update(vae_to_ldm(pipe.vae.state_dict(), len(pipe.vae.config.block_out_channels)))
    state.update(text[family.name]())
    state.update(_prediction_markers(pipe))
    return state


def _refuse_unmerged_adapters(pipe) -> None:
    """peft wraps adapted layers (`to_q.base_layer.weight` + `lora_A...`); their keys have no original name."""
    for name in ("unet", "transformer", "text_encoder", "text_encoder_2", "text_encoder_3"):
        module = getattr(pipe, name, None)
        if module is not None and any(".base_layer." in key for key in module.state_dict()):
            raise DcustomError(
                f"single-file export needs plain weights, but the pipeline's {name} has unmerged adapters (peft layers): "
                "merge them first (dcustom adapters merge, or pipe.fuse_lora() then pipe.unload_lora_weights())."
            )


def _prediction_markers(pipe) -> dict:
    """Empty `v_pred` / `ztsnr` tensors: the markers ComfyUI/Forge read to sample a v-prediction
    (zero-terminal-SNR) checkpoint correctly; diffusers ignores them and takes the scheduler config."""
    import torch

    from dcustom.families import prediction_type

    markers = {}
    if prediction_type(pipe) == "v_prediction":
        markers["v_pred"] = torch.tensor([])
        if getattr(pipe.scheduler.config, "rescale_betas_zero_snr", False):
            markers["ztsnr"] = torch.tensor([])
    return markers


def save_single_file(pipe, path: str | Path, metadata: dict | None = None) -> Path:
    """Save an SD1.x/SD2.x/SDXL/SD3/FLUX pipeline as one `.safetensors` checkpoint in the original layout (atomically)."""
    from safetensors.torch import save_file

    state = {k: v.detach().contiguous().cpu() for k, v in single_file_state(pipe).items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    save_file(state, str(tmp), metadata={k: str(v) for k, v in (metadata or {}).items()})
    tmp.replace(path)
    return path
