"""`htcli plot`: runs' learning curves drawn from their logs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from htcli.cli.common import app, console, err_console, parse_path, user_errors
from htcli.errors import HtcliError
from htcli.help_layout import Command


@app.command(cls=Command)
def plot(
    runs: Annotated[
        list[Path],
        typer.Argument(parser=parse_path, help="Run directories (as written by `htcli train --out`)."),
    ],
    output: Annotated[
        Path,
        typer.Option(
            "--output", "-o", help="The figure to write (its format by its extension: .png, .pdf, .svg, ...)."
        ),
    ] = Path("curves.png"),
    x: Annotated[
        str, typer.Option("--x", help="Against: step, bytes (trained on) or time (of training).")
    ] = "step",
) -> None:
    """Validation bits per byte and training loss of runs (finished, running or crashed) on one figure.

    From each run's log.jsonl; a table of where each run is goes to stdout."""
    with user_errors(needs=()):  # (matplotlib, imported whole where a figure is drawn: plots.pyplot)
        from htcli.curves import X_AXES, read_curves, run_names
        from htcli.device import check_choice
        from htcli.display import runs_table
        from htcli.files import LOG_FILE
        from htcli.plots import check_plot_path, curves_plot

        check_choice("x", x, X_AXES)
        check_plot_path(output, "--output")
        curves = [read_curves(run, name) for run, name in zip(runs, run_names(runs))]
        for run, read in zip(runs, curves):
            if read.skipped:
                said = (
                    f"{read.skipped} lines are not htcli events"
                    if read.skipped > 1
                    else "a line is not an htcli event"
                )
                where = escape(str(run / LOG_FILE))
                err_console.print(f"[yellow]warning:[/] {where}: {said} (skipped)", soft_wrap=True)
        if not any(run.train or run.val for run in curves):
            raise HtcliError("nothing to plot: no run has logged a step or an evaluation yet")
        console.print(runs_table(curves))  # (first: where stdout fails, no figure is written either)
        curves_plot(curves, x, output)
        err_console.print(f"plot written to {escape(str(output))}", soft_wrap=True)
