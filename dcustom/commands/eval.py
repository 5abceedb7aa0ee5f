"""`dcustom eval ...`: measurements of base models and of what a method changed."""

from __future__ import annotations

import typer

app = typer.Typer(help="Evaluate models with the toy-world judges (JSON + image grids).", no_args_is_help=True)
