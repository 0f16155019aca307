"""A run's event log: every event to a callback, to the loggers (htcli.loggers) and, as one JSON line,
to OUT/log.jsonl."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Callable
from pathlib import Path

from htcli.errors import HtcliError, unreadable
from htcli.files import atomic_file, check_not_special

# events of one step, redone when a run resumes before it
METRIC_EVENTS = ("step", "eval", "sample", "early_stop")


class LogError(HtcliError):
    """The log (or a logger) could not be written: a full disk, a failed device (errno: the OSError's)."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


class RunLog:
    """Events to a callback and, one JSON line each, to a file; silent where not enabled (every
    process of a distributed run but rank 0). A context manager: the file and the loggers (objects with
    __call__(event) and close()) are closed on the way out."""

    def __init__(
        self, path: Path, on_event: Callable[[dict], None] | None, *, enabled: bool, loggers: list = ()
    ):
        self.on_event = on_event
        if enabled:
            check_not_special(path)  # (appending to a FIFO would wait for a reader for ever)
        self.file = open(path, "a") if enabled else None
        self.loggers = list(loggers)

    def __call__(self, event: str, **fields) -> None:
        """Log an event; LogError where the file or a logger cannot take it."""
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.file is not None:
            with self._writing(self.file.name):
                self.file.write(json_line(record))
                self.file.flush()
            for logger in self.loggers:
                with self._writing(logger.what):
                    logger(record)
            if self.on_event is not None:
                self.on_event(record)

    @contextlib.contextmanager
    def _writing(self, what: str):
        try:
            yield
        except OSError as error:
            raise LogError(f"cannot write {what}: {error.strerror or error}", error.errno) from None

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, kind, *exc) -> None:
        try:
            failed = None
            for logger in self.loggers:  # (every one closed; a logger's last writes fail as its others did)
                try:
                    with self._writing(logger.what):
                        logger.close()
                except LogError as error:
                    failed = failed or error
            if failed is not None and kind is None:  # (one error says it: not over another on its way out)
                raise failed
        finally:
            if self.file is not None:
                # (closing writes the rest of a line that could not be written: its error is raised only
                # where no other is on its way out)
                with self._writing(self.file.name) if kind is None else contextlib.suppress(OSError):
                    self.file.close()


def trim_log(path: Path, step: int, *, then: str = "resume") -> list[dict]:
    """Before a resume from `step` (0: a new run): drop the metric events of later steps, which a crash left
    and the run redoes, so that each step is logged once. A last line that a crash cut short is dropped
    too; any other line that is not an event (not UTF-8, not a JSON object) is an error (then: what it says
    to do after the repair), and the file is left as it was. Returns the events kept."""
    if not path.exists():
        return []
    check_not_special(path)
    try:
        lines = path.read_bytes().split(b"\n")
    except OSError as error:
        raise unreadable(path, error) from None
    last = lines.pop()  # after the last newline: nothing, or a line cut short (kept if whole)
    events = []
    for number, line in enumerate(lines, 1):
        record = parse_event(line)
        if record is None:
            raise HtcliError(
                f"{path} line {number} is not an htcli event (not a JSON object in UTF-8): repair or "
                f"move the file, then {then}"
            )
        events.append(record)
    if parse_event(last) is not None:
        events.append(parse_event(last))
    kept = [
        record
        for record in events
        if not (record.get("event") in METRIC_EVENTS and _after(record.get("step"), step))
    ]
    with atomic_file(path, "w") as file:
        file.writelines(map(json_line, kept))
    return kept


def lowest_val(events: list[dict]) -> tuple[int, float] | None:
    """The (step, val bpb) of the eval event with the lowest finite val bpb (the first of equals) since the
    corpus last changed (a start event with `corpus_was`: scores before it may not compare), or None."""
    scores: list[tuple[int, float]] = []
    for event in events:
        if event.get("event") == "start" and event.get("corpus_was"):
            scores = []
        elif (
            event.get("event") == "eval"
            and isinstance(event.get("step"), int)
            and isinstance(event.get("val_bpb"), float)
            and math.isfinite(event["val_bpb"])
        ):
            scores.append((event["step"], event["val_bpb"]))
    return min(scores, key=lambda score: score[1], default=None)


def json_line(record: dict) -> str:
    """record as one line of strict JSON: a number that is not finite (a diverged loss) as null, which every
    JSON reader takes (Python's NaN is not JSON)."""
    return json.dumps(_finite(record), allow_nan=False) + "\n"


def _finite(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _after(value: object, step: int) -> bool:
    return isinstance(value, int | float) and value > step


def parse_event(line: bytes) -> dict | None:
    """A log line's event, or None if the line is not one."""
    try:
        record = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None
