"""What the UNet is called with, for SD1.x/2.x and SDXL alike: text states plus SDXL's extra inputs.

Prompts are encoded by the pipeline's own `encode_prompt`, so the token embeddings that UCE edits
and the conditions ESD trains on are exactly those the stock pipeline feeds its UNet.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from dcustom.models import family_of


@dataclass
class Cond:
    hidden: torch.Tensor  # (B, L, D) encoder_hidden_states
    added: Optional[dict] = None  # SDXL: {"text_embeds", "time_ids"}

    def repeat(self, n: int) -> "Cond":
        added = None if self.added is None else {k: v.repeat_interleave(n, 0) for k, v in self.added.items()}
        return Cond(self.hidden.repeat_interleave(n, 0), added)

    def cat(self, other: "Cond") -> "Cond":
        added = None if self.added is None else {k: torch.cat([v, other.added[k]]) for k, v in self.added.items()}
        return Cond(torch.cat([self.hidden, other.hidden]), added)


def _time_ids(pipe, batch: int, device, dtype) -> torch.Tensor:
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    # original size, crop top-left, target size: the defaults of a plain SDXL call.
    ids = torch.tensor([[size, size, 0, 0, size, size]], device=device, dtype=dtype)
    return ids.repeat(batch, 1)


@torch.no_grad()
def encode(pipe, prompts: list[str]) -> Cond:
    """Conditions of `prompts` as the pipeline would compute them."""
    device = pipe.unet.device
    if family_of(pipe).micro_conditioning:
        hidden, _, pooled, _ = pipe.encode_prompt(prompt=list(prompts), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return Cond(hidden, {"text_embeds": pooled, "time_ids": _time_ids(pipe, len(prompts), device, hidden.dtype)})
    hidden, _ = pipe.encode_prompt(list(prompts), device, 1, False)
    return Cond(hidden)


@torch.no_grad()
def unconditional(pipe, batch: int) -> Cond:
    """The condition of CFG's unconditional branch (SDXL zeroes it when configured to)."""
    if family_of(pipe).micro_conditioning and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        ref = encode(pipe, [""])
        return Cond(torch.zeros_like(ref.hidden).repeat(batch, 1, 1),
                    {"text_embeds": torch.zeros_like(ref.added["text_embeds"]).repeat(batch, 1),
                     "time_ids": ref.added["time_ids"].repeat(batch, 1)})
    return encode(pipe, [""]).repeat(batch)


def predict(unet, x: torch.Tensor, t, cond: Cond) -> torch.Tensor:
    """The UNet's raw output (ε or v, whatever the model predicts) for latents x at timestep t."""
    if not torch.is_tensor(t):
        t = torch.tensor(t, device=x.device)
    return unet(x, t, encoder_hidden_states=cond.hidden.to(x.dtype),
                added_cond_kwargs=cond.added, return_dict=False)[0]


def token_ids(tokenizer, text: str) -> list[int]:
    """Token ids of `text` with start/end tokens, without padding."""
    return tokenizer(text, padding=False, truncation=True).input_ids


def concept_span(tokenizer, template: str, concept: str) -> tuple[int, int]:
    """Positions [start, end) of `concept`'s tokens in `template.format(concept)` (end = start if empty)."""
    prefix = template.split("{}")[0]
    start = len(token_ids(tokenizer, prefix)) - 1  # drop the end token: it sits where the concept starts
    full_prefix_and_word = token_ids(tokenizer, (prefix + concept).rstrip())
    end = max(start, len(full_prefix_and_word) - 1)
    if not concept.strip():
        end = start
    return start, end
