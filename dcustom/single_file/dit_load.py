"""Loading an SD3/3.5 or FLUX.1 original-layout checkpoint offline (never downloads).

The file holds weights only; the architecture, tokenizers and scheduler come from a local diffusers folder
of the same model, found in this order:
  1. `config=` (generate: `--model-config`): any local diffusers folder of that model (weights optional);
  2. the tiny family's own configs, when the file's transformer has exactly tiny:sd3's / tiny:flux's shapes;
  3. the family's reference repository in the local Hugging Face cache (local_files_only), when present.
Each component is built empty from its config and filled from the file: the transformer through
`transformer_plan` (our inverse of the writer), the VAE through diffusers' LDM converter, the text encoders
by prefix. A component the file does not carry (BFL's transformer-only files) is loaded from the folder.
SD3's CLIP-L pools unprojected, so, as diffusers' own single-file loader does, its projection is the identity.
"""

from __future__ import annotations

import importlib
import json
import tempfile
from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.single_file.dit import (DIT_PREFIX, TEXT_ENCODERS, TEXT_PREFIXES, transformer_from_original,
                                     transformer_plan)

LABELS = {"sd3": "SD3/3.5", "flux": "FLUX.1"}
A_LABEL = {"sd3": "an SD3/3.5", "flux": "a FLUX.1"}
PIPELINES = {"sd3": "StableDiffusion3Pipeline", "flux": "FluxPipeline"}
TRANSFORMERS = {"sd3": "SD3Transformer2DModel", "flux": "FluxTransformer2DModel"}
VAE_PREFIXES = ("first_stage_model.", "vae.")


def dit_family_of_keys(keys) -> str | None:
    """"sd3" or "flux" from a checkpoint's key names (with or without the `model.diffusion_model.` prefix), else None."""
    for name, mark in (("flux", "double_blocks."), ("sd3", "joint_blocks.")):
        if any(k.startswith((mark, DIT_PREFIX + mark)) for k in keys):
            return name
    return None


class _File:
    """The checkpoint's tensors, read one at a time (a real FLUX file is 20+ GB), cast to `dtype`."""

    def __init__(self, handle, dtype):
        self.handle, self.dtype, self.keys = handle, dtype, set(handle.keys())
        self.prefix = DIT_PREFIX if any(k.startswith(DIT_PREFIX) for k in self.keys) else ""

    def get(self, key):
        value = self.handle.get_tensor(key)
        return value.to(self.dtype) if value.is_floating_point() else value

    def transformer_keys(self) -> set[str]:
        if self.prefix:
            return {k for k in self.keys if k.startswith(self.prefix)}
        return {k for k in self.keys if not k.startswith((*VAE_PREFIXES, "text_encoders."))}

    def under(self, prefix: str) -> dict:
        return {k[len(prefix):]: self.get(k) for k in self.keys if k.startswith(prefix)}


def load_dit_single_file(path: Path, family: str, config, torch_dtype):
    """The StableDiffusion3Pipeline / FluxPipeline stored in `path` (an original-layout .safetensors file)."""
    from safetensors import safe_open

    if path.suffix.lower() != ".safetensors":
        raise DcustomError(f"checkpoint {str(path)!r} is {A_LABEL[family]} .ckpt file; dcustom reads SD3/FLUX single "
                           "files as .safetensors only: convert it first.")
    with safe_open(str(path), framework="pt") as handle, tempfile.TemporaryDirectory() as tmp:
        file = _File(handle, torch_dtype)
        folder, tiny = _config_folder(path, family, file, config, Path(tmp))
        pipe = _assemble(path, family, file, folder)
    if tiny is not None:
        pipe.default_sample_size = tiny.default_sample_size  # tiny:flux draws 64 px (FluxPipeline hard-codes 1024)
    return pipe


def _config_folder(path: Path, family: str, file: _File, config, tmp: Path):
    """(the folder of configs, the tiny pipeline when they are tiny's, else None)."""
    if config is not None:
        folder = Path(config).expanduser()
        if not (folder / "model_index.json").is_file():
            raise DcustomError(f"config {str(config)!r} is not a local diffusers folder (no model_index.json); pass the "
                               f"folder of {A_LABEL[family]} model whose configs describe {str(path)!r}.")
        held = json.loads((folder / "model_index.json").read_text()).get("_class_name")
        if held != PIPELINES[family]:
            raise DcustomError(f"config folder {str(config)!r} holds a {held}, but checkpoint {str(path)!r} is "
                               f"{A_LABEL[family]} single file; pass the folder of {A_LABEL[family]} model ({PIPELINES[family]}).")
        return folder, None
    from dcustom.tiny import build_tiny_pipeline

    tiny = build_tiny_pipeline(family)
    if _is_tiny(file, family, tiny.transformer.state_dict()):
        write_configs(tiny, tmp / "tiny")
        return tmp / "tiny", tiny
    cached = _cached_reference(family, file)
    if cached is not None:
        return cached, None
    raise DcustomError(f"checkpoint {str(path)!r} is {A_LABEL[family]} single file whose architecture configs are not "
                       "available offline; pass config=<a local diffusers folder of the same model> (generate: "
                       "--model-config <folder>), e.g. the model's folder from the Hugging Face cache.")


def write_configs(pipe, folder: Path) -> Path:
    """A diffusers folder of `pipe` without weights: model_index.json, every component's config, the tokenizers."""
    pipe.save_config(str(folder))
    for name, component in pipe.components.items():
        if component is None:
            continue
        if hasattr(component, "save_config"):  # diffusers models and schedulers
            component.save_config(str(folder / name))
        elif hasattr(getattr(component, "config", None), "save_pretrained"):  # transformers models
            component.config.save_pretrained(str(folder / name))
        else:  # tokenizers
            component.save_pretrained(str(folder / name))
    return folder


def _is_tiny(file: _File, family: str, tiny: dict) -> bool:
    """True when the file's transformer has exactly the tiny pipeline's original keys and shapes."""
    plan = transformer_plan(family, tiny)
    if {file.prefix + k for k in plan} != file.transformer_keys():
        return False
    return all(list(file.handle.get_slice(file.prefix + k).get_shape()) ==
               [sum(tiny[m].shape[0] for m in members), *tiny[members[0]].shape[1:]] for k, (members, _) in plan.items())


def _cached_reference(family: str, file: _File) -> Path | None:
    """The family's reference diffusers repository from the local Hugging Face cache (never downloads)."""
    if family == "flux":
        repo = "black-forest-labs/FLUX.1-dev" if any("guidance_in." in k for k in file.keys) else \
            "black-forest-labs/FLUX.1-schnell"
    elif any(".x_block.attn2." in k for k in file.keys):
        repo = "stabilityai/stable-diffusion-3.5-medium"
    elif any(k.endswith("joint_blocks.37.x_block.mlp.fc1.weight") for k in file.keys):
        repo = "stabilityai/stable-diffusion-3.5-large"
    else:
        repo = "stabilityai/stable-diffusion-3-medium-diffusers"
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*.txt", "*.model"]))
    except Exception:  # not in the cache (or no hub client): the caller says what to pass
        return None
    return folder if (folder / "model_index.json").is_file() else None


def _class(library: str, name: str):
    return getattr(importlib.import_module(library), name)


def _fill(path: Path, family: str, folder: Path, name: str, model, state: dict):
    """Load `state` into the empty `model` (strict); a missing or mis-shaped weight is one sentence."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise DcustomError(f"checkpoint {str(path)!r} is not a complete {LABELS[family]} single file: its {name} lacks "
                           f"{len(missing)} of the {len(expected)} weights the configs in {str(folder)!r} expect "
                           f"(first: {missing[0]!r}); the file may be truncated.")
    unknown = sorted(set(state) - set(expected))
    wrong = next((k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)), None)
    if unknown or wrong:
        detail = (f"{wrong!r} is {list(state[wrong].shape)} in the file, {list(expected[wrong].shape)} expected"
                  if wrong else f"it has weights the configs do not ({unknown[0]!r})")
        raise DcustomError(f"checkpoint {str(path)!r} does not fit the {LABELS[family]} architecture in {str(folder)!r} "
                           f"({name}: {detail}); pass config= the diffusers folder of the model it was saved from.")
    model.load_state_dict(state, strict=True, assign=True)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()


def _empty(cls, folder: Path, subfolder: str):
    from accelerate import init_empty_weights

    if hasattr(cls, "from_config"):  # diffusers
        config = cls.load_config(str(folder), subfolder=subfolder, local_files_only=True)
        with init_empty_weights():
            return cls.from_config(config)
    config = cls.config_class.from_pretrained(str(folder), subfolder=subfolder, local_files_only=True)
    with init_empty_weights():
        return cls(config)


def _transformer(path, family, file: _File, folder: Path):
    model = _empty(_class("diffusers", TRANSFORMERS[family]), folder, "transformer")
    expected = model.state_dict()

    def read(original):
        key = file.prefix + original
        if key not in file.keys:
            raise KeyError(original)
        return file.get(key)

    try:
        state = transformer_from_original(read, expected, family)
    except KeyError as exc:
        raise DcustomError(f"checkpoint {str(path)!r} is not a complete {LABELS[family]} single file: it lacks the "
                           f"transformer weight {file.prefix + exc.args[0]!r} that the configs in {str(folder)!r} "
                           "expect; the file may be truncated.") from None
    except ValueError as exc:
        raise DcustomError(f"checkpoint {str(path)!r} does not fit the {LABELS[family]} architecture in {str(folder)!r} "
                           f"(transformer: {exc}); pass config= the diffusers folder of the model it was saved from.") from None
    plan = transformer_plan(family, expected)
    extra = sorted(k for k in file.transformer_keys() if k[len(file.prefix):] not in plan)
    if extra:
        raise DcustomError(f"checkpoint {str(path)!r} does not fit the {LABELS[family]} architecture in {str(folder)!r} "
                           f"(transformer: it has weights the configs do not, e.g. {extra[0]!r}); pass config= the "
                           "diffusers folder of the model it was saved from.")
    return _fill(path, family, folder, "transformer", model, state)


def _vae(path, family, file: _File, folder: Path, prefix: str):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    model = _empty(AutoencoderKL, folder, "vae")
    state = convert_ldm_vae_checkpoint({prefix + k: v for k, v in file.under(prefix).items()}, model.config)
    return _fill(path, family, folder, "VAE", model, state)


def _text_encoder(path, family, file: _File, folder: Path, attribute: str, library: str, class_name: str):
    import torch

    name = TEXT_ENCODERS[family][attribute]
    model = _empty(_class(library, class_name), folder, attribute)
    state = file.under(TEXT_PREFIXES[name])
    wraps = hasattr(model, "text_model")  # CLIPTextModelWithProjection keeps the level transformers 5 flattened
    state = {(k if wraps or not k.startswith("text_model.") else k.removeprefix("text_model.")): v
             for k, v in state.items() if not k.endswith("embeddings.position_ids")}
    expected = model.state_dict()
    if name == "clip_l" and "text_projection.weight" in expected:  # SD3 pools CLIP-L unprojected
        shape = expected["text_projection.weight"].shape
        state["text_projection.weight"] = torch.eye(*shape, dtype=file.dtype)
    elif "text_projection.weight" not in expected:
        state.pop("text_projection.weight", None)  # FLUX's CLIP-L: ComfyUI files carry an unused projection
    if "encoder.embed_tokens.weight" in expected and "shared.weight" in state:  # T5: tied to shared.weight
        state.setdefault("encoder.embed_tokens.weight", state["shared.weight"])
    return _fill(path, family, folder, f"text encoder {name}", model, state)


def _assemble(path: Path, family: str, file: _File, folder: Path):
    index = json.loads((folder / "model_index.json").read_text())
    vae_prefix = next((p for p in VAE_PREFIXES if any(k.startswith(p) for k in file.keys)), None)
    components = {}
    for attribute, entry in index.items():
        if attribute.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue
        library, class_name = entry
        text = TEXT_ENCODERS[family].get(attribute)
        if attribute == "transformer":
            components[attribute] = _transformer(path, family, file, folder)
        elif attribute == "vae" and vae_prefix is not None:
            components[attribute] = _vae(path, family, file, folder, vae_prefix)
        elif text is not None and any(k.startswith(TEXT_PREFIXES[text]) for k in file.keys):
            components[attribute] = _text_encoder(path, family, file, folder, attribute, library, class_name)
        else:  # tokenizers, scheduler, and what a transformer-only file leaves out
            components[attribute] = _from_folder(path, family, folder, attribute, library, class_name)
    return _class("diffusers", PIPELINES[family])(**components)


def _from_folder(path, family, folder: Path, attribute: str, library: str, class_name: str):
    """Tokenizers and the scheduler, and the weights a transformer-only file leaves out (load_pipeline casts them)."""
    try:
        return _class(library, class_name).from_pretrained(str(folder), subfolder=attribute, local_files_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DcustomError(f"checkpoint {str(path)!r} does not hold the {attribute} and the folder {str(folder)!r} cannot "
                           f"provide it ({reason}); pass config= a diffusers folder of the same {LABELS[family]} model "
                           "that holds it.") from None
