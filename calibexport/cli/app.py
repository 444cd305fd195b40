"""The ``calibexport`` command line (typer): the application object and what every command shares.

Exit codes: 0 success, 1 a parity check failed, 2 bad usage or input (the message is printed to
stderr without a traceback). Each command lives in its own module of this package.
"""

from __future__ import annotations

import functools
import logging
import sys
from typing import Any, Callable

import typer

from calibexport import __version__
from calibexport.errors import CalibexportError

app = typer.Typer(
    name="calibexport",
    help="Calibrate diffusion noise-prediction networks, export them to ONNX with eta folded in, "
    "sample and validate.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    # Plain help text: square brackets such as eta[t] must not be read as markup.
    rich_markup_mode=None,
    # Wide enough that each command's one-line summary in --help is not cut off.
    context_settings={"max_content_width": 120},
)

EXIT_PARITY_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130

MODEL_HELP = (
    "Checkpoint: NAME.safetensors (with NAME.json), a DDIM list checkpoint or a state_dict "
    "(.pt/.pth/.ckpt)."
)
CONFIG_HELP = (
    "Architecture for .pt/.pth files: a preset (celeba64, cifar10, digits), a DDIM YAML or a "
    "JSON config."
)
WEIGHTS_HELP = "Which weights of a DDIM list checkpoint to use: ema or model."


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"calibexport {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="Print the version."
    ),
) -> None:
    level = logging.INFO
    if verbose:
        level = logging.DEBUG
    elif quiet:
        level = logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr, force=True)


def user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Print CalibexportError messages to stderr and exit 2, without a traceback."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except CalibexportError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(EXIT_USAGE) from None
        except KeyboardInterrupt:
            typer.echo("interrupted: nothing was installed at the output path.", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None

    return wrapper


def main() -> None:
    # Importing the command modules registers their commands on ``app``.
    from calibexport.cli import (  # noqa: F401
        build, calibrate, compress, evaluate, fold, inspect, merge, sample, validate,
    )

    app()
