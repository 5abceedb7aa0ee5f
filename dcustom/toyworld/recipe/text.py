"""The text stage's objective: teach the CLIPTextModel the grammar before the UNet ever sees it.

Each attribute word's token state is classified as its attribute value (so synonyms become one concept),
and the end-of-text/padding states as the whole caption's attributes. The probe that reads them out is
thrown away afterwards; only the aligned text encoder is part of the model.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from dcustom.toyworld.grammar import BACKGROUNDS, COLOURS, POSITION_WORDS, SHAPES, SIZE_WORDS, SYNONYMS

SENTENCE_HEADS = {"shape": SHAPES, "colour": COLOURS, "background": BACKGROUNDS,
                  "size": tuple(SIZE_WORDS), "position": tuple(POSITION_WORDS)}


def concepts():
    """word -> concept index (1-based; 0 = not an attribute), and per concept its (head index, class index)."""
    keys = [(h, cls) for h, classes in SENTENCE_HEADS.items() for cls in classes]
    word_to_concept = {}
    for k, (h, cls) in enumerate(keys):
        words = SIZE_WORDS[cls] if h == "size" else (POSITION_WORDS[cls].split()[-1],) if h == "position" else SYNONYMS[cls]
        for w in words:
            word_to_concept[w] = k + 1
    head_of = torch.tensor([-1] + [list(SENTENCE_HEADS).index(h) for h, _ in keys])
    class_of = torch.tensor([-1] + [SENTENCE_HEADS[h].index(c) for h, c in keys])
    return word_to_concept, head_of, class_of


class CaptionEncoder:
    """Token ids and per-token concept labels for captions, aligned word by word.

    A grammar word may take several BPE tokens; its concept label goes on its last token (whose
    state has seen the whole word under the causal mask); its other tokens are not scored (-100).
    Ids equal the tokenizer's own (CLIP tokenizes each word and punctuation mark on its own).
    """

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.length = tokenizer.model_max_length
        self.word_to_concept = concepts()[0]
        self._piece: dict[str, list[int]] = {}
        self._cache: dict[str, tuple[list[int], list[int]]] = {}

    def __call__(self, text: str) -> tuple[list[int], list[int]]:
        if text in self._cache:
            return self._cache[text]
        ids, labels = [self.tok.bos_token_id], [-100]
        for piece in re.findall(r"[a-z]+|[^\sa-z]", text.lower()):
            if piece not in self._piece:
                self._piece[piece] = self.tok(piece, add_special_tokens=False).input_ids
            sub = self._piece[piece]
            concept = self.word_to_concept.get(piece, 0)
            ids += sub
            labels += [-100] * (len(sub) - 1) + [concept]
        ids, labels = ids[: self.length - 1], labels[: self.length - 1]
        pad = self.length - len(ids)
        ids += [self.tok.eos_token_id] * pad  # pad token = end-of-text, as in the pipeline
        labels += [-100] * pad
        self._cache[text] = (ids, labels)
        return ids, labels

    def batch(self, texts):
        pairs = [self(t) for t in texts]
        return torch.tensor([p[0] for p in pairs]), torch.tensor([p[1] for p in pairs], dtype=torch.int16)


class TextProbe(nn.Module):
    """Linear read-outs used only while aligning the text encoder (not part of the model)."""

    def __init__(self, hidden: int, n_concepts: int):
        super().__init__()
        self.token = nn.Linear(hidden, n_concepts + 1)
        self.sentence = nn.ModuleDict({h: nn.Linear(hidden, len(c) + 1) for h, c in SENTENCE_HEADS.items()})


def text_losses(text_encoder, probe, ids, labels, head_of, class_of):
    states = text_encoder(ids).last_hidden_state  # [B, L, H]
    labels = labels.long()
    loss = F.cross_entropy(probe.token(states).flatten(0, 1), labels.flatten(), ignore_index=-100)
    eos_pos = (ids == ids[:, -1:]).int().argmax(dim=1)  # first end-of-text (= the padding token)
    pos = torch.arange(ids.shape[1], device=ids.device)[None]
    tail = (pos >= eos_pos[:, None]).float()[..., None]  # end-of-text and padding states carry the whole caption
    summary = (states * tail).sum(1) / tail.sum(1)
    concepts_ = labels.clamp(min=0)
    for k, head in enumerate(SENTENCE_HEADS):
        in_head = head_of[concepts_] == k
        target = torch.where(in_head, class_of[concepts_] + 1, torch.zeros_like(concepts_)).amax(dim=1)
        loss = loss + F.cross_entropy(probe.sentence[head](summary), target)
    return loss
