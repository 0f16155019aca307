"""The one project exception: a mistake the user can fix, reported as one line without a traceback."""

from __future__ import annotations

import errno
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


def unreadable_advice(error: OSError) -> str:
    """What to do about a file or folder (a corpus's, a run's) that could not be read with this error."""
    if isinstance(error, PermissionError):
        return "give a path you may read, or change its permissions"
    if error.errno in (errno.EMFILE, errno.ENFILE):  # (not the path's fault)
        return "raise the limit on open files (ulimit -n) and start again"
    return "give another path, or mend that one"


def unreadable(path, error: OSError) -> HtcliError:
    """A file (a corpus's, a run's) that could not be read with this error, said with what to do."""
    return HtcliError(f"cannot read {path}: {error.strerror or error}: {unreadable_advice(error)}")


def room_advice(number: int | None) -> str | None:
    """What to do where a write failed for want of room (a full disk or quota, a limit on file sizes),
    else None."""
    if number in (errno.ENOSPC, errno.EDQUOT):
        return "free some space"
    return "raise the limit on file sizes (ulimit -f)" if number == errno.EFBIG else None


def unwritable_advice(error: OSError, *, resuming: bool = False) -> str:
    """What to do about a run directory that could not be written with this error (names the field out);
    resuming: a run to resume, which stays where it is ("give another out" does not resume it)."""
    if error.errno in (errno.EMFILE, errno.ENFILE):  # (not the directory's fault: "give another out" misled)
        return unreadable_advice(error)
    if resuming:
        mend = "free some space" if error.errno in (errno.ENOSPC, errno.EDQUOT) else "mend that"
        mend = "make its filesystem writable" if error.errno == errno.EROFS else mend
        return f"{'change its permissions' if isinstance(error, PermissionError) else mend}, then resume"
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        return "free some space, or give another out"
    if error.errno == errno.EROFS:
        return "give an out on a filesystem that can be written"
    if isinstance(error, PermissionError):
        return "give an out you may write, or change its permissions"
    return "give another out, or mend that one"
