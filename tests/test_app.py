"""The Gradio app's endpoints through gradio_client against a launched app (tiny pipelines)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

gradio = pytest.importorskip("gradio", reason="the UI extra is not installed: pip install 'dcustom[ui]'")
from gradio_client import Client, handle_file  # noqa: E402

from dcustom.app.uploads import UploadLimits  # noqa: E402

NO_ADAPTERS = [None, 1.0, True] * 3
TRAIN_ARGS = dict(method="lora", model="tiny:sd15", trigger="sks", class_word="toy", steps=2, lr=None, rank=4,
                  resolution=None, seed=0, sample_every=0, validation_prompt="", adapter_name="",
                  overrides="sample_steps=2\nwrite_kohya=false")


def gen_args(model="tiny:sd15", prompt="a red circle", steps=2, seed=7, count=2, width=0, height=0, adapters=NO_ADAPTERS,
             reference=None, strength=1.0):
    return [model, prompt, "", steps, 5.0, seed, False, count, width, height, "default", *adapters, reference,
            strength]


def train_args(**changes):
    return list({**TRAIN_ARGS, **changes}.values())


def write_images(folder: Path, n=3) -> list[Path]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), (40 * i, 180, 90))
        ImageDraw.Draw(image).ellipse((8 + 4 * i, 10, 44, 48), fill=(210, 30, 30))
        out.append(folder / f"img{i}.png")
        image.save(out[-1])
    return out


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch

    from dcustom.app.main import close, launch

    torch.set_num_threads(1)
    data = tmp_path_factory.mktemp("appdata")
    demo, url = launch(data, port=None, prevent_thread_lock=True, quiet=True, default_model="tiny:sd15", device="cpu",
                       limits=UploadLimits(max_bytes=512 * 1024, max_pixels=1024 * 1024, max_files=8))
    client = Client(url, verbose=False, download_files=str(tmp_path_factory.mktemp("downloads")))
    yield demo.dcustom_state, client, tmp_path_factory.mktemp("inputs")
    close(demo)


def test_binds_localhost_by_default(app):
    _, client, _ = app
    assert client.src.startswith("http://127.0.0.1:")


def test_gpu_work_shares_one_queue_slot(tmp_path):
    """Generate, stylize and merge run one at a time through Gradio's queue (one shared concurrency id)."""
    from dcustom.app.main import build_app, make_state

    demo = build_app(make_state(tmp_path, "tiny:sd15"))
    gpu = {fn.api_name: fn for fn in demo.fns.values() if fn.api_name in ("generate", "stylize", "merge_adapters")}
    assert set(gpu) == {"generate", "stylize", "merge_adapters"}
    assert {fn.concurrency_id for fn in gpu.values()} == {"gpu"}
    assert all(fn.queue and fn.concurrency_limit == 1 for fn in gpu.values())


def test_earlier_runs_are_listed_after_a_restart(tmp_path):
    from dcustom.app.main import make_state

    run = tmp_path / "runs" / "20260101-000000-abcdef"
    run.mkdir(parents=True)
    (run / "run.yaml").write_text("method: oft\n")
    (run / "events.jsonl").write_text('{"event": "step", "step": 1, "total": 2, "loss": 0.5}\n'
                                      '{"event": "end", "status": "cancelled", "step": 1}\n')
    state = make_state(tmp_path, "tiny:sd15")
    job = state.training.get(run.name)
    assert (job.status, job.method) == ("cancelled", "oft")
    state.training.close()


def test_generate_returns_images_with_their_parameters(app):
    state, client, _ = app
    gallery, info = client.predict(*gen_args(seed=11), api_name="/generate")
    assert len(gallery) == 2
    from PIL import Image

    for i, item in enumerate(gallery):
        with Image.open(item["image"]) as image:
            params = json.loads(image.text["dcustom"])
            assert image.size == (64, 64)
        assert params["seed"] == 11 + i and params["steps"] == 2 and params["prompt"] == "a red circle"
        assert "Steps: 2" in Image.open(item["image"]).text["parameters"]
        assert f"seed {11 + i}" in item["caption"]
    assert json.loads(info)["seed"] == 11
    saved = sorted(state.paths.outputs.glob("*.png"))
    assert len(saved) >= 2  # written into the app's data folder, nowhere else


def test_generate_refuses_bad_input_with_a_clear_message(app):
    _, client, _ = app
    with pytest.raises(Exception, match="width: 60 is not a multiple of 8"):
        client.predict(*gen_args(width=60), api_name="/generate")
    with pytest.raises(Exception, match="Value 0 is less than minimum value 1"):  # Gradio's own bound check
        client.predict(*gen_args(steps=0), api_name="/generate")
    with pytest.raises(Exception, match="adapter 'nope' is not in the library"):
        client.predict(*gen_args(adapters=["nope", 1.0, True] + [None, 1.0, True] * 2), api_name="/generate")


@pytest.mark.parametrize("spec", ["../../etc", "/etc", "models/../../outside", "~/.cache"])
def test_model_path_outside_the_data_folder_is_refused(app, spec):
    _, client, _ = app
    with pytest.raises(Exception, match="outside the app's data folder"):
        client.predict(*gen_args(model=spec), api_name="/generate")


def test_symlink_out_of_the_data_folder_is_refused(app, tmp_path):
    state, client, _ = app
    (state.paths.models / "escape").symlink_to(tmp_path, target_is_directory=True)
    with pytest.raises(Exception, match="outside the app's data folder"):
        client.predict(*gen_args(model="models/escape"), api_name="/generate")


def test_train_yaml_is_the_cli_config(app):
    state, client, _ = app
    text = client.predict(*train_args(), api_name="/train_yaml")
    import yaml

    data = yaml.safe_load(text)
    assert data["method"] == "lora" and data["train"]["steps"] == 2 and data["rank"] == 4
    assert data["data"]["instance_prompt"] == "a photo of sks toy"
    assert data["train"]["output_dir"].startswith(str(state.paths.runs))


@pytest.mark.parametrize("method", ["lora", "oft", "boft", "textual_inversion"])
def test_every_subject_method_gets_a_config_the_cli_accepts(app, method, tmp_path):
    """The YAML the Train tab shows is what `dcustom train <method> --config` loads (strict keys)."""
    from dcustom.config import load_config
    from dcustom.registry import get_method

    _, client, _ = app
    text = client.predict(*train_args(method=method, trigger="<sks>" if method == "textual_inversion" else "sks",
                                      overrides="sample_steps=2"), api_name="/train_yaml")
    (tmp_path / "run.yaml").write_text(text)
    cfg = load_config(get_method(method).config_class(), tmp_path / "run.yaml")
    assert cfg.method == method and cfg.train.steps == 2
    if method == "textual_inversion":
        assert cfg.tokens == ["<sks>"] and cfg.init_words == ["toy"] and cfg.data.instance_prompt == "a photo of <sks>"


@pytest.mark.parametrize("override, message", [
    ("data.images=/etc", "data.images: '/etc' is outside the app's data folder"),
    ("data.prior.class_dir=../../x", "data.prior.class_dir: '../../x' is outside"),
    ("train.resume=/tmp/elsewhere", "train.resume: '/tmp/elsewhere' is outside"),
    ("no_such_key=1", "unknown key 'no_such_key'"),
])
def test_train_settings_cannot_point_outside(app, override, message):
    _, client, _ = app
    with pytest.raises(Exception, match=message):
        client.predict(*train_args(overrides=override), api_name="/train_yaml")


def test_uploads_are_checked(app):
    state, client, inputs = app
    bad = inputs / "notes.png"
    bad.write_text("this is not an image")
    with pytest.raises(Exception, match="training image 'notes.png': is not an image"):
        client.predict([handle_file(str(bad))], *train_args(), api_name="/train_start")
    from PIL import Image

    huge = inputs / "huge.png"  # few bytes, too many pixels
    Image.new("RGB", (1500, 1000)).save(huge)
    with pytest.raises(Exception, match=r"has 1500x1000 pixels; images up to 1,048,576 pixels"):
        client.predict([handle_file(str(huge))], *train_args(), api_name="/train_start")
    with pytest.raises(Exception, match="adapter name: '../evil' is not a valid name"):
        client.predict([handle_file(str(write_images(inputs / "ok")[0]))], *train_args(adapter_name="../evil"),
                       api_name="/train_start")
    assert not any(state.paths.runs.iterdir())  # nothing queued, nothing written


def test_oversized_upload_is_refused(app):
    _, client, inputs = app
    big = inputs / "big.bin"
    big.write_bytes(os.urandom(600 * 1024))
    with pytest.raises(Exception, match="(?i)file.*(size|large)|exceeds"):
        client.predict([handle_file(str(big))], *train_args(), api_name="/train_start")


def test_oversized_upload_is_refused_by_the_server(app):
    """Not only the client's check: a raw HTTP upload over the limit is refused too."""
    import httpx

    _, client, _ = app
    response = httpx.post(client.src.rstrip("/") + "/gradio_api/upload",
                          files={"files": ("big.png", os.urandom(600 * 1024), "image/png")})
    assert response.status_code == 413, response.text


def wait_for(client, job_id, until, timeout=240):
    start = time.time()
    while time.time() - start < timeout:
        snap = json.loads(client.predict(job_id, api_name="/train_status"))
        if until(snap):
            return snap
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not get there in {timeout}s: {snap}")


def test_train_queue_stop_and_use_the_adapter(app):
    state, client, inputs = app
    files = [handle_file(str(p)) for p in write_images(inputs / "subject")]
    first = client.predict(files, *train_args(adapter_name="subject-lora"), api_name="/train_start")[-1]
    second = client.predict(files, *train_args(adapter_name="never"), api_name="/train_start")[-1]
    snap = json.loads(client.predict(second, api_name="/train_status"))
    assert snap["status"] == "queued" and snap["queue_position"] >= 1  # jobs wait, one runs at a time
    assert client.predict(second, api_name="/train_stop") == "cancelled"  # Stop works on a queued job

    done = wait_for(client, first, lambda s: s["status"] in ("finished", "failed", "cancelled"))
    assert done["status"] == "finished", done["log"]
    assert [s for s, _ in done["loss"]] == [1, 2] and all(v == v for _, v in done["loss"])
    assert done["samples"] and Path(done["samples"][0]).is_file()
    assert (state.paths.adapters / "subject-lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (state.paths.adapters / "never").exists()

    names = client.predict(api_name="/refresh_adapters")
    assert "subject-lora" in str(names[0])
    plain, _ = client.predict(*gen_args(seed=5, count=1), api_name="/generate")
    with_lora, _ = client.predict(*gen_args(seed=5, count=1, adapters=["subject-lora", 1.0, True] + [None, 1.0, True] * 2),
                                  api_name="/generate")
    switched_off, _ = client.predict(*gen_args(seed=5, count=1, adapters=["subject-lora", 1.0, False] + [None, 1.0, True] * 2),
                                     api_name="/generate")
    import numpy as np
    from PIL import Image

    px = [np.asarray(Image.open(g[0]["image"]), dtype=np.int16) for g in (plain, with_lora, switched_off)]
    assert np.array_equal(px[0], px[2])  # a disabled slot and unloading leave the base model untouched
    assert np.abs(px[0] - px[1]).max() > 0  # the adapter changes the drawing

    # The Adapters tab works on the same library.
    info = client.predict("subject-lora", api_name="/inspect_adapter")
    info = json.loads(info) if isinstance(info, str) else info
    summary = info["files"]["pytorch_lora_weights.safetensors"]
    assert summary["method"] == "lora" and summary["family"] == "sd1" and summary["parameters"] > 0
    assert "method: lora" in info["training_config"]
    lora_file = state.paths.adapters / "subject-lora" / "pytorch_lora_weights.safetensors"
    message, table, *_ = client.predict(handle_file(str(lora_file)), "copy", api_name="/import_adapter")
    assert "Imported `copy`" in message and ["copy", "pytorch_lora_weights.safetensors"] in table["data"]
    with pytest.raises(Exception, match="adapter name: 'copy' is already taken"):
        client.predict(handle_file(str(lora_file)), "copy", api_name="/import_adapter")
    message, *_ = client.predict("copy", "kohya", api_name="/convert_adapter")
    assert "Wrote `lora_kohya.safetensors` into `copy`" in message
    kohya = state.paths.adapters / "copy" / "lora_kohya.safetensors"
    assert any(k.startswith("lora_unet_") for k in __import__("safetensors").safe_open(str(kohya), "pt").keys())
    with pytest.raises(Exception, match="already has lora_kohya.safetensors"):
        client.predict("copy", "kohya", api_name="/convert_adapter")
    message = client.predict(["subject-lora"], 1.0, "tiny:sd15", "merged-sd15", api_name="/merge_adapters")
    assert "models/merged-sd15" in message and (state.paths.models / "merged-sd15" / "model_index.json").is_file()
    merged, _ = client.predict(*gen_args(model="models/merged-sd15", seed=5, count=1), api_name="/generate")
    px_merged = np.asarray(Image.open(merged[0]["image"]), dtype=np.int16)
    assert np.abs(px_merged - px[1]).max() <= 2  # merged weights draw what the loaded LoRA drew
    message, table, *_ = client.predict("copy", api_name="/delete_adapter")
    assert "Deleted `copy`" in message and not (state.paths.adapters / "copy").exists()
    with pytest.raises(Exception, match="adapter: '../runs' is not a valid name"):
        client.predict("../runs", api_name="/delete_adapter")
    assert state.paths.runs.is_dir()


def test_stop_a_running_job(app):
    _, client, inputs = app
    files = [handle_file(str(p)) for p in write_images(inputs / "subject2")]
    job = client.predict(files, *train_args(steps=500, adapter_name="stopped"), api_name="/train_start")[-1]
    wait_for(client, job, lambda s: s["status"] == "running")
    assert client.predict(job, api_name="/train_stop") in ("stopping", "cancelled")
    snap = wait_for(client, job, lambda s: s["status"] in ("finished", "failed", "cancelled"), timeout=120)
    assert snap["status"] == "cancelled" and snap["step"] < 500


def test_stylize_a_pair(app):
    state, client, inputs = app
    content, style = write_images(inputs / "pair", n=2)
    result, grid = client.predict(handle_file(str(content)), handle_file(str(style)), "style_injection", "tiny:sd15",
                                  0.75, 1.5, 3, "decoder_self_late", 0.0, 1.0, True, api_name="/stylize")
    from PIL import Image

    with Image.open(result) as image:
        assert image.size == (64, 64)
        params = json.loads(image.text["dcustom"])
        assert params["method"] == "style_injection" and params["steps"] == 3 and params["gamma"] == 0.75
    with Image.open(grid) as image:
        assert image.width > 3 * 64  # content | style | result
    assert len(list(state.paths.style.glob("*-grid.png"))) == 1
    with pytest.raises(Exception, match="need 0 <= step_start <= step_end <= 1, got 0.9 and 0.1"):
        client.predict(handle_file(str(content)), handle_file(str(style)), "style_injection", "tiny:sd15",
                       0.75, 1.5, 3, "decoder_self_late", 0.9, 0.1, True, api_name="/stylize")
    with pytest.raises(Exception, match="model: '/etc' is outside"):
        client.predict(handle_file(str(content)), handle_file(str(style)), "attention_injection", "/etc",
                       0.0, 1.0, 3, "decoder_self_late", 0.0, 1.0, True, api_name="/stylize")


def test_generate_with_a_style_reference(app):
    """The reference acts during sampling: DDIM inversion (cached across calls) + shared attention."""
    state, client, inputs = app
    reference = write_images(inputs / "reference", n=1)[0]
    plain, _ = client.predict(*gen_args(seed=3, count=1, steps=3), api_name="/generate")
    styled, info = client.predict(*gen_args(seed=3, count=1, steps=3, reference=handle_file(str(reference)),
                                            strength=0.7), api_name="/generate")
    params = json.loads(info)
    used = params["style_reference"]
    assert params["method"] == "generate" and params["style_strength"] == 0.7
    assert used["strength"] == 0.7 and used["attended_steps"] == 3 and used["inversion"]["cache_hit"] is False
    kept = Path(params["style_ref"])  # a lasting copy inside the data folder, named in the metadata
    assert kept.parent == state.paths.uploads / "style-refs" and kept.read_bytes() == reference.read_bytes()
    assert "style ref 0.7" in styled[0]["caption"]
    import numpy as np
    from PIL import Image

    a, b = (np.asarray(Image.open(g[0]["image"]), dtype=np.int16) for g in (plain, styled))
    assert np.abs(a - b).max() > 0
    _, info = client.predict(*gen_args(seed=4, count=1, steps=3, reference=handle_file(str(reference)), strength=0.3),
                             api_name="/generate")
    assert json.loads(info)["style_reference"]["inversion"]["cache_hit"] is True  # inverted once per model
    with pytest.raises(Exception, match="Value 1.5 is greater than maximum value 1"):  # Gradio's own bound check
        client.predict(*gen_args(count=1, steps=2, reference=handle_file(str(reference)), strength=1.5),
                       api_name="/generate")
    from dcustom.errors import DcustomError

    with pytest.raises(DcustomError, match="style strength: 1.5 is out of range; accepted: 0.0 to 1.0"):
        state.generate(model="tiny:sd15", prompt="a cat", style_ref=str(reference), style_strength=1.5)
    with pytest.raises(DcustomError, match="scheduler 'euler' cannot be used with a style reference"):
        state.generate(model="tiny:sd15", prompt="a cat", style_ref=str(reference), scheduler="euler")


def test_publish_copies_files_and_peft_folders_atomically(tmp_path):
    """A finished run's deliverables (files and OFT/BOFT peft folders) land in the library intact."""
    from dcustom.app.jobs import publish_adapter

    run = tmp_path / "run"
    (run / "unet").mkdir(parents=True)
    (run / "unet" / "adapter_model.safetensors").write_bytes(b"w")
    (run / "unet" / "adapter_config.json").write_text("{}")
    (run / "lora_extracted_kohya.safetensors").write_bytes(b"x")
    (run / "config.yaml").write_text("method: oft\n")
    dest = publish_adapter(run, [str(run / "unet"), "lora_extracted_kohya.safetensors"], tmp_path / "lib" / "oft-a")
    assert sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file()) == [
        "config.yaml", "lora_extracted_kohya.safetensors", "unet/adapter_config.json", "unet/adapter_model.safetensors"]
    assert not list((tmp_path / "lib").glob(".*"))  # no temp folder left behind


def test_train_example_subject_fills_the_form_and_trains(app):
    state, client, _ = app
    files, trigger, class_word, model, prompt = client.predict(api_name="/train_example")
    paths = [Path(f if isinstance(f, str) else f["path"]) for f in files]
    assert len(paths) == 5 and all(p.is_file() and not p.name.endswith(".mask.png") for p in paths)
    assert (trigger, class_word) == ("qrv", "triangle") and prompt == "a photo of a qrv triangle on a black background"
    job = client.predict([handle_file(str(p)) for p in paths],
                         *train_args(trigger=trigger, class_word=class_word, adapter_name="example-pine"),
                         api_name="/train_start")[-1]
    done = wait_for(client, job, lambda s: s["status"] in ("finished", "failed", "cancelled"))
    assert done["status"] == "finished", done["log"]
    assert (state.paths.adapters / "example-pine" / "pytorch_lora_weights.safetensors").is_file()
