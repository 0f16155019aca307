"""A machine-wide cache of corpus bytes made from other files: decompressed `.gz`/`.zst`/`.bz2`/`.xz` files
and the text of JSONL and Parquet records, each made once, streaming, and reused until its source changes.

The cache lives in $HTCLI_CACHE_DIR, else $XDG_CACHE_HOME/htcli or ~/.cache/htcli. An entry is named by
its source's name (its first NAME_BYTES bytes) and a hash of the source's path, size, modification time,
change time (which a copy that keeps the modification time, `cp -p` or `rsync -t`, cannot set back) and the
way it was made (the options, and FORMAT). A lock file per entry, taken only to make one (a whole entry is
read without it), makes concurrent makers wait for one another: the processes of a torchrun job on one
machine make each entry once and share it. The entry's bytes appear (atomically) only when whole, after a
small JSON file of facts about it (how many records, how many skipped, and its size: an entry whose size is
not its facts', cut short or emptied, or whose facts are lost, is made again). The default cache, or one
htcli makes, holds a CACHEDIR.TAG, so that a corpus directory holding it skips it (a folder that was there
before is not tagged; walks skip it as htcli's cache all the same).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

from htcli.errors import HtcliError
from htcli.files import CACHE_SIGNATURE, CACHE_TAG, atomic_file, is_cache_directory, write_json

# how this htcli makes entries: part of every entry's name, raised when a change makes other bytes
# from the same source (2: a JSONL record holding a lone surrogate is skipped as bad, where htcli
# before it wrote the surrogate's bytes), so that no entry an older htcli made is read as this one's
FORMAT = 2
# the most bytes of its source's name an entry's name keeps: with the hash, ".lock" and a temporary file's
# ".NAME.PID.tmp", a name under the usual 255-byte limit (a longer source name failed to make its entry)
NAME_BYTES = 200


def cache_dir() -> Path:
    """Where made corpus bytes go: $HTCLI_CACHE_DIR, else $XDG_CACHE_HOME/htcli or ~/.cache/htcli (a
    leading `~` of either variable is the home directory, as a shell would have made it unquoted: a
    folder named `~` was made)."""
    if os.environ.get("HTCLI_CACHE_DIR"):
        return Path(os.environ["HTCLI_CACHE_DIR"]).expanduser()
    return _default_dir()


def _default_dir() -> Path:
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "htcli"
    try:
        return Path.home() / ".cache" / "htcli"
    except RuntimeError:  # (no HOME, and a user without a passwd entry: a container's uid)
        raise HtcliError(
            "there is no home directory for the cache of corpus bytes (compressed, JSONL and Parquet files "
            "are made into bytes there): set HTCLI_CACHE_DIR to a directory"
        ) from None


def _make(
    source: Path, stat: os.stat_result, make: Callable[[IO[bytes]], dict], target: Path, facts_file: Path
) -> dict:
    """cached's entry made: its bytes, then its facts."""
    try:
        with atomic_file(target) as sink:
            facts = make(sink)
            _check_unchanged(source, stat)
            sink.flush()
            facts["bytes"] = os.fstat(sink.fileno()).st_size
            write_json(facts_file, facts)
    except BaseException:  # (the entry is not made: neither are its facts)
        if not _whole(target, _read_facts(facts_file)):  # (stopped once in place: both stay)
            facts_file.unlink(missing_ok=True)
        raise
    return facts


def cached(
    source: Path,
    how: str,
    make: Callable[[IO[bytes]], dict],
    cache: Path | None = None,
    making: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[Path, dict]:
    """The cache entry made from source by `make` (which writes the bytes to the file it is given and
    returns facts about them), made now if there is none: (its path, the facts). `how` names the way
    of making it (part of the entry's name: a change of options makes another entry). making(): a context
    manager entered while the entry is made, or waited for (seconds a GB)."""
    cache = cache or cache_dir()
    stat = source.stat()
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{how}|{FORMAT}"
    # (fsencode: a path that is not UTF-8 holds surrogates, which str.encode refuses)
    digest = hashlib.sha256(os.fsencode(identity)).hexdigest()[:20]
    target = cache / f"{_cut(source.name, NAME_BYTES)}.{digest}"
    facts_file = target.with_name(target.name + ".json")
    try:
        made = not cache.exists()
        cache.mkdir(parents=True, exist_ok=True)
        # (never a folder of the user's that HTCLI_CACHE_DIR names; no home directory looked up for it)
        if made or (not os.environ.get("HTCLI_CACHE_DIR") and cache == _default_dir()):
            with contextlib.suppress(OSError):  # (a read-only cache still serves the entries it holds)
                _tag(cache)
        facts = _read_facts(facts_file)
        # a whole entry is read without the lock (a file made in the cache: a read-only cache serves too)
        if _whole(target, facts):
            return target, facts
        # (making: the wait for another process making the entry too, under torchrun another rank's)
        with contextlib.nullcontext() if making is None else making():
            with _locked(target.with_name(target.name + ".lock")):
                facts = _read_facts(facts_file)  # (made meanwhile by another process, or still to make)
                if not _whole(target, facts):
                    _remove_leftovers(target, facts_file)
                    facts = _make(source, stat, make, target, facts_file)
        return target, facts
    except OSError as error:
        fix = "free some space or " if error.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        if error.errno == errno.EEXIST and (link := _dangling(cache)):
            within = "" if link == cache else f" cannot be made: {link}"
            what = f"the cache {cache}{within} is a link to {os.readlink(link)}, which does not exist"
            fix = "make that directory or "
        elif error.errno in (errno.EEXIST, errno.ENOTDIR) and (blocker := _not_a_directory(cache)):
            made = "" if blocker == cache else f" cannot be made: {blocker}"
            what = f"the cache {cache}{made} is not a directory"
        else:
            what = f"cannot make {source}'s bytes in the cache {cache}: {error.strerror or error}"
        raise HtcliError(f"{what}; {fix}set HTCLI_CACHE_DIR to a directory that can take them") from None


def _check_unchanged(source: Path, before: os.stat_result) -> None:
    """HtcliError where source changed while its entry was made (rewritten, replaced): the entry would hold
    part of the old text, or of both (a file copied over a JSONL was cut at 43% of its records and
    trained on, where a plain file read while it changes is an error)."""
    now = source.stat()
    if any(
        getattr(now, key) != getattr(before, key)
        for key in ("st_ino", "st_size", "st_mtime_ns", "st_ctime_ns")
    ):
        raise HtcliError(f"{source} changed while it was being unpacked: run again once it is whole")


def _tag(cache: Path) -> None:
    """A CACHEDIR.TAG in cache, if it has none: a corpus directory that holds the cache skips it (its
    entries are the corpus's files made into bytes), as backup tools do."""
    if not is_cache_directory(cache):  # (all or nothing: a tag cut short is written again)
        with atomic_file(cache / CACHE_TAG) as tag:
            tag.write(CACHE_SIGNATURE + b"\n# This directory is htcli's cache of corpus bytes.\n")


def _cut(name: str, limit: int) -> str:
    """name's first characters, at most limit bytes as the filesystem takes them."""
    while len(os.fsencode(name)) > limit:
        name = name[:-1]
    return name


def _dangling(path: Path) -> Path | None:
    """path, or the first of its parents, that is a link to nothing (None if there is none)."""
    for candidate in reversed([path, *path.parents]):
        if candidate.is_symlink() and not candidate.exists():
            return candidate
    return None


def _not_a_directory(path: Path) -> Path | None:
    """path, or the first of its parents, that exists and is not a directory (None if there is none)."""
    for candidate in reversed([path, *path.parents]):
        if candidate.exists() and not candidate.is_dir():
            return candidate
    return None


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock held by this process while the block runs (released if it dies)."""
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _remove_leftovers(*made: Path) -> None:
    """The temporary files of a making of these that did not end (its process killed: SIGKILL, out of
    memory), removed: with the entry's lock held, no other process is making them."""
    for path in made:
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
            leftover.unlink(missing_ok=True)


def _read_facts(path: Path) -> dict:
    try:
        facts = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return facts if isinstance(facts, dict) else {}


def _whole(target: Path, facts: dict) -> bool:
    """Whether the entry at target is there and of the size its facts give (one cut short or emptied, or
    whose facts are lost, is made again: its bytes were read as the corpus's)."""
    try:
        size = target.stat().st_size if target.is_file() else None
    except OSError:
        return False
    return type(facts.get("bytes")) is int and size == facts["bytes"]
