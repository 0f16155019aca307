"""Checkpoints: safetensors files in a run directory, written so that a crash never loses the last one.

    OUT/model.safetensors      weights; metadata: htcli_config (model config JSON), htcli_version,
                               step, tokenizer ("bytes"), val_bpb
    OUT/optimizer.safetensors  optimizer state; metadata: step, param_groups (JSON)
    OUT/state.json             step, RNG states (as text: `rng_to_text`), data sampler state, gradient
                               scaler state, the training's byte counts and precision (train.py's)

A save writes all three as hidden `.pending` files first (state.json's last, so its presence means the
others are complete), then renames them over the old ones. A crash before that leaves the previous
checkpoint; a crash during the renames is finished by the next load (`commit_pending`).

    OUT/best.safetensors       the weights of the lowest validation bits per byte so far, as
                               model.safetensors (written at an eval that beats it, as a hidden
                               `.best.safetensors.next` that the next save renames: `save_best`)
"""

from __future__ import annotations

import base64
import contextlib
import errno
import json
import os
import re
import shutil
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TypeVar

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from htcli import __version__, is_newer
from htcli.attention import check_device
from htcli.checkpoint_checks import check_finite, check_state, check_weights_header
from htcli.device import usable_device
from htcli.errors import HtcliError, unreadable
from htcli.files import (
    BEST_FILE,
    BEST_NEXT,
    CHECKPOINT_FILES,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    OPTIMIZER_FILE,
    SAVING_DIR,
    STATE_FILE,
    check_not_special,
    check_saving_folder,
    check_utf8_path,
    checkpoint_file,
    fsync_dir,
    has_checkpoint,
    is_run_directory,
    nothing_at,
    pending_file,
    read_json,
    write_json,
)
from htcli.model import BYTE_TOKENS, LIMITS, HTransformer1D, HTransformerConfig, given_differences
from htcli.runlock import in_training

TOKENIZER = "bytes"
# what to do where a run's optimizer state cannot be read (its weights still serve sample and eval)
NO_OPTIMIZER = "restore it from a copy of the run to resume, or start a new run in another out"

T = TypeVar("T")
# the metadata key of a file's CRC-32 (its tensors' names, shapes, dtypes and bytes, and its other
# metadata), checked where its tensors are loaded: a byte damaged in place loaded as it was (review);
# files of htcli before it have none and load as before
CHECKSUM = "htcli_crc32"


@dataclass
class CheckpointInfo:
    path: Path  # the model.safetensors file
    config: HTransformerConfig
    step: int
    val_bpb: float | None
    version: str

    @property
    def name(self) -> Path:
        """The weights file by its name in place, also where they were read from a first save's pending file
        (the run's resume renames it there)."""
        return (
            self.path.parent / MODEL_FILE
            if self.path == pending_file(self.path.parent, MODEL_FILE)
            else self.path
        )


def commit_pending(out: Path) -> None:
    """Finish a save that was interrupted while renaming (its files checked first); drop one interrupted
    while writing."""
    if not pending_file(out, STATE_FILE).exists():
        for name in CHECKPOINT_FILES:
            pending_file(out, name).unlink(missing_ok=True)
        return
    _check_pending(out)
    for name in CHECKPOINT_FILES:
        # several ranks of a resumed run may finish the same save at once: a file gone was renamed by another
        with contextlib.suppress(FileNotFoundError):
            os.replace(pending_file(out, name), out / name)
    fsync_dir(out)


def _check_pending(out: Path) -> None:
    """The files of a save cut short between its renames are what that save wrote, before any of them
    replaces a file of the checkpoint: a pending state.json that htcli can read, and a weights and an
    optimizer file (pending, or renamed already) of its step. Anything else (a file damaged or put there
    by hand) is refused and the checkpoint left as it is."""
    state_file = pending_file(out, STATE_FILE)
    try:
        try:
            state = read_json(state_file, missing=HtcliError(f"{state_file} is gone"))
        except HtcliError:
            if not state_file.exists():  # (another process finished the save: nothing left to check)
                return
            raise
        step = state.get("step") if isinstance(state, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise HtcliError(f"{state_file} is not an htcli training state (no step)")
        for name in (MODEL_FILE, OPTIMIZER_FILE):
            file = checkpoint_file(out, name)
            found = _read_metadata(file, file).get("step")
            if found != str(step):
                raise HtcliError(f"{file} is of step {found}, {state_file} of step {step}")
    except HtcliError as error:
        raise HtcliError(
            f"{error}: a save cut short cannot be finished; remove the .pending files in {out} to go on from"
            " its last complete checkpoint (left as it was)"
        ) from None


def _os_error(text: str) -> OSError:
    """The OSError that safetensors (Rust) describes as "No space left on device (os error 28)", with its
    number, and its words without Rust's (they reached the user's message), nor the temporary file it
    names after them (` at path "..."`: gone by then)."""
    found = re.fullmatch(r"(.*?) \(os error (\d+)\)(?: at path .*)?", text.strip(), re.DOTALL)
    return OSError(int(found.group(2)), found.group(1)) if found else OSError(text)


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """tensors written to path, through the run directory's saving folder (SAVING_DIR: safetensors' own
    temporary file goes there too, where the next run's start finds what a kill -9 left)."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    metadata = {**metadata, CHECKSUM: _checksum(tensors, metadata)}
    written = path.parent / SAVING_DIR / path.name
    written.parent.mkdir(exist_ok=True)
    try:
        save_file(tensors, str(written), metadata=metadata)
    except SafetensorError as error:  # how safetensors reports a failed write (a full disk, say)
        raise _os_error(str(error).split("I/O error: ")[-1]) from None
    os.chmod(written, 0o666 & ~_umask())  # safetensors makes files readable by their owner only
    with open(written, "rb") as file:
        os.fsync(file.fileno())
    os.replace(written, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def save_checkpoint(
    out: Path,
    model: HTransformer1D,
    optimizer: torch.optim.Optimizer,
    state: dict,
    *,
    step: int,
    val_bpb: float | None,
) -> None:
    """Atomically replace the run's checkpoint by this one (see the module docstring)."""
    out = Path(out)
    commit_pending(out)
    try:
        with _through_saving_folder(out):
            _write_pending(out, model, optimizer, state, step=step, val_bpb=val_bpb)
    except BaseException:
        for name in CHECKPOINT_FILES:  # a save cut short (a full disk, a Ctrl-C) leaves no half files
            pending_file(out, name).unlink(missing_ok=True)
        raise
    commit_pending(out)
    commit_best(out, step)


@contextlib.contextmanager
def _through_saving_folder(out: Path) -> Iterator[None]:
    """A block that writes safetensors files through out's saving folder (_save_safetensors), checked first
    (a failure as a failed write: the save's caller says which save failed) and removed after."""
    try:
        check_saving_folder(out / SAVING_DIR)
    except HtcliError as error:
        raise OSError(str(error)) from None
    try:
        yield
    finally:
        shutil.rmtree(out / SAVING_DIR, ignore_errors=True)


def _write_pending(out: Path, model, optimizer, state: dict, *, step: int, val_bpb: float | None) -> None:
    _save_safetensors(
        model.state_dict(), pending_file(out, MODEL_FILE), _model_metadata(model, step, val_bpb)
    )
    tensors, groups = _flatten_optimizer(optimizer.state_dict())
    _save_safetensors(tensors, pending_file(out, OPTIMIZER_FILE), {"step": str(step), "param_groups": groups})
    write_json(
        pending_file(out, STATE_FILE),
        {**state, "step": step, "val_bpb": val_bpb, "htcli_version": __version__},
    )


def _model_metadata(model: HTransformer1D, step: int, val_bpb: float | None) -> dict[str, str]:
    return {
        "htcli_config": json.dumps(model.config.to_dict()),
        "htcli_version": __version__,
        "step": str(step),
        "tokenizer": TOKENIZER,
        "val_bpb": json.dumps(val_bpb),
    }


def save_best(out: Path, model: HTransformer1D, *, step: int, val_bpb: float) -> None:
    """The weights, with a checkpoint's metadata, as out's BEST_NEXT (whole or not at all), which the next
    checkpoint's save makes out's BEST_FILE (`commit_best`): so that best.safetensors is always of a step
    the checkpoint has passed, one the log keeps (a crash before that save drops the steps after it, and
    the redone steps make it again)."""
    out = Path(out)
    with _through_saving_folder(out):
        _save_safetensors(model.state_dict(), out / BEST_NEXT, _model_metadata(model, step, val_bpb))


def best_step(out: Path) -> int | None:
    """The step of out's BEST_FILE (None where there is none, or it cannot be read)."""
    file = Path(out) / BEST_FILE
    return _step_of(file) if file.exists() else None


def _step_of(file: Path) -> int | None:
    """The step in a weights file's metadata (None where it cannot be read: damaged by hand, as its write
    was atomic)."""
    try:
        return int(_read_metadata(file, file).get("step", ""))
    except (HtcliError, OSError, ValueError):
        return None


def commit_best(out: Path, step: int | None) -> None:
    """BEST_NEXT made out's BEST_FILE where it is of `step` (the checkpoint's) or before; dropped where it
    is of a later step, unreadable, or where a new run starts (step None: a run killed before its first save
    left it)."""
    out, upcoming = Path(out), Path(out) / BEST_NEXT
    if not upcoming.exists():
        return
    of = _step_of(upcoming)
    if step is None or of is None or of > step:
        upcoming.unlink(missing_ok=True)
        return
    os.replace(upcoming, out / BEST_FILE)
    fsync_dir(out)


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], str]:
    """Optimizer state as flat tensors `state.<param index>.<name>`, param groups as JSON."""
    tensors = {}
    for index, param_state in state_dict["state"].items():
        for name, value in param_state.items():
            tensors[f"state.{index}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    return tensors, json.dumps(state_dict["param_groups"])


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], groups: str, file: Path) -> dict:
    state: dict[int, dict] = {}
    try:
        for key, value in tensors.items():
            parts = key.split(".", 2)
            if len(parts) != 3 or parts[0] != "state" or not parts[1].isdigit() or not parts[2]:
                raise ValueError(f"a tensor named {key!r}")
            _, index, name = parts
            state.setdefault(int(index), {})[name] = value
        param_groups = json.loads(groups)
        if not isinstance(param_groups, list) or not all(isinstance(g, dict) for g in param_groups):
            raise ValueError("param_groups")
    except ValueError as error:
        raise HtcliError(
            f"{file} is not an htcli optimizer state (malformed: {error}): {NO_OPTIMIZER}", fields=("out",)
        ) from None
    return {"state": state, "param_groups": param_groups}


def model_file(path: str | os.PathLike) -> Path:
    """The weights file of a checkpoint given as a run directory or a .safetensors file. In a directory, the
    one in place; where a crash cut the run's first save short between its renames, the pending one (whole:
    the save's state.json was written after it; the run's resume renames it)."""
    path = Path(path)
    if not path.is_dir():
        return path
    return path / MODEL_FILE if (path / MODEL_FILE).exists() else checkpoint_file(path, MODEL_FILE)


def _runs_below(folder: Path, shown: str | os.PathLike) -> str:
    """What to do where folder holds no checkpoint: give a run it holds (a folder of runs, `runs`), where it
    holds any, else train one."""
    try:
        runs = sorted(e.name for e in os.scandir(folder) if e.is_dir() and has_checkpoint(Path(e.path)))
    except OSError:
        runs = []
    if not runs:
        return "train one with `htcli train`"
    named = ", ".join(str(Path(shown) / name) for name in runs[:3]) + (", ..." if len(runs) > 3 else "")
    return f"it holds runs: give one of them ({named})"


def _read_metadata(file: Path, shown: str | os.PathLike, source: Path | None = None) -> dict[str, str]:
    """file's metadata, read from source where given (the same file, pinned: _pinned)."""
    check_utf8_path(file)
    if not file.exists():
        if file.parent == Path(shown) and is_run_directory(file.parent) and not has_checkpoint(file.parent):
            if in_training(file.parent) is False:  # (a run stopped before its first save: it never will)
                raise HtcliError(  # (a process in another container or on another machine does not show)
                    f"the run in {shown} has no checkpoint, and no process here trains it (it stopped before "
                    "its first save): train it again, or give another checkpoint (a run training elsewhere "
                    "saves every save_every steps)",
                    fields=("save_every",),
                )
            raise HtcliError(  # (a run training towards its first save)
                f"the run in {shown} has saved no checkpoint yet: wait for its first save (every save_every "
                "steps of its training, and when it stops), or give another checkpoint",
                fields=("save_every",),
            )
        if file.parent != Path(shown) or not has_checkpoint(file.parent):
            raise HtcliError(f"no checkpoint at {shown}: {_runs_below(file.parent, shown)}")
        raise HtcliError(  # (it said "no checkpoint at", where the run's optimizer and state are)
            f"{shown} holds a checkpoint without its {MODEL_FILE}, which holds the weights (deleted?): "
            "give another checkpoint"
        )
    check_not_special(file)
    try:
        open(source or file, "rb").close()  # (safetensors says a file it may not read is corrupt: here why)
        with safe_open(str(source or file), framework="pt") as opened:
            return opened.metadata() or {}
    except PermissionError as error:
        raise unreadable(file, error) from None
    except RuntimeError as error:  # (torch's map of the file, for safetensors' "pt": an OSError in words)
        raise _mapping_error(error, file) from None
    except OSError as error:
        if error.errno in (errno.EMFILE, errno.ENFILE):  # (the process's limit, not the file: said as it is,
            raise OSError(error.errno, error.strerror, str(file)) from None  # named as the user named it)
        raise _unreadable(file) from None
    except (SafetensorError, ValueError):
        raise _unreadable(file) from None


def _mapping_error(error: RuntimeError, file: Path) -> OSError | HtcliError:
    """torch's RuntimeError of a file it could not map ("unable to open file <f> in read-only mode: Too
    many open files (24)") as the OSError it describes (a traceback, at a save's check of its files under
    a low `ulimit -n`); any other as the file's HtcliError."""
    found = re.search(r": ([^:]*) \((\d+)\)$", str(error).strip())
    if found is None:
        return HtcliError(f"cannot read {file}: {error}")
    return OSError(int(found.group(2)), found.group(1), str(file))


def _unreadable(file: Path) -> HtcliError:
    """The HtcliError of a checkpoint file that is not readable safetensors (or a run's other file)."""
    saved = has_checkpoint(file.parent)
    if file.name in (CONFIG_FILE, STATE_FILE, LOG_FILE) and (saved or is_run_directory(file.parent)):
        give = (
            f"give the run directory or its {MODEL_FILE}"
            if saved
            else "give the run directory once it has saved"
        )
        return HtcliError(  # (it said "truncated or corrupt?"; a run that never saved has no weights yet)
            f"{file} is a file of the run in {file.parent}, not its weights: {give}"
        )
    if not _safetensors_header(file):  # (a corpus given as the checkpoint: it was "truncated or corrupt?")
        return HtcliError(
            f"{file} is not a checkpoint (not a safetensors file): give a run directory (htcli train's out) "
            "or its model.safetensors"
        )
    return HtcliError(f"{file} is not a readable safetensors file (truncated or corrupt?)")


def _safetensors_header(file: Path) -> bool:
    """Whether file begins as safetensors do: an 8-byte little-endian length of a header (safetensors takes
    up to 100 MB; text read so is ~1e18), then the header's "{" (True where it cannot be read: said as
    before, as where it is too short to tell: an empty file). A checkpoint cut short, in its header too,
    begins so."""
    try:
        with open(file, "rb") as opened:
            head = opened.read(9)
    except OSError:
        return True
    return len(head) < 9 or head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= 100_000_000


def read_checkpoint_info(path: str | os.PathLike, *, source: Path | None = None) -> CheckpointInfo:
    """Check that path holds an htcli checkpoint and read its metadata (no weights); source: the weights
    file to read, pinned (_pinned), where given."""
    file = model_file(path)
    metadata = _read_metadata(file, path, source)
    if "param_groups" in metadata and "step" in metadata and "htcli_config" not in metadata:
        raise HtcliError(  # (it said "not an htcli checkpoint")
            f"{file} is a run's optimizer state, not its weights: give the run directory or its {MODEL_FILE}"
        )
    if "htcli_config" not in metadata or metadata.get("tokenizer") != TOKENIZER:
        raise HtcliError(
            f"{file} is not an htcli checkpoint (no htcli metadata): give one written by `htcli train`"
        )
    try:
        saved = json.loads(metadata["htcli_config"])
        if not isinstance(saved, dict):
            raise ValueError("the model config is not an object")
        config = HTransformerConfig.from_dict(saved)
        step, val_bpb = metadata.get("step", "0"), _number_or_null(metadata.get("val_bpb", "null"), "val_bpb")
        if not (step.isascii() and step.isdigit()):
            raise ValueError(f"step {step!r} is not a whole number")
        step = int(step)
    except (ValueError, TypeError) as error:
        version = metadata.get("htcli_version", "?")
        if is_newer(version):  # (a field or value this version does not know)
            raise HtcliError(
                f"{file} was written by htcli {version}, newer than this htcli {__version__}, and this one"
                f" cannot read it ({error}): upgrade htcli (pip install -U htcli)"
            ) from None
        raise HtcliError(f"{file} is not an htcli checkpoint (bad metadata: {error})") from None
    if config.num_tokens != BYTE_TOKENS:
        raise HtcliError(
            f"{file} is not an htcli checkpoint: a byte model has {BYTE_TOKENS} tokens, "
            f"its config {config.num_tokens}"
        )
    check_weights_header(source or file, config, shown=file)
    return CheckpointInfo(file, config, step, val_bpb, metadata.get("htcli_version", "?"))


def _number_or_null(text: str, name: str) -> float | int | None:
    """A metadata field holding a JSON number (NaN and Infinity too, as json.dumps writes them) or null;
    ValueError naming the field otherwise."""
    try:
        value = json.loads(text)
    except ValueError:
        value = text
    if value is not None and (isinstance(value, bool) or not isinstance(value, float | int)):
        raise ValueError(f"{name} {text!r} is not a number")
    return value


def _checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """The CRC-32 of a file's metadata (CHECKSUM's own aside) and tensors (CPU, contiguous), as hex."""
    crc = zlib.crc32(json.dumps(sorted((k, v) for k, v in metadata.items() if k != CHECKSUM)).encode())
    for name in sorted(tensors):
        tensor = tensors[name]  # (JSON: no name or value can pass for another's)
        crc = zlib.crc32(json.dumps([name, str(tensor.dtype), list(tensor.shape)]).encode(), crc)
        crc = zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def _load_tensors(file: Path, shown: Path | None = None) -> dict[str, torch.Tensor]:
    """file's tensors (CPU), checked against its checksum where it has one (shown: its name in messages,
    where file is a pinned one's)."""
    shown = shown or file
    try:
        with safe_open(str(file), framework="pt") as opened:
            metadata = opened.metadata() or {}
            tensors = {name: opened.get_tensor(name) for name in opened.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError):
        raise HtcliError(f"{shown} is not a readable safetensors file (truncated or corrupt?)") from None
    if CHECKSUM in metadata and metadata[CHECKSUM] != _checksum(tensors, metadata):
        raise HtcliError(
            f"{shown} is damaged: its bytes do not match the checksum saved with them (a byte changed on the "
            "disk or in a copy): use a good copy of it"
        )
    return tensors


@contextlib.contextmanager
def _pinned(file: Path) -> Iterator[Path | None]:
    """A name of file as it is now, whatever a run's save renames over it while it is read (its metadata,
    its header's check, its tensors: safetensors opens a file again by name to read its bytes), on a system
    that has one (Linux: /proc/self/fd/N of the file opened here); else None (read it by its name)."""
    try:
        descriptor = os.open(file, os.O_RDONLY | os.O_NONBLOCK)  # (a FIFO's open would wait: checked later)
    except OSError:  # (the reads by name say what is wrong)
        descriptor = None
    try:
        pinned = None if descriptor is None else Path(f"/proc/self/fd/{descriptor}")
        yield pinned if pinned is not None and pinned.exists() else None
    finally:
        if descriptor is not None:
            os.close(descriptor)


def load_model(
    path: str | os.PathLike, device: torch.device | str = "cpu", *, context: int | None = None
) -> tuple[HTransformer1D, CheckpointInfo]:
    """The model stored at path (a run directory or a .safetensors file), in eval mode on device.
    context: the longest input it takes, instead of the one it trained with (no weight depends on it;
    whether the model extrapolates to a longer one is what evaluating it there shows)."""
    _check_there(path)
    device = usable_device(device)
    info, config, tensors = _read_model(path, device, context)
    check_finite(tensors, info.path)
    model = HTransformer1D(config)
    load_weights(model, tensors, info.path)
    return model.to(device).eval(), info


def _check_there(path: str | os.PathLike, named: str = "", fields: tuple[str, ...] = ()) -> None:
    """HtcliError where nothing is at path (a mistyped name: "no checkpoint at" sent users looking for a lost
    one), the path said after named."""
    if nothing_at(path):
        raise HtcliError(
            f"{named}{path} does not exist: give a run directory (htcli train's out) or a .safetensors file",
            fields=fields,
        )


def _read_model(path: str | os.PathLike, device, context: int | None) -> tuple:
    """The checkpoint's info, its model config (for context: load_model's) and tensors."""
    return _once_more_if_moved(path, lambda: _read_model_once(path, device, context))


def _once_more_if_moved(path: str | os.PathLike, read: Callable[[], T]) -> T:
    """read(), once more where it failed on a pending weights file that a run's save renamed into place
    meanwhile."""
    file = model_file(path)
    try:
        return read()
    except HtcliError:
        if model_file(path) == file:
            raise
    return read()


def _read_model_once(path: str | os.PathLike, device, context: int | None) -> tuple:
    with _pinned(model_file(path)) as source:  # (a run saving meanwhile: metadata and weights of one save)
        info = read_checkpoint_info(path, source=source)
        config = _with_context(info.config, context)
        if config.attention == "h":
            check_device(torch.device(device).type)
        tensors = _load_tensors(source or info.path, info.path)
        now = model_file(path)  # (a first save's pending file, renamed into place meanwhile: its name now)
        with contextlib.suppress(OSError):
            if source is not None and now != info.path and os.path.samefile(source, now):
                info = replace(info, path=now)
        return info, config, tensors


def _with_context(config: HTransformerConfig, context: int | None) -> HTransformerConfig:
    if context is None:
        return config
    longest = LIMITS["max_seq_len"]
    if not (isinstance(context, int) and 0 < context <= longest):  # (before a multiple of the block size)
        raise HtcliError(
            f"context must be a positive number of bytes up to {longest:,}, got {context}",
            fields=("context",),
        )
    if config.attention == "h" and context % config.block_size:
        raise HtcliError(
            f"context must be a positive multiple of the model's block size ({config.block_size}), "
            f"got {context}",
            fields=("context",),
        )
    try:
        return replace(config, max_seq_len=context)
    except ValueError as error:
        raise HtcliError(str(error).replace("max_seq_len", "context"), fields=("context",)) from None


@contextlib.contextmanager
def _as_init_from(path: str | os.PathLike) -> Iterator[None]:
    """An HtcliError inside said as one of init_from (a checkpoint a new run starts from)."""
    _check_there(path, "init_from ", fields=("init_from",))
    try:
        yield
    except HtcliError as error:
        raise HtcliError(f"init_from: {error}", fields=("init_from", *error.fields)) from None


def model_fields(path: str | os.PathLike) -> dict:
    """The model config (a dict of its fields) of the checkpoint at path: a new run's that starts from it."""
    return start_info(path).config.to_dict()


def start_weights(model: HTransformer1D, path: str | os.PathLike) -> CheckpointInfo:
    """model's weights from the checkpoint at path (a run directory or a .safetensors file): a new run's
    init_from. Its model config must be model's, max_seq_len aside (no weight depends on it)."""
    with _as_init_from(path):
        info, _, tensors = _read_model(path, "cpu", None)
        check_finite(tensors, info.path)
    check_start_model(info, model.config)
    load_weights(model, tensors, info.path)
    return info


def check_start_model(info: CheckpointInfo, config: HTransformerConfig) -> None:
    """HtcliError where the checkpoint a new run starts from (init_from) holds another model than config's
    (max_seq_len aside)."""
    ours, theirs = config.to_dict(), info.config.to_dict()
    differ = given_differences(
        [name for name in ours if name != "max_seq_len" and ours[name] != theirs[name]], ours
    )
    if differ:
        shown = ", ".join(f"{name} {theirs[name]} (this run's: {ours[name]})" for name in differ[:4])
        raise HtcliError(
            f"init_from {info.name} holds a model of {shown}: a run that starts from it keeps its model, all"
            f" but max_seq_len; drop {', '.join(differ[:4])} (or start from random weights)",
            fields=("init_from", "max_seq_len", *differ[:4]),  # (those it names)
        )


def start_info(path: str | os.PathLike) -> CheckpointInfo:
    """The info of the checkpoint at path that a new run starts from (init_from), its errors naming that."""
    with _as_init_from(path):
        return _once_more_if_moved(path, lambda: read_checkpoint_info(path))


def load_weights(model: HTransformer1D, tensors: dict[str, torch.Tensor], file: Path) -> None:
    try:
        model.load_state_dict(tensors)
    except RuntimeError:
        raise HtcliError(
            f"{file} is not an htcli checkpoint: its weights do not match its model config"
        ) from None


def load_training_state(
    out: Path, *, commit: bool = True
) -> tuple[CheckpointInfo, dict[str, torch.Tensor], dict, dict]:
    """Everything a resumed run needs, checked as one unit: (info, model tensors, optimizer state dict,
    state.json), all of the same step. commit: first finish a save cut short between its renames (the
    run's one writer does; the other processes of a distributed run only read)."""
    out = Path(out)
    if commit:
        commit_pending(out)
    info = read_checkpoint_info(out)
    optimizer_file, state_file = out / OPTIMIZER_FILE, out / STATE_FILE
    metadata = _read_metadata(optimizer_file, optimizer_file)
    groups = metadata.get("param_groups")
    if groups is None:
        raise HtcliError(f"{optimizer_file} is not an htcli optimizer state: {NO_OPTIMIZER}", fields=("out",))
    if metadata.get("step") != str(info.step):
        raise HtcliError(
            f"{out} holds files of different steps ({info.step} and {metadata.get('step')}): cannot resume"
        )
    missing = HtcliError(f"no training state at {state_file}: the run cannot be resumed")
    state = check_state(read_json(state_file, missing=missing), state_file, info.step)
    moments = _load_tensors(optimizer_file)
    check_finite(moments, optimizer_file, "optimizer moments")  # (NaN there would read as divergence)
    optimizer = _unflatten_optimizer(moments, groups, optimizer_file)
    weights = _load_tensors(info.path)
    check_finite(weights, info.path)
    return info, weights, optimizer, state


def rng_to_text(state: torch.Tensor) -> str:
    """A random number generator's state (a uint8 tensor) as text, for state.json."""
    return base64.b64encode(bytes(state.tolist())).decode()


def rng_from_text(text: str) -> torch.Tensor:
    """The generator state that rng_to_text wrote."""
    return torch.tensor(list(base64.b64decode(text)), dtype=torch.uint8)
