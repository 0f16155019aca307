"""Which files make a corpus: files, directories (every file below), glob patterns.

Inside a named directory (or a `**` pattern) hidden files and directories, whose names start with
".", are skipped (`.git`, `.venv`, `.env`, editor swap files) unless `include_hidden`; a file named
on its own is always read. Paths under `exclude` (a run's own directory) are never corpus, except
files there that the run does not write, named on their own or matched by a glob pattern whose fixed
part lies there (`htcli train '*.txt' --out .`); nor are the directories of other htcli runs found
inside a named directory (their weights and logs are not text to train on; a run directory named itself
is read), nor caches (directories holding a CACHEDIR.TAG, as htcli's corpus cache does, and htcli's own
cache where it has none). A directory's files come sorted by path; symbolic links to directories are not
followed.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from htcli.corpus.cache import cache_dir
from htcli.errors import HtcliError, unreadable, unreadable_advice
from htcli.files import is_cache_directory, is_run_directory, written_by_the_run

GLOB_CHARACTERS = "*?["


def check_corpus_given(specs: Sequence[str | os.PathLike]) -> None:
    """HtcliError if specs names nothing, or holds an empty name (which Path reads as the current directory:
    `htcli train "$DATA"` with DATA unset trained on whatever was there)."""
    if not specs:
        raise HtcliError("no corpus given: name at least one file, directory or glob pattern")
    if any(str(spec) == "" for spec in specs):
        raise HtcliError(
            "an empty path was given (an unset shell variable?): name a file, directory or glob pattern"
        )


def resolve_corpus(
    specs: Sequence[str | os.PathLike],
    *,
    include_hidden: bool = False,
    exclude: Iterable[str | os.PathLike] = (),
    excluded_as: str | None = None,
    role: str = "corpus",
) -> list[Path]:
    """Files named by specs, in order: a file, a directory's files below it (sorted), a glob's matches.
    excluded_as: what the directories of exclude are, for a message (default: the run directory, out);
    role: what specs are, for a message (the held-out files: "held-out corpus (val)")."""
    check_corpus_given(specs)
    excluded = [Path(path).expanduser().resolve() for path in exclude]
    files: list[Path] = []
    named: dict[tuple, tuple] = {}  # each file's identity: the spec that named it (its index, as given)
    try:
        for index, spec in enumerate(specs):
            found = _files_of(spec, include_hidden, excluded, excluded_as, role)
            if len(specs) > 1:  # (one spec names a file once: a walk or a glob lists each path once)
                _name_once(found, (index, str(spec)), named, role)
            files += found
    except HtcliError as error:  # (every error of the held-out files is val's, whose file it may come from)
        if role == "corpus":
            raise
        raise HtcliError(str(error), fields=(*error.fields, "val")) from None
    return files


def check_hidden_applies(specs: Sequence[str | os.PathLike], include_hidden: bool) -> None:
    """HtcliError where include_hidden is given and no spec is a directory or a glob pattern: hidden files
    are looked for only there, and it would be ignored without a word."""
    if include_hidden and not any(_searched(spec) for spec in specs):
        raise HtcliError(
            "include_hidden reads the hidden files of directories and glob patterns, and the corpus names "
            "files alone: leave it out (or turn it off)",
            fields=("include_hidden",),
        )


def _searched(spec: str | os.PathLike) -> bool:
    """Whether spec is a directory or a glob pattern (what _files_of walks or matches)."""
    path = Path(spec).expanduser()
    return path.is_dir() or not path.exists() and has_wildcard(str(spec))


def file_identity(path: str | os.PathLike) -> tuple:
    """What makes a file itself, whatever names it (links, symbolic or hard): its device and inode (its
    absolute path where it cannot be looked at)."""
    try:
        found = os.stat(path)
    except OSError:
        found = None
    if found is None or not found.st_ino:  # (a filesystem without inode numbers: 0 for every file)
        return (os.path.abspath(path),)
    return (found.st_dev, found.st_ino)


def _name_once(found: list[Path], spec: tuple[int, str], named: dict[tuple, tuple], role: str) -> None:
    """HtcliError for a file of found that an earlier spec (index, as given) named, by a name or a link (its
    bytes would be trained on twice); else each is added to named (identity: spec). Links within one spec
    are read as the files they are, as where it is the only one (they were refused beside another spec)."""
    for file in found:
        where = file_identity(file)
        first = named.setdefault(where, spec)
        if first != spec:
            by = f" (by {first[1]} and by {spec[1]})" if first[1] != spec[1] else ""
            raise HtcliError(f"{file} is named twice in the {role}{by}: name each file once")


def _files_of(
    spec: str | os.PathLike, include_hidden: bool, excluded: list[Path], excluded_as: str | None, role: str
) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir() and _under_any(path, excluded) or _written_by_a_run(path, excluded):
        raise HtcliError(
            f"{spec} is in {excluded_as or 'the run directory (out)'}, which is never corpus: name another",
            fields=() if excluded_as else ("out",),
        )
    if path.is_dir():
        found = sorted(_walk(path, include_hidden, excluded))
        if not found:
            hidden = "" if include_hidden else " (hidden ones aside: include_hidden reads them)"
            raise HtcliError(
                f"directory {spec} has no files{hidden}: point at one that holds the corpus",
                fields=("include_hidden",),
            )
        return found
    if path.exists():
        if not path.is_file():
            raise HtcliError(f"{spec} is not a regular file: give files, directories or glob patterns")
        if os.fspath(spec).endswith("/"):  # (Path drops the slash, which names a directory)
            raise HtcliError(f"{spec} is not a directory but a file: name it without the /")
        return [path]
    if has_wildcard(str(spec)):
        inside = _under_any(_fixed_prefix(path), excluded)  # (it names files of the run directory)
        directories_only = os.fspath(spec).endswith("/")
        matches = sorted(_glob(path, include_hidden, directories_only))
        found = [p for p in matches if not (_written_by_a_run if inside else _under_any)(p, excluded)]
        if not found:
            aside = " (the run directory's files aside)" if matches else ""
            if not matches and not include_hidden and any(_glob(path, True, directories_only)):
                aside = " but hidden ones (include_hidden reads them)"
            raise HtcliError(
                f"no files match {spec}{aside}: check the pattern (quote it so the shell leaves it)",
                fields=("include_hidden",),
            )
        return found
    if os.fspath(spec) == "-":
        raise HtcliError(
            "a corpus is read from files, not from standard input (-): save it to a file and give that"
        )
    if path.is_symlink():  # (exists() follows it: to nothing, or round in a loop)
        raise HtcliError(
            f"{role} {spec} is a link that leads to no file (its target is missing, or links loop): "
            "give the file it should point at"
        )
    raise HtcliError(f"{role} {spec} does not exist: give a file, a directory or a glob pattern")


def has_wildcard(text: str) -> bool:
    """Whether text holds a glob wildcard."""
    return any(c in text for c in GLOB_CHARACTERS)


def _fixed_prefix(pattern: Path) -> Path:
    """The directories of a glob pattern before its first wildcard."""
    parts = []
    for part in pattern.parts:
        if has_wildcard(part):
            break
        parts.append(part)
    return Path(*parts) if parts else Path()


def _glob(pattern: Path, include_hidden: bool, directories_only: bool = False) -> Iterable[Path]:
    """The regular files (or links to them) that pattern matches, and the files below the directories it
    matches (walked as a directory named: `'data/*'` reads what the shell's data/* does): `*`, `?`,
    `[...]` within a name, `**` any number of directories; never in a run directory or a cache below the
    pattern's fixed part. The wildcards go through no link to a directory, as a directory's walk does not
    (Python's glob follows them under `**`: a link to a parent repeats the tree dozens of times, two such
    links exponentially many), and match hidden names only with include_hidden. directories_only: a
    pattern that ends in "/" (`'data/*/'`), which matches directories alone, as the shell's does."""
    prefix = _fixed_prefix(pattern)
    wild = pattern.parts[len(prefix.parts) :]
    root = str(prefix) if prefix.parts else os.curdir
    if not wild or not os.path.isdir(root):
        return
    deepest = None if "**" in wild else len(wild) - 1  # (directories below it cannot match)
    cache = _cache_identity()

    def refuse(error: OSError) -> None:  # (a directory that could hold matches: they were left out)
        if _matches(Path(error.filename).relative_to(root).parts, wild, include_hidden, below=True):
            _refuse_unreadable(error)

    for directory, subdirectories, names in os.walk(root, onerror=refuse):
        where = Path(directory).relative_to(root).parts
        # (no run directory or cache below the pattern's fixed part, as a directory's walk)
        subdirectories[:] = [name for name in subdirectories if not _kept_apart(Path(directory, name), cache)]
        walked = [
            name
            for name in subdirectories
            if _matches((*where, name), wild, include_hidden) and not os.path.islink(Path(directory, name))
        ]
        for name in walked:
            yield from _walk(prefix.joinpath(*where, name), include_hidden, [])
        # (a matched directory is walked, not descended into again: each file comes once)
        subdirectories[:] = [name for name in subdirectories if name not in walked]
        if deepest is not None and len(where) >= deepest:
            subdirectories[:] = []
        for name in names if not directories_only else ():
            if _matches((*where, name), wild, include_hidden):
                match = prefix.joinpath(*where, name)
                if not _is_file(match):
                    raise _not_a_file(match)
                yield match


def _matches(
    parts: tuple[str, ...], wild: tuple[str, ...], include_hidden: bool, below: bool = False
) -> bool:
    """Whether the names parts match the pattern's components wild, one by one (`**`: any number); below:
    whether files below the directory named by parts could (parts matches a beginning of wild)."""
    if not wild:
        return not parts and not below
    if not parts and below:
        return True
    head = wild[0]
    if head == "**":
        return any(
            (below and skip == len(parts)) or _matches(parts[skip:], wild[1:], include_hidden, below)
            for skip in range(len(parts) + 1)
            if include_hidden or not any(part.startswith(".") for part in parts[:skip])
        )
    if not parts or (parts[0].startswith(".") and not head.startswith(".") and not include_hidden):
        return False
    return fnmatch.fnmatchcase(parts[0], head) and _matches(parts[1:], wild[1:], include_hidden, below)


def _refuse_unreadable(error: OSError) -> None:
    raise HtcliError(
        f"cannot read directory {error.filename}: {error.strerror}: {unreadable_advice(error)}"
    ) from None


def _kept_apart(directory: Path, cache: tuple | None) -> bool:
    """Whether a directory found below a named one is skipped: an htcli run's (its weights and log), a
    cache (CACHEDIR.TAG: htcli's own, made from the corpus's files, would be read twice), or htcli's cache
    untagged (a folder of the user's that HTCLI_CACHE_DIR names: its entries were read as corpus); cache:
    _cache_identity(), looked up once per walk."""
    if is_run_directory(directory) or is_cache_directory(directory):
        return True
    return cache is not None and file_identity(directory) == cache


def _cache_identity() -> tuple | None:
    """The identity of htcli's corpus cache (file_identity: its device and inode; None where there is no
    home for one)."""
    try:
        return file_identity(cache_dir())
    except HtcliError:
        return None


def _walk(root: Path, include_hidden: bool, excluded: list[Path]) -> Iterable[Path]:
    """Every regular file below root (hidden ones only with include_hidden), none under excluded or in a
    run directory below root."""
    cache = _cache_identity()
    for directory, subdirectories, names in os.walk(root, onerror=_refuse_unreadable):
        subdirectories[:] = [
            name
            for name in subdirectories
            if (include_hidden or not name.startswith("."))
            and not _under_any(Path(directory, name), excluded)
            and not _kept_apart(Path(directory, name), cache)
        ]
        for name in names:
            if include_hidden or not name.startswith("."):
                path = Path(directory, name)
                if _is_file(path):
                    yield path
                elif not path.is_dir():  # (a link to a directory is not followed, as documented)
                    raise _not_a_file(path)


def _not_a_file(path: Path) -> HtcliError:
    """The error of an entry a walk or a glob pattern finds that is no file: it was skipped without a word
    (a dataset's links whose targets moved left its bytes out)."""
    if path.is_symlink():
        return HtcliError(
            f"{path} is a link that leads to no file (its target is missing, or links loop): mend or remove"
            " it, or name the files to read"
        )
    return HtcliError(
        f"{path} is not a regular file (a pipe, a socket or a device): remove it, or name the files to read"
    )


def _is_file(path: Path) -> bool:
    """Whether path is a regular file (or a link to one); an entry that cannot be looked at is an error."""
    try:
        return path.is_file()
    except OSError as error:
        raise unreadable(path, error) from None


def _written_by_a_run(path: Path, outs: list[Path]) -> bool:
    """Whether path is a file that the run in one of outs writes (its checkpoint, log, config: it would read
    what it writes); a corpus file that merely lies in the run directory (`--out .`) is not."""
    return path.is_file() and any(written_by_the_run(path.resolve(), out) for out in outs)


def _under_any(path: Path, roots: list[Path]) -> bool:
    """Whether path is one of roots or below one (both resolved)."""
    if not roots:
        return False
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in roots)
