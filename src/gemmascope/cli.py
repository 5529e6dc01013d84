"""The `gemmascope` command line: one subcommand per step of model -> activations -> SAE -> metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

import gemmascope

app = typer.Typer(
    name="gemmascope",
    help="Train, load, evaluate and explore sparse autoencoders on every layer and site of a model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"gemmascope {gemmascope.__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        Optional[bool],  # noqa: UP007 - typer needs Optional on 3.10
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = None,
) -> None:
    """gemmascope: sparse autoencoders for every layer and site of a language model."""


def fail(message: str) -> None:
    """Print a clear error (no traceback) and exit with status 2."""
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


# Subcommands are registered below, one block per step of the data flow.
_ = Path
