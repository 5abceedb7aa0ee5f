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
            with gr.Accordion("Convert the selected adapter", open=False, elem_id="lib_convert_box"):
                to = gr.Radio(["kohya", "diffusers", "full"], value="kohya", label="Write the form read by",
                              info="kohya: ComfyUI/Forge, A1111, InvokeAI and diffusers (DoRA: ComfyUI/Forge only); "
                                   "diffusers: pipe.load_lora_weights; full: exact weight differences of any adapter "
                                   "(OFT/BOFT/DoRA) for ComfyUI/Forge, A1111 and InvokeAI. Inspect says which file "
                                   "is for which tool (use_with / not_for).", elem_id="lib_to")
                convert_btn = gr.Button("Convert", elem_id="lib_convert")
            with gr.Accordion("Merge adapters into a base model", open=False, elem_id="lib_merge_box"):
                merge_names = gr.Dropdown([], value=[], multiselect=True, allow_custom_value=True, label="Adapters",
                                          elem_id="lib_merge_names")
                merge_weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight of each", elem_id="lib_merge_weight")
                merge_model = gr.Dropdown(state.model_choices(), value=state.default_model, allow_custom_value=True,
                                          label="Base model", elem_id="lib_merge_model")
                merged_name = gr.Textbox(label="New model name (saved under models/)", elem_id="lib_merged_name")
                merge_btn = gr.Button("Merge", elem_id="lib_merge")
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
        return (table_rows, gr.update(choices=names), gr.update(choices=names),
                *[gr.update(choices=[None] + names) for _ in adapter_dropdowns])

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

    @shown_in_ui
    def on_convert(adapter, form):
        written = convert_adapter(state, adapter, form)
        return (f"Wrote `{written.name}` into `{adapter}`.", *rows())

    @shown_in_ui
    def on_merge(adapters, weight, model, new_name, progress=gr.Progress()):
        progress(0, desc="Merging")
        folder = merge_adapters(state, adapters, float(weight), model, new_name)
        return f"Saved the merged model as `models/{folder.name}`; pick it as a base model in the other tabs."

    outputs = [table, name, merge_names, *adapter_dropdowns]
    convert_btn.click(on_convert, [name, to], [message, *outputs], api_name="convert_adapter")
    merge_btn.click(on_merge, [merge_names, merge_weight, merge_model, merged_name], message, api_name="merge_adapters",
                    concurrency_id="gpu", concurrency_limit=1)
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


def convert_adapter(state, adapter: str, form: str):
    """Write another form (kohya, diffusers, full weight differences) next to the adapter's files in its library folder."""
    from dcustom.adapters.convert import convert_lora
    from dcustom.adapters.files import DIFFUSERS_LORA_NAME, FULL_DIFF_NAME, KOHYA_LORA_NAME

    names = {"kohya": KOHYA_LORA_NAME, "diffusers": DIFFUSERS_LORA_NAME, "full": FULL_DIFF_NAME}
    if form not in names:
        raise DcustomError(f"convert: {form!r} is not a known form; accepted: {', '.join(names)}.")
    folder = adapter_folder(state.paths, adapter)
    dest = folder / names[form]
    if dest.exists():
        raise DcustomError(f"convert: {adapter!r} already has {dest.name}; nothing to do.")
    source = {"kohya": folder / DIFFUSERS_LORA_NAME, "diffusers": folder / KOHYA_LORA_NAME}.get(form, folder)
    return convert_lora(source if source.is_file() else folder, form, dest)


def merge_adapters(state, adapters: list, weight: float, model: str, new_name: str):
    """Bake library adapters into a base model; the result is a new model folder under <data>/models."""
    from dcustom.adapters.merge import merge_into_model

    if not adapters:
        raise DcustomError("merge: no adapters were chosen; pick at least one from the library.")
    name = safe_name(new_name, "new model name")
    out = state.paths.models / name
    if out.exists():
        raise DcustomError(f"new model name: {name!r} is already taken under models/; choose another name.")
    specs = [f"{adapter_folder(state.paths, a)}:{weight}" for a in adapters]
    with state.gpu:
        return merge_into_model(state.resolve_model(model), specs, out)
