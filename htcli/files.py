"""A run's small files: the names of its checkpoint's files, all-or-nothing writes (a temp file in the
same folder, fsynced, then renamed over the target) and JSON reads that say what went wrong."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from htcli.errors import HtcliError, unreadable

CONFIG_FILE = "config.json"  # the resolved config of a run
LOG_FILE = "log.jsonl"  # its events, one JSON object a line (htcli.runlog)
LOCK_FILE = ".lock"  # locked by the process training into the run directory (htcli.runlock)
# a checkpoint: the model's weights (all that sample and eval read), the optimizer's state, and the step,
# data position and random states (written last: it commits a save)
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
STATE_FILE = "state.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)
BEST_FILE = "best.safetensors"  # the weights of the run's lowest validation bits per byte (not a checkpoint)
BEST_NEXT = ".best.safetensors.next"  # a new best's weights until the next checkpoint commits them
TENSORBOARD_DIR = "tensorboard"  # event files, under the run directory
WANDB_DIR = "wandb"  # W&B's own files, which it makes under the run directory (its dir)
WANDB_ID_FILE = "wandb-id"  # the W&B run id of a run directory, so that a resume continues that run
# the Cache Directory Tagging convention's file, and how it starts (tar --exclude-caches, backup tools)
CACHE_TAG = "CACHEDIR.TAG"
CACHE_SIGNATURE = b"Signature: 8a477f597d28d172789f06886806bc55"
# where a save writes its safetensors files before renaming them into the run directory: safetensors writes
# a temporary file beside the file it makes (.tmpXXXXXX), so a folder of htcli's own holds both
SAVING_DIR = ".saving"
# what a run writes in its directory (and the pending files of a save)
RUN_ENTRIES = (
    *CHECKPOINT_FILES,
    BEST_FILE,
    BEST_NEXT,
    CONFIG_FILE,
    LOG_FILE,
    LOCK_FILE,
    TENSORBOARD_DIR,
    WANDB_DIR,
    WANDB_ID_FILE,
    SAVING_DIR,
)


def is_run_directory(path: Path) -> bool:
    """Whether path is (likely) an htcli run directory: it holds a lock file, a config.json and a log
    (False where its entries cannot be looked at)."""
    try:
        return all((path / name).is_file() for name in (LOCK_FILE, CONFIG_FILE, LOG_FILE))
    except OSError:
        return False


def is_cache_directory(path: Path) -> bool:
    """Whether path holds a CACHEDIR.TAG (https://bford.info/cachedir/): a cache, htcli's corpus cache or
    another tool's, whose entries are not text to train on (False where it cannot be looked at)."""
    try:
        if not (path / CACHE_TAG).is_file():  # (a FIFO would block the walk)
            return False
        with open(path / CACHE_TAG, "rb") as tag:
            return tag.read(len(CACHE_SIGNATURE)) == CACHE_SIGNATURE
    except OSError:
        return False


def written_by_the_run(path: Path, out: Path) -> bool:
    """Whether path (resolved) is a file that the run in out (resolved) writes, or in a folder it writes."""
    try:
        first = path.relative_to(out).parts[0]
    except (ValueError, IndexError):
        return False
    return is_write_leftover(first) or _is_run_entry(first)


def _is_run_entry(name: str) -> bool:
    return name in RUN_ENTRIES or (name.startswith(".") and name.endswith(".pending"))


def is_write_leftover(name: str) -> bool:
    """Whether a name in a run directory is a temporary file of temp_path's for one of the run's files,
    which a write cut short (a kill -9) leaves."""
    base, _, pid = name[1:].removesuffix(".tmp").rpartition(".")
    return name.startswith(".") and name.endswith(".tmp") and pid.isdigit() and _is_run_entry(base)


def check_saving_folder(saving: Path) -> None:
    """HtcliError where something other than a folder (a file, a link) stands at a run's SAVING_DIR."""
    if os.path.islink(saving) or (os.path.lexists(saving) and not saving.is_dir()):
        raise HtcliError(
            f"{saving} is a file or a link, where htcli writes a checkpoint's files before renaming them into"
            " place: remove it, then run again"
        )


def remove_write_leftovers(out: Path) -> None:
    """Remove what writes cut short (a kill -9 during a save) left in the run directory out: temp_path's
    files of the run's own files, and the saving folder with what it holds (safetensors' temporary files,
    as large as the checkpoint's). For the run's one writer, which holds its lock: no write of another
    process is under way there. What cannot be removed stays (it harms nothing but space)."""
    check_saving_folder(out / SAVING_DIR)
    shutil.rmtree(out / SAVING_DIR, ignore_errors=True)  # (a folder, or nothing)
    with contextlib.suppress(OSError), os.scandir(out) as entries:
        for entry in list(entries):
            if is_write_leftover(entry.name) and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def nothing_at(path: str | os.PathLike) -> bool:
    """Whether nothing is at path (not even a broken link); a folder one may not enter may hold it: not
    nothing (reading it says so)."""
    try:
        os.lstat(path)
    except FileNotFoundError:
        return True
    except OSError:
        pass
    return False


def pending_file(out: Path, name: str) -> Path:
    """Where a save writes the checkpoint file `name` before renaming it into place."""
    return out / f".{name}.pending"


def checkpoint_file(out: Path, name: str) -> Path:
    """The file that holds the checkpoint's file `name` for a resume: the pending one where a crash cut a
    save short between its renames before renaming it (the resume finishes that save first), else the
    one in place. A save cut short while writing (no pending state.json) counts for nothing: the next
    save or resume drops its files."""
    pending = pending_file(out, name)
    return pending if pending_file(out, STATE_FILE).exists() and pending.exists() else out / name


def missing_checkpoint_files(out: Path) -> list[str]:
    """The files of a checkpoint that the directory out lacks (checkpoint_file: in place or pending a
    rename; all of them where it holds no checkpoint)."""
    return [name for name in CHECKPOINT_FILES if not checkpoint_file(out, name).exists()]


def no_checkpoint(out: Path) -> HtcliError:
    """The error of a resume where out holds no checkpoint."""
    return HtcliError(f"no checkpoint at {out}: start a new run there (without resume)", fields=("resume",))


def has_checkpoint(out: Path) -> bool:
    """Whether out holds a checkpoint's files, or some of them."""
    return len(missing_checkpoint_files(out)) < len(CHECKPOINT_FILES)


def check_complete_checkpoint(out: Path) -> None:
    """HtcliError if out holds some of a checkpoint's files but not all (deleted, or never written)."""
    missing = missing_checkpoint_files(out)
    if missing and has_checkpoint(out):
        readable = f" (sample and eval read its {MODEL_FILE} alone)" if (out / MODEL_FILE).exists() else ""
        raise HtcliError(
            f"{out} holds an incomplete checkpoint ({' and '.join(missing)} missing): it cannot be resumed;"
            f" start the run in another out{readable}",
            fields=("out",),
        )


def fsync_dir(path: Path) -> None:
    """Make renames inside a folder durable (no-op where folders cannot be opened, e.g. Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(path: Path) -> Path:
    """A hidden sibling of path that this process alone writes."""
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open path for writing; readers see the old file until the block ends without an error."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        with open(tmp, mode) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_json(path: str | os.PathLike, data: object) -> None:
    """Atomically write data as indented JSON."""
    with atomic_file(path, "w") as file:
        json.dump(data, file, indent=2)
        file.write("\n")


def printable(path: str | os.PathLike) -> str:
    """path (or a message naming paths) as text that can be printed or drawn: bytes of its name that are
    not UTF-8 (which Python holds as surrogates) escaped, \xfe (any other lone surrogate as its code)."""
    try:
        return os.fsencode(path).decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # (a surrogate that no byte stands for: not from a file name)
        return os.fspath(path).encode("utf-8", "backslashreplace").decode("utf-8")


def check_utf8_path(path: str | os.PathLike, *, run_directory: bool = False) -> None:
    """HtcliError if path's bytes are not UTF-8 (Python holds them as surrogates): safetensors, written in
    Rust, cannot open such a path, so a checkpoint there could be written by nothing and read by nothing.
    run_directory: path is the run directory (out), which the message names as such."""
    try:  # (its bytes: in a locale that is not UTF-8, Python holds a UTF-8 name's bytes as surrogates too)
        os.fsencode(path).decode("utf-8")
    except UnicodeError:
        given = "the run directory (out) " if run_directory else ""
        raise HtcliError(
            f"{given}{printable(path)} is not a UTF-8 name, which safetensors cannot open: use another name",
            fields=("out",) if run_directory else (),
        ) from None


def check_not_special(path: Path) -> None:
    """HtcliError if path is neither a regular file nor a directory: reading a FIFO blocks until a writer
    comes (and a signal's handler cannot end the wait), a device may never end. Nothing is opened."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return  # (absent or unreadable: the read that follows says which)
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise HtcliError(f"{path} is not a regular file (a pipe or a device?): give the file htcli wrote")


def read_json(path: Path, *, missing: HtcliError) -> Any:
    """A run's JSON file; raises `missing` if it is absent, another HtcliError if it is unreadable."""
    check_not_special(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise missing from None
    except PermissionError as error:
        raise unreadable(path, error) from None
    except (OSError, ValueError):
        raise HtcliError(f"{path} is not readable JSON (truncated or corrupt?)") from None


def _loops(path: Path) -> bool:
    """Whether following the link path goes round a loop of links."""
    try:
        os.stat(path)
    except OSError as error:
        return error.errno == errno.ELOOP
    return False


def check_out_path(out: Path) -> None:
    """out is a directory, or can become one: no part of it is a file."""
    for path in (out, *out.parents):
        if path.is_symlink() and not path.exists():
            where = "is" if path == out else f"is under {path},"
            target = path.parent / os.readlink(path)  # (a relative link's target: from the link's folder)
            what = (
                "a link in a loop of links: give another"
                if _loops(path)
                else f"a link to {target}, which does not exist: make that directory, or give another"
            )
            raise HtcliError(f"the run directory (out) {out} {where} {what}", fields=("out",))
        if path.exists():
            if not path.is_dir():
                where = "is a file" if path == out else f"is under {path}, a file"
                raise HtcliError(f"the run directory (out) {out} {where}: give a directory", fields=("out",))
            return
