"""A run's event log: every event to a callback and, as one JSON line, to OUT/log.jsonl."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

from htcli.files import atomic_file

LOG_FILE = "log.jsonl"
METRIC_EVENTS = ("step", "eval", "sample")  # events of one step, redone when a run resumes before it


class RunLog:
    """Events to a callback and, one JSON line each, to a file; silent where not enabled (every
    process of a distributed run but rank 0). A context manager: the file is closed on the way out."""

    def __init__(self, path: Path, on_event: Callable[[dict], None] | None, *, enabled: bool):
        self.on_event = on_event
        self.file = open(path, "a") if enabled else None

    def __call__(self, event: str, **fields) -> None:
        record = {"event": event, "time": round(time.time(), 3), **fields}
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()
            if self.on_event is not None:
                self.on_event(record)

    def __enter__(self) -> RunLog:
        return self

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


def trim_log(path: Path, step: int) -> None:
    """Before a resume from `step`: drop the metric events of later steps, which a crash left and
    the resumed run redoes, and any torn line, so that each step is logged once."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("event") in METRIC_EVENTS and record.get("step", 0) > step:
            continue
        kept.append(line + "\n")
    with atomic_file(path, "w") as file:
        file.writelines(kept)
