"""Train-tab logic without Gradio: the run YAML from a few form fields, checked paths, job status."""

from __future__ import annotations

import dataclasses
import time
import typing
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dcustom.app.jobs import Job, TrainingQueue, read_events, tail
from dcustom.app.paths import safe_name
from dcustom.app.uploads import new_upload_folder, store_images
from dcustom.errors import DcustomError

# Keys whose string values are file-system paths: each must stay inside the app's data folder.
PATH_KEY_SUFFIXES = ("dir", "path", "file", "images", "model_config")


@dataclass
class TrainForm:
    """The few settings that matter; everything else keeps the method's defaults or an override."""

    method: str
    model: str
    trigger: str = "sks"
    class_word: str = "toy"
    steps: int = 200
    lr: Optional[float] = None
    rank: Optional[int] = None
    resolution: Optional[int] = None
    seed: int = 0
    sample_every: int = 0
    validation_prompt: str = ""
    adapter_name: str = ""
    overrides: str = ""  # key=value lines, as `dcustom train --set`

    @property
    def instance_prompt(self) -> str:
        return " ".join(w for w in ("a photo of", self.trigger.strip(), self.class_word.strip()) if w)


def train_methods() -> list[str]:
    """Registered training methods that learn a subject from an image folder (LoRA, OFT, BOFT, TI...)."""
    from dcustom.registry import get_method, methods_of_kind

    out = []
    for method_id in methods_of_kind("train"):
        try:
            cls = get_method(method_id).config_class()
        except ImportError:  # a method whose module is not importable here is simply not offered
            continue
        if field_path(cls, "images") and field_path(cls, "instance_prompt"):
            out.append(method_id)
    return out


def field_path(cls, name: str) -> Optional[list[str]]:
    """Dotted path of the shallowest field called `name` in a nested config dataclass (BFS)."""
    queue = [(cls, [])]
    while queue:
        current, prefix = queue.pop(0)
        fields = [f for f in dataclasses.fields(current) if f.init]
        for f in fields:
            if f.name == name:
                return prefix + [name]
        hints = typing.get_type_hints(current)
        for f in fields:
            if dataclasses.is_dataclass(hints[f.name]):
                queue.append((hints[f.name], prefix + [f.name]))
    return None


def set_field(cls, data: dict, names: tuple[str, ...], value) -> bool:
    """Set the first of `names` the schema has; False when it has none of them."""
    for name in names:
        path = field_path(cls, name)
        if path:
            node = data
            for part in path[:-1]:
                node = node.setdefault(part, {})
            node[path[-1]] = value
            return True
    return False


def build_config(state, form: TrainForm, images_dir: Path, run_dir: Path):
    """The method's config object for this form; paths inside the data folder or one clear error."""
    from dcustom.config import apply_overrides, from_dict, to_dict
    from dcustom.registry import get_method

    cls = get_method(form.method, kind="train").config_class()
    if not form.trigger.strip() or not all(c.isalnum() or c in "_-<>" for c in form.trigger.strip()):
        raise DcustomError(f"trigger word: {form.trigger!r} is not valid; use one word of letters/digits, e.g. 'sks'.")
    data = to_dict(cls())
    data["method"] = form.method
    data["model"] = state.resolve_model(form.model)
    set_field(cls, data, ("images",), str(images_dir))
    set_field(cls, data, ("instance_prompt",), form.instance_prompt)
    if field_path(cls, "tokens"):  # textual inversion: the trigger is a new token, the class word its start
        set_field(cls, data, ("tokens",), [form.trigger.strip()])
        set_field(cls, data, ("init_words",), [form.class_word.strip() or "object"])
        set_field(cls, data, ("instance_prompt",), f"a photo of {form.trigger.strip()}")
    set_field(cls, data, ("steps",), int(form.steps))
    set_field(cls, data, ("seed",), int(form.seed))
    set_field(cls, data, ("sample_every",), int(form.sample_every))
    set_field(cls, data, ("checkpoint_every",), 0)  # the app checkpoints when stopped; resume is a CLI feature
    if form.lr:
        set_field(cls, data, ("lr",), float(form.lr))
    if form.rank:
        set_field(cls, data, ("rank", "r"), int(form.rank))
    if form.resolution:
        set_field(cls, data, ("resolution",), int(form.resolution))
    prompt = form.validation_prompt.strip() or field_value(data, cls, "instance_prompt")
    set_field(cls, data, ("validation_prompts",), [prompt]) or set_field(cls, data, ("validation_prompt",), prompt)
    set_field(cls, data, ("device",), state.device)
    overrides = [line.strip() for line in (form.overrides or "").splitlines() if line.strip()]
    data = apply_overrides(cls, data, overrides)
    set_field(cls, data, ("output_dir",), str(run_dir))  # after overrides: the app owns where runs go
    confine_paths(state, data)
    return from_dict(cls, data, "train settings")


def field_value(data: dict, cls, name: str):
    node = data
    for part in field_path(cls, name):
        node = node[part]
    return node


def confine_paths(state, data: dict, where: str = "") -> None:
    """Every path-like value (and the model) must resolve inside the data folder."""
    for key, value in data.items():
        dotted = f"{where}.{key}" if where else key
        if isinstance(value, dict):
            confine_paths(state, value, dotted)
        elif key == "model" and isinstance(value, str):
            data[key] = state.resolve_model(value)
        elif key == "resume" and isinstance(value, str) and value != "latest" and not value.isdigit():
            data[key] = str(state.paths.confine(value, dotted))
        elif isinstance(value, str) and value and key.endswith(PATH_KEY_SUFFIXES):
            data[key] = str(state.paths.confine(value, dotted))


def preview_yaml(state, form: TrainForm) -> str:
    """The YAML a Start would write, with placeholder folders (no files are created)."""
    from dcustom.config import to_yaml

    cfg = build_config(state, form, state.paths.uploads / "<uploaded-images>", state.paths.runs / "<job-id>")
    return to_yaml(cfg, comments=False)


def start_job(state, queue: TrainingQueue, form: TrainForm, files: list) -> Job:
    """Validate the uploads and the settings, write runs/<id>/run.yaml, queue the job."""
    from dcustom.config import save_yaml

    job_id = time.strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]
    name = safe_name(form.adapter_name.strip() or f"{form.method}-{form.trigger.strip()}-{job_id[-6:]}", "adapter name")
    if (state.paths.adapters / name).exists() or any(j.adapter_name == name and j.status not in ("failed", "cancelled")
                                                     for j in queue.jobs.values()):
        raise DcustomError(f"adapter name: {name!r} is already taken in the library; choose another name.")
    run_dir = state.paths.runs / job_id
    # Settings are checked before any file is written, so a bad form leaves nothing behind.
    build_config(state, form, state.paths.uploads / "check", run_dir)
    images_dir = new_upload_folder(state.paths.uploads, job_id)
    store_images(files, images_dir, state.limits, "training image")
    cfg = build_config(state, form, images_dir, run_dir)
    run_dir.mkdir(parents=True)
    config_path = save_yaml(cfg, run_dir / "run.yaml")
    return queue.submit(Job(job_id, form.method, run_dir, config_path, name))


def job_snapshot(queue: TrainingQueue, job_id: str) -> dict:
    """Everything the UI shows about a job, read from its events.jsonl and log."""
    job = queue.get(job_id)
    events = read_events(job.events_path)
    steps = [e for e in events if e.get("event") == "step"]
    samples = [p for e in events if e.get("event") == "sample" for p in e.get("paths", [])]
    last = steps[-1] if steps else {}
    return {
        "id": job.id, "method": job.method, "status": job.status, "adapter": job.adapter_name,
        "queue_position": queue.position(job_id), "step": last.get("step", 0),
        "total": last.get("total"), "loss": [(e["step"], e["loss"]) for e in steps if e.get("loss") is not None],
        "elapsed_s": last.get("elapsed_s"), "samples": [p for p in samples if Path(p).is_file()],
        "message": job.message, "log": tail(job.log_path), "run_dir": str(job.run_dir),
        "config": str(job.config_path),
    }
