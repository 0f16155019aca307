"""Corpora: the files named (find.py), what each kind of file holds (formats.py: plain, .gz, .zst,
.bz2, .xz, JSONL, Parquet), the cache where compressed and record files are made into bytes once
(cache.py), and the whole read as one byte string (reader.py)."""

from htcli.corpus.cache import cache_dir
from htcli.corpus.find import (
    check_corpus_given,
    check_hidden_applies,
    file_identity,
    has_wildcard,
    resolve_corpus,
)
from htcli.corpus.formats import RECORD_SEPARATOR, RecordOptions, check_records_apply
from htcli.corpus.reader import ByteCorpus, ByteSpan

__all__ = [
    "RECORD_SEPARATOR",
    "ByteCorpus",
    "ByteSpan",
    "RecordOptions",
    "cache_dir",
    "check_corpus_given",
    "check_hidden_applies",
    "check_records_apply",
    "file_identity",
    "has_wildcard",
    "resolve_corpus",
]
