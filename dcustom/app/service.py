"""What the tabs call: model specs, a one-pipeline cache, generation. No Gradio here.

All GPU work of the app process goes through `AppState.gpu` (one job at a time); Gradio's queue
with a shared concurrency id already serialises events, the lock also covers direct callers.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from dcustom.app.paths import AppPaths
from dcustom.app.uploads import UploadLimits
from dcustom.errors import DcustomError

BUILTIN_PREFIXES = ("tiny:", "builtin:")
MAX_STEPS, MAX_COUNT, MAX_SIDE = 200, 8, 2048


def default_model_spec() -> str:
    from dcustom.models import toy_model_dir

    return "builtin:toy" if toy_model_dir() is not None else "tiny:sd15"


@dataclass
class AppState:
    paths: AppPaths
    limits: UploadLimits = field(default_factory=UploadLimits)
    default_model: str = field(default_factory=default_model_spec)
    device: str = "auto"
    gpu: threading.Lock = field(default_factory=threading.Lock)
    training: object = None  # TrainingQueue, created by make_state
    _pipe_key: Optional[str] = None
    _pipe: object = None

    # -- models ------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        """Built-in specs plus diffusers folders and checkpoint files under <data>/models."""
        from dcustom.models import toy_model_dir

        choices = (["builtin:toy"] if toy_model_dir() is not None else []) + ["tiny:sd15", "tiny:sd2", "tiny:sdxl"]
        for p in sorted(self.paths.models.iterdir()):
            if (p / "model_index.json").is_file() or p.suffix.lower() in (".safetensors", ".ckpt"):
                choices.append(f"models/{p.name}")
        return choices

    def resolve_model(self, spec: str) -> str:
        """A spec typed into the UI -> what load_pipeline gets; local paths must stay in the data folder."""
        from dcustom.models import HUB_ID

        spec = (spec or "").strip() or self.default_model
        if spec.startswith(BUILTIN_PREFIXES):
            return spec
        parts = spec.replace("\\", "/").split("/")
        local = self.paths.root / spec
        if HUB_ID.match(spec) and ".." not in parts and not local.exists() and parts[0] != "models":
            return spec  # a hub id, read from the local Hugging Face cache
        return str(self.paths.confine(spec, "model"))

    def pipeline(self, spec: str):
        """The pipeline for `spec`, loading it (and dropping the previous one) when it changes."""
        from dcustom.models import load_pipeline

        key = self.resolve_model(spec)
        if key != self._pipe_key:
            self._pipe, self._pipe_key = None, None  # free the old weights before loading new ones
            self._pipe = load_pipeline(key, device=self.device)
            self._pipe_key = key
        return self._pipe

    def inversion_cache(self, model_key: str):
        """Inversions of recent content/style images (in memory), reused while the model stays the same."""
        from dcustom.pipelines.inversion import InversionCache

        if getattr(self, "_cache_key", None) != model_key:
            self._cache, self._cache_key = InversionCache(None, max_items=8), model_key
        return self._cache

    # -- generation ----------------------------------------------------------------------------
    def generate(self, *, model: str, prompt: str, negative_prompt: str = "", steps: int = 20, guidance: float = 7.5,
                 seed: Optional[int] = None, width: Optional[int] = None, height: Optional[int] = None, count: int = 1,
                 scheduler: str = "default", adapters: Optional[list] = None, style_ref: Optional[str] = None,
                 style_strength: float = 1.0, on_step: Optional[Callable[[int, int], None]] = None) -> list[Path]:
        """Generate PNGs (parameters in their text chunks) into <data>/outputs; returns their paths.

        With `style_ref` (an image file, already checked) the images attend to it while they are
        sampled; a copy is kept in <data>/uploads/style-refs so the PNG metadata names a lasting file.
        """
        from dcustom.config import from_dict
        from dcustom.generate import generate
        from dcustom.generate_config import GenerateConfig

        check_range("steps", steps, 1, MAX_STEPS)
        check_range("count", count, 1, MAX_COUNT)
        check_range("guidance", guidance, 0.0, 50.0)
        for name, side in (("width", width), ("height", height)):
            if side:
                check_range(name, side, 8, MAX_SIDE)
                if side % 8:
                    raise DcustomError(f"{name}: {side} is not a multiple of 8; use e.g. {side // 8 * 8 or 8}.")
        if seed is not None and not 0 <= seed < 2**31 - count:
            raise DcustomError(f"seed: {seed} is out of range; use 0 to {2**31 - count - 1}, or random.")
        values = dict(model=self.resolve_model(model), prompt=prompt or "", negative_prompt=negative_prompt or "",
                      steps=int(steps), guidance=float(guidance), seed=None if seed is None else int(seed),
                      width=int(width) if width else None, height=int(height) if height else None,
                      count=int(count), scheduler=scheduler, output_dir=str(self.paths.outputs), device=self.device)
        from dcustom.app.library import adapter_folder

        # generate() puts exactly these adapters on the pipeline (and takes earlier ones off).
        values["adapters"] = [f"{adapter_folder(self.paths, name)}:{float(weight)}" for name, weight in adapters or []]
        if style_ref:
            check_range("style strength", style_strength, 0.0, 1.0)
            values["style_ref"] = str(self.keep_style_reference(style_ref))
            values["style_strength"] = float(style_strength)
        try:
            cfg = from_dict(GenerateConfig, values)
        except ValueError as exc:
            raise DcustomError(str(exc)) from None
        with self.gpu:
            pipe = self.pipeline(model)
            return generate(cfg, pipe=pipe, on_step=on_step, cache=self.inversion_cache(self._pipe_key))

    def keep_style_reference(self, path: str | Path) -> Path:
        """A copy of an uploaded style reference under <data>/uploads/style-refs, named by its content."""
        import shutil

        from dcustom.generate import file_sha256

        source = Path(path)
        digest = file_sha256(source)[:16]
        target = self.paths.uploads / "style-refs" / f"{digest}{source.suffix.lower() or '.png'}"
        if not target.is_file():
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name("." + target.name + ".tmp")
            shutil.copyfile(source, tmp)
            tmp.replace(target)
        return target


def check_range(name: str, value, low, high) -> None:
    if value is None or not low <= value <= high:
        raise DcustomError(f"{name}: {value!r} is out of range; accepted: {low} to {high}.")


def read_png_parameters(path: str | Path) -> dict:
    """The 'dcustom' JSON text chunk generate() writes into each PNG (empty when absent)."""
    import json

    from PIL import Image

    with Image.open(path) as image:
        text = image.text.get("dcustom") if hasattr(image, "text") else None
    return json.loads(text) if text else {}


def style_methods() -> list[str]:
    from dcustom.registry import methods_of_kind

    return methods_of_kind("style")


def stylize_files(state: AppState, *, method: str, model: str, content: str, style: str, steps: int, gamma: float,
                  temperature: float, extra: Optional[dict] = None,
                  on_step: Optional[Callable[[int, int], None]] = None) -> tuple[Path, Path]:
    """Content + style image files (already checked) -> (result PNG, content|style|result grid PNG)."""
    import uuid

    from dcustom.config import from_dict, to_dict
    from dcustom.registry import get_method

    spec = get_method(method, kind="style")
    check_range("steps", steps, 1, MAX_STEPS)
    cls = spec.config_class()
    out = state.paths.style / f"{time_stamp()}-{uuid.uuid4().hex[:6]}.png"
    values = {**to_dict(cls()), **(extra or {}), "method": method, "model": state.resolve_model(model),
              "content": str(content), "style": str(style), "output": str(out), "steps": int(steps),
              "gamma": float(gamma), "temperature": float(temperature), "device": state.device, "cache_dir": None}
    try:
        cfg = from_dict(cls, values, "style settings")
    except ValueError as exc:
        raise DcustomError(str(exc)) from None
    with state.gpu:
        pipe = state.pipeline(model)
        without_adapters(pipe)  # the Generate tab may have left its adapters on the shared pipeline
        cache = state.inversion_cache(state._pipe_key)
        result = Path(spec.implementation()(cfg, pipe=pipe, cache=cache, on_step=on_step))
    return result, result.with_name(result.stem + "-grid.png")


def without_adapters(pipe) -> None:
    from dcustom.adapters.load import apply_adapters

    apply_adapters(pipe, [])


def time_stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S")
