"""Generate tab: prompt and settings on the left, gallery on the right (A1111's layout)."""

from __future__ import annotations

import json

import gradio as gr

from dcustom.app.errors import shown_in_ui
from dcustom.app.service import MAX_COUNT, MAX_SIDE, MAX_STEPS, AppState, read_png_parameters
from dcustom.app.uploads import check_image_file
from dcustom.generate_config import SCHEDULERS

ADAPTER_SLOTS = 3
GPU = dict(concurrency_id="gpu", concurrency_limit=1)


def build(state: AppState) -> dict:
    with gr.Row():
        with gr.Column(scale=5):
            model = gr.Dropdown(state.model_choices(), value=state.default_model, allow_custom_value=True, label="Model",
                                info="builtin:toy, tiny:sd15|sd2|sdxl, models/<folder or file> in the data folder, or a cached hub id",
                                elem_id="gen_model")
            prompt = gr.Textbox(label="Prompt", lines=2, value="a red circle on a striped background", elem_id="gen_prompt")
            negative = gr.Textbox(label="Negative prompt", lines=1, elem_id="gen_negative")
            run = gr.Button("Generate", variant="primary", elem_id="gen_run")
            with gr.Row():
                steps = gr.Slider(1, MAX_STEPS, value=20, step=1, label="Steps", elem_id="gen_steps")
                guidance = gr.Slider(0, 20, value=7.5, step=0.5, label="Guidance", elem_id="gen_guidance")
            with gr.Row():
                seed = gr.Number(value=0, precision=0, label="Seed", elem_id="gen_seed")
                random_seed = gr.Checkbox(value=True, label="Random seed", elem_id="gen_random_seed")
                count = gr.Slider(1, MAX_COUNT, value=2, step=1, label="Images", elem_id="gen_count")
            with gr.Row():
                width = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Width (0: model default)", elem_id="gen_width")
                height = gr.Slider(0, MAX_SIDE, value=0, step=8, label="Height (0: model default)", elem_id="gen_height")
            scheduler = gr.Dropdown(list(SCHEDULERS), value="default", label="Sampler", elem_id="gen_scheduler")
            with gr.Accordion("Adapters", open=True, elem_id="gen_adapters"):
                slots = []
                for i in range(ADAPTER_SLOTS):
                    with gr.Row():
                        name = gr.Dropdown([], value=None, label=f"Adapter {i + 1}", scale=3, allow_custom_value=True, elem_id=f"gen_adapter_{i}")
                        weight = gr.Slider(-2, 2, value=1.0, step=0.05, label="Weight", scale=2, elem_id=f"gen_weight_{i}")
                        enabled = gr.Checkbox(value=True, label="On", scale=1, min_width=60, elem_id=f"gen_enabled_{i}")
                    slots += [name, weight, enabled]
                refresh = gr.Button("Refresh adapter list", size="sm", elem_id="gen_refresh_adapters")
            with gr.Accordion("Style reference (training-free, optional)", open=False, elem_id="gen_style_box"):
                style_ref = gr.Image(label="Style image", type="filepath", sources=["upload", "clipboard"], height=160,
                                     elem_id="gen_style_ref")
                style_strength = gr.Slider(0, 1, value=1.0, step=0.05, elem_id="gen_style_strength",
                                           label="Style strength (fraction of the steps that attend to the reference)")
                gr.Markdown("The images attend to the reference *while they are sampled* (shared self-attention "
                            "with the reference's DDIM inversion, as in StyleAligned; sampling uses DDIM). To restyle "
                            "a finished image instead, select it and use *Send selected image to the Style tab*.",
                            elem_id="gen_style_help")
        with gr.Column(scale=6):
            gallery = gr.Gallery(label="Images", columns=2, height=520, format="png", elem_id="gen_gallery")
            to_style = gr.Button("Send selected image to the Style tab", interactive=False, elem_id="gen_to_style")
            info = gr.Textbox(label="Parameters of the selected image", lines=4, max_lines=14, interactive=False,
                              elem_id="gen_info")
            selected = gr.State(None)

    @shown_in_ui
    def on_generate(model, prompt, negative, steps, guidance, seed, random_seed, count, width, height, scheduler,
                    *slot_values, progress=gr.Progress()):
        *slot_values, reference, strength = slot_values
        adapters = adapter_choices(slot_values)
        if reference:
            check_image_file(reference, state.limits, "style image")
        progress(0, desc="Loading model")
        desc = "Inverting the style reference, then denoising" if reference else "Denoising"

        def on_step(done, total):
            progress((done, total), desc=desc, unit="steps")

        paths = state.generate(model=model, prompt=prompt, negative_prompt=negative, steps=int(steps),
                               guidance=float(guidance), seed=None if random_seed else int(seed or 0),
                               width=int(width) or None, height=int(height) or None, count=int(count),
                               scheduler=scheduler, adapters=adapters, style_ref=reference or None,
                               style_strength=float(strength), on_step=on_step)
        items = [(str(p), caption_of(p)) for p in paths]
        first = read_png_parameters(paths[0])
        return items, json.dumps(first, indent=1), str(paths[0]), gr.update(interactive=True)

    run.click(on_generate, [model, prompt, negative, steps, guidance, seed, random_seed, count, width, height,
                            scheduler, *slots, style_ref, style_strength], [gallery, info, selected, to_style],
              api_name="generate", **GPU)

    def on_select(evt: gr.SelectData):
        path = (evt.value or {}).get("image", {}).get("path") if isinstance(evt.value, dict) else None
        if not path:
            return gr.update(), None, gr.update(interactive=False)
        return json.dumps(read_png_parameters(path), indent=1), path, gr.update(interactive=True)

    gallery.select(on_select, None, [info, selected, to_style], api_visibility="private", queue=False)

    def on_refresh():
        names = state_adapter_names(state)
        return [gr.update(choices=[None] + names) for _ in range(ADAPTER_SLOTS)]

    names_only = slots[0::3]
    refresh.click(on_refresh, None, names_only, api_name="refresh_adapters", queue=False)
    return {"model": model, "refresh": on_refresh, "adapter_dropdowns": names_only, "selected": selected,
            "to_style": to_style, "gallery": gallery}


def adapter_choices(slot_values) -> list[tuple[str, float]]:
    """(name, weight) for each filled, enabled slot, in slot order."""
    out = []
    for i in range(0, len(slot_values), 3):
        name, weight, enabled = slot_values[i:i + 3]
        if name and enabled:
            out.append((str(name), float(weight)))
    return out


def state_adapter_names(state: AppState) -> list[str]:
    from dcustom.app.library import list_adapters

    return [a.name for a in list_adapters(state.paths)]


def caption_of(path) -> str:
    p = read_png_parameters(path)
    caption = f"seed {p.get('seed')} · {p.get('steps')} steps · cfg {p.get('guidance')}"
    reference = p.get("style_reference")
    if reference:
        caption += f" · style ref {reference.get('strength')}"
    return caption
