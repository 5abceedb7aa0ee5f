"""`build_app(...)` assembles the tabs into one gr.Blocks; `launch(...)` serves it."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

from dcustom.app.paths import AppPaths
from dcustom.app.service import AppState
from dcustom.app.uploads import UploadLimits

TITLE = "dcustom"


def build_app(state: AppState):
    import gradio as gr

    from dcustom.app.tabs import adapters, generate, style, train

    with gr.Blocks(title=TITLE, delete_cache=(3600, 24 * 3600)) as demo:
        gr.Markdown(f"### dcustom · data folder `{state.paths.root}`", elem_id="app_header")
        with gr.Tabs(elem_id="tabs") as tabs:
            with gr.Tab("Generate", id="generate", elem_id="tab_generate"):
                gen = generate.build(state)
            with gr.Tab("Style", id="style", elem_id="tab_style"):
                sty = style.build(state)
            with gr.Tab("Train", id="train", elem_id="tab_train"):
                train.build(state, state.training, gen["adapter_dropdowns"])
            with gr.Tab("Adapters", id="adapters", elem_id="tab_adapters"):
                lib = adapters.build(state, gen["adapter_dropdowns"])
        # "Send to Style tab": the selected generated image becomes the content image.
        gen["to_style"].click(lambda path: (path, gr.Tabs(selected="style")), gen["selected"], [sty["content"], tabs],
                              queue=False, api_visibility="private")
        rows, outputs = lib["load"]
        demo.load(rows, None, outputs, queue=False, api_visibility="private")
    demo.dcustom_tabs = tabs
    return demo


def make_state(data_dir: str | Path, default_model: Optional[str] = None, device: str = "auto",
               limits: Optional[UploadLimits] = None) -> AppState:
    from dcustom.app.jobs import TrainingQueue

    paths = AppPaths.create(data_dir)
    state = AppState(paths, limits=limits or UploadLimits(), device=device)
    state.training = TrainingQueue(paths.adapters, cwd=paths.root)
    state.training.restore(paths.runs)
    if default_model:
        state.default_model = default_model
    return state


def launch(data_dir: str | Path = "dcustom-data", host: str = "127.0.0.1", port: int = 7860, share: bool = False,
           default_model: Optional[str] = None, device: str = "auto", max_queue: int = 32,
           limits: Optional[UploadLimits] = None, prevent_thread_lock: bool = False, quiet: bool = False):
    """Serve the app; only the data folder is exposed to the browser; returns (demo, local_url)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    state = make_state(data_dir, default_model, device, limits)
    demo = build_app(state)
    demo.queue(max_size=max_queue, default_concurrency_limit=1)
    _, url, _ = demo.launch(server_name=host, server_port=port, share=share, allowed_paths=[str(state.paths.root)],
                            max_file_size=state.limits.max_bytes, prevent_thread_lock=prevent_thread_lock,
                            quiet=quiet, show_error=True)
    demo.dcustom_state = state
    return demo, url


def close(demo) -> None:
    """Stop the server and any training child process it started."""
    state = getattr(demo, "dcustom_state", None)
    if state is not None and state.training is not None:
        state.training.close()
    demo.close()
