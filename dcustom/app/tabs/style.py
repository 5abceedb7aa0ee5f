"""Style tab: content + style image, method, γ / temperature / steps -> stylized image and grid."""

from __future__ import annotations

import gradio as gr

from dcustom.app.errors import shown_in_ui
from dcustom.app.service import MAX_STEPS, style_methods, stylize_files
from dcustom.app.uploads import check_image_file

GPU = dict(concurrency_id="gpu", concurrency_limit=1)


def build(state) -> dict:
    methods = style_methods()
    with gr.Row():
        with gr.Column(scale=5):
            with gr.Row():
                content = gr.Image(label="Content image", type="filepath", sources=["upload", "clipboard"],
                                   height=240, elem_id="style_content")
                style = gr.Image(label="Style image", type="filepath", sources=["upload", "clipboard"], height=240,
                                 elem_id="style_style")
            with gr.Row():
                method = gr.Radio(methods, value=methods[0] if methods else None, label="Method", elem_id="style_method")
                model = gr.Dropdown(state.model_choices(), value=state.default_model, allow_custom_value=True,
                                    label="Model", elem_id="style_model")
            with gr.Row():
                gamma = gr.Slider(0, 1, value=0.75, step=0.05, label="γ (content query preservation)", elem_id="style_gamma")
                temperature = gr.Slider(0.5, 3, value=1.5, step=0.05, label="Attention temperature", elem_id="style_temperature")
                steps = gr.Slider(1, MAX_STEPS, value=50, step=1, label="Steps", elem_id="style_steps")
            with gr.Accordion("Advanced settings", open=False):
                layers = gr.Textbox(value="decoder_self_late", label="Layers (family preset or regex)", elem_id="style_layers")
                with gr.Row():
                    step_start = gr.Slider(0, 1, value=0.0, step=0.01, label="Inject from (fraction of steps)")
                    step_end = gr.Slider(0, 1, value=1.0, step=0.01, label="Inject until")
                init_adain = gr.Checkbox(value=True, label="AdaIN the initial latent to the style")
            run = gr.Button("Stylize", variant="primary", elem_id="style_run")
        with gr.Column(scale=6):
            result = gr.Image(label="Result", type="filepath", format="png", interactive=False, height=320,
                              elem_id="style_result")
            grid = gr.Image(label="Content | style | result", type="filepath", format="png", interactive=False,
                            height=200, elem_id="style_grid")

    def on_method(name):
        """Each method's own defaults for γ, temperature, start step and AdaIN."""
        from dcustom.registry import get_method

        cfg = get_method(name, kind="style").config_class()()
        return cfg.gamma, cfg.temperature, cfg.step_start, cfg.init_adain

    method.change(on_method, method, [gamma, temperature, step_start, init_adain], queue=False, api_visibility="private")

    @shown_in_ui
    def on_stylize(content_file, style_file, method, model, gamma, temperature, steps, layers, step_start, step_end,
                   init_adain, progress=gr.Progress()):
        if not content_file or not style_file:
            raise ValueError("Stylize: give both a content image and a style image.")
        check_image_file(content_file, state.limits, "content image")
        check_image_file(style_file, state.limits, "style image")
        progress(0, desc="Loading model")

        def on_step(done, total):
            progress((done, total), desc="Inverting and sampling", unit="steps")

        out, grid_file = stylize_files(state, method=method, model=model, content=content_file, style=style_file,
                                       steps=int(steps), gamma=float(gamma), temperature=float(temperature),
                                       extra={"layers": layers, "step_start": float(step_start),
                                              "step_end": float(step_end), "init_adain": bool(init_adain)},
                                       on_step=on_step)
        return str(out), str(grid_file)

    run.click(on_stylize, [content, style, method, model, gamma, temperature, steps, layers, step_start, step_end,
                           init_adain], [result, grid], api_name="stylize", **GPU)
    return {"content": content}
