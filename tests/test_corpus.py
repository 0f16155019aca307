"""Real corpora: many files, hidden files, JSONL and Parquet records, files that change, the cache."""

import bz2
import contextlib
import gzip
import json
import lzma
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import TINY_FLAGS, assert_user_error, invoke, make_text, tiny_config

from htcli.corpus import RECORD_SEPARATOR, ByteCorpus, RecordOptions, reader, resolve_corpus
from htcli.errors import HtcliError
from htcli.train import train


def write(path, content: bytes):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


def jsonl(*records) -> bytes:
    return b"".join(json.dumps(record).encode() + b"\n" for record in records)


def texts(*parts: str) -> bytes:
    """What records with these texts read as: each followed by the record separator."""
    return b"".join(part.encode() + RECORD_SEPARATOR for part in parts)


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def tree(tmp_path):
    """3,000 small files in 30 directories: 60 kB of text."""
    root = tmp_path / "tree"
    for index in range(3000):
        write(root / f"d{index % 30:02d}" / f"f{index:04d}.txt", make_text(20, seed=index))
    return root


def test_many_files_under_a_low_descriptor_limit(tree, tmp_path):
    """`htcli train` on a tree of 3,000 files runs with only 64 descriptors allowed."""
    script = textwrap.dedent(
        """
        import resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from htcli.cli import app
        app(sys.argv[1:], prog_name="htcli")
        """
    )
    args = ["train", tree, "--out", tmp_path / "run", "--steps", 2, *TINY_FLAGS]
    process = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True)
    assert process.returncode == 0, process.stderr
    assert "2 of 2" in process.stdout


def test_open_files_stay_bounded(tree):
    """Reading every byte of a 3,000-file corpus keeps at most MAX_OPEN files open, and equals the files."""
    files = resolve_corpus([tree])
    with ByteCorpus(files) as corpus:
        assert corpus.read(0, len(corpus)) == b"".join(path.read_bytes() for path in files)
        for start in range(0, len(corpus) - 100, 997):
            corpus.read(start, 100)
        assert len(corpus._open) <= reader.MAX_OPEN
        descriptors = len(os.listdir("/proc/self/fd")) if os.path.exists("/proc/self/fd") else 0
    assert descriptors < 100


def test_a_cache_entry_removed_while_in_use_is_named(tmp_path, monkeypatch):
    """More compressed files than stay open, their cache removed while the corpus is in use: the error named
    the corpus file, which was there, as missing ("give another path")."""
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "cache"))
    for index in range(reader.MAX_OPEN + 2):
        with gzip.open(tmp_path / f"f{index:02d}.txt.gz", "wb") as packed:
            packed.write(b"abcdef" * 10)
    with ByteCorpus.open([tmp_path / "*.gz"]) as corpus:
        assert corpus.read(0, len(corpus)) == b"abcdef" * 10 * (reader.MAX_OPEN + 2)  # (the first one closed)
        shutil.rmtree(tmp_path / "cache")
        with pytest.raises(
            HtcliError, match=r"the cache entry of .*f00.txt.gz \(.*\) was removed while in use"
        ):
            corpus.read(0, 6)


def test_hidden_files_are_skipped_unless_asked(tmp_path):
    """Inside a named directory, .git, .venv, .env and swap files are skipped; include_hidden reads them;
    a hidden file named on its own is read."""
    root = tmp_path / "project"
    shown = write(root / "main.py", b"print()")
    sub = write(root / "pkg" / "mod.py", b"x = 1")
    hidden = [
        write(root / ".git" / "config", b"[core]"),
        write(root / ".venv" / "lib" / "site.py", b"venv"),
        write(root / ".env", b"SECRET=1"),
        write(root / "pkg" / ".mod.py.swp", b"swap"),
    ]
    assert resolve_corpus([root]) == [shown, sub]
    assert set(resolve_corpus([root], include_hidden=True)) == {shown, sub, *hidden}
    assert resolve_corpus([root / ".env"]) == [root / ".env"]


def test_runs_inside_a_corpus_directory_are_not_corpus(tmp_path):
    """`htcli train . --out run1`, then `htcli train . --out run2`: run2 read run1's weights, optimizer and
    log as text to train on; another run's directory found in a walk is now skipped (the run's own was
    already); a run directory named itself is read."""
    data = tmp_path / "data"
    text = write(data / "text.txt", make_text(20_000))
    train(tiny_config(text, data / "run1", steps=2))
    run_files = sorted(p for p in (data / "run1").iterdir() if not p.name.startswith("."))
    assert [p.name for p in run_files] == [
        "best.safetensors", "config.json", "log.jsonl", "model.safetensors", "optimizer.safetensors",
        "state.json",
    ]  # fmt: skip
    assert resolve_corpus([data]) == [text]
    assert resolve_corpus([data / "**"]) == [text]  # (a glob read run1's files too, as text to train on)
    assert resolve_corpus([data / "run1"]) == run_files
    (data / "run1" / ".lock").unlink()  # a directory with a config.json alone is not a run's
    assert resolve_corpus([data]) == [*run_files, text]


def test_a_cache_inside_a_corpus_directory_is_not_corpus(tmp_path, monkeypatch):
    """HTCLI_CACHE_DIR inside the corpus directory: the next run read the cache's entries (the corpus's
    .gz made into bytes) and facts files as corpus, its data twice. The cache holds a CACHEDIR.TAG and a
    walk or glob skips such directories (another tool's cache too); one named itself is read."""
    data = tmp_path / "data"
    content = make_text(5000)
    write(data / "c.txt.gz", gzip.compress(content))
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(data / "cache"))
    with ByteCorpus.open([data]) as corpus:
        assert len(corpus) == len(content)
    assert (data / "cache" / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f0688")
    with ByteCorpus.open([data]) as corpus:  # (read 10,037 bytes)
        assert len(corpus) == len(content)
    assert resolve_corpus([data / "**"]) == [data / "c.txt.gz"]
    assert len(resolve_corpus([data / "cache"])) == 4  # (the entry, its facts, its lock, the tag)
    (data / "cache" / "CACHEDIR.TAG").write_bytes(b"not the signature")  # (then not a tagged cache)
    assert len(resolve_corpus([data])) == 1  # (but htcli's own cache all the same)
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert len(resolve_corpus([data])) == 5  # (a folder with a broken tag, not htcli's cache: read)
    # a folder of the user's named as the cache is not tagged (its files would leave walks and backups)
    own = tmp_path / "own"
    write(own / "notes.txt", b"mine")
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(own))
    with ByteCorpus.open([data / "c.txt.gz"]) as corpus:
        assert len(corpus) == len(content)
    assert not (own / "CACHEDIR.TAG").exists()
    assert own / "notes.txt" not in resolve_corpus([tmp_path / "**"])  # (a walk skips the cache, untagged)
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert own / "notes.txt" in resolve_corpus([tmp_path / "**"])  # (no longer the cache: a folder as any)


def test_a_glob_reads_the_directories_it_matches(tmp_path):
    """A quoted 'data/*' matched only files, where the shell's data/* names the subdirectories too (walked):
    quoting a pattern, as README says to, dropped dir/sub's files without a word, and a pattern that
    matched directories alone was "no files match". A matched directory is walked as if named (hidden
    files, runs and caches aside); under `**` each file comes once; a link to a directory is not followed."""
    data = tmp_path / "data"
    top, below = write(data / "a.txt", b"a" * 100), write(data / "sub" / "b.txt", b"b" * 100)
    deeper, hidden = write(data / "sub" / "deep" / "c.txt", b"c" * 100), write(data / "sub" / ".h", b"h")
    (data / "link").symlink_to(data / "sub")
    assert resolve_corpus([str(data / "*")]) == [top, below, deeper]  # (sorted by path, as a walk)
    assert resolve_corpus([str(data / "s*")]) == [below, deeper]
    assert resolve_corpus([str(data / "**")]) == [top, below, deeper]
    assert resolve_corpus([str(data / "s*")], include_hidden=True) == [hidden, below, deeper]
    assert resolve_corpus([str(data / "*" / "*.txt")]) == [below]


def test_globs_do_not_follow_links_to_directories(tmp_path):
    """As a directory's walk, a glob's wildcards do not go through links to directories: a link to a
    parent made `**` read the tree dozens of times over (the held-out part a copy of the training
    part); a link named before the wildcards is followed, as asked."""
    tree = tmp_path / "tree"
    write(tree / "a.txt", b"a" * 100)
    write(tree / "sub" / "b.txt", b"b" * 100)
    (tree / "loop").symlink_to(tree)
    assert resolve_corpus([str(tree / "**" / "*.txt")]) == [tree / "a.txt", tree / "sub" / "b.txt"]
    assert resolve_corpus([str(tree)]) == [tree / "a.txt", tree / "sub" / "b.txt"]
    assert resolve_corpus([str(tree / "loop" / "*.txt")]) == [tree / "loop" / "a.txt"]


def test_a_file_named_twice_is_refused(tmp_path, corpus, monkeypatch):
    """A file that two specs name (itself twice, or a directory and a file in it) was read twice, its
    bytes trained on twice; the same file as --val and corpus was scored as held out. Both refused."""
    tree = tmp_path / "tree"
    write(tree / "a.txt", b"a" * 100)
    write(tree / "b.txt", b"b" * 100)
    with pytest.raises(HtcliError, match=r"a.txt is named twice in the corpus: name each file once"):
        resolve_corpus([tree / "a.txt", tree / "a.txt"])
    with pytest.raises(HtcliError, match=r"b.txt is named twice in the corpus \(by .*tree and by .*b.txt\)"):
        resolve_corpus([tree, tree / "b.txt"])
    # by a link, symbolic or hard, or a link to its directory (compared by path, they were read twice)
    (tmp_path / "soft.txt").symlink_to(tree / "a.txt")
    os.link(tree / "b.txt", tmp_path / "hard.txt")
    (tmp_path / "same-tree").symlink_to(tree)
    for specs in (
        [tree / "a.txt", tmp_path / "soft.txt"],
        [tree, tmp_path / "hard.txt"],
        [tree, tmp_path / "same-tree"],
    ):
        with pytest.raises(HtcliError, match=r"is named twice in the corpus \(by "):
            resolve_corpus(specs)
    # a link within one directory is read as the file it is, as where that directory is the only spec: also
    # beside another spec (it was "named twice", by nobody, once another file was given; review)
    (tree / "c.txt").symlink_to("a.txt")
    alone = resolve_corpus([tree])
    assert alone == [tree / "a.txt", tree / "b.txt", tree / "c.txt"]
    assert resolve_corpus([tree, corpus]) == [*alone, corpus]
    assert resolve_corpus([f"{tree}/*", corpus]) == [*alone, corpus]
    (tmp_path / "corpus-link.txt").symlink_to(corpus)
    result = invoke(
        "train", corpus, *TINY_FLAGS, "--val", tmp_path / "corpus-link.txt", "--out", tmp_path / "r2"
    )
    assert_user_error(result, "corpus-link.txt is both in the corpus and in --val")
    result = invoke("train", corpus, *TINY_FLAGS, "--val", corpus, "--out", tmp_path / "run", "--steps", "2")
    assert_user_error(result, f"{corpus} is both in the corpus and in --val: held-out bytes must not be")
    assert "--val-fraction holds out the corpus's end" in result.stderr  # (the flag, not the field)
    assert not (tmp_path / "run").exists()
    copy = write(tmp_path / "held" / "copy.txt", corpus.read_bytes())  # (another name, the same bytes)
    same_size = write(tmp_path / "held" / "other.txt", corpus.read_bytes()[::-1])
    result = invoke("train", corpus, *TINY_FLAGS, "--val", copy, "--out", tmp_path / "run", "--steps", "2")
    assert_user_error(result, f"{copy} (in --val) holds the same bytes as {corpus} (in the corpus): held-out")
    # said before any file is unpacked: a bad record of a val file beside it was the error, after unpacking
    write(tmp_path / "held" / "bad.jsonl", b'{"no text": 1}\n')
    cache = tmp_path / "cache-of-val"
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(cache))
    result = invoke("train", corpus, *TINY_FLAGS, "--val", tmp_path / "held", "--out", tmp_path / "run")
    assert_user_error(result, "(in --val) holds the same bytes as")
    assert not cache.exists()
    (tmp_path / "held" / "bad.jsonl").unlink()
    result = invoke(
        "train", corpus, *TINY_FLAGS, "--val", same_size, "--out", tmp_path / "run", "--steps", "1"
    )
    assert result.exit_code == 0, result.output  # (a file of the same size, other bytes: held out)
    write(tmp_path / "tree" / "empty.txt", b"")
    write(tmp_path / "held" / "empty.txt", b"")  # (no bytes: no copy of any)
    flags = [*TINY_FLAGS, "--out", tmp_path / "run2", "--steps", "1"]
    empty_ones = [
        tmp_path / "tree" / "empty.txt",
        "--val",
        same_size,
        "--val",
        tmp_path / "held" / "empty.txt",
    ]
    result = invoke("train", corpus, *empty_ones, *flags)
    assert result.exit_code == 0, result.output


def test_an_empty_path_is_refused_not_read_as_the_current_directory(tmp_path, monkeypatch):
    """`htcli train "$DATA"` with DATA unset trained on the current directory ("" is Path(".")); as --val
    it was the whole corpus again; eval scored the directory's files."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_bytes(make_text(5000))
    empty = "an empty path was given (an unset shell variable?)"
    for args in (["train", ""], ["train", "a.txt", "--val", ""]):
        assert_user_error(invoke(*args, *TINY_FLAGS, "--out", tmp_path / "run"), empty)
        assert not (tmp_path / "run").exists()
    assert invoke("train", "a.txt", *TINY_FLAGS, "--steps", "2", "--out", tmp_path / "run").exit_code == 0
    assert_user_error(invoke("eval", tmp_path / "run", ""), empty)


def test_only_hidden_files_is_a_clear_error(tmp_path):
    """A directory whose files are all hidden says so, naming the option that reads them."""
    write(tmp_path / "d" / ".hidden", b"x")
    with pytest.raises(HtcliError, match="has no files .hidden ones aside: include_hidden reads them"):
        resolve_corpus([tmp_path / "d"])


def test_the_run_directory_is_never_corpus(tmp_path):
    """Training on a directory that holds the run's --out reads the corpus files only, even on resume."""
    root = tmp_path / "data"
    write(root / "a.txt", make_text(20_000))
    config = tiny_config(root, root / "run", steps=2)
    train(config)
    files = resolve_corpus([root], exclude=[root / "run"])
    assert files == [root / "a.txt"]
    for inside in (root / "run", root / "run" / "state.json"):  # (a file: the run read what it wrote)
        with pytest.raises(HtcliError, match="is in the run directory"):
            resolve_corpus([inside], exclude=[root / "run"])
    mine = write(root / "run" / "notes.txt", b"mine")  # (a corpus file that lies in the run, `--out .`: read)
    assert resolve_corpus([mine], exclude=[root / "run"]) == [mine]
    mine.unlink()
    result = invoke("train", "--out", root / "run", "--resume", "--steps", 3)
    assert result.exit_code == 0, result.output
    start = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()][-1]
    assert start["event"] == "end"
    events = [json.loads(line) for line in (root / "run" / "log.jsonl").read_text().splitlines()]
    assert {e["train_bytes"] + e["val_bytes"] for e in events if e["event"] == "start"} == {20_000}


def test_a_glob_in_the_run_directory_matches_its_corpus_files(tmp_path, monkeypatch):
    """`htcli train '*' --out .` in a directory of corpus files: the pattern, whose fixed part is the run
    directory, matches the files there but none that the run writes, on resume too (it matched nothing
    before); a pattern from above the run directory skips it whole, and says so."""
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", make_text(20_000))
    write(corpus / "b.txt", make_text(5_000, seed=1))
    monkeypatch.chdir(corpus)
    for more in ([], ["--resume"]):
        result = invoke("train", "*", *TINY_FLAGS, "--steps", 2 + len(more), "--out", ".", *more)
        assert result.exit_code == 0, result.output
    assert "changed" not in result.stderr
    starts = [json.loads(line) for line in (corpus / "log.jsonl").read_text().splitlines()]
    assert [e["train_bytes"] + e["val_bytes"] for e in starts if e["event"] == "start"] == [25_000] * 2
    assert len(os.listdir(corpus)) > 4  # (the run's files lie beside the corpus's)
    assert resolve_corpus(["*"], exclude=[corpus]) == [Path("a.txt"), Path("b.txt")]
    write(corpus / ".config.json.999.tmp", b"{")  # (a write of the run's cut short)
    assert resolve_corpus(["*"], include_hidden=True, exclude=[corpus]) == [Path("a.txt"), Path("b.txt")]
    with pytest.raises(HtcliError, match=r"no files match \.\* \(the run directory's files aside\)"):
        resolve_corpus([".*"], exclude=[corpus])  # (.lock and the cut-short write)
    write(tmp_path / "new" / "c.txt", b"c")  # (the directory of a run that has not started)
    with pytest.raises(HtcliError, match=r"no files match .*c\.txt \(the run directory's files aside\)"):
        resolve_corpus([tmp_path / "**" / "c.txt"], exclude=[tmp_path / "new"])


def test_too_many_open_files_says_to_raise_the_limit(tmp_path):
    """More corpus files than the process may hold open (ulimit -n 22 and 40 files): the advice was to give
    another path or mend that one, which no path could."""
    for index in range(40):
        write(tmp_path / "many" / f"f{index:02d}.txt", make_text(300 + 10 * index, seed=index))
    code = (
        "import resource, sys\n"
        "from htcli.corpus import ByteCorpus\n"
        "from htcli.errors import HtcliError\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (16, 16))\n"
        "try:\n"
        "    with ByteCorpus.open([sys.argv[1]]) as corpus:\n"
        "        [corpus.read(start, 1) for start in range(0, len(corpus), 100)]\n"
        "except HtcliError as error:\n"
        "    print(error)\n"
    )
    done = subprocess.run([sys.executable, "-c", code, tmp_path / "many"], capture_output=True, text=True)
    assert done.stdout.strip().endswith(
        "Too many open files: raise the limit on open files (ulimit -n) and start again"
    ), done.stdout + done.stderr


def test_a_kernel_file_as_corpus_says_to_copy_it():
    """/proc's files report 0 bytes until read: "is empty (0 bytes): give files with some content" told a
    user who could see their content nothing useful."""
    with pytest.raises(HtcliError, match=r"is empty \(0 bytes\): the kernel's files .* copy them to a file"):
        ByteCorpus.open(["/proc/self/status"])


def test_a_corpus_given_as_one_string_is_refused(tmp_path):
    """ByteCorpus.open("/data/a.txt"): the string's characters were taken as paths, "/" first (the whole
    file system walked)."""
    path = write(tmp_path / "a.txt", make_text(100))
    for spec in (str(path), path):
        with pytest.raises(HtcliError, match=r"the corpus must be a list of paths, got .*a\.txt.*: give \["):
            ByteCorpus.open(spec)


@pytest.mark.parametrize("suffix", [".jsonl", ".jsonl.gz", ".jsonl.zst", ".jsonl.bz2", ".JSONL.XZ"])
def test_jsonl_records(tmp_path, suffix):
    """JSONL (plain, gzip, zstd, bzip2, xz): each record's text field, followed by the separator; blank
    lines skipped; a byte-order mark before the first record, as Windows tools write one, taken as none
    (the first record was refused as not JSON)."""
    content = (
        b"\xef\xbb\xbf" + jsonl({"text": "first doc", "id": 1}, {"text": "ünïcode\n"}, {"text": ""}) + b"\n"
    )
    if suffix.endswith(".gz"):
        content = gzip.compress(content)
    elif suffix.endswith(".zst"):
        import zstandard

        content = zstandard.ZstdCompressor().compress(content)
    elif suffix.endswith(".bz2"):
        content = bz2.compress(content)
    elif suffix.endswith(".XZ"):
        content = lzma.compress(content)
    path = write(tmp_path / f"shard{suffix}", content)
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(corpus)) == texts("first doc", "ünïcode\n", "")


def test_another_text_field(tmp_path):
    """--text-field picks the field; a record without it names the file, the line and the fields it has."""
    path = write(tmp_path / "c.jsonl", jsonl({"content": "abc", "meta": 1}, {"content": "de"}))
    with ByteCorpus.open([path], records=RecordOptions(text_field="content")) as corpus:
        assert corpus.read(0, len(corpus)) == texts("abc", "de")
    with pytest.raises(HtcliError, match=r"c.jsonl line 1: no field 'text' \(its fields: content, meta;"):
        ByteCorpus.open([path])


@pytest.mark.parametrize(
    "line,problem",
    [
        (b"{not json", "not JSON"),
        # (json's "Invalid control character at" lost its position: "(Invalid control character at);"; review)
        (b'{"text": "a\tb"}', r"not JSON \(Invalid control character, at character 12\); fix the record"),
        (b'{"text": "a"} x', r"not JSON \(Extra data, at character 15\)"),
        (b"[1, 2]", "an array, not an object"),  # (Python's names were "a JSON list", "a JSON NoneType")
        (b"null", "null, not an object"),
        (b'"abc"', "a string, not an object"),
        (b'{"text": 42}', "field 'text' is a number, not a string"),
        (b'{"text": null}', "field 'text' is null, not a string"),
        (b'{"text": [1]}', "field 'text' is an array, not a string"),
        (b'{"text": "\xff"}', "not UTF-8 text"),
        (
            b'{"text": "a\\u0000b"}',
            r"field 'text' holds a NUL character \(\\u0000\), the byte that ends each",
        ),
        # (it went into the corpus as the bytes ED A0 80, which are not UTF-8)
        (b'{"text": "a\\ud800b"}', r"field 'text' holds a lone surrogate \(\\ud800\), which is not text"),
        (b"[" * 100_000, "not JSON that can be read"),  # (json's RecursionError)
        (b'{"text": "a", "n": ' + b"1" * 5000 + b"}", "not JSON that can be read"),  # (int digits limit)
    ],
)
def test_bad_records_stop_with_file_and_line(tmp_path, line, problem):
    """A malformed line, a non-object, a non-string field: an error naming the file and line, no cache;
    with skip_bad_records the record is left out and counted."""
    path = write(tmp_path / "bad.jsonl", jsonl({"text": "good"}) + line + b"\n" + jsonl({"text": "also"}))
    with pytest.raises(HtcliError, match=f"bad.jsonl line 2: {problem}.*skip_bad_records"):
        ByteCorpus.open([path])
    with ByteCorpus.open([path], records=RecordOptions(skip_bad_records=True)) as corpus:
        assert corpus.read(0, len(corpus)) == texts("good", "also")
        assert corpus.skipped_records == 1


def test_a_corpus_of_bad_records_only(tmp_path):
    """Every record bad, left out: says so (it said the 2-line file was empty, 0 bytes); eval's empty
    --text-field is refused as train's is (it read "text")."""
    path = write(tmp_path / "bad.jsonl", jsonl({"x": 1}, {"x": 2}))
    with pytest.raises(
        HtcliError, match="bad.jsonl has no good record: skip_bad_records left out all 2, as bad"
    ):
        ByteCorpus.open([path], records=RecordOptions(skip_bad_records=True))
    assert_user_error(
        invoke("eval", tmp_path / "none", path, "--text-field", ""), "--text-field must name a field"
    )


def test_bad_record_through_the_cli(tmp_path):
    """The CLI says it in flags, and --skip-bad-records trains, reporting how many were left out."""
    path = write(
        tmp_path / "c.jsonl",
        jsonl(*({"text": make_text(300, seed=i).decode()} for i in range(60))) + b"oops\n",
    )
    result = invoke("train", path, "--out", tmp_path / "run", "--steps", 1, *TINY_FLAGS)
    assert_user_error(result, "c.jsonl line 61: not JSON")
    assert "--skip-bad-records" in result.stderr and not (tmp_path / "run").exists()
    result = invoke("train", path, "--out", tmp_path / "run", "--steps", 1, "--skip-bad-records", *TINY_FLAGS)
    assert result.exit_code == 0, result.output
    assert "left out 1 bad record of the corpus" in result.stderr  # (was "1 bad records")
    held_out = write(tmp_path / "held.jsonl", jsonl({"text": "the of and"}, {"t": 1}))
    result = invoke("eval", tmp_path / "run", held_out, "--skip-bad-records", "--json", "--device", "cpu")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["skipped_records"] == 1 and report["bytes_scored"] == len(texts("the of and")) - 1
    assert "left out 1 bad record of the corpus" in result.stderr  # (eval says it too)


def test_a_damaged_parquet_file_and_a_glob_of_hidden_files_say_what_to_do(tmp_path):
    """A Parquet file cut short quoted pyarrow alone; a glob matching only hidden files said "no files match",
    where a directory of them names include_hidden (review)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    whole = tmp_path / "whole.parquet"
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(100)]}), whole)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole.read_bytes()[:-10])
    with pytest.raises(
        HtcliError, match=r"cut.parquet is not a readable Parquet file \(.*\): write it again, or"
    ):
        ByteCorpus.open([cut]).close()
    (tmp_path / "hidden").mkdir()
    (tmp_path / "hidden" / ".a.txt").write_bytes(b"hidden text")
    with pytest.raises(HtcliError, match=r"hidden/\* but hidden ones \(include_hidden reads them\): check"):
        resolve_corpus([tmp_path / "hidden" / "*"])
    assert resolve_corpus([tmp_path / "hidden" / "*"], include_hidden=True) == [
        tmp_path / "hidden" / ".a.txt"
    ]
    with pytest.raises(HtcliError, match=r"no files match .*\*\.nothing: check"):  # (no hidden ones either)
        resolve_corpus([tmp_path / "hidden" / "*.nothing"])


def test_parquet_records(tmp_path):
    """Parquet: the text column of every row, across row groups; nulls and a missing column are errors."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i}" for i in range(2500)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": rows, "n": list(range(2500))}), path, row_group_size=1000)
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(corpus)) == texts(*rows)
    with pytest.raises(HtcliError, match=r"data.parquet has no column 'body' \(its columns: text, n\)"):
        ByteCorpus.open([path], records=RecordOptions(text_field="body"))
    with pytest.raises(
        HtcliError, match="column 'n' holds int64, not strings: text_field names the text column"
    ):
        ByteCorpus.open([path], records=RecordOptions(text_field="n"))
    latin = tmp_path / "latin.parquet"
    pq.write_table(pa.table({"text": pa.array([b"ok", b"caf\xe9"], pa.binary()).view(pa.string())}), latin)
    with pytest.raises(HtcliError, match="latin.parquet row 2: not UTF-8 text; fix the record or pass"):
        ByteCorpus.open([latin])
    with ByteCorpus.open([latin], records=RecordOptions(skip_bad_records=True)) as corpus:
        assert corpus.read(0, len(corpus)) == texts("ok") and corpus.skipped_records == 1
    nulls = tmp_path / "nulls.parquet"
    pq.write_table(pa.table({"text": ["a", None, "b", "c\x00d"]}), nulls)
    with pytest.raises(HtcliError, match="nulls.parquet row 2: 'text' is null"):
        ByteCorpus.open([nulls])
    with ByteCorpus.open([nulls], records=RecordOptions(skip_bad_records=True)) as corpus:
        assert corpus.read(0, len(corpus)) == texts("a", "b") and corpus.skipped_records == 2
    pq.write_table(pa.table({"text": ["a", "c\x00d"]}), nulls)
    with pytest.raises(HtcliError, match="nulls.parquet row 2: field 'text' holds a NUL character"):
        ByteCorpus.open([nulls])
    # two columns of the name (a KeyError's traceback; review)
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"])], names=["text", "text"]), twice)
    with pytest.raises(
        HtcliError, match="twice.parquet has 2 columns named 'text': which one holds the text"
    ):
        ByteCorpus.open([twice])


def test_a_parquet_file_is_read_a_row_group_at_a_time(tmp_path):
    """pyarrow reads a file's column chunks ahead by default and kept each it had read: filling the cache
    from a Parquet file of 1 GB of text peaked at 1.16 GB (review): Arrow's memory now holds about one row
    group (here 0.5 MB of 8 MB), whatever the file's size."""
    import random
    import string

    import pyarrow as pa
    import pyarrow.parquet as pq

    from htcli.corpus import formats

    letters = random.Random(0)  # (text that does not compress: the file is as large as its text)
    rows = ["".join(letters.choices(string.ascii_letters, k=1000)) for _ in range(8000)]
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"text": rows}), path, row_group_size=500)
    held = 0
    for _ in formats.parquet_texts(path, RecordOptions()):
        held = max(held, pa.total_allocated_bytes())
    assert held < 3 * 2**20, held


def test_parquet_text_as_dictionary_or_string_view(tmp_path):
    """A text column that is dictionary-encoded (a pandas categorical) or of string views (as newer Arrow
    writers make) reads as the same text as plain strings, a value that is not UTF-8 a bad row of it; a
    dictionary of numbers is refused."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [f"row {i % 7}" for i in range(2500)]
    columns = {"codes": pa.array(rows).dictionary_encode()}
    if hasattr(pa, "string_view"):  # (pyarrow >= 16)
        columns["views"] = pa.array(rows, pa.string_view())
    columns["numbers"] = pa.array([i % 3 for i in range(2500)]).dictionary_encode()
    latin = pa.array([b"caf\xe9" if i == 1500 else row.encode() for i, row in enumerate(rows)], pa.binary())
    columns["latin"] = latin.view(pa.string()).dictionary_encode()
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=1000)
    for field in set(columns) - {"numbers", "latin"}:
        with ByteCorpus.open([path], records=RecordOptions(text_field=field)) as corpus:
            assert corpus.read(0, len(corpus)) == texts(*rows)
    with pytest.raises(HtcliError, match="column 'numbers' holds .*int64.*, not strings"):
        ByteCorpus.open([path], records=RecordOptions(text_field="numbers"))
    with pytest.raises(HtcliError, match="data.parquet row 1501: not UTF-8 text"):
        ByteCorpus.open([path], records=RecordOptions(text_field="latin"))
    with ByteCorpus.open([path], records=RecordOptions(text_field="latin", skip_bad_records=True)) as corpus:
        assert corpus.read(0, len(corpus)) == texts(*(rows[:1500] + rows[1501:]))


def test_parquet_without_pyarrow_names_the_install(tmp_path, monkeypatch):
    """Without pyarrow, a Parquet corpus is one line naming the install command."""
    path = write(tmp_path / "data.parquet", b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    result = invoke("train", path, "--out", tmp_path / "run", *TINY_FLAGS)
    assert_user_error(result, "Parquet corpora need pyarrow: pip install 'htcli[parquet]'")


def test_unpacking_into_the_cache_is_said_once(tmp_path, monkeypatch):
    """A compressed or record file's first use unpacks it into the cache, seconds a GB with nothing said
    until the start line (review: minutes for real corpora): train and eval say it where it takes over
    display.SLOW_SECONDS (here 0), once; later runs read the entry without a word. The library's
    ByteCorpus enters its on_unpack while it unpacks."""
    from htcli import display

    monkeypatch.setattr(display, "SLOW_SECONDS", 0.0)
    text = make_text(4000)
    packed = tmp_path / "data.txt.gz"
    packed.write_bytes(gzip.compress(text))
    records = write(tmp_path / "held.jsonl", jsonl({"text": "held out " * 20}, {"text": "text " * 20}))
    run = tmp_path / "run"
    first = invoke("train", packed, *TINY_FLAGS, "--steps", "1", "--val", records, "--out", run)
    assert first.exit_code == 0, first.output
    said = [line for line in first.stderr.splitlines() if line.startswith("unpacking")]
    assert said == [
        f"unpacking {file} into the corpus cache (its first use: later runs read it from there) ..."
        for file in (packed, records)
    ]
    again = invoke("train", packed, *TINY_FLAGS, "--steps", "1", "--val", records, "--out", tmp_path / "two")
    assert again.exit_code == 0 and "\nunpacking" not in "\n" + again.stderr, again.stderr
    other = tmp_path / "other.jsonl"
    other.write_bytes(records.read_bytes())
    scored = invoke("eval", run, other, "--device", "cpu", "--json")
    assert scored.exit_code == 0, scored.output
    assert scored.stderr.startswith(f"unpacking {other} into the corpus cache"), scored.stderr
    told = []
    noted = lambda file: told.append(file) or contextlib.nullcontext()  # noqa: E731
    with ByteCorpus.open([other, packed], on_unpack=noted) as corpus:
        assert len(corpus) > len(text) and told == []  # (both in the cache now)
    packed.write_bytes(gzip.compress(text + b"more"))
    with ByteCorpus.open([other, packed], on_unpack=noted):
        assert told == [packed]


def test_waiting_for_another_unpacking_is_told_too(tmp_path, monkeypatch):
    """A process that waits for another to unpack the same file (under torchrun, rank 0 for another rank)
    waited without a word (review): its on_unpack is entered for the wait too."""
    import threading

    from htcli.corpus import formats

    packed = tmp_path / "data.txt.gz"
    packed.write_bytes(gzip.compress(make_text(4000)))
    making, decompress = threading.Event(), formats._decompress

    def slowly(*args):
        making.set()
        time.sleep(0.5)
        return decompress(*args)

    monkeypatch.setattr(formats, "_decompress", slowly)
    other = threading.Thread(target=lambda: ByteCorpus.open([packed]).close())
    other.start()
    assert making.wait(30)
    told = []
    with ByteCorpus.open([packed], on_unpack=lambda file: told.append(file) or contextlib.nullcontext()):
        assert told == [packed]
    other.join()


def test_quick_unpacking_is_not_said(tmp_path):
    """Unpacking that takes under display.SLOW_SECONDS says nothing: a bad record's error is one line."""
    bad = write(tmp_path / "c.jsonl", jsonl({"text": "a" * 200}) + b"{oops\n")
    result = invoke("train", bad, *TINY_FLAGS, "--out", tmp_path / "run")
    assert_user_error(result, "c.jsonl line 2: not JSON")


def test_zst_file_is_decompressed(tmp_path):
    """A .zst file reads as its content, like a .gz file."""
    import zstandard

    content = make_text(5000)
    path = write(tmp_path / "c.txt.zst", zstandard.ZstdCompressor().compress(content))
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(corpus)) == content


def test_zst_files_of_several_frames_read_whole_and_truncated_ones_are_refused(tmp_path):
    """Every frame of a .zst file is read, one after another; a file cut inside a frame (a download
    cut short) is refused by name, where zstandard's reader had ended there silently (half a corpus)."""
    import zstandard

    content = make_text(300_000)
    compress = zstandard.ZstdCompressor().compress
    frames = compress(content[:1000]) + compress(content)
    path = write(tmp_path / "two.txt.zst", frames)
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(corpus)) == content[:1000] + content
    whole = compress(content)
    cut = write(tmp_path / "cut.txt.zst", whole[: len(whole) // 2])
    with pytest.raises(HtcliError, match=r"cut.txt.zst is not a readable zstd file \(truncated or corrupt"):
        ByteCorpus.open([cut])


@pytest.mark.parametrize("suffix,compress", [(".bz2", bz2.compress), (".xz", lzma.compress)])
def test_bz2_and_xz_files_are_decompressed_and_broken_ones_refused(tmp_path, suffix, compress):
    """A .bz2 or .xz file reads as its content, every stream of it (as pbzip2 and xz -T write them): they
    were read as plain files, the compressed bytes trained on without a word. One cut short, or not in that
    format, is refused by name."""
    content = make_text(300_000)
    path = write(tmp_path / f"c.txt{suffix}", compress(content[:1000]) + compress(content))
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(corpus)) == content[:1000] + content
    name = {".bz2": "bzip2", ".xz": "xz"}[suffix]
    whole = compress(content)
    for broken in (whole[: len(whole) // 2], make_text(5000)):
        path = write(tmp_path / f"broken.txt{suffix}", broken)
        expected = rf"broken.txt{suffix} is not a readable {name} file \(truncated or corrupt\?\): download"
        with pytest.raises(HtcliError, match=expected):
            ByteCorpus.open([path])


def test_a_python_without_lzma_or_bz2_reads_other_corpora_and_says_what_xz_needs(tmp_path, monkeypatch):
    """Python built without _lzma (pyenv's, where liblzma's headers were missing): htcli imported bz2 and lzma
    for every command, so none ran; other corpora read as before, and an .xz file says what it needs."""
    text = write(tmp_path / "c.txt", make_text(2000))
    script = (
        "import sys; sys.modules['lzma'] = sys.modules['bz2'] = None; import htcli.corpus.formats, htcli.cli"
    )
    imported = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert imported.returncode == 0, imported.stderr
    monkeypatch.setitem(sys.modules, "lzma", None)
    with ByteCorpus.open([text]) as corpus:
        assert len(corpus) == 2000
    packed = write(tmp_path / "c.txt.xz", lzma.compress(make_text(2000)))
    with pytest.raises(
        HtcliError, match=r"\.xz corpora need Python's lzma module, which this Python was built"
    ):
        ByteCorpus.open([packed])


def test_truncated_file_while_reading(tmp_path):
    """A corpus file cut short after the corpus was opened is an error naming it, not a crash."""
    path = write(tmp_path / "c.txt", make_text(5000))
    with ByteCorpus.open([path]) as corpus:
        corpus.read(0, 10)
        os.truncate(path, 1000)
        with pytest.raises(HtcliError, match=f"corpus file {path} changed while in use .it is shorter"):
            corpus.read(2000, 100)


def test_replaced_file_while_reading(tmp_path):
    """A corpus file replaced by another after the corpus was indexed is an error naming it."""
    path = write(tmp_path / "c.txt", make_text(5000))
    with ByteCorpus.open([path]) as corpus:
        replacement = write(tmp_path / "new.txt", make_text(5000, seed=1))
        os.replace(replacement, path)
        with pytest.raises(HtcliError, match=f"corpus file {path} changed while in use .it was replaced"):
            corpus.read(0, 100)


def test_training_stops_cleanly_when_the_corpus_is_truncated(tmp_path):
    """Truncating the corpus mid-run stops training with a clear error; the last checkpoint stays whole."""
    path = write(tmp_path / "c.txt", make_text(20_000))
    config = tiny_config(path, tmp_path / "run", steps=50, save_every=2, eval_every=0)

    def truncate_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            os.truncate(path, 500)

    with pytest.raises(HtcliError, match="changed while in use"):
        train(config, on_event=truncate_at_step_3)
    state = json.loads((tmp_path / "run" / "state.json").read_text())
    assert state["step"] == 2
    from htcli.checkpoint import load_training_state

    assert load_training_state(tmp_path / "run")[0].step == 2


def test_training_stops_when_the_corpus_is_rewritten_in_place(tmp_path):
    """A file overwritten at the same size while open (nothing to see on a read) stops the run at the
    next batch: it trained on (and scored a val bpb of 0 for) the new bytes before."""
    path = write(tmp_path / "c.txt", make_text(20_000))
    config = tiny_config(path, tmp_path / "run", steps=50, save_every=2, eval_every=0)

    def rewrite_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            with open(path, "r+b") as file:
                file.write(b"Z" * 20_000)
            os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))  # (a coarse clock: surely later)

    with pytest.raises(HtcliError, match=r"c.txt changed while in use \(it was modified\)"):
        train(config, on_event=rewrite_at_step_3)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2


def test_a_corpus_of_relative_paths_reads_on_after_a_chdir(tmp_path, monkeypatch):
    """Files named relative to the working directory are read (and checked) where they were when the corpus
    was opened: after a chdir the check took them for removed (review)."""
    write(tmp_path / "a.txt", make_text(3000))
    monkeypatch.chdir(tmp_path)
    with ByteCorpus.open(["a.txt"]) as corpus:
        first = corpus.span().windows([0], 8)
        monkeypatch.chdir("/")
        assert corpus.span().windows([0], 8).tolist() == first.tolist()
    # a path up through a link to a directory is the kernel's to follow (made absolute, it was normalised:
    # link/../x named the working directory's x, "cannot read"; review)
    write(tmp_path / "real" / "x.txt", make_text(3000))
    (tmp_path / "real" / "sub").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path)
    with ByteCorpus.open(["link/../x.txt"]) as corpus:
        assert corpus.span().windows([0], 8).tolist() == first.tolist()
    # absolute paths from a working directory that was removed (os.getcwd() raises there)
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with ByteCorpus.open([tmp_path / "a.txt"]) as corpus:
        assert corpus.span().windows([0], 8).tolist() == first.tolist()


@pytest.mark.parametrize("how", ["replaced", "removed"])
def test_training_stops_when_an_open_corpus_file_is_replaced_or_removed(tmp_path, how):
    """A file replaced by rename (or removed) while open: its old bytes were read on to the end of the run
    without a word (README: a file replaced while a run reads it stops the run; review). Stopped at the next
    batch; the checkpoint before stays."""
    path = write(tmp_path / "c.txt", make_text(20_000))
    config = tiny_config(path, tmp_path / "run", steps=50, save_every=2, eval_every=0)

    def replace_at_step_3(event):
        if event["event"] == "step" and event["step"] == 3:
            if how == "replaced":
                os.replace(write(tmp_path / "new.txt", make_text(20_000)), path)
            else:
                path.unlink()

    with pytest.raises(HtcliError, match=r"c.txt changed while in use \(it was replaced or removed\)"):
        train(config, on_event=replace_at_step_3)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["step"] == 2


COUNTING_OPENER = """
import sys, time
from htcli.corpus import ByteCorpus, formats
made = formats._decompress
def slow_decompress(*args):
    with open(sys.argv[2], "a") as log:
        log.write("made\\n")
    time.sleep(1.5)
    return made(*args)
formats._decompress = slow_decompress
with ByteCorpus.open([sys.argv[1]]) as corpus:
    print(len(corpus))
"""


def test_concurrent_processes_decompress_once(tmp_path, cache):
    """Two processes (as the ranks of one machine) opening the same .gz at once decompress it once."""
    content = make_text(100_000)
    path = write(tmp_path / "c.txt.gz", gzip.compress(content))
    log = tmp_path / "made.log"
    env = {**os.environ, "HTCLI_CACHE_DIR": str(cache)}
    ranks = [
        subprocess.Popen([sys.executable, "-c", COUNTING_OPENER, str(path), str(log)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [rank.communicate(timeout=60) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert [out.strip() for out, _ in outputs] == [str(len(content))] * 2
    assert log.read_text() == "made\n"


def test_a_compressed_file_with_a_long_name_is_read(tmp_path, cache):
    """A .gz whose name is legal but 250 bytes long (its cache entry's name, with the hash, went past the
    filesystem's 255 bytes: "File name too long; set HTCLI_CACHE_DIR", which could not help): read, and
    its entry named by the name's first bytes; a name of 2-byte characters is cut between them."""
    content = make_text(5000)
    for stem in ("y" * 247, "z" + "é" * 123):
        path = write(tmp_path / f"{stem}.gz", gzip.compress(content))
        with ByteCorpus.open([path]) as corpus:
            assert corpus.read(0, len(content)) == content
    entries = [p.name for p in cache.iterdir() if not p.name.endswith((".json", ".lock", ".TAG"))]
    assert sorted(len(os.fsencode(name)) for name in entries) == [220, 221]  # (199 or 200 bytes, ".", hash)


def test_a_compressed_file_whose_path_is_not_utf8_is_read(tmp_path):
    """A .gz (or JSONL, Parquet) file whose path holds bytes that are not UTF-8 (a Latin-1 or CP437 name
    from another system): its cache entry's hash took the path as UTF-8 (a UnicodeEncodeError traceback)."""
    content = make_text(3000)
    directory = tmp_path / os.fsdecode(b"r\xe9sum\xe9")
    path = write(directory / os.fsdecode(b"caf\xe9.gz"), gzip.compress(content))
    with ByteCorpus.open([path]) as corpus:
        assert corpus.read(0, len(content)) == content


def test_a_cache_without_a_home_directory(tmp_path, monkeypatch):
    """No HOME (and no passwd entry for the user: a container's uid): HTCLI_CACHE_DIR, the fix, is used
    without looking for a home directory (Path.home()'s RuntimeError came first), and without it one line
    says to set it."""
    content = make_text(3000)
    path = write(tmp_path / "c.gz", gzip.compress(content))

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(Path, "home", no_home)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    with ByteCorpus.open([path]) as corpus:  # (HTCLI_CACHE_DIR: the autouse fixture's)
        assert corpus.read(0, len(content)) == content
    monkeypatch.delenv("HTCLI_CACHE_DIR")
    with pytest.raises(HtcliError, match="there is no home directory for the cache .*: set HTCLI_CACHE_DIR"):
        ByteCorpus.open([tmp_path / "c.gz"])


def test_a_cache_that_is_not_a_directory_is_named(tmp_path, monkeypatch):
    """HTCLI_CACHE_DIR set to a file: one line that says so and what to do (was "File exists; free some
    space"), and the file is left as it was."""
    not_a_directory = tmp_path / "cache"
    not_a_directory.write_text("mine")
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(not_a_directory))
    corpus = tmp_path / "c.txt.gz"
    corpus.write_bytes(gzip.compress(make_text(4000)))
    result = invoke("train", corpus, "--out", tmp_path / "run", *TINY_FLAGS, "--steps", 1)
    assert_user_error(result, f"the cache {not_a_directory} is not a directory; set HTCLI_CACHE_DIR to a")
    assert not_a_directory.read_text() == "mine"


def test_a_cache_named_with_a_tilde_or_as_a_link_to_nothing(tmp_path, monkeypatch):
    """HTCLI_CACHE_DIR='~/c' (quoted: the shell left the `~`) is the home directory's c, as it would have
    been unquoted (a folder named `~` was made in the working directory); one that is a link to nothing,
    or under one, says so (was "File exists; set HTCLI_CACHE_DIR")."""
    corpus = tmp_path / "c.txt.gz"
    corpus.write_bytes(gzip.compress(make_text(4000)))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HTCLI_CACHE_DIR", "~/c")
    with ByteCorpus.open([corpus]) as opened:
        assert opened.read(0, 10) == make_text(4000)[:10]
    assert (tmp_path / "home" / "c").is_dir() and not (tmp_path / "~").exists()
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "nowhere")
    for cache, within in ((link, ""), (link / "sub", f" cannot be made: {link}")):
        monkeypatch.setenv("HTCLI_CACHE_DIR", str(cache))
        result = invoke("train", corpus, "--out", tmp_path / "run", *TINY_FLAGS, "--steps", 1)
        assert_user_error(
            result,
            f"the cache {cache}{within} is a link to {tmp_path / 'nowhere'}, which does not exist; make that "
            "directory or set HTCLI_CACHE_DIR to a",
        )


def test_a_cache_entry_that_fails_at_its_last_step_leaves_no_facts(tmp_path, monkeypatch):
    """An entry whose bytes cannot be put in place (here os.replace fails; a SIGTERM during its fsync
    is the same) leaves neither the bytes nor the small file of facts written before them."""
    from htcli import files
    from htcli.corpus.cache import cached
    from htcli.errors import HtcliError

    source = tmp_path / "c.txt"
    source.write_bytes(b"abc")

    real_replace = os.replace

    def refuse(source, target):  # the facts are put in place, the entry's bytes are not
        if str(target).endswith(".json"):
            return real_replace(source, target)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(HtcliError, match="No space left on device; free some space or set HTCLI_CACHE_DIR"):
        cached(source, "copy", lambda sink: sink.write(b"abc") and {"records": 1}, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".TAG"))] == []


def test_a_source_changed_while_its_entry_is_made_is_refused(tmp_path):
    """A compressed or record file rewritten while it is unpacked (a copy over it): the entry was made of
    what had been read by then, cut short or mixed, and trained on; now an error, and no entry."""
    from htcli.corpus.cache import cached

    source = tmp_path / "data.jsonl"
    source.write_bytes(b'{"text": "old"}\n' * 100)

    def rewritten_meanwhile(sink):
        sink.write(b"old" * 10)
        source.write_bytes(b'{"text": "new"}\n' * 50)  # (in place: the same file, another size)
        return {"records": 10}

    with pytest.raises(HtcliError, match="data.jsonl changed while it was being unpacked: run again once"):
        cached(source, "copy", rewritten_meanwhile, tmp_path / "cache")
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith((".lock", ".TAG"))] == []


def test_a_cache_entry_stopped_after_it_is_in_place_keeps_its_facts(tmp_path, monkeypatch):
    """A stop (Ctrl-C, SIGTERM) after the entry's bytes are in place, in the directory's fsync: the
    entry stays whole, with its facts (the next run read its skipped records as 0)."""
    from htcli import files
    from htcli.corpus.cache import cached

    source = tmp_path / "c.txt"
    source.write_bytes(b"abc")

    calls = []

    def stopped(path):  # the cache tag's and the facts' fsyncs pass, the entry's (third) is interrupted
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(files, "fsync_dir", stopped)
    with pytest.raises(KeyboardInterrupt):
        cached(source, "copy", lambda sink: sink.write(b"abc") and {"skipped": 80}, tmp_path / "cache")
    monkeypatch.undo()
    entry, facts = cached(source, "copy", lambda sink: pytest.fail("made again"), tmp_path / "cache")
    assert entry.read_bytes() == b"abc" and facts == {"skipped": 80, "bytes": 3}


def test_a_cache_entry_cut_short_or_without_its_facts_is_made_again(tmp_path, monkeypatch):
    """An entry whose size is not its facts' (truncated, emptied: its bytes were read as the corpus's, exit 0)
    or whose facts are lost (its skipped records were read as 0) is made again, not read."""
    from htcli.corpus import cache as cache_module
    from htcli.corpus.cache import cached

    source, cache = tmp_path / "c.txt", tmp_path / "cache"
    source.write_bytes(b"abcdef")
    made = []

    def copy(sink):
        made.append(1)
        sink.write(source.read_bytes())
        return {"skipped": 2}

    entry, _ = cached(source, "copy", copy, cache)
    for damage in (
        lambda: entry.write_bytes(b"abc"),
        lambda: entry.write_bytes(b""),
        lambda: entry.with_name(entry.name + ".json").unlink(),
        lambda: entry.with_name(entry.name + ".json").write_text("[1]"),
    ):
        damage()
        again, facts = cached(source, "copy", copy, cache)
        assert again.read_bytes() == b"abcdef" and facts == {"skipped": 2, "bytes": 6}
    assert len(made) == 5
    # a whole entry is read, without its lock (a read-only cache that holds it said "cannot make")
    monkeypatch.setattr(cache_module, "_locked", lambda path: pytest.fail("locked"))
    assert cached(source, "copy", copy, cache)[0].read_bytes() == b"abcdef" and len(made) == 5


def test_a_read_only_default_cache_without_its_tag_serves_its_entries(tmp_path, monkeypatch):
    """The default cache on read-only storage, its tag gone (copied without it): the tag that could not be
    written stopped the read of a whole entry ("cannot make ...: Read-only file system")."""
    from htcli.corpus import cache as cache_module
    from htcli.corpus.cache import cached

    monkeypatch.delenv("HTCLI_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    source = tmp_path / "a.txt.gz"
    source.write_bytes(b"abcdef")
    entry, _ = cached(source, "copy", lambda sink: sink.write(source.read_bytes()) and {})
    (tmp_path / "xdg" / "htcli" / "CACHEDIR.TAG").unlink()
    real = cache_module.atomic_file

    def read_only(path, *args, **kwargs):
        if str(path).endswith("CACHEDIR.TAG"):
            raise OSError(30, "Read-only file system")
        return real(path, *args, **kwargs)

    monkeypatch.setattr(cache_module, "atomic_file", read_only)
    again, _ = cached(source, "copy", lambda sink: pytest.fail("made again"))
    assert again == entry and again.read_bytes() == b"abcdef"


def test_an_untagged_cache_inside_a_corpus_directory_is_not_read(tmp_path, monkeypatch):
    """HTCLI_CACHE_DIR naming a folder that was there before (so never tagged) inside the corpus directory:
    its entries were read as corpus the second time (the bytes twice, and the facts files)."""
    from htcli.corpus import ByteCorpus

    data = tmp_path / "data"
    (data / "cache").mkdir(parents=True)
    with gzip.open(data / "a.txt.gz", "wb") as packed:
        packed.write(b"abcdef" * 10)
    monkeypatch.setenv("HTCLI_CACHE_DIR", str(data / "cache"))
    for _ in range(2):
        with ByteCorpus.open([data]) as corpus:
            assert list(map(str, corpus.files)) == [str(data / "a.txt.gz")] and len(corpus) == 60
    assert any((data / "cache").iterdir())
    assert not (data / "cache" / "CACHEDIR.TAG").exists()


def test_a_making_killed_leaves_no_temporary_file_past_the_next(tmp_path):
    """A process killed while it made an entry (SIGKILL, out of memory) left its hidden temporary file
    (167 MB for a large .zst), never removed; the next making of that entry removes it (and no other's)."""
    from htcli.corpus.cache import cached

    source, cache = tmp_path / "c.txt", tmp_path / "cache"
    source.write_bytes(b"abcdef")
    entry, _ = cached(source, "copy", lambda sink: sink.write(b"abcdef") and {}, cache)
    entry.unlink()
    left = [cache / f".{entry.name}.99999999.tmp", cache / f".{entry.name}.json.99999999.tmp"]
    other = cache / ".other.99999999.tmp"
    for path in (*left, other):
        path.write_bytes(b"half")
    cached(source, "copy", lambda sink: sink.write(b"abcdef") and {}, cache)
    assert not any(path.exists() for path in left) and other.exists()


def test_a_source_rewritten_with_its_size_and_time_is_made_again(tmp_path):
    """A source rewritten at the same size, its modification time set back (`cp -p`, `rsync -t`): its old
    bytes were read (the entry was named by path, size and modification time); its change time, which no
    copy sets back, names the entry too."""
    from htcli.corpus.cache import cached

    source, cache = tmp_path / "c.txt", tmp_path / "cache"
    source.write_bytes(b"abcdef")
    before = source.stat()

    def copy(sink):
        sink.write(source.read_bytes())
        return {}

    assert cached(source, "copy", copy, cache)[0].read_bytes() == b"abcdef"
    time.sleep(0.05)  # (past the filesystem's clock tick)
    source.write_bytes(b"ghijkl")
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert cached(source, "copy", copy, cache)[0].read_bytes() == b"ghijkl"


def test_an_entry_an_older_htcli_made_is_not_read(tmp_path):
    """An entry named as htcli made them before cache.FORMAT (a JSONL record's lone surrogate went in as
    bytes, where this htcli skips the record): made again, not read."""
    import hashlib

    from htcli.corpus.cache import cached

    source, cache = tmp_path / "c.txt", tmp_path / "cache"
    source.write_bytes(b"abc")
    stat = source.stat()
    identity = f"{source.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|copy"  # (no format in it)
    old = cache / f"c.txt.{hashlib.sha256(identity.encode()).hexdigest()[:20]}"
    cache.mkdir()
    old.write_bytes(b"made by an older htcli")
    old.with_name(old.name + ".json").write_text("{}")
    entry, facts = cached(source, "copy", lambda sink: sink.write(b"abc") and {"records": 1}, cache)
    assert entry.read_bytes() == b"abc" and facts == {"records": 1, "bytes": 3}


def test_include_hidden_is_refused_where_it_would_change_nothing(tmp_path):
    """include_hidden concerns walks and globs: for a corpus of named files alone it is refused (it was
    ignored without a word); a directory or a pattern among them takes it."""
    from htcli.corpus import check_hidden_applies

    text = tmp_path / "a.txt"
    text.write_text("abc")
    with pytest.raises(HtcliError, match="include_hidden reads the hidden files of directories and glob"):
        check_hidden_applies([text], True)
    check_hidden_applies([text], False)
    check_hidden_applies([text, tmp_path], True)
    check_hidden_applies([str(tmp_path / "*.txt")], True)


@pytest.mark.parametrize("kind", ["broken link", "link loop", "fifo"])
def test_a_walk_or_a_glob_that_finds_no_file_says_so(tmp_path, kind):
    """A broken link, a loop of links or a named pipe inside a corpus directory (or matched by a glob) was
    skipped without a word (a dataset's links whose targets moved left its bytes out); alone in it, the
    error pointed at include_hidden. Now one line naming it."""
    data = tmp_path / "data"
    write(data / "a.txt", b"some text")
    odd = data / "b.txt"
    if kind == "broken link":
        odd.symlink_to(tmp_path / "moved.txt")
    elif kind == "link loop":
        odd.symlink_to(data / "c.txt")
        (data / "c.txt").symlink_to(odd)
    else:
        os.mkfifo(odd)
    said = "is a link that leads to no file" if "link" in kind else r"is not a regular file \(a pipe"
    for spec in (data, data / "*.txt", tmp_path / "d*"):
        with pytest.raises(HtcliError, match=said):
            resolve_corpus([str(spec)])


def test_a_glob_ending_in_a_slash_matches_directories_alone(tmp_path):
    """'data/*/' read the files of data too (Path drops the slash), where the shell's data/*/ names its
    directories alone; a file named with a slash is no directory."""
    write(tmp_path / "data" / "top.txt", b"top")
    write(tmp_path / "data" / "sub" / "a.txt", b"below")
    assert resolve_corpus([f"{tmp_path / 'data'}/*/"]) == [tmp_path / "data" / "sub" / "a.txt"]
    assert resolve_corpus([str(tmp_path / "data" / "*")]) == [
        tmp_path / "data" / "sub" / "a.txt",
        tmp_path / "data" / "top.txt",
    ]
    with pytest.raises(HtcliError, match="top.txt/ is not a directory but a file: name it without the /"):
        resolve_corpus([f"{tmp_path / 'data' / 'top.txt'}/"])
    printed = invoke("train", f"{tmp_path / 'data'}/*/", *TINY_FLAGS, "--print-config")  # (train made it
    assert f'corpus = ["{tmp_path / "data"}/*/"]' in printed.stdout, (
        printed.output
    )  # absolute, without the /)


def test_held_out_files_errors_name_val(tmp_path):
    """A held-out file named twice, or a link to nothing, said "in the corpus" / "corpus X": --val's."""
    corpus, held_out = write(tmp_path / "c.txt", make_text(4000)), write(tmp_path / "v.txt", make_text(900))
    (tmp_path / "gone.txt").symlink_to(tmp_path / "nowhere")
    flags = ["--out", tmp_path / "run", *TINY_FLAGS, "--steps", 1]
    twice = invoke("train", corpus, "--val", held_out, "--val", held_out, *flags)
    assert_user_error(twice, f"{held_out} is named twice in the held-out corpus (--val): name each file once")
    gone = invoke("train", corpus, "--val", tmp_path / "gone.txt", *flags)
    assert_user_error(
        gone, f"held-out corpus (--val) {tmp_path / 'gone.txt'} is a link that leads to no file"
    )


def test_a_dash_as_train_corpus_is_refused_as_standard_input(tmp_path):
    """train made every corpus path absolute, so "-" was "corpus /cwd/- does not exist"; it is refused as
    standard input, as eval refuses it."""
    result = invoke("train", "-", "--out", tmp_path / "run", *TINY_FLAGS)
    assert_user_error(result, "a corpus is read from files, not from standard input (-): save it to a file")
