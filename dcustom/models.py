"""`load_pipeline(spec)`: one entry point for every way a user names a base model.

Accepted specs:
  tiny:sd15 | tiny:sd2 | tiny:sdxl   random tiny pipelines for tests
  tiny:sd3 | tiny:flux               random tiny MM-DiT pipelines (CLIP + T5, flow matching)
  builtin:toy                        the embedded toy model shipped inside the package
  path/to/diffusers-folder           a folder with model_index.json
  path/to/model.safetensors|.ckpt    one checkpoint file (diffusers from_single_file)
  org/name                           a Hugging Face hub id (from the local cache when offline)
"""

from __future__ import annotations

import os
import re
import socket
from pathlib import Path

from dcustom.errors import DcustomError
from dcustom.families import Family, detect_family

ACCEPTED = (
    "'tiny:sd15', 'tiny:sd2', 'tiny:sdxl', 'tiny:sd3', 'tiny:flux', 'builtin:toy', a diffusers folder containing model_index.json, "
    "a .safetensors/.ckpt checkpoint file, or a hub id like 'org/name'"
)
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_dtype(dtype, device: str):
    import torch

    if dtype is None or dtype == "auto":
        return torch.float16 if device.startswith("cuda") else torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16,
             "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}
    if dtype not in names:
        raise DcustomError(f"dtype {dtype!r} is not known; accepted: auto, fp32, fp16, bf16.")
    return names[dtype]


def resolve_device(device: str | None = "auto") -> str:
    import torch

    if device in (None, "auto"):
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return device


def family_of(pipe) -> Family:
    """The pipeline's family, as recorded by load_pipeline or detected from its components."""
    fam = getattr(pipe, "_dcustom_family", None)
    return fam if fam is not None else detect_family(pipe)


def _quiet_libraries() -> None:
    """Silence load-time chatter (torchvision fallbacks, fp32-module notes) that users cannot act on."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    transformers.logging.set_verbosity_error()


def dtype_kwarg(torch_dtype) -> dict:
    """diffusers renamed `torch_dtype` to `dtype` in 0.42; pass whichever this version takes."""
    import diffusers

    major, minor = (int(x) for x in diffusers.__version__.split(".")[:2])
    return {"dtype": torch_dtype} if (major, minor) >= (0, 42) else {"torch_dtype": torch_dtype}


def load_pipeline(spec: str, dtype="auto", device: str | None = "auto", config: str | None = None):
    """Load a text-to-image pipeline from `spec` (see module doc) on `device` in `dtype`.

    `config` is only used for single files: a local diffusers folder (or hub id) whose configs
    describe the checkpoint's architecture, for offline use. The returned pipeline is a stock
    diffusers pipeline; `family_of(pipe)` tells its family.
    """
    spec = str(spec).strip()
    _quiet_libraries()
    device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, device)
    pipe = _load(spec, torch_dtype, config)
    pipe._dcustom_family = detect_family(pipe)
    pipe._dcustom_spec = spec
    pipe.to(device=device, dtype=torch_dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _load(spec: str, torch_dtype, config):
    if spec.startswith("tiny:"):
        from dcustom.tiny import TINY_SPECS, build_tiny_pipeline

        kind = spec.split(":", 1)[1]
        if kind not in TINY_SPECS:
            raise DcustomError(f"model spec {spec!r} is not a tiny pipeline; accepted: {', '.join('tiny:' + k for k in TINY_SPECS)}.")
        return build_tiny_pipeline(kind)
    if spec.startswith("builtin:"):
        return _load_builtin(spec, torch_dtype)
    path = Path(spec).expanduser()
    if path.is_dir():
        return _load_folder(path, torch_dtype)
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        if not path.is_file():
            raise DcustomError(f"checkpoint file {spec!r} does not exist.")
        return _load_single_file(path, torch_dtype, config)
    if path.exists():
        raise DcustomError(f"model file {spec!r} has an unsupported type; accepted: {ACCEPTED}.")
    if spec.startswith((".", "/", "~")) or os.sep in spec.strip("/").split("/", 1)[-1]:
        raise DcustomError(f"model path {spec!r} does not exist; accepted: {ACCEPTED}.")
    if HUB_ID.match(spec):
        return _load_hub(spec, torch_dtype)
    raise DcustomError(f"model spec {spec!r} is not recognised; accepted: {ACCEPTED}.")


def _load_builtin(spec: str, torch_dtype):
    if spec != "builtin:toy":
        raise DcustomError(f"model spec {spec!r} is not a built-in model; accepted: 'builtin:toy'.")
    folder = toy_model_dir()
    if folder is None:
        raise DcustomError(
            "builtin:toy is not shipped in this install yet: train it on this machine's CPU with "
            "'bash scripts/toy/train_cpu.sh' (docs/toy_model.md), or use 'tiny:sd15', a random test model."
        )
    return _load_folder(folder, torch_dtype)


TOY_OVERRIDE_ENV = "DCUSTOM_TOY_MODEL_DIR"


def toy_model_dir() -> Path | None:
    """The folder behind builtin:toy: the shipped one, or None when this install has none.

    DCUSTOM_TOY_MODEL_DIR points builtin:toy at another toy-model folder, so a candidate from
    'dcustom toyworld train-base' can be run through the quality tests before it is installed."""
    override = os.environ.get(TOY_OVERRIDE_ENV)
    if override:
        folder = Path(override).expanduser().resolve()
        if not (folder / "model_index.json").is_file():
            raise DcustomError(f"{TOY_OVERRIDE_ENV}={override!r} is not a diffusers model folder (no model_index.json); "
                               "point it at the model/ folder of a 'dcustom toyworld train-base' run or unset it.")
        return folder
    folder = Path(__file__).resolve().parent / "toyworld" / "weights" / "toy"
    return folder if (folder / "model_index.json").is_file() else None


def _load_folder(path: Path, torch_dtype):
    from diffusers import DiffusionPipeline

    if not (path / "model_index.json").is_file():
        raise DcustomError(f"folder {str(path)!r} is not a diffusers model folder: it has no model_index.json.")
    pipe = DiffusionPipeline.from_pretrained(str(path), local_files_only=True, **dtype_kwarg(torch_dtype))
    _check_supported(pipe, str(path))
    return pipe


def _check_supported(pipe, where: str):
    from diffusers import FluxPipeline, StableDiffusion3Pipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if not isinstance(pipe, (StableDiffusionPipeline, StableDiffusionXLPipeline, StableDiffusion3Pipeline, FluxPipeline)):
        raise DcustomError(
            f"model {where!r} is a {type(pipe).__name__}; accepted: StableDiffusionPipeline (SD1.x/2.x), "
            "StableDiffusionXLPipeline (SDXL), StableDiffusion3Pipeline (SD3/3.5) or FluxPipeline (FLUX.1)."
        )


def _checkpoint_keys(path: Path) -> list[str]:
    if path.suffix.lower() == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return list(f.keys())
        except Exception as exc:  # safetensors raises its own error types
            raise DcustomError(
                f"checkpoint {str(path)!r} is not a readable safetensors file ({exc}); "
                "re-download it or pass a diffusers folder instead."
            ) from None
    import torch

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise DcustomError(
            f"checkpoint {str(path)!r} could not be read as a weights-only .ckpt ({str(exc).splitlines()[0]}); "
            "convert it to .safetensors."
        ) from None
    state = state.get("state_dict", state) if isinstance(state, dict) else {}
    return list(state)


def _load_single_file(path: Path, torch_dtype, config):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from dcustom.single_file.dit_load import dit_family_of_keys, load_dit_single_file

    keys = _checkpoint_keys(path)
    dit = dit_family_of_keys(keys)
    if dit is not None:  # SD3/3.5 or FLUX.1: offline, configs from config=, the tiny family or the local HF cache
        return load_dit_single_file(path, dit, config, torch_dtype)
    if not any(k.startswith("model.diffusion_model.") for k in keys):
        raise DcustomError(
            f"checkpoint {str(path)!r} has no UNet weights (no 'model.diffusion_model.*' keys) and no SD3/FLUX "
            "transformer ('joint_blocks.*', 'double_blocks.*'); accepted: a full SD1.x/2.x/SDXL, SD3/3.5 or FLUX.1 "
            "checkpoint. For a LoRA file use load_adapter instead."
        )
    is_xl = any(k.startswith("conditioner.embedders.1.") for k in keys)
    cls = StableDiffusionXLPipeline if is_xl else StableDiffusionPipeline
    kwargs = dtype_kwarg(torch_dtype)
    if config is not None:
        kwargs["config"] = str(config)
        kwargs["local_files_only"] = True
        if is_xl:  # equal-width text encoders (tiny SDXL) need the second one loaded by key prefix
            from dcustom.single_file.read import sdxl_text_encoder_2_override

            kwargs.update(sdxl_text_encoder_2_override(path, config, torch_dtype))
    elif not _hub_reachable():
        kwargs["local_files_only"] = True
    try:
        pipe = cls.from_single_file(str(path), **kwargs)
    except DcustomError:
        raise
    except Exception as exc:
        if kwargs.get("local_files_only") and config is None:
            raise DcustomError(
                f"checkpoint {str(path)!r} needs its architecture configs, which are not cached and the hub "
                "cannot be reached; pass config=<a local diffusers folder of the same family> (generate: --model-config)."
            ) from None
        raise DcustomError(f"checkpoint {str(path)!r} could not be loaded as {cls.__name__}: {exc}") from None
    if not is_xl and "safety_checker" in pipe.components:
        pipe.safety_checker = None
    return pipe


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def _load_hub(spec: str, torch_dtype):
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(spec, local_files_only=True, **dtype_kwarg(torch_dtype))
    except Exception:
        if not _hub_reachable():
            raise DcustomError(
                f"model {spec!r} is not in the local Hugging Face cache and the hub cannot be reached "
                "(offline); download it once with network, or pass a local folder or checkpoint file."
            ) from None
        try:
            pipe = DiffusionPipeline.from_pretrained(spec, **dtype_kwarg(torch_dtype))
        except Exception as exc:
            raise DcustomError(f"model {spec!r} could not be loaded from the hub: {exc}") from None
    _check_supported(pipe, spec)
    return pipe
