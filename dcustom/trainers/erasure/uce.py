"""UCE: closed-form edit of the cross-attention key/value projections.

For each projection W (key or value), the edit minimises

    λ‖W' − W‖² + s_e Σ_i ‖W' c_i − W g_i‖² + s_p Σ_j ‖W' p_j − W p_j‖²

over erased token embeddings c_i (each paired with an anchor embedding g_i) and preserved
embeddings p_j. Setting the gradient to zero gives

    W' = W (λI + s_e Σ g_i c_iᵀ + s_p Σ p_j p_jᵀ)(λI + s_e Σ c_i c_iᵀ + s_p Σ p_j p_jᵀ)⁻¹ = W T.

T depends only on the embeddings, so one D×D solve serves every layer, and the change
W' − W = W (T − I) has the (small) rank of T − I: it is saved exactly as a LoRA with
A = √S Vᵀ and B = W U √S from the SVD T − I = U S Vᵀ.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import torch

from dcustom.trainers.erasure.conditioning import concept_span, encode, token_ids
from dcustom.trainers.erasure.selection import selected_modules


@dataclass
class UceEmbeddings:
    erased: torch.Tensor  # (N_e, D) token embeddings to move
    anchors: torch.Tensor  # (N_e, D) where each goes (row-aligned)
    preserved: torch.Tensor  # (N_p, D) token embeddings whose keys/values must stay
    info: dict = field(default_factory=dict)


def gather_embeddings(pipe, erase: list[str], anchors: list[str], preserve: list[str], templates: list[str],
                      tokens: str = "concept_and_after", preserve_empty_prompt: bool = True) -> UceEmbeddings:
    """Token embeddings (as the UNet sees them) of erased concepts, their anchors and kept concepts.

    Erased and anchor tokens are paired right-aligned: the concept's last token goes to the anchor's
    last token (an empty anchor offers its prompt's end token, the sentence summary). With
    ``concept_and_after`` the template's suffix and the end token are paired by their offset after the
    word (suffix words meet the same suffix words), and padding by position (padding differs mostly
    by its position embedding, and the kept prompts pin each padding position where it is).
    """
    tok = pipe.tokenizer  # SDXL's second tokenizer splits the same words at the same positions
    length = tok.model_max_length
    erased, targets, kept = [], [], []
    for concept, anchor in zip(erase, anchors):
        prompts = [t.format(concept) for t in templates] + [t.format(anchor) for t in templates]
        hidden = encode(pipe, prompts).hidden.double().cpu()
        for k, template in enumerate(templates):
            c_emb, a_emb = hidden[k], hidden[len(templates) + k]
            cs, ce = concept_span(tok, template, concept)
            a_s, a_e = concept_span(tok, template, anchor)
            c_end = len(token_ids(tok, template.format(concept))) - 1
            a_end = len(token_ids(tok, template.format(anchor))) - 1
            pairs = [(pos, max(a_e - 1 - j, a_s) if a_e > a_s else a_end)
                     for j, pos in enumerate(range(ce - 1, cs - 1, -1))]
            if tokens == "concept_and_after":
                pairs += [(ce + off, a_e + off) for off in range(min(c_end - ce, a_end - a_e) + 1)]
                pairs += [(pos, pos) for pos in range(max(c_end, a_end) + 1, length)]
            for c_pos, a_pos in pairs:
                erased.append(c_emb[c_pos])
                targets.append(a_emb[a_pos])
    if preserve:
        prompts = [t.format(p) for p in preserve for t in templates]
        hidden = encode(pipe, prompts).hidden.double().cpu()
        for i, prompt_emb in enumerate(hidden):
            concept, template = preserve[i // len(templates)], templates[i % len(templates)]
            ps, pe = concept_span(tok, template, concept)
            stop = length if tokens == "concept_and_after" else pe
            kept.extend(prompt_emb[ps:stop])
    if preserve_empty_prompt:
        kept.extend(encode(pipe, [""]).hidden.double().cpu()[0, 1:])
    dim = erased[0].shape[0]
    stack = lambda rows: torch.stack(rows) if rows else torch.zeros(0, dim, dtype=torch.float64)  # noqa: E731
    return UceEmbeddings(stack(erased), stack(targets), stack(kept),
                         {"erased_vectors": len(erased), "preserved_vectors": len(kept), "tokens": tokens})


def edit_matrix(emb: UceEmbeddings, lam: float, erase_scale: float, preserve_scale: float) -> torch.Tensor:
    """T (D×D, float64) such that every edited projection is W' = W T."""
    c, g, p = emb.erased, emb.anchors, emb.preserved
    eye = torch.eye(c.shape[1], dtype=torch.float64)
    preserved_cov = preserve_scale * p.T @ p
    lhs = lam * eye + erase_scale * g.T @ c + preserved_cov
    gram = lam * eye + erase_scale * c.T @ c + preserved_cov
    # T = lhs @ gram⁻¹; gram is symmetric positive definite, so solve gram Tᵀ = lhsᵀ.
    return torch.linalg.solve(gram, lhs.T).T


def low_rank_factors(delta: torch.Tensor, max_rank: int = 0, rtol: float = 1e-6):
    """(U√S, √S Vᵀ, rank, dropped_energy) of a D×D matrix, keeping singular values above rtol·max."""
    u, s, vh = torch.linalg.svd(delta)
    keep = int((s > rtol * s[0]).sum()) if s.numel() and s[0] > 0 else 1
    keep = max(1, min(keep, max_rank) if max_rank > 0 else keep)
    dropped = float((s[keep:] ** 2).sum() / (s ** 2).sum().clamp_min(1e-300))
    root = s[:keep].sqrt()
    return u[:, :keep] * root, root[:, None] * vh[:keep], keep, dropped


@dataclass
class UceEdit:
    transform: torch.Tensor  # T, float64
    modules: list[str]  # edited module names
    lora_state: dict  # diffusers-format LoRA: "unet.<module>.lora_A.weight" / ".lora_B.weight"
    rank: int
    dropped_energy: float
    seconds: float
    info: dict


def compute_uce(pipe, erase, anchors, preserve, templates, lam=0.5, erase_scale=1.0, preserve_scale=1.0,
                tokens="concept_and_after", preserve_empty_prompt=True, max_rank=0) -> UceEdit:
    """The UCE edit of `pipe` (not yet applied): T, and its exact LoRA factors for every K/V layer."""
    start = time.perf_counter()
    emb = gather_embeddings(pipe, erase, anchors, preserve, templates, tokens, preserve_empty_prompt)
    transform = edit_matrix(emb, lam, erase_scale, preserve_scale)
    left, right, rank, dropped = low_rank_factors(transform - torch.eye(transform.shape[0], dtype=torch.float64),
                                                  max_rank)
    modules = selected_modules(pipe.unet, "uce")
    state = {}
    for name, module in modules.items():
        w = module.weight.detach().double().cpu()
        state[f"unet.{name}.lora_A.weight"] = right.float().contiguous()
        state[f"unet.{name}.lora_B.weight"] = (w @ left).float().contiguous()
    return UceEdit(transform, list(modules), state, rank, dropped, time.perf_counter() - start, emb.info)


@torch.no_grad()
def apply_uce(pipe, edit: UceEdit) -> None:
    """Write W' = W T into every edited projection of `pipe` (in place)."""
    modules = selected_modules(pipe.unet, "uce")
    for name in edit.modules:
        w = modules[name].weight
        w.copy_((w.double() @ edit.transform.to(w.device)).to(w.dtype))


def run_uce(cfg, pipe=None):
    """`dcustom train erasure` with algorithm uce: solve, write the LoRA (or the edited model) and report.json;
    returns an ErasureResult. `pipe` (optional) is edited in place."""
    from dcustom.config import save_yaml
    from dcustom.models import load_pipeline
    from dcustom.outputs import writable_folder
    from dcustom.trainers.erasure.artifacts import (FULL_FOLDER, LORA_FILE, ErasureResult, dcustom_metadata,
                                                    lora_config_dict, save_full_model, save_lora_file)
    from dcustom.trainers.run_folder import choose_run_dir

    start = time.perf_counter()
    # Before the model loads: a folder that cannot be written costs nothing, a finished run is never overwritten.
    out = writable_folder(choose_run_dir(cfg.train.output_dir, None), "train.output_dir")
    if pipe is None:
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.train.device)
    anchors = [cfg.anchor_for(i) for i in range(len(cfg.erase))]
    u = cfg.uce
    edit = compute_uce(pipe, list(cfg.erase), anchors, list(cfg.preserve), list(cfg.templates), lam=u.lam,
                       erase_scale=u.erase_scale, preserve_scale=u.preserve_scale, tokens=u.tokens,
                       preserve_empty_prompt=u.preserve_empty_prompt, max_rank=u.max_rank)
    save_yaml(cfg, out / "config.yaml")
    info = {"solve_seconds": round(edit.seconds, 4), "rank": edit.rank, "dropped_energy": edit.dropped_energy,
            "edited_modules": len(edit.modules), **edit.info}
    meta = dcustom_metadata(cfg, pipe, **info)
    files = []
    if cfg.output_format() == "lora":
        files.append(save_lora_file(out / LORA_FILE, edit.lora_state,
                                    lora_config_dict(edit.rank, edit.rank, edit.modules), meta))
    apply_uce(pipe, edit)
    if cfg.output_format() == "full":
        files.append(save_full_model(pipe, out / FULL_FOLDER, meta))
    seconds = time.perf_counter() - start
    info["total_seconds"] = round(seconds, 3)
    (out / "report.json").write_text(json.dumps(info, indent=2))
    return ErasureResult(out, files, seconds, info, pipe)
