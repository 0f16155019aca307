"""The one project exception: a mistake the user can fix, reported as one line without a traceback."""

from __future__ import annotations

from collections.abc import Iterable


class HtcliError(Exception):
    """A bad input or an impossible request; the message says what to do.

    The message speaks the library's language: config fields by their names (`max_seq_len must be
    ...`). `fields` lists the names it uses, so that a front end can respell them in its own terms
    (the command line writes each as the flag that sets it: `--seq-len must be ...`).
    """

    def __init__(self, message: str, *, fields: Iterable[str] = ()):
        super().__init__(message)
        self.fields = tuple(fields)
