"""The peft adapters dcustom trains: one LoRA settings class, the peft configs built from settings, the
checks before injection, and the files written after training. Torch-free at import (peft loads inside
the functions), so config modules import `LoraAdapterConfig` cheaply.

How a value reaches peft: a YAML key (``rank`` in the lora method, ``lora.rank`` in textual_inversion,
erasure and reward) fills `LoraAdapterConfig.rank`; `lora_config(settings, target_modules)` turns the
settings into ``peft.LoraConfig(r=rank, lora_alpha=..., ...)``; the trainer injects it with
``unet.add_adapter(...)``. OFT and BOFT go the same way through `oft_config` / `boft_config`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dcustom.config import opt
from dcustom.errors import DcustomError

log = logging.getLogger("dcustom.train")

# The attention projections of every diffusers UNet attention block, and of a CLIP text encoder.
ATTN_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_INITS = ("gaussian", "true")


@dataclass
class LoraAdapterConfig:
    """A LoRA's size and start, the same in every method that trains one. The lora method's YAML holds these
    keys at its top level (it is a LoRA config); textual_inversion, erasure and reward hold them under `lora:`."""

    rank: int = opt(16, "LoRA rank r.", ge=1)
    alpha: Optional[float] = opt(16.0, "LoRA alpha: the update is scaled by alpha / rank (saved as the true alpha); "
                                       "null: the rank (scale 1).", gt=0)
    dropout: float = opt(0.0, "LoRA dropout.", ge=0, lt=1)
    dora: bool = opt(False, "DoRA: weight-decomposed LoRA (learns a per-output magnitude).")
    init: str = opt("gaussian", "peft init_lora_weights: gaussian (B = 0, A Gaussian) or true (B = 0, A Kaiming-uniform); "
                                "either way training starts at the base model.", choices=LORA_INITS)

    @property
    def scale_alpha(self):
        """The alpha peft gets: `alpha`, or the rank when alpha is null."""
        return self.alpha if self.alpha is not None else self.rank


def lora_config(lora: LoraAdapterConfig, target_modules):
    """peft's LoraConfig for `lora` on the modules named by `target_modules`."""
    from peft import LoraConfig

    return LoraConfig(r=lora.rank, lora_alpha=lora.scale_alpha, lora_dropout=lora.dropout, use_dora=lora.dora,
                      init_lora_weights=True if lora.init == "true" else lora.init, target_modules=list(target_modules))


def oft_config(block_size: int, target_modules, coft: bool = False, eps: float = 6e-5, cayley_neumann: bool = True,
               module_dropout: float = 0.0):
    """peft's OFTConfig (OFTv2: sized by block_size, r=0); the defaults are the oft method's."""
    from peft import OFTConfig

    return OFTConfig(r=0, oft_block_size=block_size, target_modules=list(target_modules), coft=coft, eps=eps,
                     use_cayley_neumann=cayley_neumann, module_dropout=module_dropout)


def boft_config(block_size: int, butterfly_factor: int, target_modules, dropout: float = 0.0):
    """peft's BOFTConfig."""
    from peft import BOFTConfig

    return BOFTConfig(boft_block_size=block_size, boft_n_butterfly_factor=butterfly_factor,
                      target_modules=list(target_modules), boft_dropout=dropout, bias="none")


def _targeted(name: str, target_modules) -> bool:
    """Whether peft's suffix matching wraps the module `name`."""
    return any(name == t or name.endswith("." + t) for t in target_modules)


def check_targets(unet, target_modules, block_size: Optional[int] = None, what: str = "UNet",
                  examples: str = "to_q, to_k, to_v, to_out.0, proj_in, ff.net.2", linear_only: bool = False) -> None:
    """Before injection: every target names a layer of `unet` (a UNet, or the `what` model), (OFT/BOFT)
    `block_size` divides each targeted Linear layer's input width, and (`linear_only`) no target is a
    convolution; else one sentence."""
    names = {n.rsplit(".", 1)[-1] if "." in n else n for n, _ in unet.named_modules()}
    full = {n for n, _ in unet.named_modules()}
    for t in target_modules:
        if t not in names and not any(n.endswith("." + t) for n in full):
            raise DcustomError(f"target_modules: {t!r} matches no {what} layer; accepted e.g. {examples}.")
    import torch

    if linear_only:
        # peft's OFT runs a Conv2d with one rotation and merges it with another (measured on peft 0.21: the
        # merged conv's output differs by as much as the output itself), so every merged, extracted or
        # full-diff file would draw something else than the trained adapter.
        conv = next((n for n, m in unet.named_modules()
                     if isinstance(m, torch.nn.Conv2d) and _targeted(n, target_modules)), None)
        if conv is not None:
            raise DcustomError(f"target_modules: OFT on the convolution {conv!r} is not supported (peft merges OFT "
                               "convolutions differently from how it trains them); accepted: Linear layers such as "
                               "to_q, to_k, to_v, to_out.0, ff.net.0.proj, ff.net.2, or BOFT/LoRA for convolutions.")
    if block_size is None:
        return

    for n, m in unet.named_modules():
        if isinstance(m, torch.nn.Linear) and _targeted(n, target_modules):
            if m.in_features % block_size:
                raise DcustomError(f"block_size: {block_size} does not divide the input width {m.in_features} of "
                                   f"UNet layer {n!r}; accepted: a divisor of every targeted layer's width.")


def effective_butterfly_factor(unet, configured: int) -> int:
    """peft silently trains BOFT with 1 butterfly factor when it finds no block-diagonal kernel. With
    ensure_boft_kernel() that should not happen; the check stays in case a peft version stops reading
    the kernel cache. Returns the factor actually used and records it, so the saved adapter_config matches."""
    from peft.tuners.boft.layer import BOFTLayer

    layer = next(m for m in unet.modules() if isinstance(m, BOFTLayer))
    effective = int(layer.boft_R["default"].shape[0])
    if effective != configured:
        log.warning("BOFT: peft found no block-diagonal kernel, so it trains with %d butterfly "
                    "factor(s) instead of %d; the saved adapter records %d.", effective, configured, effective)
        unet.peft_config["default"].boft_n_butterfly_factor = effective
    return effective


@dataclass
class AdapterFiles:
    """What `save_adapter_files` wrote; `extraction` = (relative error, worst module, its error) of an extracted LoRA."""

    paths: list
    extraction: Optional[tuple] = None


def save_adapter_files(folder: Path, pipe, family: str, kind: str, meta: dict, *, final: bool,
                       text_encoders=(), dora: bool = False, write_kohya: bool = False, extract_rank: int = 0,
                       write_merged: bool = False, write_full_diff: bool = False) -> AdapterFiles:
    """Write the trained "default" adapter of `pipe` (`kind` lora, oft or boft) into `folder`.

    LoRA: the diffusers file (UNet + `text_encoders`), plus kohya keys when `write_kohya` (not for DoRA).
    OFT/BOFT: the peft folder `unet/`, plus an SVD-extracted LoRA, the merged UNet and the exact weight
    differences when asked. The extra files are written only for the `final` run folder, not for checkpoints."""
    from dcustom.adapters import files

    folder = Path(folder)
    if kind == "lora":
        paths = [files.save_diffusers_lora(folder, pipe, list(text_encoders), {**meta, "dcustom.format": "diffusers"})]
        if write_kohya and final and not dora:
            paths.append(files.save_kohya_lora(folder, pipe, family, list(text_encoders), meta))
        return AdapterFiles(paths)
    out = AdapterFiles([files.save_peft_folder(folder / "unet", pipe.unet, {**meta, "dcustom.format": "peft"})])
    if final and extract_rank > 0:
        path, rel = files.save_extracted_lora(folder, pipe.unet, extract_rank,
                                              {**meta, "dcustom.method": f"{kind}-extracted-lora"})
        written = files.read_metadata(path)
        out.extraction = (rel, written["dcustom.extraction_worst_module"],
                          float(written["dcustom.extraction_worst_rel_error"]))
        out.paths.append(path)
    if final and write_merged:
        out.paths.append(files.save_merged_unet(folder, pipe.unet, meta))
    if final and write_full_diff:
        out.paths.append(files.save_full_diff(folder, pipe, family, meta))
    return out


def peft_version() -> str:
    import peft

    return peft.__version__
