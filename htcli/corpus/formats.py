"""The kinds of corpus file, by name, and how each becomes bytes to train on.

- plain files (anything not below): their bytes, read in place;
- `.gz`, `.zst`, `.bz2`, `.xz`: their decompressed bytes;
- JSONL (`.jsonl`, compressed as above: `.jsonl.gz` ...) and Parquet (`.parquet`): the text of one field of
  each record (`text_field`, default "text"), UTF-8, each record followed by RECORD_SEPARATOR.

Everything but plain files is made once into the cache (htcli.corpus.cache), streaming: a record or
a block of the file at a time, never the whole file. A record that is not JSON, not an object, lacks
the field or holds something other than a string stops with an error naming the file and line (or
row); with `skip_bad_records` it is left out and counted instead.
"""

from __future__ import annotations

import codecs
import contextlib
import gzip
import importlib
import io
import json
import shutil
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from htcli.corpus.cache import cached
from htcli.errors import HtcliError, unreadable

COMPRESSIONS = {"gz": "gzip", "zst": "zstd", "bz2": "bzip2", "xz": "xz"}
ZSTD_SLICE = 2048  # compressed bytes fed to the decompressor at a time (its output has no bound)
RECORD_SEPARATOR = b"\x00"  # after every record's text: a byte text never holds, so the model sees
# where one document ends and the next begins (a record whose text holds it is a bad record)
SEPARATOR_CHARACTER = RECORD_SEPARATOR.decode()
PARQUET_BATCH_ROWS = 1024
WHOLE_COPY = "download or compress it again, or leave it out of the corpus"


@dataclass(frozen=True)
class RecordOptions:
    text_field: str = "text"  # the field of each JSONL or Parquet record whose text is the corpus
    skip_bad_records: bool = False  # leave out (and count) bad records instead of stopping

    def __post_init__(self) -> None:
        if not isinstance(self.text_field, str) or not self.text_field:
            raise HtcliError(f"text_field must name a field, got {self.text_field!r}", fields=("text_field",))


@dataclass(frozen=True)
class Prepared:
    """A corpus file ready to read: the file whose bytes it is (the source itself, or a cache entry)."""

    source: Path  # the corpus file as named
    path: Path  # the file holding its bytes
    records: int | None = None  # JSONL/Parquet: records read
    skipped: int = 0  # JSONL/Parquet: bad records left out


JSONL_KINDS = ("jsonl", *(f"jsonl.{compression}" for compression in COMPRESSIONS))
RECORD_KINDS = (*JSONL_KINDS, "parquet")


def kind(path: Path) -> str:
    """ "jsonl", "jsonl.gz" (and each of COMPRESSIONS), "parquet", "gz" (each of COMPRESSIONS) or "plain"."""
    name = path.name.lower()
    for suffix in (*JSONL_KINDS[1:], "jsonl", "parquet", *COMPRESSIONS):
        if name.endswith("." + suffix):
            return suffix
    return "plain"


# the record options' defaults, as check_records_apply says them (a run's config.json holds them all)
DEFAULT_SAID = {
    "text_field": f"text_field to {RecordOptions().text_field}",
    "skip_bad_records": "skip_bad_records off",
}


def check_records_apply(files: Sequence[str | Path], options: RecordOptions) -> None:
    """HtcliError where options other than the defaults are given for files of which none holds records
    (JSONL or Parquet): they would be ignored without a word."""
    given = [
        name
        for name in ("text_field", "skip_bad_records")
        if getattr(options, name) != getattr(RecordOptions(), name)
    ]
    if given and not any(kind(Path(file)) in RECORD_KINDS for file in files):
        raise HtcliError(
            f"{' and '.join(given)} concern{'' if len(given) > 1 else 's'} the records of JSONL and Parquet"
            " files, and the corpus holds none: leave "
            + ("them" if len(given) > 1 else "it")
            + " out (or set "
            + " and ".join(DEFAULT_SAID[name] for name in given)
            + ")",
            fields=tuple(given),
        )


def prepare(
    source: Path,
    options: RecordOptions,
    cache: Path | None = None,
    on_unpack: Callable[[Path], contextlib.AbstractContextManager] | None = None,
) -> Prepared:
    """The file to read source's bytes from, made into the cache first where it must be (inside
    on_unpack(source), a context manager)."""
    what = kind(source)
    if what == "plain":
        return Prepared(source, source)
    making = None if on_unpack is None else lambda: on_unpack(source)
    if what in COMPRESSIONS:
        path, _ = cached(source, what, lambda sink: _decompress(source, what, sink), cache, making)
        return Prepared(source, path)
    how = f"{what}|field={options.text_field}|skip={options.skip_bad_records}|sep={RECORD_SEPARATOR.hex()}"
    how += "|separator-in-text=bad"  # (entries made before such records were refused are made again)
    path, facts = cached(source, how, lambda sink: _extract(source, what, options, sink), cache, making)
    return Prepared(source, path, facts.get("records"), facts.get("skipped", 0))


def _decompress(source: Path, what: str, sink: IO[bytes]) -> dict:
    with _opened(source, what) as stream:
        try:
            shutil.copyfileobj(stream, sink, 1 << 20)
        except _corrupt_errors() as error:
            _raise_io_error(error)
            raise HtcliError(
                f"{source} is not a readable {COMPRESSIONS[what]} file (truncated or corrupt?): {WHOLE_COPY}"
            ) from None
    return {}


def _extract(source: Path, what: str, options: RecordOptions, sink: IO[bytes]) -> dict:
    records = parquet_texts(source, options) if what == "parquet" else jsonl_texts(source, what, options)
    count = skipped = 0
    for text in records:
        if text is None:
            skipped += 1
            continue
        sink.write(text)
        sink.write(RECORD_SEPARATOR)
        count += 1
    return {"records": count, "skipped": skipped}


def _bad(options: RecordOptions, where: str, problem: str) -> None:
    """None (a record to skip) with skip_bad_records; else the error that stops the run."""
    if not options.skip_bad_records:
        raise HtcliError(
            f"{where}: {problem}; fix the record or pass skip_bad_records to leave such records out",
            fields=("skip_bad_records", "text_field"),
        )


def jsonl_texts(source: Path, what: str, options: RecordOptions) -> Iterator[bytes | None]:
    """The text_field of each record of a JSONL file, in UTF-8 (None for a bad record that is skipped)."""
    with _opened(source, what.removeprefix("jsonl").lstrip(".") or "plain") as stream:
        try:
            for number, line in enumerate(stream, 1):
                if number == 1:  # (a byte-order mark, as Windows tools write one, is not the record's)
                    line = line.removeprefix(codecs.BOM_UTF8)
                if line.strip():
                    yield _record_text(line, options, f"{source} line {number}")
        except _corrupt_errors() as error:
            _raise_io_error(error)
            raise HtcliError(
                f"{source} is not a readable {what} file (truncated or corrupt?): {WHOLE_COPY}"
            ) from None


def _record_text(line: bytes, options: RecordOptions, where: str) -> bytes | None:
    field = options.text_field
    try:
        record = json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        return _bad(options, where, "not UTF-8 text")
    except json.JSONDecodeError as error:
        said = error.msg.removesuffix(" at")  # ("Invalid control character at": the position is ours to say)
        return _bad(options, where, f"not JSON ({said}, at character {error.colno})")
    except (RecursionError, ValueError):  # arrays nested thousands deep, a number of thousands of digits
        return _bad(options, where, "not JSON that can be read (nested too deep, or a number too long)")
    if not isinstance(record, dict):
        return _bad(options, where, f"{_json_kind(record)}, not an object")
    if field not in record:
        keys = ", ".join(list(record)[:5]) or "none"
        return _bad(
            options, where, f"no field {field!r} (its fields: {keys}; text_field names the one to read)"
        )
    text = record[field]
    if not isinstance(text, str):
        return _bad(options, where, f"field {field!r} is {_json_kind(text)}, not a string")
    return _without_separator(text, options, where, field)


def _json_kind(value: object) -> str:
    """What a JSON value is, in JSON's names (null, true, an array), not Python's (NoneType, bool, list)."""
    if value is None or isinstance(value, bool):
        return {None: "null", True: "true", False: "false"}[value]
    return {dict: "an object", list: "an array", str: "a string"}.get(type(value), "a number")


def _without_separator(text: str, options: RecordOptions, where: str, field: str) -> bytes | None:
    """A record's text in UTF-8, unless it holds the record separator or a lone surrogate (JSON's
    "\\ud800", which is no character and has no UTF-8: it went in as the bytes ED A0 80): then a bad
    record."""
    if SEPARATOR_CHARACTER in text:
        return _bad(
            options, where, f"field {field!r} holds a NUL character (\\u0000), the byte that ends each record"
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as error:
        lone = text[error.start].encode("unicode_escape").decode()
        return _bad(options, where, f"field {field!r} holds a lone surrogate ({lone}), which is not text")


def _unreadable_parquet(source: Path, error: BaseException) -> HtcliError:
    """A Parquet file that pyarrow cannot read (cut short, damaged), said with what to do."""
    return HtcliError(
        f"{source} is not a readable Parquet file ({_first_line(error)}): write it again, or leave it out of"
        " the corpus"
    )


def parquet_texts(source: Path, options: RecordOptions) -> Iterator[bytes | None]:
    """The text_field of each row of a Parquet file, in UTF-8, a batch of rows at a time."""
    pq, pa = _pyarrow()
    try:
        # (read as it goes: pre-buffered, pyarrow kept every column chunk it had read, the whole file's)
        table = pq.ParquetFile(source, pre_buffer=False)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(source, error) from None
    field = options.text_field
    schema = table.schema_arrow
    if field not in schema.names:
        raise HtcliError(
            f"{source} has no column {field!r} (its columns: {', '.join(schema.names[:8])}): "
            "text_field names the one to read",
            fields=("text_field",),
        )
    if schema.names.count(field) > 1:  # (schema.field raised a KeyError: a traceback)
        raise HtcliError(
            f"{source} has {schema.names.count(field)} columns named {field!r}: which one holds the text is "
            "not known; write the file with one such column, or name another with text_field",
            fields=("text_field",),
        )
    column_type = schema.field(field).type
    if not _holds_text(pa, column_type):
        raise HtcliError(
            f"{source}: column {field!r} holds {column_type}, not strings: text_field names the text column",
            fields=("text_field",),
        )
    row = 0
    try:
        for batch in table.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
            for text in _batch_texts(pa, batch.column(0)):
                row += 1
                yield _row_text(text, options, f"{source} row {row}", field)
    except (pa.ArrowException, OSError) as error:
        raise _unreadable_parquet(source, error) from None


NOT_UTF8 = object()  # a row of _batch_texts whose bytes are not UTF-8


def _batch_texts(pa, column) -> list:
    """A batch's texts as str, None for a null, NOT_UTF8 for bytes that are not UTF-8 (Arrow does not
    check them when it reads a file, only when it converts them)."""
    try:
        return column.to_pylist()
    except UnicodeDecodeError:
        if pa.types.is_dictionary(column.type):
            column = column.dictionary_decode()
        return [_decoded(raw) for raw in column.cast(pa.large_binary()).to_pylist()]


def _decoded(raw: bytes | None):
    try:
        return None if raw is None else raw.decode("utf-8")
    except UnicodeDecodeError:
        return NOT_UTF8


def _row_text(text, options: RecordOptions, where: str, field: str) -> bytes | None:
    if text is None:
        return _bad(options, where, f"{field!r} is null")
    if text is NOT_UTF8:
        return _bad(options, where, "not UTF-8 text")
    return _without_separator(text, options, where, field)


def _holds_text(pa, column_type) -> bool:
    """Whether a Parquet column of this Arrow type holds text: strings, large strings or string views,
    plain or dictionary-encoded (as pandas writes a categorical column)."""
    if pa.types.is_dictionary(column_type):
        column_type = column_type.value_type
    is_view = getattr(pa.types, "is_string_view", lambda _: False)  # pyarrow >= 16
    return pa.types.is_string(column_type) or pa.types.is_large_string(column_type) or is_view(column_type)


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _pyarrow():
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise HtcliError(
            "Parquet corpora need pyarrow: pip install 'htcli[parquet]' (or pip install pyarrow)"
        ) from None
    return pq, pa


def _zstd():
    try:
        import zstandard
    except ImportError:
        raise HtcliError(
            ".zst corpora need zstandard: pip install 'htcli[zstd]' (or pip install zstandard)"
        ) from None
    return zstandard


def _corrupt_errors() -> tuple[type[BaseException], ...]:
    """What a decompressor raises on a file that is not what its name says, or is cut short: bz2's is an
    OSError without an errno ("Invalid data stream"), which _raise_io_error tells from a failing disk."""
    lzma_error, zstd_error = _error_class("lzma", "LZMAError"), _error_class("zstandard", "ZstdError")
    return EOFError, zlib.error, gzip.BadGzipFile, lzma_error, OSError, zstd_error


def _error_class(module: str, name: str) -> type[Exception]:
    """module's error class `name` where the module can be imported (a class nothing raises where not)."""
    try:
        return getattr(importlib.import_module(module), name)
    except ImportError:
        return type(f"No{name}", (Exception,), {})


def _standard(module: str, kind: str):
    """A decompression module of Python's standard library, imported when a corpus needs it: a Python built
    without it (pyenv's, where liblzma's headers were missing) reads the other kinds of corpus as before."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise HtcliError(
            f".{kind} corpora need Python's {module} module, which this Python was built without: decompress"
            " the file first, or use a Python built with it"
        ) from None


def _raise_io_error(error: BaseException) -> None:
    """An OSError with an errno (the disk, not the data), or of another kind than the decompressors raise
    (io.UnsupportedOperation), raised again as it was."""
    if isinstance(error, OSError) and (
        error.errno is not None or type(error) not in (OSError, gzip.BadGzipFile)
    ):
        raise error


@contextlib.contextmanager
def _opened(source: Path, compression: str) -> Iterator[IO[bytes]]:
    """source's decompressed bytes as a buffered stream (lines can be iterated); closed on the way out."""
    try:
        raw = open(source, "rb")
    except OSError as error:
        raise unreadable(source, error) from None
    with raw:
        if compression == "gz":
            with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
                yield stream
        elif compression == "zst":
            with io.BufferedReader(_ZstdFrames(raw), 1 << 20) as stream:
                yield stream
        elif compression == "bz2":
            with _standard("bz2", "bz2").BZ2File(raw, "rb") as stream:
                yield stream
        elif compression == "xz":
            with _standard("lzma", "xz").LZMAFile(raw, "rb") as stream:
                yield stream
        else:
            yield raw


class _ZstdFrames(io.RawIOBase):
    """The decompressed bytes of every frame of a zstd stream, one after another; EOFError where the
    stream ends inside a frame (a truncated file: zstandard's stream reader ends there silently)."""

    def __init__(self, raw: IO[bytes]):
        self.raw, self.frame = raw, None
        self.out, self.offset = b"", 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        while self.offset == len(self.out):
            chunk = self.raw.read(1 << 20)
            if not chunk:
                if self.frame is not None:
                    raise EOFError("the stream ends inside a zstd frame")
                return 0
            self.out, self.offset = self._decompress(chunk), 0
        count = min(len(buffer), len(self.out) - self.offset)
        buffer[:count] = self.out[self.offset : self.offset + count]
        self.offset += count
        return count

    def _decompress(self, data: bytes) -> bytes:
        """data's decompressed bytes, fed 2 KiB at a time and returned once there are some: at zstd's
        largest ratio (~32,000) a slice makes at most ~64 MiB, where a whole chunk could make gigabytes."""
        parts, rest = [], memoryview(data)
        while rest:
            piece, rest = rest[:ZSTD_SLICE], rest[ZSTD_SLICE:]
            while piece:
                self.frame = self.frame or _zstd().ZstdDecompressor().decompressobj()
                parts.append(self.frame.decompress(piece))
                piece = b""
                if self.frame.eof:  # the frame is complete: the slice's rest begins the next one
                    piece, self.frame = self.frame.unused_data, None
        return b"".join(parts)
