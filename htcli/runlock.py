"""One writer per run directory: an exclusive lock on OUT/.lock, held while a process trains into OUT.

The lock is the operating system's (flock): it dies with its process, so a lock left by a process
that crashed or was killed never blocks the next run. A second process is refused at once with the
holder's process id where the system says it (Linux: /proc/locks). Nothing is written to take or
hold the lock: the empty lock file is the only trace.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import NamedTuple

from htcli.errors import HtcliError, unwritable_advice
from htcli.files import LOCK_FILE, check_not_special


class Whereabouts(NamedTuple):
    """Where a locked run directory is now (RunLock.where_now)."""

    path: Path  # (where it was deleted: the path it had)
    deleted: bool
    ours: bool  # its .lock is still the file this process locked


class RunLock:
    """The lock of one run directory, taken by `acquire()`, let go by `release()` (or the process's end)."""

    def __init__(self, out: Path):
        self.path = Path(out) / LOCK_FILE
        self._file = None
        self._folder: int | None = None  # a descriptor of the run directory, which follows it where it moves

    def acquire(self, *, resuming: bool = False) -> RunLock:
        """Take the lock, or raise an HtcliError naming the process that holds it (resuming: the advice where
        the lock cannot be written is for a run to resume)."""
        if self._file is not None:
            return self
        check_not_special(self.path)  # (opening a FIFO waits for a reader for ever)
        try:  # (not through a link: a dangling one made its target, outside the run directory)
            file = os.fdopen(
                os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, 0o666), "a"
            )
        except OSError as error:
            if self.path.is_symlink():
                raise HtcliError(
                    f"{self.path} (the run's lock) is a link: remove it (htcli makes its own)"
                ) from None
            if self.path.is_dir():
                raise HtcliError(
                    f"{self.path} (the run's lock) is a directory: remove it (htcli makes its lock a file)"
                ) from None
            what = (
                f"{self.path} (the run's lock)"
                if self.path.exists()
                else f"the run directory {self.path.parent}"
            )
            said = f"{error.strerror or error}; {unwritable_advice(error, resuming=resuming)}"
            raise HtcliError(f"cannot write {what}: {said}", fields=("out",)) from None
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(os.fstat(file.fileno()).st_ino)
            file.close()
            who = f"process {holder}" if holder else "another process"
            raise HtcliError(
                f"{self.path.parent} is being trained into by {who}: wait for it to end, or choose "
                "another out",
                fields=("out",),
            ) from None
        self._file = file
        with contextlib.suppress(OSError):
            self._folder = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        return self

    @property
    def held(self) -> bool:
        """Whether this process holds the lock (acquired, not released)."""
        return self._file is not None

    def in_place(self) -> bool:
        """Whether OUT/.lock is still the file this process locked: False where the run directory was moved
        or deleted since (and another, maybe another run's, may stand at its name now), or the lock file."""
        return self._holds(self.path)

    def denied(self, now: Path | None = None) -> str | None:
        """The system's words where this process may no longer look into the run directory (its permissions,
        or a parent's, taken away), at its path or where it is `now`, else None."""
        for path in (self.path, *([] if now is None else [Path(now) / LOCK_FILE])):
            try:
                os.stat(path)
            except PermissionError as error:
                return error.strerror
            except OSError:
                pass
        return None

    def _holds(self, path: Path) -> bool:
        held = os.fstat(self._file.fileno())
        try:
            there = os.stat(path)
        except OSError:
            return False
        return (there.st_dev, there.st_ino) == (held.st_dev, held.st_ino)

    def where_now(self) -> Whereabouts | None:
        """Where the run directory is now; None where the system does not say (Linux says, in
        /proc/self/fd)."""
        if self._folder is None:
            return None
        try:
            now = os.readlink(f"/proc/self/fd/{self._folder}")
        except OSError:
            return None
        deleted = now.endswith(" (deleted)")
        now = now.removesuffix(" (deleted)")
        if not os.path.isabs(now):
            return None
        return Whereabouts(Path(now), deleted, not deleted and self._holds(Path(now) / LOCK_FILE))

    def moving_path(self) -> Path | None:
        """A path of the run directory that leads to it where it is moved, for this process's own opens
        (Linux: /proc/self/fd/N); None where the system has none."""
        if self._folder is None:
            return None
        path = Path(f"/proc/self/fd/{self._folder}")
        return path if path.is_dir() else None

    def follow(self, out: Path) -> None:
        """The run directory, with the locked file, is out now (it was moved)."""
        self.path = Path(out) / LOCK_FILE

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing the file lets go of the lock
            self._file = None
        if self._folder is not None:
            os.close(self._folder)
            self._folder = None


def in_training(out: Path) -> bool | None:
    """Whether a process trains into out now (holds its lock), where the system says (/proc/locks: Linux):
    None where it cannot tell. Reads, takes nothing (a lock taken to probe could refuse a run starting)."""
    try:
        inode = os.stat(Path(out) / LOCK_FILE).st_ino
        readable = os.access("/proc/locks", os.R_OK)
    except OSError:
        return None
    return _holder(inode) is not None if readable else None


def _holder(inode: int) -> int | None:
    """The id of the process holding a flock on the file with this inode, where /proc/locks tells."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # "1: FLOCK  ADVISORY  WRITE 4242 fd:01:1234567 0 EOF"
        if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
            return int(fields[4]) if fields[4].isdigit() and fields[4] != "0" else None
    return None
