"""Corpora and training data: paths, concatenation, the .gz cache, train/val split, sampler state."""

import gzip
import os
from pathlib import Path

import pytest
import torch

from htcli.corpus import ByteCorpus, formats, resolve_corpus
from htcli.data import WindowSampler, split
from htcli.errors import HtcliError


def write(path: Path, content: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def test_resolve_files_directories_and_globs(tmp_path):
    """Files stay in the given order; directories give their files below, sorted; globs their matches."""
    b = write(tmp_path / "d" / "b.txt", b"b")
    a = write(tmp_path / "d" / "sub" / "a.txt", b"a")
    c = write(tmp_path / "c.log", b"c")
    z = write(tmp_path / "z.txt", b"z")
    assert resolve_corpus([z, tmp_path / "d", str(tmp_path / "*.log")]) == [z, b, a, c]


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.txt", "does not exist"),
        (lambda p: (p / "empty_dir").mkdir() or p / "empty_dir", "has no files"),
        (lambda p: p / "*.nothing", "no files match"),
    ],
)
def test_resolve_errors(tmp_path, make, message):
    """A missing path, a directory without files, a glob matching nothing: each a clear error."""
    with pytest.raises(HtcliError, match=message):
        resolve_corpus([make(tmp_path)])


def test_concatenation_reads_across_files(tmp_path):
    """Reads spanning file boundaries (and skipping empty files) equal the concatenated bytes."""
    parts = [b"hello ", b"", b"wide ", b"world\n" * 50]
    files = [write(tmp_path / f"{i}.txt", part) for i, part in enumerate(parts)]
    whole = b"".join(parts)
    with ByteCorpus(files) as corpus:
        assert len(corpus) == len(whole)
        for start, length in [(0, len(whole)), (3, 10), (6, 5), (10, 100), (len(whole) - 1, 1)]:
            assert corpus.read(start, length) == whole[start : start + length]
        windows = corpus.span(2, 40).windows([0, 5], 8)
        assert windows.tolist() == [list(whole[2:10]), list(whole[7:15])]


def test_empty_corpus_is_an_error(tmp_path):
    """A corpus of empty files says it is empty."""
    with pytest.raises(HtcliError, match=r"is empty \(0 bytes\)"):
        ByteCorpus.open([write(tmp_path / "e.txt", b"")])


def test_gz_is_decompressed_once_into_the_cache(tmp_path, monkeypatch):
    """A .gz file reads as its content; a second open reuses the cache file instead of decompressing."""
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "cache"))
    content = b"compressed corpus " * 1000
    gz = tmp_path / "c.txt.gz"
    gz.write_bytes(gzip.compress(content))
    with ByteCorpus.open([gz]) as corpus:
        assert corpus.read(0, len(corpus)) == content
    cached = sorted((tmp_path / "cache").iterdir())
    monkeypatch.setattr(formats.gzip, "GzipFile", None)  # decompressing again would fail
    with ByteCorpus.open([gz]) as corpus:
        assert corpus.read(0, len(corpus)) == content
    assert sorted((tmp_path / "cache").iterdir()) == cached


def test_corrupt_gz_is_an_error(tmp_path, monkeypatch):
    """A truncated .gz file is reported as such and leaves no cache file behind."""
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "cache"))
    gz = write(tmp_path / "c.gz", gzip.compress(os.urandom(5000))[:-100])
    with pytest.raises(HtcliError, match="not a readable gzip file"):
        ByteCorpus.open([gz])
    assert not [p for p in (tmp_path / "cache").iterdir() if p.suffix not in (".lock", ".TAG")]


def test_split_holds_out_the_tail(tmp_path):
    """Without val the last val_fraction is held out, but never less than one window."""
    with ByteCorpus([write(tmp_path / "c.txt", bytes(range(256)) * 40)]) as corpus:
        train, val = split(corpus, None, 0.1, window=65)
        assert (len(train), len(val)) == (9216, 1024)
        assert val.read(0, 4) == corpus.read(9216, 4)
        train, val = split(corpus, None, 0.001, window=65)
        assert len(val) == 65


def test_split_too_short_says_how_long(tmp_path):
    """A corpus shorter than two windows names the length it needs."""
    with ByteCorpus([write(tmp_path / "c.txt", b"x" * 100)]) as corpus:
        with pytest.raises(HtcliError, match=r"100 bytes.*max_seq_len 64 it must be at least 130 bytes"):
            split(corpus, None, 0.01, window=65)


def test_split_with_too_large_a_fraction_says_to_lower_it(tmp_path):
    """A corpus long enough for two windows whose val_fraction leaves no training window: the fraction is
    named, with the largest that works (it said the corpus was too short, and that it must be longer than
    it was)."""
    with ByteCorpus([write(tmp_path / "c.txt", b"x" * 5000)]) as corpus:
        with pytest.raises(HtcliError, match=r"val_fraction 0.99 holds out 4,950 of .*at most 0.987 here"):
            split(corpus, None, 0.99, window=65)
        train, _ = split(corpus, None, 0.987, window=65)
        assert len(train) >= 65
        with pytest.raises(HtcliError, match="less than one training window"):
            split(corpus, None, 0.988, window=65)


def test_sampler_state_round_trip():
    """A sampler restored from its state draws exactly what the original draws next."""
    sampler = WindowSampler(10_000, 65, 4, seed=3)
    sampler.starts()
    state = sampler.state_dict()
    expected = [sampler.starts() for _ in range(3)]
    restored = WindowSampler(10_000, 65, 4, seed=99)
    restored.load_state_dict(state)
    assert [restored.starts() for _ in range(3)] == expected
    assert all(0 <= s <= 10_000 - 65 for batch in expected for s in batch)


def test_sharded_samplers_split_one_global_batch():
    """n samplers with shard (i, n) and one seed draw, between them, one sampler's batch n times as large."""
    whole = WindowSampler(10_000, 65, 6, seed=3)
    shards = [WindowSampler(10_000, 65, 2, seed=3, shard=(i, 3)) for i in range(3)]
    for _ in range(3):
        assert [s for shard in shards for s in shard.starts()] == whole.starts()


def _rss_file_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssFile:"):
            return int(line.split()[1])
    raise AssertionError("no RssFile in /proc/self/status")


@pytest.fixture
def cached_big_file(tmp_path):
    """A 128 MB file, just written, so that the OS page cache holds it (as it would a corpus in use)."""
    big = tmp_path / "big.bin"
    chunk = bytes(range(1, 256)) * (1 << 16)  # 16.7 MB
    with open(big, "wb") as file:
        while file.tell() < 128 << 20:
            file.write(chunk)
    return big


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_reading_a_whole_corpus_keeps_memory_small(cached_big_file):
    """Reading every byte of a 134 MB corpus keeps under 32 MB of it resident in the process."""
    with ByteCorpus([cached_big_file]) as corpus:
        before, peak = _rss_file_kb(), 0
        for start in range(0, len(corpus), 1 << 20):
            assert len(corpus.read(start, min(1 << 20, len(corpus) - start))) > 0
            peak = max(peak, _rss_file_kb() - before)
    assert peak < 32 << 10, f"{peak} kB of the corpus stayed resident"


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_random_windows_keep_memory_small(cached_big_file, monkeypatch):
    """Thousands of small random windows (training's reads) keep under 32 MB of the corpus resident,
    although each page fault maps the cached pages around it too."""
    with ByteCorpus([cached_big_file]) as corpus:
        span, sampler = corpus.span(), WindowSampler(len(corpus), 257, 16, seed=0)
        before, peak = _rss_file_kb(), 0
        for _ in range(300):
            span.windows(sampler.starts(), 257)
            peak = max(peak, _rss_file_kb() - before)
    assert peak < 32 << 10, f"{peak} kB of the corpus stayed resident"


def test_windows_are_int64_tokens(tmp_path):
    """Windows come out as int64 byte values, as the model's embedding expects."""
    with ByteCorpus([write(tmp_path / "c.bin", bytes([0, 255, 7, 128]))]) as corpus:
        windows = corpus.span().windows([0], 4)
    assert windows.dtype == torch.int64 and windows.tolist() == [[0, 255, 7, 128]]


def test_evenly_spaced_asked_for_more_windows_than_there_are():
    """More windows than a corpus holds (--eval-batches 2**53) gives every start once, at once (it
    looped over every window asked for)."""
    from htcli.data import evenly_spaced

    assert evenly_spaced(100, 10, 2**53) == list(range(91))
    assert evenly_spaced(100, 10, 91) == list(range(91))
    assert evenly_spaced(100, 10, 3) == [0, 45, 90]
