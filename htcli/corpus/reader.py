"""A corpus read as one byte string: the concatenation of its files' bytes, never loaded whole.

Reads go straight to the files (`os.pread`) through at most MAX_OPEN open descriptors, the most
recently used, whatever the number of files: nothing is memory-mapped, so resident memory stays small
whatever the corpus size, and a tree of 100,000 files needs no more descriptors than one file. A
file that changes while it is read (truncated, or replaced by another) is an error that names it,
never a crash or silently different data.
"""

from __future__ import annotations

import bisect
import contextlib
import os
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import BinaryIO

import torch

from htcli.corpus.find import resolve_corpus
from htcli.corpus.formats import Prepared, RecordOptions, prepare
from htcli.errors import HtcliError, unreadable

MAX_OPEN = 16  # open files per corpus at the most


def _absolute(path: Path) -> str:
    """path from the root, so that it opens (and is checked) after a chdir too; not normalised (a/link/../x
    is not a/x), and an absolute one as it is (the working directory may be gone)."""
    return str(path) if Path(path).is_absolute() else os.path.join(os.getcwd(), path)


class ByteCorpus:
    """Files read as one concatenated byte string. Empty files contribute nothing."""

    def __init__(
        self,
        files: Sequence[Path],
        *,
        cache: Path | None = None,
        records: RecordOptions | None = None,
        on_unpack: Callable[[Path], contextlib.AbstractContextManager] | None = None,
    ):
        """on_unpack(file): a context manager entered while a compressed or record file is unpacked into
        the cache (its first use: seconds a GB)."""
        self.files = [str(file) for file in files]
        # the non-empty files ("parts"), compactly (a corpus may have millions): the file each part's
        # bytes are read from, where it starts in the concatenation, its inode and modification time
        self._paths: list[str] = []
        self._sources: dict[int, str] = {}  # parts read from the cache: the corpus file they come from
        self._offsets, self._inodes, self._mtimes = array("q"), array("q"), array("q")
        self._size = 0
        self._open: OrderedDict[int, BinaryIO] = OrderedDict()  # part index -> open file, oldest first
        self.skipped_records = 0  # JSONL and Parquet records left out (skip_bad_records)
        for file in files:
            prepared = prepare(Path(file), records or RecordOptions(), cache, on_unpack)
            stat = _readable(prepared)
            self.skipped_records += prepared.skipped
            if stat.st_size:
                if prepared.path != prepared.source:
                    self._sources[len(self._paths)] = str(prepared.source)
                self._paths.append(_absolute(prepared.path))
                self._offsets.append(self._size)
                self._inodes.append(stat.st_ino)
                self._mtimes.append(stat.st_mtime_ns)
                self._size += stat.st_size
        self._offsets.append(self._size)  # the end of the last part

    @classmethod
    def open(
        cls,
        specs: Sequence[str | os.PathLike],
        *,
        cache: Path | None = None,
        records: RecordOptions | None = None,
        include_hidden: bool = False,
        exclude: Iterable[str | os.PathLike] = (),
        files: Sequence[Path] | None = None,
        on_unpack: Callable[[Path], contextlib.AbstractContextManager] | None = None,
    ) -> ByteCorpus:
        """Resolve specs (htcli.corpus.find; files: what that gave already) and index every file (on_unpack:
        as the constructor's); an empty corpus is an error."""
        if isinstance(specs, str | bytes | os.PathLike):  # (a string's characters were taken as paths: "/")
            raise HtcliError(f"the corpus must be a list of paths, got {specs!r}: give [{specs!r}]")
        if files is None:
            files = resolve_corpus(specs, include_hidden=include_hidden, exclude=exclude)
        corpus = cls(files, cache=cache, records=records, on_unpack=on_unpack)
        if len(corpus) == 0:
            names = ", ".join(str(s) for s in specs)
            if corpus.skipped_records:
                raise HtcliError(
                    f"corpus {names} has no good record: skip_bad_records left out all"
                    f" {corpus.skipped_records:,}, as bad",
                    fields=("skip_bad_records",),
                )
            fix = "give files with some content"
            if any(Path(file).resolve().parts[1:2] in (("proc",), ("sys",)) for file in files):
                fix = "the kernel's files (/proc, /sys) say they hold none until read: copy them to a file"
            raise HtcliError(f"corpus {names} is empty (0 bytes): {fix}")
        return corpus

    def __len__(self) -> int:
        return self._size

    def layout(self) -> bytes:
        """Where each non-empty file's bytes begin in the concatenation, and where they end: the files'
        sizes in order (a resume compares them: files in another order, or others of the same total)."""
        return self._offsets.tobytes()

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the concatenation."""
        if start < 0 or length < 0 or start + length > self._size:
            raise IndexError(f"bytes [{start}, {start + length}) outside a corpus of {self._size}")
        parts = []
        index = bisect.bisect_right(self._offsets, start) - 1
        position, end = start, start + length
        while position < end:
            offset = position - self._offsets[index]
            take = min(end - position, self._offsets[index + 1] - position)
            parts.append(self._pread(index, take, offset))
            position += take
            index += 1
        return b"".join(parts)

    def _pread(self, index: int, length: int, offset: int) -> bytes:
        data = os.pread(self._file(index).fileno(), length, offset)
        if len(data) < length:
            self._changed(index, "it is shorter than when training started")
        return data

    def _file(self, index: int) -> BinaryIO:
        """Part `index` opened, checked to be the file indexed; the least recently used one is closed
        past MAX_OPEN."""
        if index in self._open:
            self._open.move_to_end(index)
            return self._open[index]
        try:
            file = open(self._paths[index], "rb", buffering=0)
        except OSError as error:
            if index in self._sources and isinstance(error, FileNotFoundError):  # (its bytes in the cache)
                self._cache_entry_lost(index)  # (it said the corpus file was missing, which was there)
            raise unreadable(self._source(index), error) from None
        if not self._as_indexed(index, file):
            file.close()
            self._changed(index, "it was replaced or modified")
        self._open[index] = file
        if len(self._open) > MAX_OPEN:
            self._open.popitem(last=False)[1].close()
        return file

    def check_unchanged(self) -> None:
        """Each open file still as indexed (size, modification time): a file rewritten in place at the
        same size is caught here, where the check on opening never runs again (a corpus of up to
        MAX_OPEN files stays open the whole run)."""
        for index, file in self._open.items():
            if not self._as_indexed(index, file):
                self._changed(index, "it was modified")
            if not self._still_named(index):  # (the open file is read on as it was: a rename went unseen)
                if index in self._sources:
                    self._cache_entry_lost(index)
                self._changed(index, "it was replaced or removed")

    def _still_named(self, index: int) -> bool:
        """Whether part `index`'s path still names the file indexed (not another, put in its place)."""
        try:
            return os.stat(self._paths[index]).st_ino == self._inodes[index]
        except OSError:
            return False

    def _cache_entry_lost(self, index: int) -> None:
        raise HtcliError(
            f"the cache entry of {self._source(index)} ({self._paths[index]}) was removed while in use: run "
            "again (it is made again)"
        ) from None

    def _as_indexed(self, index: int, file: BinaryIO) -> bool:
        """Whether the open file is part `index` as indexed: the same inode, size and modification time."""
        stat = os.fstat(file.fileno())
        expected = (self._inodes[index], self._offsets[index + 1] - self._offsets[index], self._mtimes[index])
        return (stat.st_ino, stat.st_size, stat.st_mtime_ns) == expected

    def _source(self, index: int) -> str:
        """The corpus file part `index` comes from."""
        return self._sources.get(index, self._paths[index])

    def _changed(self, index: int, how: str) -> None:
        raise HtcliError(
            f"corpus file {self._source(index)} changed while in use ({how}): leave a corpus as it is "
            "while training or evaluating, then run again (a training run resumes from its last checkpoint)"
        )

    def span(self, start: int = 0, stop: int | None = None) -> ByteSpan:
        """Bytes [start, stop) of the corpus (stop: its end by default)."""
        stop = self._size if stop is None else stop
        if not (isinstance(start, int) and isinstance(stop, int) and 0 <= start <= stop <= self._size):
            raise HtcliError(
                f"a span must have 0 <= start <= stop <= the corpus's {self._size:,} bytes, "
                f"got [{start}, {stop})"
            )
        return ByteSpan(self, start, stop)

    def close(self) -> None:
        while self._open:
            self._open.popitem()[1].close()

    def __enter__(self) -> ByteCorpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _readable(prepared: Prepared) -> os.stat_result:
    """The file's facts, once it is known to open (every input is checked before training starts)."""
    try:
        with open(prepared.path, "rb", buffering=0) as file:
            return os.fstat(file.fileno())
    except OSError as error:
        raise unreadable(prepared.source, error) from None


class ByteSpan:
    """Bytes [start, stop) of a corpus, e.g. its training or its validation part."""

    def __init__(self, corpus: ByteCorpus, start: int, stop: int):
        self.corpus, self.start, self.stop = corpus, start, stop

    def __len__(self) -> int:
        return self.stop - self.start

    def read(self, start: int, length: int) -> bytes:
        if start < 0 or start + length > len(self):
            raise IndexError(f"bytes [{start}, {start + length}) outside a span of {len(self)}")
        return self.corpus.read(self.start + start, length)

    def windows(self, starts: Sequence[int], length: int) -> torch.Tensor:
        """(len(starts), length) int64 tokens: the bytes at each start."""
        buffer = bytearray(b"".join(self.read(start, length) for start in starts))
        self.corpus.check_unchanged()  # (a few fstat calls: microseconds a batch)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(len(starts), length).long()
