"""Progress bars for long operations (rich), usable as a plain `on_step(done, total)` callback."""

from __future__ import annotations

import contextlib
import sys


@contextlib.contextmanager
def step_progress(description: str, total: int):
    """Yield an `on_step(done, total)` callback drawing a progress bar on stderr."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    console = Console(file=sys.stderr)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  TimeRemainingColumn(), console=console, transient=False) as bar:
        task = bar.add_task(description, total=total)

        def on_step(done: int, new_total: int | None = None):
            if new_total is not None and new_total != bar.tasks[0].total:
                bar.update(task, total=new_total)
            bar.update(task, completed=done)

        yield on_step
