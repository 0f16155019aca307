"""Which files make a corpus: files, directories (every file below), glob patterns.

Inside a named directory (or a `**` pattern) hidden files and directories, whose names start with
".", are skipped (`.git`, `.venv`, `.env`, editor swap files) unless `include_hidden`; a file named
on its own is always read. Paths under `exclude` (a run's own directory) are never corpus. A
directory's files come sorted by path; symbolic links to directories are not followed.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from htcli.errors import HtcliError

GLOB_CHARACTERS = "*?["


def check_corpus_given(specs: Sequence[str | os.PathLike]) -> None:
    """HtcliError if specs names nothing."""
    if not specs:
        raise HtcliError("no corpus given: name at least one file, directory or glob pattern")


def resolve_corpus(
    specs: Sequence[str | os.PathLike],
    *,
    include_hidden: bool = False,
    exclude: Iterable[str | os.PathLike] = (),
) -> list[Path]:
    """Files named by specs, in order: a file, a directory's files below it (sorted), a glob's matches."""
    check_corpus_given(specs)
    excluded = [Path(path).expanduser().resolve() for path in exclude]
    files: list[Path] = []
    for spec in specs:
        files += _files_of(spec, include_hidden, excluded)
    return files


def _files_of(spec: str | os.PathLike, include_hidden: bool, excluded: list[Path]) -> list[Path]:
    path = Path(spec).expanduser()
    if path.is_dir():
        if _under_any(path, excluded):
            raise HtcliError(
                f"{spec} is in the run directory (out), which is never corpus: name another", fields=("out",)
            )
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
        return [path]
    if any(c in str(spec) for c in GLOB_CHARACTERS):
        hidden = {"include_hidden": True} if include_hidden else {}
        matches = (Path(p) for p in glob.glob(str(path), recursive=True, **hidden))
        fixed = len(_fixed_prefix(path).parts)
        found = sorted(
            p
            for p in matches
            if p.is_file() and not _under_any(p, excluded) and not _through_a_linked_directory(p, fixed)
        )
        if not found:
            raise HtcliError(f"no files match {spec}: check the pattern (quote it so the shell leaves it)")
        return found
    raise HtcliError(f"corpus {spec} does not exist: give a file, a directory or a glob pattern")


def _fixed_prefix(pattern: Path) -> Path:
    """The directories of a glob pattern before its first wildcard."""
    parts = []
    for part in pattern.parts:
        if any(c in part for c in GLOB_CHARACTERS):
            break
        parts.append(part)
    return Path(*parts) if parts else Path()


def _through_a_linked_directory(match: Path, fixed: int) -> bool:
    """Whether a glob match lies below a symbolic link to a directory that the wildcards went through
    (as for a directory, links to directories are not followed: a link to a parent would repeat the
    tree, dozens of times over, until the system's limit on links)."""
    parents = match.parents
    return any(parents[i].is_symlink() for i in range(len(match.parts) - fixed - 1))


def _walk(root: Path, include_hidden: bool, excluded: list[Path]) -> Iterable[Path]:
    """Every regular file below root (hidden ones only with include_hidden), none under excluded."""

    def refuse(error: OSError) -> None:
        raise HtcliError(f"cannot read directory {error.filename}: {error.strerror}") from None

    for directory, subdirectories, names in os.walk(root, onerror=refuse):
        subdirectories[:] = [
            name
            for name in subdirectories
            if (include_hidden or not name.startswith("."))
            and not _under_any(Path(directory, name), excluded)
        ]
        for name in names:
            if include_hidden or not name.startswith("."):
                path = Path(directory, name)
                if _is_file(path):
                    yield path


def _is_file(path: Path) -> bool:
    """Whether path is a regular file (or a link to one); an entry that cannot be looked at is an error."""
    try:
        return path.is_file()
    except OSError as error:
        raise HtcliError(f"cannot read {path}: {error.strerror or error}") from None


def _under_any(path: Path, roots: list[Path]) -> bool:
    """Whether path is one of roots or below one (both resolved)."""
    if not roots:
        return False
    resolved = path.resolve()
    return any(resolved == root or root in resolved.parents for root in roots)
