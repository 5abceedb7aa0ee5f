"""Turn user-input errors into messages shown in the UI (and returned to API clients)."""

from __future__ import annotations

import functools

from dcustom.errors import DcustomError


def shown_in_ui(fn):
    """Re-raise DcustomError/ValueError as gr.Error so the sentence reaches the user, not a traceback."""
    import inspect

    import gradio as gr

    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def gen_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except (DcustomError, ValueError) as exc:
                raise gr.Error(str(exc), print_exception=False) from None
        return gen_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (DcustomError, ValueError) as exc:
            raise gr.Error(str(exc), print_exception=False) from None
    return wrapper
