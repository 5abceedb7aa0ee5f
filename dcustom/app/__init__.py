"""The Gradio app (`dcustom app`): generate, train, stylize and manage adapters in the browser.

`build_app(state)` returns the gr.Blocks; `launch(data_dir, host, port)` serves it on 127.0.0.1 by
default. Gradio is imported lazily so `import dcustom.app` stays cheap.
"""

from __future__ import annotations


def launch(*args, **kwargs):
    from dcustom.app.main import launch as _launch

    return _launch(*args, **kwargs)


def build_app(*args, **kwargs):
    from dcustom.app.main import build_app as _build

    return _build(*args, **kwargs)


def make_state(*args, **kwargs):
    from dcustom.app.main import make_state as _make

    return _make(*args, **kwargs)
