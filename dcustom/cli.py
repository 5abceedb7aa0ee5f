"""`dcustom` command line. Heavy imports (torch, diffusers, gradio) happen inside commands.

Errors reach the user as one line (`error: ...`, exit code 2 for bad input, 1 for anything unexpected);
the traceback is printed only with `dcustom --debug ...`.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.core import TyperGroup

from dcustom.commands.common import SET_HELP, fail, overrides_as_yaml_strings
from dcustom.errors import DcustomError


def _usage_exceptions() -> tuple:
    """Exits and usage errors the commands and the argument parser raise on purpose (typer vendors click
    from 0.29 on, and re-exports its exceptions' base as TyperException)."""
    kinds = [typer.Exit, typer.Abort, getattr(typer, "TyperException", None)]
    try:
        import click

        kinds += [click.exceptions.Exit, click.ClickException, click.exceptions.Abort]
    except ImportError:
        pass
    return tuple(k for k in kinds if k is not None)


class OneLineErrors(TyperGroup):
    """Every error of every sub-command becomes one line on stderr; `--debug` lets the traceback through."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _usage_exceptions():
            raise
        except Exception as exc:
            if ctx.params.get("debug"):
                raise
            typer.secho(f"error: {error_line(exc)}", fg=typer.colors.RED, err=True)
            raise typer.Exit(2 if isinstance(exc, DcustomError) else 1) from None
        finally:
            _drop_message_handlers()  # in-process callers (tests, the app) keep no handler on a closed stream


def error_line(exc: BaseException) -> str:
    if isinstance(exc, DcustomError):
        return str(exc)
    text = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return (f"unexpected {type(exc).__name__}{': ' + text if text else ''} (not a known kind of bad input; "
            "run again with --debug for the traceback and report it).")


app = typer.Typer(
    help="dcustom: customize text-to-image diffusion models (LoRA/OFT/BOFT, textual inversion, "
    "training-free style transfer).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=OneLineErrors,
)
config_app = typer.Typer(help="Print and check YAML configs.", no_args_is_help=True)
app.add_typer(config_app, name="config")

from dcustom.commands import eval as _eval_commands  # noqa: E402  (torch-free)

app.add_typer(_eval_commands.app, name="eval")
import dcustom.commands.eval_erasure  # noqa: E402,F401  (registers `dcustom eval erasure`, torch-free)
import dcustom.commands.eval_style  # noqa: E402,F401  (registers `dcustom eval style`, torch-free)
import dcustom.commands.eval_reward  # noqa: E402,F401  (registers `dcustom eval reward`, torch-free)
import dcustom.commands.eval_subject  # noqa: E402,F401  (registers `dcustom eval subject`, torch-free)
app.add_typer(__import__("dcustom.commands.app", fromlist=["app"]).app, name="app")  # `dcustom app`: the web UI
app.add_typer(__import__("dcustom.commands.toyworld", fromlist=["app"]).app, name="toyworld")  # torch-free
app.add_typer(__import__("dcustom.commands.adapters", fromlist=["app"]).app, name="adapters")  # inspect|convert|merge|extract
app.command("style")(__import__("dcustom.commands.style", fromlist=["style"]).style)  # training-free style transfer

@app.callback()
def _global_options(debug: bool = typer.Option(False, "--debug", help="Print the full traceback of an error.")):
    show_messages()


def show_messages() -> None:
    """dcustom's own notes (images used and skipped, a renamed run folder, a truncated prompt) go to stderr."""
    logger = logging.getLogger("dcustom")
    _drop_message_handlers()
    handler = logging.StreamHandler(sys.stderr)  # the stderr of this invocation (tests swap it)
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler.dcustom_cli = True
    logger.addHandler(handler)
    logger.setLevel(logging.WARNING)
    logging.getLogger("dcustom.train").setLevel(logging.INFO)


def _drop_message_handlers() -> None:
    logger = logging.getLogger("dcustom")
    for handler in [h for h in logger.handlers if getattr(h, "dcustom_cli", False)]:
        logger.removeHandler(handler)


@app.command()
def generate(
    prompt: str = typer.Option(None, "--prompt", "-p", help="What to draw."),
    model: str = typer.Option(None, "--model", "-m", help="builtin:toy, tiny:sd15|sd2|sdxl, a folder, a checkpoint file or a hub id."),
    model_config: str = typer.Option(None, "--model-config", help="For a single-file model offline: a local diffusers folder of the same family."),
    negative_prompt: str = typer.Option(None, "--negative-prompt", "-n"),
    steps: int = typer.Option(None, "--steps"),
    guidance: float = typer.Option(None, "--guidance", "--cfg"),
    seed: int = typer.Option(None, "--seed", help="Seed of the first image; image i uses seed+i."),
    width: int = typer.Option(None, "--width"),
    height: int = typer.Option(None, "--height"),
    count: int = typer.Option(None, "--count", "-c"),
    scheduler: str = typer.Option(None, "--scheduler", help="default, ddim, dpmpp_2m, dpmpp_2m_karras, euler, euler_a, pndm, lms, unipc, heun."),
    output_dir: str = typer.Option(None, "--output-dir", "-o"),
    device: str = typer.Option(None, "--device"),
    dtype: str = typer.Option(None, "--dtype"),
    config: Optional[Path] = typer.Option(None, "--config", help="A generate YAML (see `dcustom config print generate`)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
    adapter: List[str] = typer.Option([], "--adapter", "-a", help="Adapter 'path' or 'path:weight' (repeatable; they stack)."),
    style_ref: Optional[Path] = typer.Option(None, "--style-ref", help="Style reference image: the images attend to it while they are sampled (DDIM)."),
    style_strength: float = typer.Option(None, "--style-strength", help="Fraction of the steps attending to the style reference (0-1, default 1)."),
):
    """Generate images; writes PNGs with their parameters in PNG text metadata and prints the paths."""
    from dcustom.config import load_config
    from dcustom.generate_config import GenerateConfig

    flags = dict(prompt=prompt, model=model, model_config=model_config, negative_prompt=negative_prompt, steps=steps, guidance=guidance,
                 seed=seed, width=width, height=height, count=count, scheduler=scheduler,
                 output_dir=output_dir, device=device, dtype=dtype, adapters=list(adapter) or None,
                 style_ref=str(style_ref) if style_ref else None, style_strength=style_strength)
    try:
        cfg = load_config(GenerateConfig, config, overrides=list(set_) + overrides_as_yaml_strings(flags))
    except DcustomError as exc:
        fail(str(exc))
    from dcustom.generate import generate as run_generate
    from dcustom.generate import load_style_reference
    from dcustom.models import load_pipeline
    from dcustom.outputs import writable_folder
    from dcustom.progress import step_progress

    try:
        writable_folder(cfg.output_dir, "output_dir")  # before the model loads and anything is sampled
        load_style_reference(cfg)  # a bad image path fails before the model loads
        typer.echo(f"loading {cfg.model} ...", err=True)
        pipe = load_pipeline(cfg.model, dtype=cfg.dtype, device=cfg.device, config=cfg.model_config)
        with step_progress(f"generating {cfg.count} image(s)", cfg.steps) as on_step:
            paths = run_generate(cfg, pipe=pipe, on_step=on_step)
    except DcustomError as exc:
        fail(str(exc))
    for p in paths:
        typer.echo(str(p))


@app.command()
def demo(
    output_dir: Path = typer.Option(Path("outputs/demo"), "--output-dir", "-o", help="Where the examples, the LoRA, "
                                    "before_after.png and demo.json go."),
    subject: Optional[str] = typer.Option(None, "--subject", help="Held-out toy subject: robot, ladybug or pine "
                                          "(default: pine, the one every step of configs/lora.yaml draws)."),
    config: Path = typer.Option(Path("configs/lora.yaml"), "--config", help="The LoRA settings to train with."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Teach builtin:toy a subject from 5 renders and draw it on backgrounds it never saw: before/after grid + J_eval."""
    from dcustom.toyworld.demo import DEMO_SUBJECT, run_demo
    from dcustom.toyworld.grammar import SUBJECT_NAMES

    subject = subject or DEMO_SUBJECT
    if subject not in SUBJECT_NAMES:
        fail(f"--subject {subject!r} is not a toy subject; accepted: {', '.join(SUBJECT_NAMES)}.")
    try:
        report = run_demo(output_dir, subject, config, overrides=list(set_), log=lambda m: typer.echo(m, err=True))
    except DcustomError as exc:
        fail(str(exc))
    figures = report["j_eval"]
    typer.echo(f"{subject} ({report['trigger']}) on unseen backgrounds, J_eval, {len(report['seeds'])} seeds x "
               f"{len(report['prompts'])} prompts:")
    for row in ("before", "after"):
        typer.echo(f"  {row:6s} subject {figures[row]['subject']:.2f}  background {figures[row]['background']:.2f}")
    typer.echo(f"trained {report['train_steps']} steps in {report['train_seconds']:.0f} s; "
               f"total {report['total_seconds']:.0f} s")
    typer.echo(report["grid"])


@app.command()
def train(
    method: str = typer.Argument(..., help="Method id, e.g. lora, oft, boft, textual_inversion."),
    config: Optional[Path] = typer.Option(None, "--config", help="YAML config (see `dcustom config print <method>`)."),
    set_: List[str] = typer.Option([], "--set", help=SET_HELP),
):
    """Train an adapter, embedding or edit from a YAML config plus overrides."""
    from dcustom.config import load_config
    from dcustom.registry import get_method

    try:
        spec = get_method(method, kind="train")
        cfg = load_config(spec.config_class(), config, overrides=set_)
        if getattr(cfg, "method", method) != method:
            raise DcustomError(f"{config}: method {cfg.method!r} does not match the command's method {method!r}.")
        result = spec.implementation()(cfg)
    except DcustomError as exc:
        fail(str(exc))
    if result is not None:
        typer.echo(str(result))


@config_app.command("print")
def config_print(name: str = typer.Argument(..., help="Method id, e.g. generate or lora.")):
    """Print the commented YAML of a method's defaults."""
    from dcustom.config import to_yaml
    from dcustom.registry import get_method

    try:
        spec = get_method(name)
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(to_yaml(spec.config_class()(), comments=True), nl=False)


@config_app.command("check")
def config_check(path: Path = typer.Argument(..., help="A YAML config with a 'method:' key.")):
    """Validate a YAML config against its method's schema."""
    from dcustom.config import load_config, read_yaml
    from dcustom.registry import get_method

    try:
        data = read_yaml(path)
        if "method" not in data:
            raise DcustomError(f"{path}: has no 'method:' key naming what it configures.")
        load_config(get_method(str(data["method"])).config_class(), path)
    except DcustomError as exc:
        fail(str(exc))
    typer.echo(f"{path}: ok")


@app.command()
def env():
    """Versions, accelerators, attention backend and optional extras present."""
    from dcustom.environment import LOCK_FILE, describe_environment, lock_report

    for key, value in describe_environment().items():
        typer.echo(f"{key:24s} {value}")
    rows = lock_report()
    if rows[0][3] == "no lock":
        typer.echo(f"no lock file at {LOCK_FILE} (installed from a wheel?): versions not checked")
        return
    typer.echo(f"against the locked set ({LOCK_FILE.name}):")
    for dist, have, want, verdict in rows:
        typer.echo(f"  {dist:14s} installed {have:16s} locked {want:16s} {verdict}")
    outside = [r[0] for r in rows if r[3] != "ok"]
    if outside:
        typer.echo(f"outside the locked set: {', '.join(outside)}; 'bash scripts/setup.sh' installs the locked versions")


def main():
    import os

    # Library chatter at import time (e.g. torchvision fallbacks) is noise for CLI users.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        app()
    except Exception as exc:  # raised outside a command (OneLineErrors handles those inside)
        if "--debug" in sys.argv[1:]:
            raise
        typer.secho(f"error: {error_line(exc)}", fg=typer.colors.RED, err=True)
        sys.exit(2 if isinstance(exc, DcustomError) else 1)


if __name__ == "__main__":
    main()
