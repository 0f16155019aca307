"""Corpora as byte strings: resolve files, directories, globs and .gz files; memory-map them; sample windows.

A corpus is never read into Python memory: files are memory-mapped, windows are copied out of the
maps as they are needed, and the mapped pages are handed back to the OS every few reads, so
resident memory stays small whatever the corpus size. `.gz` files are decompressed once,
streaming, into a cache file (HTCLI_CACHE_DIR, else ~/.cache/htcli) that is then mapped.
"""

from __future__ import annotations

import bisect
import glob
import gzip
import hashlib
import math
import mmap
import os
import shutil
import zlib
from collections.abc import Sequence
from pathlib import Path

import torch

from htcli.errors import HtcliError
from htcli.files import atomic_file

GLOB_CHARACTERS = "*?["
# mapped pages are handed back to the OS after this many bytes read, or this many reads: a page fault
# can map far more of a cached file than it reads (fault-around, large folios), so small random reads
# need the second bound
RELEASE_EVERY = 64 << 20
RELEASE_EVERY_READS = 16


def check_corpus_given(specs: Sequence[str | os.PathLike]) -> None:
    """HtcliError if specs names nothing."""
    if not specs:
        raise HtcliError("no corpus given: name at least one file, directory or glob pattern")


def resolve_corpus(specs: Sequence[str | os.PathLike]) -> list[Path]:
    """Files named by specs, in order: a file, a directory's files below it (sorted), a glob's matches."""
    check_corpus_given(specs)
    files: list[Path] = []
    for spec in specs:
        path = Path(spec).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file())
            if not found:
                raise HtcliError(f"directory {spec} has no files: point at one that holds the corpus")
        elif path.exists():
            if not path.is_file():
                raise HtcliError(f"{spec} is not a regular file: give files, directories or glob patterns")
            found = [path]
        elif any(c in str(spec) for c in GLOB_CHARACTERS):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise HtcliError(
                    f"no files match {spec}: check the pattern (quote it so the shell leaves it)"
                )
        else:
            raise HtcliError(f"corpus {spec} does not exist: give a file, a directory or a glob pattern")
        files += found
    return files


def cache_dir() -> Path:
    """Where decompressed .gz corpora go: $HTCLI_CACHE_DIR, else $XDG_CACHE_HOME/htcli or ~/.cache/htcli."""
    if os.environ.get("HTCLI_CACHE_DIR"):
        return Path(os.environ["HTCLI_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "htcli"


def decompressed(path: Path, cache: Path | None = None) -> Path:
    """A .gz file's bytes, decompressed once (streaming) into the cache; reused until the file changes."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:20]
    cache = cache or cache_dir()
    target = cache / f"{path.stem}.{key}"
    if target.exists():
        return target
    try:
        source = open(path, "rb")
    except OSError as error:
        raise HtcliError(f"cannot read {path}: {error.strerror or error}") from None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with source, gzip.GzipFile(fileobj=source) as unzipped, atomic_file(target) as sink:
            shutil.copyfileobj(unzipped, sink, 1 << 20)
    except (EOFError, zlib.error, gzip.BadGzipFile):
        raise HtcliError(f"{path} is not a readable gzip file (truncated or corrupt?)") from None
    except OSError as error:
        raise HtcliError(
            f"cannot decompress {path} into {cache}: {error.strerror or error}; set HTCLI_CACHE_DIR elsewhere"
        ) from None
    return target


class ByteCorpus:
    """Files read as one concatenated byte string, memory-mapped. Empty files contribute nothing."""

    def __init__(self, files: Sequence[Path], *, cache: Path | None = None):
        self.files = list(files)
        self._maps: list[mmap.mmap] = []
        self._offsets: list[int] = []  # where each map starts in the concatenation
        self._size = 0
        self._read_since_release = self._reads_since_release = 0
        for file in self.files:
            mapped = self._map(decompressed(file, cache) if file.suffix == ".gz" else file, shown=file)
            if mapped is not None:
                self._offsets.append(self._size)
                self._maps.append(mapped)
                self._size += len(mapped)

    @staticmethod
    def _map(path: Path, shown: Path) -> mmap.mmap | None:
        try:
            with open(path, "rb") as file:
                if os.fstat(file.fileno()).st_size == 0:
                    return None
                mapped = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as error:
            raise HtcliError(f"cannot read {shown}: {error.strerror or error}") from None
        if hasattr(mapped, "madvise"):  # random windows: no read-ahead
            mapped.madvise(mmap.MADV_RANDOM)
        return mapped

    @classmethod
    def open(cls, specs: Sequence[str | os.PathLike], *, cache: Path | None = None) -> ByteCorpus:
        """Resolve specs and map every file; an empty corpus is an error."""
        corpus = cls(resolve_corpus(specs), cache=cache)
        if len(corpus) == 0:
            names = ", ".join(str(s) for s in specs)
            raise HtcliError(f"corpus {names} is empty (0 bytes): give files with some content")
        return corpus

    def __len__(self) -> int:
        return self._size

    def read(self, start: int, length: int) -> bytes:
        """Bytes [start, start + length) of the concatenation."""
        if start < 0 or length < 0 or start + length > self._size:
            raise IndexError(f"bytes [{start}, {start + length}) outside a corpus of {self._size}")
        parts = []
        index = bisect.bisect_right(self._offsets, start) - 1
        position, end = start, start + length
        while position < end:
            mapped, offset = self._maps[index], position - self._offsets[index]
            take = min(end - position, len(mapped) - offset)
            parts.append(mapped[offset : offset + take])
            position += take
            index += 1
        self._read_since_release += length
        self._reads_since_release += 1
        if self._read_since_release >= RELEASE_EVERY or self._reads_since_release >= RELEASE_EVERY_READS:
            self.release()
        return b"".join(parts)

    def release(self) -> None:
        """Unmap the pages read so far from this process (the OS page cache may keep them)."""
        self._read_since_release = self._reads_since_release = 0
        for mapped in self._maps:
            if hasattr(mapped, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
                mapped.madvise(mmap.MADV_DONTNEED)

    def span(self, start: int = 0, stop: int | None = None) -> ByteSpan:
        return ByteSpan(self, start, self._size if stop is None else stop)

    def close(self) -> None:
        for mapped in self._maps:
            mapped.close()
        self._maps = []

    def __enter__(self) -> ByteCorpus:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
        return torch.frombuffer(buffer, dtype=torch.uint8).view(len(starts), length).long()


def split(
    corpus: ByteCorpus, val: ByteCorpus | None, val_fraction: float, window: int
) -> tuple[ByteSpan, ByteSpan]:
    """Training and validation spans, each at least one window long; without `val`, the corpus's tail."""
    seq_len = window - 1
    if val is not None:
        for name, part in (("training corpus", corpus), ("validation corpus (val)", val)):
            if len(part) < window:
                raise HtcliError(
                    f"the {name} is {len(part):,} bytes, shorter than one window: with max_seq_len {seq_len} "
                    f"it must be at least {window:,} bytes; add data or lower max_seq_len",
                    fields=("max_seq_len", "val"),
                )
        return corpus.span(), val.span()
    total = len(corpus)
    held_out = max(math.ceil(total * val_fraction), window)
    if total - held_out < window:
        need = 2 * window
        while need - max(math.ceil(need * val_fraction), window) < window:
            need += 1
        raise HtcliError(
            f"the corpus is {total:,} bytes, shorter than a training window plus a validation window: "
            f"with max_seq_len {seq_len} it must be at least {need:,} bytes; add data, pass val or lower "
            "max_seq_len",
            fields=("max_seq_len", "val"),
        )
    return corpus.span(0, total - held_out), corpus.span(total - held_out)


class WindowSampler:
    """Uniformly random window starts. Its whole state is one torch.Generator, saved with checkpoints.

    With shard=(i, n) it draws n batches at once and keeps the i-th: n samplers with the same seed split
    one batch of n * batch_size windows between them, the windows one sampler would draw alone.
    """

    def __init__(
        self, num_bytes: int, window: int, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)
    ):
        self.num_starts = num_bytes - window + 1
        self.batch_size = batch_size
        self.shard = shard
        self.generator = torch.Generator().manual_seed(seed)

    def starts(self) -> list[int]:
        index, count = self.shard
        drawn = torch.randint(self.num_starts, (self.batch_size * count,), generator=self.generator)
        return drawn[index * self.batch_size : (index + 1) * self.batch_size].tolist()

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


def evenly_spaced(num_bytes: int, window: int, count: int) -> list[int]:
    """Up to `count` distinct window starts spread from the first byte to the last window."""
    last = num_bytes - window
    if count <= 1 or last == 0:
        return [0]
    return sorted({round(i * last / (count - 1)) for i in range(count)})
