"""Write a real `CLIPTokenizer` from a small word list (no download).

CLIP's tokenizer is byte-level BPE: every byte maps to a printable unicode character, words end in
"</w>", and merges build longer tokens. Giving each known word a chain of merges makes it a single
token; any other text still tokenizes, character by character, so the tokenizer never fails.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

START, END = "<|startoftext|>", "<|endoftext|>"


def _byte_to_char() -> dict[int, str]:
    """The reversible byte -> printable character table used by byte-level BPE."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _bpe(symbols: list[str], ranks: dict[tuple[str, str], int]) -> list[str]:
    """Apply merges the way BPE does: repeatedly merge the lowest-ranked adjacent pair."""
    symbols = list(symbols)
    while len(symbols) > 1:
        pairs = [(ranks.get((a, b)), i) for i, (a, b) in enumerate(zip(symbols, symbols[1:]))]
        pairs = [(r, i) for r, i in pairs if r is not None]
        if not pairs:
            break
        _, i = min(pairs)
        symbols[i : i + 2] = [symbols[i] + symbols[i + 1]]
    return symbols


def _word_symbols(word: str, table: dict[int, str]) -> list[str]:
    symbols = [table[b] for b in word.encode("utf-8")]
    symbols[-1] += "</w>"
    return symbols


def write_clip_tokenizer(words, out_dir: str | Path, model_max_length: int = 77) -> Path:
    """Write vocab.json, merges.txt and tokenizer config for a CLIP tokenizer knowing `words`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _byte_to_char()
    base = list(table.values())
    vocab_list = base + [c + "</w>" for c in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    seen = set(vocab_list)
    for word in sorted({w.lower() for w in words if re.fullmatch(r"[a-z0-9<>\-_]+", w.lower())}):
        # Tokenize with the merges so far, then join what is left with new, lower-priority merges.
        # Earlier words never reach a state where only a new merge applies, so they stay one token.
        pieces = _bpe(_word_symbols(word, table), ranks)
        current = pieces[0]
        for nxt in pieces[1:]:
            pair = (current, nxt)
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            current += nxt
            if current not in seen:
                seen.add(current)
                vocab_list.append(current)
    vocab_list += [START, END]
    vocab = {tok: i for i, tok in enumerate(vocab_list)}
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    return out


def build_clip_tokenizer(words, out_dir: str | Path, model_max_length: int = 77):
    """A `CLIPTokenizer` over `words`, saved in `out_dir` in the standard layout."""
    from transformers import CLIPTokenizer

    out = write_clip_tokenizer(words, out_dir, model_max_length)
    # from_pretrained reads vocab.json + merges.txt in every transformers version (4.x and 5.x).
    tok = CLIPTokenizer.from_pretrained(str(out), model_max_length=model_max_length, pad_token=END)
    tok.save_pretrained(str(out))
    return tok


# ----------------------------------------------------------------------------- T5 (SD3, FLUX)

T5_SPECIALS = ("<pad>", "</s>", "<unk>")  # T5's fixed ids 0, 1, 2


def t5_vocab(words) -> list[tuple[str, float]]:
    """A Unigram vocabulary (piece, log-probability) in which each known word is one piece.

    T5's tokenizer is SentencePiece Unigram: the text is split on whitespace, each word gets a leading "▁",
    and the most probable segmentation wins. A whole-word piece "▁word" with a higher score than any split
    keeps each known word one token; single characters (with and without "▁") let any other text tokenize."""
    import string

    pieces = [(p, 0.0) for p in T5_SPECIALS]
    seen = set(T5_SPECIALS)
    for word in sorted({w.lower() for w in words}):
        piece = "▁" + word
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, -1.0))
    for ch in ["▁", *string.ascii_lowercase, *string.ascii_uppercase, *string.digits, *string.punctuation]:
        for piece in (ch, "▁" + ch) if ch != "▁" else (ch,):
            if piece not in seen:
                seen.add(piece)
                pieces.append((piece, -10.0))
    return pieces


def build_t5_tokenizer(words, out_dir: str | Path, model_max_length: int = 77):
    """A transformers `T5Tokenizer` (Unigram, the tokenizers backend) over `words`, saved in `out_dir`.

    transformers 5 builds T5's Unigram model from a (piece, score) list, so no sentencepiece model file
    (and no sentencepiece package) is needed; `from_pretrained(out_dir)` reads back tokenizer.json."""
    from transformers import T5Tokenizer

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = T5Tokenizer(vocab=t5_vocab(words), extra_ids=0, model_max_length=model_max_length)
    tok.save_pretrained(str(out))
    return T5Tokenizer.from_pretrained(str(out))
