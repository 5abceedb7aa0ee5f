"""Train tab: images + trigger word + method + steps; the run YAML shown; live progress from events.jsonl."""

from __future__ import annotations

import json

import gradio as gr

from dcustom.app.errors import shown_in_ui
from dcustom.app.training import TrainForm, job_snapshot, preview_yaml, start_job, train_methods

FORM_FIELDS = ("method", "model", "trigger", "class_word", "steps", "lr", "rank", "resolution", "seed",
               "sample_every", "validation_prompt", "adapter_name", "overrides")


def build(state, queue, adapter_dropdowns: list) -> dict:
    """`adapter_dropdowns`: the Generate tab's adapter slots, refreshed when a run adds an adapter."""
    methods = train_methods()
    with gr.Row():
        with gr.Column(scale=5):
            images = gr.File(label="Training images (3-20 photos of one subject)", file_count="multiple",
                             file_types=["image"], elem_id="train_images")
            example = gr.Button("Use the example subject: 5 renders of the toy robot (builtin:toy never saw it)",
                                size="sm", elem_id="train_example")
            with gr.Row():
                method = gr.Radio(methods, value=methods[0] if methods else None, label="Method", elem_id="train_method")
                model = gr.Dropdown(state.model_choices(), value=state.default_model, allow_custom_value=True, label="Base model",
                                    elem_id="train_model")
            with gr.Row():
                trigger = gr.Textbox(value="sks", label="Trigger word", elem_id="train_trigger")
                class_word = gr.Textbox(value="toy", label="Class word", elem_id="train_class")
                steps = gr.Number(value=400, precision=0, minimum=1, maximum=100_000, label="Steps", elem_id="train_steps")
            with gr.Accordion("Advanced settings", open=False, elem_id="train_advanced"):
                with gr.Row():
                    lr = gr.Number(value=0, label="Learning rate (0: method default)", elem_id="train_lr")
                    rank = gr.Number(value=0, precision=0, label="LoRA rank (0: method default)", elem_id="train_rank")
                    resolution = gr.Number(value=0, precision=0, label="Resolution (0: model native)",
                                           elem_id="train_resolution")
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="Seed", elem_id="train_seed")
                    sample_every = gr.Number(value=0, precision=0, label="Samples every N steps (0: at the end)",
                                             elem_id="train_sample_every")
                validation_prompt = gr.Textbox(label="Validation prompt (empty: 'a photo of <trigger> <class>')",
                                               elem_id="train_validation_prompt")
                adapter_name = gr.Textbox(label="Adapter name in the library (empty: automatic)", elem_id="train_adapter_name")
                overrides = gr.Textbox(label="More settings, one key=value per line (as `dcustom train --set`)", lines=3,
                                       placeholder="min_snr_gamma=5\ntrain.batch_size=2", elem_id="train_overrides")
            with gr.Row():
                show_yaml = gr.Button("Show YAML", elem_id="train_show_yaml")
                start = gr.Button("Start training", variant="primary", elem_id="train_start")
                stop = gr.Button("Stop", variant="stop", elem_id="train_stop")
            yaml_box = gr.Code(label="Run config (what `dcustom train <method> --config` reads)", language="yaml",
                               interactive=False, lines=8, max_lines=20, elem_id="train_yaml")
            yaml_file = gr.File(label="Download the YAML", interactive=False, elem_id="train_yaml_file")
        with gr.Column(scale=6):
            job = gr.Dropdown(list(reversed(queue.jobs)), value=None, label="Job", allow_custom_value=True,
                              elem_id="train_job")
            status = gr.Markdown("No training job yet.", elem_id="train_status")
            progress = gr.Slider(0, 100, value=0, label="Progress (%)", interactive=False, elem_id="train_progress")
            loss_plot = gr.Plot(label="Training loss", elem_id="train_loss")
            samples = gr.Gallery(label="Validation samples", columns=4, height=200, object_fit="contain",
                                 preview=False, elem_id="train_samples")
            log = gr.Textbox(label="Log", lines=6, max_lines=12, interactive=False, elem_id="train_log")
    timer = gr.Timer(1.0)
    form_inputs = [method, model, trigger, class_word, steps, lr, rank, resolution, seed, sample_every,
                   validation_prompt, adapter_name, overrides]

    def form_of(values) -> TrainForm:
        kw = dict(zip(FORM_FIELDS, values))
        for key in ("steps", "seed", "sample_every"):
            kw[key] = int(kw[key] or 0)
        kw["steps"] = kw["steps"] or 1
        kw["rank"] = int(kw["rank"]) if kw["rank"] else None
        kw["resolution"] = int(kw["resolution"]) if kw["resolution"] else None
        kw["lr"] = float(kw["lr"]) if kw["lr"] else None
        return TrainForm(**{k: v if v is not None or k in ("lr", "rank", "resolution") else "" for k, v in kw.items()})

    @shown_in_ui
    def on_show_yaml(*values):
        return preview_yaml(state, form_of(values))

    @shown_in_ui
    def on_start(files, *values):
        new = start_job(state, queue, form_of(values), files)
        ids = list(reversed(queue.jobs))
        return gr.update(choices=ids, value=new.id), new.config_path.read_text(), str(new.config_path), new.id

    @shown_in_ui
    def on_stop(job_id):
        if not job_id:
            raise ValueError("Stop: no job is selected.")
        return queue.stop(job_id).status

    def on_tick(job_id, known_adapters, seen):
        from dcustom.app.library import list_adapters

        names = [a.name for a in list_adapters(state.paths)]
        adapter_updates = [gr.update(choices=[None] + names) if names != known_adapters else gr.update()
                           for _ in adapter_dropdowns]
        if not job_id:
            return (gr.update(),) * 5 + (names, seen, *adapter_updates)
        snap = job_snapshot(queue, job_id)
        key = [snap["id"], snap["status"], snap["step"], len(snap["samples"]), snap["message"], len(snap["log"])]
        if key == seen:  # nothing new: leave the page alone (no flicker, no redraw of the plot)
            return (gr.update(),) * 5 + (names, seen, *adapter_updates)
        return (*render(snap), names, key, *adapter_updates)

    @shown_in_ui
    def on_example():
        """The demo's subject in one click: its renders as the images, its trigger phrase, builtin:toy."""
        from dcustom.toyworld.demo import DEMO_SUBJECT
        from dcustom.toyworld.subjects import write_subject_examples

        folder, phrase = write_subject_examples(DEMO_SUBJECT, state.paths.root / "examples" / DEMO_SUBJECT, masks=False)
        trigger_word, class_name = phrase.split()
        files = sorted(str(p) for p in folder.glob("*.png"))
        model_value = "builtin:toy" if "builtin:toy" in state.model_choices() else gr.update()
        return files, trigger_word, class_name, model_value, f"a photo of a {phrase} on a black background"

    example.click(on_example, None, [images, trigger, class_word, model, validation_prompt], api_name="train_example",
                  queue=False)
    show_yaml.click(on_show_yaml, form_inputs, yaml_box, api_name="train_yaml", queue=False)
    job_id_out = gr.Textbox(visible=False)
    start.click(on_start, [images, *form_inputs], [job, yaml_box, yaml_file, job_id_out], api_name="train_start",
                concurrency_limit=None)
    stop.click(on_stop, job, job_id_out, api_name="train_stop", concurrency_limit=None)

    @shown_in_ui
    def api_status(job_id: str) -> str:
        return json.dumps(job_snapshot(queue, job_id))

    gr.api(api_status, api_name="train_status")
    known, seen = gr.State([]), gr.State([])
    timer.tick(on_tick, [job, known, seen], [status, progress, loss_plot, samples, log, known, seen, *adapter_dropdowns],
               api_visibility="private", concurrency_limit=None, show_progress="hidden")
    return {"job": job}


def loss_figure(points: list):
    """Loss per step (matplotlib; the Agg backend, no display needed)."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, safe in server threads

    fig = Figure(figsize=(6, 2.4), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    if points:
        steps, losses = zip(*points)
        ax.plot(steps, losses, lw=1, color="#ea580c", marker="o" if len(points) < 30 else None, ms=3)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    return fig


def render(snap: dict) -> tuple:
    total = snap["total"] or 0
    pct = 100.0 * snap["step"] / total if total else (100.0 if snap["status"] == "finished" else 0.0)
    where = {0: "running"}.get(snap["queue_position"], f"queued, position {snap['queue_position']}") \
        if snap["queue_position"] is not None else snap["status"]
    lines = [f"**{snap['id']}** · {snap['method']} · **{where if snap['status'] != 'stopping' else 'stopping'}**",
             f"step {snap['step']} / {total or '?'}" + (f" · {snap['elapsed_s']:.0f} s" if snap["elapsed_s"] else ""),
             f"adapter: `{snap['adapter']}`" if snap["adapter"] else ""]
    if snap["message"]:
        lines.append(snap["message"])
    return "  \n".join(lines), round(pct, 1), loss_figure(snap["loss"]), snap["samples"], snap["log"]
