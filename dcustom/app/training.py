"""Train-tab logic without Gradio: the run YAML from a few form fields, checked paths, job status."""

from __future__ import annotations

import time
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


# Where each Train-tab field goes in a method's config: explicit dotted paths, never a search for a field name.
TRAIN_TAB_METHODS = ("lora", "oft", "boft", "textual_inversion")
FORM_PATHS = {
    "images": "data.images", "instance_prompt": "data.instance_prompt", "resolution": "data.resolution",
    "steps": "train.steps", "seed": "train.seed", "lr": "train.lr", "sample_every": "train.sample_every",
    "checkpoint_every": "train.checkpoint_every", "device": "train.device", "output_dir": "train.output_dir",
    "validation_prompts": "validation_prompts", "tokens": "tokens", "init_words": "init_words",
}
# The LoRA rank: the lora method's own key, textual inversion's `lora:` section (used with adapter: lora).
LORA_RANK_PATH = {"lora": "rank", "textual_inversion": "lora.rank"}


def train_methods() -> list[str]:
    """The registered methods the Train tab offers: those that learn a subject from an image folder."""
    from dcustom.registry import methods_of_kind

    registered = methods_of_kind("train")
    return [m for m in TRAIN_TAB_METHODS if m in registered]


def put(data: dict, path: str, value) -> None:
    """Set dotted `path` in a config mapping (its sections exist: `data` starts as a full config)."""
    *sections, key = path.split(".")
    node = data
    for part in sections:
        node = node[part]
    node[key] = value


def get(data: dict, path: str):
    node = data
    for part in path.split("."):
        node = node[part]
    return node


def build_config(state, form: TrainForm, images_dir: Path, run_dir: Path, notes: Optional[list] = None):
    """The method's config object for this form; paths inside the data folder or one clear error. A form
    value the method does not use is said in `notes` (a rank for OFT/BOFT), never silently dropped."""
    from dcustom.config import apply_overrides, from_dict, to_dict
    from dcustom.registry import get_method

    if form.method not in TRAIN_TAB_METHODS:
        raise DcustomError(f"method: {form.method!r} is not trained from the Train tab; accepted: "
                           f"{', '.join(TRAIN_TAB_METHODS)}.")
    cls = get_method(form.method, kind="train").config_class()
    trigger = form.trigger.strip()
    if not trigger or not all(c.isalnum() or c in "_-<>" for c in trigger):
        raise DcustomError(f"trigger word: {form.trigger!r} is not valid; use one word of letters/digits, e.g. 'sks'.")
    data = to_dict(cls())
    data["method"] = form.method
    data["model"] = state.resolve_model(form.model)
    put(data, FORM_PATHS["images"], str(images_dir))
    if form.method == "textual_inversion":  # the trigger is a new token, the class word its start
        put(data, FORM_PATHS["tokens"], [trigger])
        put(data, FORM_PATHS["init_words"], [form.class_word.strip() or "object"])
        put(data, FORM_PATHS["instance_prompt"], f"a photo of {trigger}")
    else:
        put(data, FORM_PATHS["instance_prompt"], form.instance_prompt)
    put(data, FORM_PATHS["steps"], int(form.steps))
    put(data, FORM_PATHS["seed"], int(form.seed))
    put(data, FORM_PATHS["sample_every"], int(form.sample_every))
    put(data, FORM_PATHS["checkpoint_every"], 0)  # the app checkpoints when stopped; resume is a CLI feature
    if form.lr:
        put(data, FORM_PATHS["lr"], float(form.lr))
    if form.rank:
        if form.method in LORA_RANK_PATH:
            put(data, LORA_RANK_PATH[form.method], int(form.rank))
        elif notes is not None:
            notes.append(f"LoRA rank {form.rank} is not used: {form.method} trains no LoRA (its size is block_size).")
    if form.resolution:
        put(data, FORM_PATHS["resolution"], int(form.resolution))
    prompt = form.validation_prompt.strip() or get(data, FORM_PATHS["instance_prompt"])
    put(data, FORM_PATHS["validation_prompts"], [prompt])
    put(data, FORM_PATHS["device"], state.device)
    overrides = [line.strip() for line in (form.overrides or "").splitlines() if line.strip()]
    data = apply_overrides(cls, data, overrides)
    put(data, FORM_PATHS["output_dir"], str(run_dir))  # after overrides: the app owns where runs go
    if form.rank and form.method == "textual_inversion" and data.get("adapter") != "lora" and notes is not None:
        notes.append(f"LoRA rank {form.rank} is used only with adapter: lora (set it under More settings).")
    confine_paths(state, data)
    return from_dict(cls, data, "train settings")


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
    """The YAML a Start would write, with placeholder folders (no files are created); notes come first as comments."""
    from dcustom.config import to_yaml

    notes = []
    cfg = build_config(state, form, state.paths.uploads / "<uploaded-images>", state.paths.runs / "<job-id>", notes)
    return "".join(f"# note: {n}\n" for n in notes) + to_yaml(cfg, comments=False)


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
    notes = []
    cfg = build_config(state, form, images_dir, run_dir, notes)
    run_dir.mkdir(parents=True)
    config_path = save_yaml(cfg, run_dir / "run.yaml")
    return queue.submit(Job(job_id, form.method, run_dir, config_path, name, message=" ".join(notes)))


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
