"""Adapters tab: the library folder — list, inspect metadata, import a file, delete."""

from __future__ import annotations

import json
import shutil

import gradio as gr

from dcustom.app.errors import shown_in_ui
from dcustom.app.library import adapter_folder, list_adapters
from dcustom.app.paths import safe_name
from dcustom.errors import DcustomError


def build(state, adapter_dropdowns: list) -> dict:
    with gr.Row():
        with gr.Column(scale=4):
            table = gr.Dataframe(headers=["adapter", "files"], datatype=["str", "str"], interactive=False,
                                 label="Library", elem_id="lib_table")
            refresh = gr.Button("Refresh", size="sm", elem_id="lib_refresh")
            name = gr.Dropdown([], value=None, allow_custom_value=True, label="Adapter", elem_id="lib_name")
            with gr.Row():
                inspect_btn = gr.Button("Inspect", elem_id="lib_inspect")
                delete_btn = gr.Button("Delete", variant="stop", elem_id="lib_delete")
            with gr.Accordion("Import a .safetensors adapter", open=False):
                upload = gr.File(label="LoRA file (diffusers or kohya keys)", file_types=[".safetensors"],
                                 elem_id="lib_upload")
                new_name = gr.Textbox(label="Name in the library", elem_id="lib_new_name")
                import_btn = gr.Button("Import", elem_id="lib_import")
        with gr.Column(scale=6):
            details = gr.JSON(label="Metadata", elem_id="lib_details")
            message = gr.Markdown("", elem_id="lib_message")

    def rows():
        entries = list_adapters(state.paths)
        names = [e.name for e in entries]
        table_rows = [[e.name, ", ".join(e.files)] for e in entries]
        return table_rows, gr.update(choices=names), *[gr.update(choices=[None] + names) for _ in adapter_dropdowns]

    @shown_in_ui
    def on_inspect(adapter: str) -> dict:
        return inspect_adapter(state, adapter)

    @shown_in_ui
    def on_delete(adapter):
        folder = adapter_folder(state.paths, adapter)
        shutil.rmtree(folder)
        return (f"Deleted `{adapter}`.", *rows())

    @shown_in_ui
    def on_import(file, adapter):
        target = import_lora(state, file, adapter)
        return (f"Imported `{target.name}`.", *rows())

    outputs = [table, name, *adapter_dropdowns]
    refresh.click(rows, None, outputs, api_name="library", queue=False)
    inspect_btn.click(on_inspect, name, details, api_name="inspect_adapter")
    delete_btn.click(on_delete, name, [message, *outputs], api_name="delete_adapter")
    import_btn.click(on_import, [upload, new_name], [message, *outputs], api_name="import_adapter")
    return {"load": (rows, outputs)}


def inspect_adapter(state, adapter: str) -> dict:
    """Format, method, family, base model, tensor and parameter counts of each file in the folder."""
    from dcustom.adapters.load import adapter_summary

    folder = adapter_folder(state.paths, adapter)
    out = {"name": folder.name, "files": {}}
    for file in sorted(folder.rglob("*.safetensors")):
        try:
            summary = adapter_summary(file)
            summary.pop("path", None)  # absolute server paths are not for the browser (and Gradio would serve them)
            out["files"][str(file.relative_to(folder))] = summary
        except DcustomError as exc:
            out["files"][str(file.relative_to(folder))] = {"error": str(exc)}
    config = folder / "config.yaml"
    if config.is_file():
        out["training_config"] = config.read_text()
    return json.loads(json.dumps(out, default=str))


def import_lora(state, file, adapter: str):
    """Copy one uploaded LoRA .safetensors into a new library folder, after checking it is one."""
    from pathlib import Path

    from dcustom.adapters.load import adapter_summary

    if not file:
        raise DcustomError("import: no file was given; upload a .safetensors LoRA.")
    src = Path(file)
    name = safe_name(adapter or src.stem, "adapter name")
    target = state.paths.adapters / name
    if target.exists():
        raise DcustomError(f"adapter name: {name!r} is already taken in the library; choose another name.")
    if src.suffix != ".safetensors":
        raise DcustomError(f"import: {src.name!r} is not a .safetensors file; only safetensors adapters are accepted.")
    try:
        summary = adapter_summary(src)
    except DcustomError:
        raise
    except Exception:  # a corrupt header: safetensors raises its own error types
        raise DcustomError(f"import: {src.name!r} is not a readable safetensors file.") from None
    if summary.get("format") not in ("kohya", "diffusers") and not str(summary.get("format")).startswith(("kohya", "diffusers")):
        raise DcustomError(f"import: {src.name!r} holds no LoRA weights dcustom recognises.")
    tmp = state.paths.adapters / f".{name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    dest_name = "lora_kohya.safetensors" if str(summary["format"]).startswith("kohya") else "pytorch_lora_weights.safetensors"
    shutil.copyfile(src, tmp / dest_name)
    tmp.rename(target)
    return target
