"""What every command shares: the one-line error exit and CLI flags written as `--set` overrides (torch-free)."""

from __future__ import annotations

import json
from typing import NoReturn

import typer

SET_HELP = "Dotted override, e.g. --set optimizer.lr=1e-4 (repeatable)."


def fail(message: str) -> NoReturn:
    """Print `error: <message>` on stderr and exit with code 2 (bad input)."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def overrides_as_yaml_strings(flags: dict) -> list[str]:
    """CLI flags as overrides; strings are quoted so YAML never re-types a prompt like 'yes'."""
    return [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in flags.items() if v is not None]


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; anything else fails in one sentence."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        fail(f"--seeds {text!r} must be comma-separated integers, e.g. 0,1,2,3.")
