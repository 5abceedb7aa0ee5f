"""Textual-inversion embeddings: write diffusers and A1111 files, read the common forms, put them on a pipeline.

Written (one file per token: diffusers' loader reads one token per file):
- `learned_embeds.safetensors` (several tokens: `learned_embeds-<slug>.safetensors`): SD1.x/2.x
  `{token: [n, dim]}`, SDXL `{"clip_l": [n, 768], "clip_g": [n, 1280]}` with the token in the
  header. `pipe.load_textual_inversion` reads the first form directly, the second per encoder.
- `a1111/<slug>.safetensors`: the A1111/Forge/ComfyUI form, whose file name is the prompt word:
  `{"emb_params": [n, dim]}` (SD1.x/2.x) or `{"clip_l", "clip_g"}` (SDXL).
Read: those, diffusers `.bin`, A1111 `.pt` (`{"name", "string_to_param": {"*": ...}}`), a raw
tensor, and diffusers' SDXL pair `learned_embeds.safetensors` + `learned_embeds_2.safetensors`.
Pickles are only opened with `torch.load(weights_only=True)`: no code in a file is ever run.

A token of n vectors becomes the tokenizer entries `tok, tok_1, ..., tok_{n-1}`, and diffusers'
`maybe_convert_prompt` expands `tok` in a prompt to all of them (the same names diffusers uses).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from dcustom.errors import DcustomError

EMBEDDINGS_NAME = "learned_embeds.safetensors"
DIFFUSERS_SDXL_SECOND = "learned_embeds_2.safetensors"  # diffusers' SDXL script: text_encoder_2 vectors
A1111_DIR = "a1111"
SDXL_KEYS = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"}
SUFFIXES = (".safetensors", ".pt", ".bin")
ACCEPTED = ("accepted: a diffusers learned_embeds.safetensors/.bin ({token: [n, dim]}), an A1111/kohya embedding "
            "(.pt with string_to_param, .safetensors with emb_params, or clip_l + clip_g for SDXL) or a raw tensor")


@dataclass
class Embedding:
    """One token's vectors as read from a file: per text encoder ("text_encoder"/"text_encoder_2"), or "*"
    when the file holds one set (SD1.x/2.x)."""

    token: str | None
    vectors: dict  # name -> float tensor [n, dim]
    path: str
    meta: dict = field(default_factory=dict)

    @property
    def num_vectors(self) -> int:
        return int(next(iter(self.vectors.values())).shape[0])


def token_names(token: str, n: int) -> list[str]:
    """Tokenizer entries of a token with n vectors, as diffusers names them."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def slug(token: str) -> str:
    """A file-name form of a token (A1111 uses the file name as the prompt word): '<toy-subject>' -> 'toy-subject'."""
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", token).strip("-.")
    return text or "embedding"


# --- reading -----------------------------------------------------------------------------------
def _read_state(path: Path):
    """The raw content of an embedding file: safetensors, or a pickle opened with weights_only=True only."""
    import pickle

    import torch

    if not path.is_file():
        raise DcustomError(f"embedding {str(path)!r} does not exist.")
    if path.stat().st_size == 0:
        raise DcustomError(f"embedding {str(path)!r} is empty (0 bytes); {ACCEPTED}.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
            return load_file(str(path)), meta
        except Exception as exc:  # safetensors raises its own error types for every kind of damage
            raise DcustomError(f"embedding {str(path)!r} is not a valid safetensors file ({_first_line(exc)}); "
                               f"{ACCEPTED}.") from None
    if path.suffix not in SUFFIXES:
        raise DcustomError(f"embedding {str(path)!r} has the unknown extension {path.suffix!r}; {ACCEPTED}.")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True), {}
    except pickle.UnpicklingError as exc:
        if "weights only" in str(exc).lower() or "weights_only" in str(exc):
            found = re.search(r"GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise DcustomError(f"embedding {str(path)!r} contains Python objects other than tensors{what}, which dcustom "
                               f"never unpickles; {ACCEPTED}.") from None
        raise DcustomError(f"embedding {str(path)!r} is a corrupt PyTorch file ({_first_line(exc)}); {ACCEPTED}.") from None
    except Exception as exc:
        raise DcustomError(f"embedding {str(path)!r} is not a readable PyTorch file ({_first_line(exc)}); {ACCEPTED}.") from None


def _first_line(exc: Exception) -> str:
    """The library's own reason, cut to its first sentence (our message stays one sentence)."""
    text = str(exc).strip()
    if not text:
        return type(exc).__name__
    return text.splitlines()[0].split(". ")[0].rstrip(".")[:200]


def _as_vectors(value, path: Path, what: str):
    import torch

    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        kind = f"a {value.dtype} tensor" if isinstance(value, torch.Tensor) else type(value).__name__
        raise DcustomError(f"embedding {str(path)!r}: {what} is {kind}, not float vectors; {ACCEPTED}.")
    if value.dim() == 1:
        value = value[None]
    if value.dim() != 2 or value.shape[0] == 0 or value.shape[1] == 0:
        raise DcustomError(f"embedding {str(path)!r}: {what} has shape {list(value.shape)}; expected [vectors, dim].")
    if not torch.isfinite(value).all():
        raise DcustomError(f"embedding {str(path)!r}: {what} contains NaN or infinite values; the file is damaged.")
    return value.detach().float().cpu()


def read_embedding(path, token: str | None = None) -> Embedding:
    """Read one embedding file (any accepted form) without touching a pipeline; `token` overrides its name."""
    import torch

    path = Path(path)
    state, meta = _read_state(path)
    named = meta.get("dcustom.token")
    if isinstance(state, torch.Tensor):
        vectors, found = {"*": _as_vectors(state, path, "the tensor")}, None
    elif isinstance(state, dict) and "string_to_param" in state:  # A1111 .pt
        params = state["string_to_param"]
        value = params.get("*", next(iter(params.values()), None)) if isinstance(params, dict) else params
        vectors = {"*": _as_vectors(value, path, "string_to_param")}
        found = state.get("name") if isinstance(state.get("name"), str) else None
    elif isinstance(state, dict) and {"clip_l", "clip_g"} <= set(state):  # SDXL (A1111/kohya/dcustom)
        vectors = {attr: _as_vectors(state[key], path, key) for attr, key in SDXL_KEYS.items()}
        if vectors["text_encoder"].shape[0] != vectors["text_encoder_2"].shape[0]:
            raise DcustomError(f"embedding {str(path)!r}: clip_l has {vectors['text_encoder'].shape[0]} vectors but "
                               f"clip_g has {vectors['text_encoder_2'].shape[0]}; both must have the same count.")
        found = None
    elif isinstance(state, dict) and len(state) == 1:  # diffusers {token: t} or kohya {"emb_params": t}
        key, value = next(iter(state.items()))
        vectors = {"*": _as_vectors(value, path, f"key {key!r}")}
        found = None if key == "emb_params" else str(key)
    else:
        keys = list(state)[:6] if isinstance(state, dict) else type(state).__name__
        raise DcustomError(f"embedding {str(path)!r} holds no embedding (found {keys}); {ACCEPTED}.")
    name = token or found or named or _name_from_file(path)
    if not name:
        raise DcustomError(f"embedding {str(path)!r} does not name its token; pass the prompt word (token=...).")
    return Embedding(name, vectors, str(path), meta)


def _name_from_file(path: Path) -> str | None:
    """A1111 convention: the file name is the prompt word (not for diffusers' generic file names)."""
    return None if path.stem.startswith("learned_embeds") else path.stem


# --- putting on a pipeline ---------------------------------------------------------------------
def _encoders(pipe):
    from dcustom.models import family_of

    family = family_of(pipe)
    return family, [(attr, getattr(pipe, attr), getattr(pipe, tok)) for attr, tok in
                    zip(family.text_encoders, family.tokenizers)]


def existing_token(tokenizer, name: str) -> str | None:
    """How `name` already exists in `tokenizer` ('an added token', 'the word ...'), or None."""
    vocab = tokenizer.get_vocab()
    if name in getattr(tokenizer, "added_tokens_encoder", {}):
        return "an added token"
    if name in vocab or f"{name}</w>" in vocab:  # CLIP's BPE marks word ends with </w>
        return "a word of its vocabulary"
    return None


def check_embedding(pipe, emb: Embedding) -> list[tuple[str, object]]:
    """Validate `emb` against `pipe` (family, dimensions, free token names); returns (encoder attr, vectors)."""
    from dcustom.families import FAMILIES

    family, encoders = _encoders(pipe)
    where = f"embedding {emb.path!r}"
    trained_for = emb.meta.get("dcustom.family")
    if trained_for in FAMILIES and trained_for != family.name:
        raise DcustomError(f"{where} was trained for {FAMILIES[trained_for].label} ({trained_for}) but this pipeline is "
                           f"{family.label} ({family.name}); load it on a {FAMILIES[trained_for].label} model.")
    if len(encoders) == 1 and "*" not in emb.vectors:
        raise DcustomError(f"{where} is an SDXL embedding (clip_l + clip_g) but this pipeline is {family.label}; "
                           "load it on an SDXL model.")
    if len(encoders) == 2 and "*" in emb.vectors:
        raise DcustomError(f"{where} holds vectors for one text encoder only, but {family.label} has two; accepted for SDXL: "
                           "an embedding with clip_l and clip_g (or diffusers' learned_embeds.safetensors + learned_embeds_2.safetensors).")
    plan = []
    for attr, te, tok in encoders:
        vectors = emb.vectors.get(attr, emb.vectors.get("*"))
        dim = te.get_input_embeddings().weight.shape[1]
        if vectors.shape[1] != dim:
            label = f" {SDXL_KEYS[attr]}" if len(encoders) == 2 else ""
            raise DcustomError(f"{where}:{label} vectors have dimension {vectors.shape[1]} but this pipeline's {attr} expects "
                               f"{dim}; it was made for another model (SD1.x 768, SD2.x 1024, SDXL clip_l 768 + clip_g 1280).")
        for name in token_names(emb.token, vectors.shape[0]):
            how = existing_token(tok, name)
            if how:
                fix = " or unload it first" if how == "an added token" else ""
                raise DcustomError(f"{where}: token {name!r} already exists in this pipeline's {attr.replace('text_encoder', 'tokenizer')} "
                                   f"as {how}; pass another token name (token=...){fix}.")
        plan.append((attr, vectors))
    return plan


def add_embedding(pipe, emb: Embedding) -> str:
    """Put a validated embedding on `pipe` through diffusers' `load_textual_inversion`; returns the prompt word."""
    plan = check_embedding(pipe, emb)
    family, encoders = _encoders(pipe)
    for (attr, te, tok), (_, vectors) in zip(encoders, plan):
        pipe.load_textual_inversion(vectors, token=emb.token, tokenizer=tok, text_encoder=te)
    loaded = getattr(pipe, "_dcustom_embedding_tokens", [])
    pipe._dcustom_embedding_tokens = loaded + [emb.token]
    return emb.token


def load_embedding(pipe, path, token: str | None = None) -> list[str]:
    """Load an embedding file, or every learned_embeds*.safetensors of a run folder; returns the prompt words."""
    embs = read_embeddings(path, token)
    for emb in embs:  # validate all before changing the pipeline: a bad file loads nothing
        check_embedding(pipe, emb)
    if len({e.token for e in embs}) < len(embs):
        raise DcustomError(f"embedding folder {str(path)!r} holds two embeddings named {embs[0].token!r}.")
    return [add_embedding(pipe, emb) for emb in embs]


def read_embeddings(path, token: str | None = None) -> list[Embedding]:
    path = Path(path)
    files = embedding_files(path)
    if not files:
        raise DcustomError(f"{str(path)!r} holds no embedding; {ACCEPTED}.")
    if token and len(files) > 1:
        raise DcustomError(f"{str(path)!r} holds {len(files)} embeddings; token=... names one file's token only.")
    second = path / DIFFUSERS_SDXL_SECOND if path.is_dir() else None
    if second is not None and second.is_file() and files == [path / EMBEDDINGS_NAME]:
        return [_diffusers_sdxl_pair(files[0], second, token)]
    return [read_embedding(f, token) for f in files]


def _diffusers_sdxl_pair(first: Path, second: Path, token: str | None) -> Embedding:
    a, b = read_embedding(first, token), read_embedding(second, token)
    if "*" not in a.vectors or "*" not in b.vectors or a.num_vectors != b.num_vectors:
        raise DcustomError(f"embedding folder {str(first.parent)!r}: {first.name} and {second.name} do not form an SDXL "
                           "pair (one vector set each, same count).")
    return Embedding(a.token, {"text_encoder": a.vectors["*"], "text_encoder_2": b.vectors["*"]}, str(first), a.meta)


def embedding_files(path) -> list[Path]:
    """The embedding files a path stands for: itself, or a run folder's learned_embeds*.safetensors."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p for p in path.glob("learned_embeds*") if p.is_file() and p.suffix in SUFFIXES
                       and p.name != DIFFUSERS_SDXL_SECOND)
        safe = [p for p in found if p.suffix == ".safetensors"]
        return safe or found
    return [path] if path.exists() else []


def looks_like_embedding(path) -> bool:
    """True for embedding files (and folders holding one): cheap, reads only safetensors headers."""
    path = Path(path)
    if path.is_dir():
        return bool(embedding_files(path))
    if path.suffix in (".pt", ".bin"):
        return True
    if path.suffix != ".safetensors" or not path.is_file():
        return False
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            shapes = [f.get_slice(k).get_shape() for k in keys]
    except Exception:
        return path.stat().st_size == 0 or path.stem.startswith("learned_embeds")  # let the reader explain the damage
    return 0 < len(keys) <= 2 and all(len(s) <= 2 for s in shapes) and not any("lora" in k.lower() for k in keys)


def unload_embeddings(pipe, tokens: list[str] | None = None) -> None:
    """Remove tokens loaded by `load_embedding`/`load_adapter` (all of them by default), vectors included."""
    loaded = list(getattr(pipe, "_dcustom_embedding_tokens", []))
    tokens = loaded if tokens is None else list(tokens)
    _, encoders = _encoders(pipe)
    for token in tokens:
        for _, te, tok in encoders:
            names = [n for n in tok.added_tokens_encoder if n == token or re.fullmatch(re.escape(token) + r"_\d+", n)]
            if names:
                pipe.unload_textual_inversion(tokens=names, tokenizer=tok, text_encoder=te)
    pipe._dcustom_embedding_tokens = [t for t in loaded if t not in tokens]


# --- the hook `load_adapter` calls --------------------------------------------------------------
@dataclass
class PendingEmbeddings:
    """Embeddings found at an adapter path, validated but not loaded yet (loaded after the adapter, so a
    failing adapter leaves the pipeline as it was)."""

    embeddings: list
    has_adapter: bool

    def apply(self, pipe) -> str:
        words = [add_embedding(pipe, emb) for emb in self.embeddings]
        return ",".join(words)


def pending_for(pipe, path) -> PendingEmbeddings | None:
    """None when `path` holds no embedding; else the validated embeddings and whether an adapter sits beside them."""
    from dcustom.adapters.files import DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME, PEFT_CONFIG

    path = Path(path)
    if not looks_like_embedding(path):
        return None
    embs = read_embeddings(path)
    for emb in embs:
        check_embedding(pipe, emb)
    has_adapter = path.is_dir() and any((path / n).is_file() for n in
                                        (DIFFUSERS_LORA_NAME, KOHYA_LORA_NAME, PEFT_CONFIG, f"unet/{PEFT_CONFIG}"))
    return PendingEmbeddings(embs, has_adapter)


# --- writing -----------------------------------------------------------------------------------
def save_embedding(folder, token: str, vectors: dict, family: str, meta: dict, single: bool = True) -> list[Path]:
    """Write one token's vectors ({encoder attr: [n, dim]}) as the diffusers file and the A1111 file."""
    from dcustom.adapters.files import save_tensors

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = int(next(iter(vectors.values())).shape[0])
    header = {**meta, "format": "pt", "dcustom.format": "textual_inversion", "dcustom.token": token,
              "dcustom.num_vectors": str(n)}
    if family == "sdxl":
        native = {SDXL_KEYS[a]: v.float() for a, v in vectors.items()}
        a1111 = native
    else:
        native = {token: vectors["text_encoder"].float()}
        a1111 = {"emb_params": vectors["text_encoder"].float()}
    name = EMBEDDINGS_NAME if single else f"learned_embeds-{slug(token)}.safetensors"
    (folder / A1111_DIR).mkdir(exist_ok=True)
    return [save_tensors(native, folder / name, header),
            save_tensors(a1111, folder / A1111_DIR / f"{slug(token)}.safetensors", {**header, "dcustom.format": "a1111_embedding"})]


def embedding_summary(path) -> dict:
    """What an embedding file (or run folder) holds, in the shape of `adapter_summary` (for `adapters inspect`)."""
    out = []
    for emb in read_embeddings(path):
        dims = {SDXL_KEYS.get(k, "text_encoder"): int(v.shape[1]) for k, v in emb.vectors.items()}
        out.append({"path": emb.path, "format": emb.meta.get("dcustom.format", "embedding"), "token": emb.token,
                    "prompt_words": token_names(emb.token, emb.num_vectors), "vectors": emb.num_vectors, "dims": dims,
                    "parameters": sum(int(v.numel()) for v in emb.vectors.values()),
                    "method": emb.meta.get("dcustom.method", "unknown"), "family": emb.meta.get("dcustom.family", "unknown"),
                    "base_model": emb.meta.get("dcustom.base_model", "unknown"),
                    "dcustom_version": emb.meta.get("dcustom.version", "-")})
    return out[0] if len(out) == 1 else {"embeddings": out}
