"""A run's learning curves, read back from its log.jsonl: of a finished, running or crashed run.

Each point carries the step, the bytes trained on so far and the training time so far (over every
session of a resumed run, the pauses between them left out), so runs of different batch sizes or
speeds can be compared on any of the three.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from htcli.errors import HtcliError, unreadable
from htcli.files import LOG_FILE, check_not_special, nothing_at, printable
from htcli.runlog import parse_event

X_AXES = ("step", "bytes", "time")  # what curves can be drawn against
LARGEST = 1e18  # the largest number of a log's events that curves take (steps, seconds, losses)


@dataclass
class Point:
    step: int
    bytes: int  # trained on, up to and including this step
    seconds: float  # training time up to this event
    value: float


@dataclass
class Curves:
    name: str
    train: list[Point] = field(default_factory=list)  # training loss, bits per byte
    val: list[Point] = field(default_factory=list)  # validation bits per byte
    skipped: int = 0  # lines of the log that are not events these curves can use (a last one cut short aside)

    @property
    def best_val(self) -> Point | None:
        """The lowest validation bits per byte (a NaN one is never the best)."""
        return min((p for p in self.val if math.isfinite(p.value)), key=lambda p: p.value, default=None)

    @property
    def last(self) -> Point | None:
        """The latest point of either curve (where the run is)."""
        return max(self.train + self.val, key=lambda p: (p.step, p.seconds), default=None)


def read_curves(run: Path, name: str | None = None) -> Curves:
    """The curves in run's log.jsonl. Lines that are not events, or events without the numbers they
    should hold, are skipped and counted (Curves.skipped), except a last line a crash cut short."""
    path = run / LOG_FILE
    if run.is_file():
        raise HtcliError(f"{run} is a file: give the run directory that holds it ({run.parent})")
    check_not_special(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except FileNotFoundError:
        what = "does not exist" if nothing_at(run) else f"has no {LOG_FILE}"
        raise HtcliError(f"{run} {what}: give run directories written by htcli train") from None
    except OSError as error:
        raise unreadable(path, error) from None
    curves = Curves(name or run.name)
    session = {"step": 0, "bytes": 0, "seconds": 0.0, "time": None, "per_step": 0}
    done = {"bytes": 0, "seconds": 0.0}
    last = len(lines) - 1  # (lines[last] is empty unless a crash cut the last line short)
    for index, line in enumerate(lines):
        if not line.strip():
            continue
        event = parse_event(line)
        if event is None or not _usable(event):
            curves.skipped += index != last
            continue
        if event["event"] == "start":
            session = {
                "step": event["step"],
                "time": event["time"],
                "per_step": event["tokens_per_step"],
                **done,
            }
            continue
        if session["time"] is None:
            continue
        point = _point(event, session)
        done = {"bytes": point.bytes, "seconds": point.seconds}
        if event["event"] == "step":
            curves.train.append(_with(point, _value(event, "loss") / math.log(2)))
        elif event["event"] == "eval":
            curves.val.append(_with(point, _value(event, "val_bpb")))
    return curves


VALUES = {"step": "loss", "eval": "val_bpb"}  # the value a curve takes from an event of that kind


def _usable(event: dict) -> bool:
    """Whether an event (of any kind) holds the numbers that the curves read from it; a value of null is
    one (a NaN, which the log writes null as strict JSON: a gap in the curve; it was a line "not an htcli
    event")."""
    kind = event.get("event")
    needs = ("tokens_per_step",) if kind == "start" else ()
    if not isinstance(kind, str) or not _numbers(event, "time", "step", *needs):
        return False
    value = VALUES.get(kind)
    return value is None or (value in event and event[value] is None) or _numbers(event, value)


def _value(event: dict, key: str) -> float:
    return math.nan if event[key] is None else event[key]


def _numbers(event: dict, *keys: str) -> bool:
    """Whether keys hold numbers a plot can take: NaN and infinities (drawn as gaps), none past LARGEST
    (matplotlib's ticks fail on an axis to 1e308: "arange: cannot compute length")."""
    return all(
        isinstance(value := event.get(k), int | float)
        and not isinstance(value, bool)
        and (abs(value) <= LARGEST or isinstance(value, float) and not math.isfinite(value))
        for k in keys
    )


def _point(event: dict, session: dict) -> Point:
    steps = event["step"] - session["step"]
    return Point(
        step=event["step"],
        bytes=session["bytes"] + steps * session["per_step"],
        seconds=session["seconds"] + event["time"] - session["time"],
        value=math.nan,
    )


def _with(point: Point, value: float) -> Point:
    point.value = value
    return point


def run_names(runs: list[Path]) -> list[str]:
    """A label per run: its directory's name, or the path as given where names repeat; HtcliError for a run
    given twice (by another path too: a link), which would draw the same curves twice."""
    seen: dict[str, Path] = {}
    for run in runs:
        if (first := seen.get(os.path.realpath(run))) is not None:
            also = "" if str(first) == str(run) else f" (also as {printable(first)})"
            raise HtcliError(f"the run {printable(run)} is given twice{also}: give each run once")
        seen[os.path.realpath(run)] = run
    names = [run.resolve().name or str(run) for run in runs]
    labels = [name if names.count(name) == 1 else str(run) for name, run in zip(names, runs)]
    return [printable(label) for label in labels]  # (a figure's text cannot hold surrogates)
