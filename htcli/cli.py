"""The command-line interface: parses options, calls a library function, prints."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.console import Console

from htcli import __version__

app = typer.Typer(
    name="htcli",
    help="Train, sample, evaluate and benchmark long-context H-Transformer-1D byte-level language models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err_console = Console(stderr=True)


def _version(value: bool) -> None:
    if value:
        print(f"htcli {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """htcli: hierarchical-attention transformers for long contexts, on one GPU or a CPU."""
