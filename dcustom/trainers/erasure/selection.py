"""Which UNet modules each erasure algorithm edits, by module name (never by counting calls).

- uce:   cross-attention key/value projections (``attn2.to_k``, ``attn2.to_v``), the only layers that
         read the text embeddings;
- esd_x: every Linear of cross-attention (``attn2.to_q/to_k/to_v/to_out.0``);
- esd_u: every Linear/Conv2d outside cross-attention, except the global time/added embeddings and
         the output head (as in ESD's "noxattn" setting).
"""

from __future__ import annotations

import re

import torch

_ESD_U_EXCLUDED = re.compile(r"^(time_embedding|add_embedding|conv_out|conv_norm_out)\b")


def _is_cross_attention(name: str) -> bool:
    return ".attn2." in f".{name}."


def selected_modules(unet, algorithm: str) -> dict[str, torch.nn.Module]:
    """Name -> module of the layers `algorithm` edits, in `named_modules` order."""
    out = {}
    for name, module in unet.named_modules():
        if algorithm == "uce":
            keep = isinstance(module, torch.nn.Linear) and re.search(r"(^|\.)attn2\.to_(k|v)$", name) is not None
        elif algorithm == "esd_x":
            keep = isinstance(module, torch.nn.Linear) and _is_cross_attention(name)
        elif algorithm == "esd_u":
            keep = (isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and not _is_cross_attention(name)
                    and not _ESD_U_EXCLUDED.match(name))
        else:
            raise ValueError(f"unknown erasure algorithm {algorithm!r}")
        if keep:
            out[name] = module
    return out


def selected_parameter_names(unet, algorithm: str) -> set[str]:
    """Parameter names (``module.weight`` / ``module.bias``) inside the selected modules."""
    names = set()
    for mod_name, module in selected_modules(unet, algorithm).items():
        for p_name, _ in module.named_parameters(recurse=False):
            names.add(f"{mod_name}.{p_name}")
    return names
