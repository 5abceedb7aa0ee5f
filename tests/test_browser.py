"""End-to-end clicks in Debian's Chromium driven by Playwright (no browser download: executable_path).

Screenshots of each tab go to $DCUSTOM_SCREENSHOTS (default: pytest's tmp folder); the ones in
docs/images/app_*.png were made with DCUSTOM_SCREENSHOTS=docs/images.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"no Chromium at {CHROMIUM}: run scripts/install_browser.sh"),
    pytest.mark.skipif(importlib.util.find_spec("playwright") is None, reason="playwright is not installed: run scripts/install_browser.sh"),
    pytest.mark.skipif(importlib.util.find_spec("gradio") is None, reason="the UI extra is not installed: pip install 'dcustom[ui]'"),
]


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    folder = Path(os.environ.get("DCUSTOM_SCREENSHOTS") or tmp_path_factory.mktemp("screenshots"))
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import torch

    from dcustom.app.main import close, launch

    torch.set_num_threads(1)
    demo, url = launch(tmp_path_factory.mktemp("appdata"), prevent_thread_lock=True, quiet=True,
                       default_model="tiny:sd15", device="cpu")
    yield demo.dcustom_state, url
    close(demo)


@pytest.fixture(scope="module")
def page(app):
    from playwright.sync_api import sync_playwright

    _, url = app
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(30_000)
        page.goto(url)
        yield page
        browser.close()


def save_screenshot(page, path: Path) -> None:
    """Full-page PNG, palette-quantised (a UI has few colours) so the docs copies stay small."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(page.screenshot(full_page=True))).convert("RGB")
    image.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(path, optimize=True)


def open_tab(page, name):
    page.get_by_role("tab", name=name).click()


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(str(value))
    box.press("Enter")


def images(folder: Path, n=3) -> list[str]:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        image = Image.new("RGB", (64, 64), (40 * i, 170, 80))
        ImageDraw.Draw(image).rectangle((10 + 3 * i, 12, 46, 50), fill=(220, 40, 30))
        image.save(folder / f"subject{i}.png")
        out.append(str(folder / f"subject{i}.png"))
    return out


def test_generate_shows_progress_and_images(page, shots):
    from playwright.sync_api import expect

    open_tab(page, "Generate")
    page.locator("#gen_prompt textarea").fill("a red circle on a striped background")
    set_number(page, "gen_steps", 30)
    page.locator("#gen_run").click()
    expect(page.get_by_text("Denoising").first).to_be_visible(timeout=60_000)  # gr.Progress while sampling
    expect(page.locator("#gen_gallery img")).to_have_count(2, timeout=120_000)
    expect(page.locator("#gen_info textarea")).to_have_value(__import__("re").compile('"steps": 30'))
    save_screenshot(page, shots / "app_generate.png")


def test_send_to_style_and_stylize(page, shots, tmp_path):
    from playwright.sync_api import expect

    open_tab(page, "Generate")
    page.locator("#gen_gallery img").first.click()  # select a generated image
    page.locator("#gen_to_style").click()
    expect(page.get_by_role("tab", name="Style")).to_have_attribute("aria-selected", "true")
    expect(page.locator("#style_content img").first).to_be_visible()
    style_file = images(tmp_path / "style", n=2)[1]
    page.locator("#style_style input[type=file]").set_input_files(style_file)
    expect(page.locator("#style_style img").first).to_be_visible()
    set_number(page, "style_steps", 3)
    page.locator("#style_run").click()
    expect(page.locator("#style_result img").first).to_be_visible(timeout=120_000)
    expect(page.locator("#style_grid img").first).to_be_visible()
    save_screenshot(page, shots / "app_style.png")


def test_non_image_upload_shows_the_error(page, tmp_path):
    from playwright.sync_api import expect

    open_tab(page, "Train")
    fake = tmp_path / "holiday.png"
    fake.write_text("I am text, not a picture")
    page.locator("#train_images input[type=file]").set_input_files([str(fake)])
    page.locator("#train_start").click()
    expect(page.get_by_text("training image 'holiday.png': is not an image")).to_be_visible()
    page.locator("#train_images button[aria-label='Clear']").first.click()


def test_train_see_progress_then_use_the_adapter(app, page, shots, tmp_path):
    from playwright.sync_api import expect

    state, _ = app
    open_tab(page, "Train")
    page.locator("#train_images input[type=file]").set_input_files(images(tmp_path / "subject"))
    set_number(page, "train_steps", 3)
    page.locator("#train_advanced").get_by_text("Advanced settings").click()
    page.locator("#train_adapter_name textarea, #train_adapter_name input").first.fill("browser-lora")
    page.locator("#train_overrides textarea").fill("sample_steps=2\nrank=4")
    page.locator("#train_show_yaml").click()
    expect(page.locator("#train_yaml")).to_contain_text("steps: 3")
    page.locator("#train_start").click()
    status = page.locator("#train_status")
    expect(status).to_contain_text("running", timeout=30_000)
    # Live progress from events.jsonl; a fast machine may finish before the 1 s poll sees step 1.
    expect(status).to_contain_text(__import__("re").compile(r"step [1-3] / 3"), timeout=180_000)
    expect(status).to_contain_text("added to the library", timeout=180_000)
    expect(page.locator("#train_samples img").first).to_be_visible()
    save_screenshot(page, shots / "app_train.png")
    assert (state.paths.adapters / "browser-lora" / "pytorch_lora_weights.safetensors").is_file()

    open_tab(page, "Generate")  # the finished adapter is offered there without a reload
    page.locator("#gen_adapter_0 input").click()
    page.get_by_role("option", name="browser-lora").click()
    set_number(page, "gen_steps", 4)
    page.locator("#gen_run").click()
    expect(page.locator("#gen_info textarea")).to_have_value(__import__("re").compile("browser-lora"), timeout=120_000)
    expect(page.locator("#gen_gallery img").first).to_be_visible()  # (preview mode from the earlier click adds thumbnails)


def test_adapters_tab_lists_and_inspects(page, shots):
    from playwright.sync_api import expect

    open_tab(page, "Adapters")
    page.locator("#lib_refresh").click()
    expect(page.locator("#lib_table")).to_contain_text("browser-lora")
    page.locator("#lib_name input").click()
    page.get_by_role("option", name="browser-lora").click()
    page.locator("#lib_inspect").click()
    expect(page.locator("#lib_details")).to_contain_text("sd1")
    save_screenshot(page, shots / "app_adapters.png")
