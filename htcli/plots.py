"""Figures as PNG files (matplotlib, the `plot` extra): evaluation by position in the window.

`pyplot()` is the one way htcli imports matplotlib: without a screen (Agg), and with a one-line error
naming the install command where it is missing. `check_plot_path` is run before the work whose figure
it is, so that a path matplotlib cannot write is refused before minutes of evaluation or measuring.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path

from htcli.errors import HtcliError, room_advice
from htcli.files import atomic_file
from htcli.stop import import_whole

PROBE_BYTES = 64 * 1024  # written where a figure goes, before the work (a figure: some 30-150 kB)


def pyplot():
    """matplotlib.pyplot, drawing to files."""
    try:
        import_whole("matplotlib")  # (a Ctrl-C inside it came out as an ImportError: "needs matplotlib")
        import matplotlib

        matplotlib.use("Agg")
        import_whole("matplotlib.pyplot")
        import matplotlib.pyplot as plt
    except ImportError:
        raise HtcliError(
            "plotting needs matplotlib: pip install 'htcli[plot]' (or pip install matplotlib)"
        ) from None
    return plt


def check_plot_path(path: Path, option: str) -> None:
    """path can take a figure: a file (not a directory) in an existing, writable directory, with an
    extension matplotlib writes (its format: .png, .pdf, .svg, ...)."""
    plt = pyplot()
    if not str(path) or str(path) == ".":  # (an empty name: Path("") is the current directory)
        raise HtcliError(f"{option} names no file: give a file name, e.g. plot.png")
    if len(os.fsencode(path.name)) > NAME_MAX:
        raise HtcliError(f"{option}: the file name is longer than {NAME_MAX} bytes: give a shorter one")
    if path.is_dir():
        raise HtcliError(f"{option} {path} is a directory: give a file name, e.g. {path / 'plot.png'}")
    folder = path.parent
    if folder.exists() and not folder.is_dir():
        raise HtcliError(f"{option} {path}: {folder} is a file, not a directory: give a file in a directory")
    if not folder.is_dir():
        raise HtcliError(f"{option} {path}: the directory {folder} does not exist (create it first)")
    try:  # (a file made and removed there: os.access says yes to root on /proc, or a read-only mount; with
        # a figure's bytes: a full disk took an empty file, and the figure failed after the work)
        with tempfile.TemporaryFile(dir=folder, prefix=".htcli-plot-") as probe:
            probe.write(bytes(PROBE_BYTES))
            probe.flush()
    except OSError as error:
        mend = room_advice(error.errno) or "mend that"
        raise HtcliError(
            f"{option} {path}: cannot write in the directory {folder} ({error.strerror or error}): {mend}, or"
            " give another directory"
        ) from None
    formats = plt.figure().canvas.get_supported_filetypes()
    plt.close("all")
    if path.suffix.lower().lstrip(".") not in formats:
        raise HtcliError(
            f"{option} {path}: give a file name ending in .png, .pdf or .svg "
            f"(the extension chooses the format; {path.suffix or 'none'} is not one matplotlib writes)"
        )


def save_figure(fig, path: Path) -> None:
    """fig written to path whole or not at all (a Ctrl-C while matplotlib writes it leaves the file as it
    was), in the format its extension names; HtcliError where it cannot be written (a full disk)."""
    # (PostScript draws the grid's and lines' transparency opaque, and matplotlib's log said so on stderr)
    postscript = logging.getLogger("matplotlib.backends.backend_ps")
    level = postscript.level
    postscript.setLevel(logging.ERROR)
    try:
        with atomic_file(path) as file:
            fig.savefig(file, dpi=120, format=Path(path).suffix.lstrip(".").lower())
    except OSError as error:
        mend = room_advice(error.errno) or "mend that"
        raise HtcliError(
            f"cannot write the figure {path}: {error.strerror or error}: {mend}, or give another path"
        ) from None
    finally:
        postscript.setLevel(level)


def by_position_plot(curves: dict[str, list[dict]], path: Path) -> None:
    """Bits per byte against position in the window (log scale), one line per label; each curve is
    an EvalResult.by_position."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, buckets in curves.items():
        points = [
            (b["first"] + (b["last"] - b["first"]) / 2, b["bits_per_byte"]) for b in buckets if b["bytes"]
        ]
        ax.plot([max(x, 1) for x, _ in points], [y for _, y in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("position in the window (bytes of context)")
    ax.set_ylabel("bits per byte")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)


NAME_MAX = 242  # bytes of a figure's file name: 255, less what its temporary sibling adds (.NAME.PID.tmp)
X_LABELS = {"step": "step", "bytes": "bytes trained on", "time": "training time (s)"}


def curves_plot(runs: list, x: str, path: Path) -> None:
    """Validation bits per byte and training loss (bits per byte) of several runs (htcli.curves.Curves)
    side by side, against x: "step", "bytes" or "time" (seconds)."""
    plt = pyplot()
    fig, (val_ax, train_ax) = plt.subplots(1, 2, figsize=(11, 4))
    axis = {"step": "step", "bytes": "bytes", "time": "seconds"}[x]
    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        if run.val:
            xs = [getattr(p, axis) for p in run.val]
            val_ax.plot(xs, [p.value for p in run.val], marker="o", markersize=3, color=color, label=run.name)
        if run.train:
            xs = [getattr(p, axis) for p in run.train]
            alone = "o" if len(xs) == 1 else None  # (one point of a line without markers is not drawn)
            train_ax.plot(
                xs, [p.value for p in run.train], marker=alone, color=color, alpha=0.8, label=run.name
            )
    for ax, title in ((val_ax, "validation bits per byte"), (train_ax, "training loss (bits per byte)")):
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x])
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # (a run's first steps have no evaluation yet)
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "none logged yet", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    save_figure(fig, path)
    plt.close(fig)
