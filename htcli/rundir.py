"""A run directory before training starts in it: can it be written, is it free, what does it hold.

`open_run` is every check that training makes of `config.out` before it writes anything: the path
is a directory (or can become one), no other process trains into it (htcli.runlock), and it holds a
checkpoint exactly when the run resumes, one that matches the config and the number of processes.
In a distributed run rank 0 takes the lock and finishes a save cut short while every other rank
waits, then all read the checkpoint; an error on rank 0 is raised on every rank.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from htcli import distributed
from htcli.checkpoint import CheckpointInfo, commit_pending, load_training_state, read_checkpoint_info
from htcli.config import TrainConfig, saved_config
from htcli.display import on_off
from htcli.errors import HtcliError
from htcli.files import (
    BEST_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    TENSORBOARD_DIR,
    WANDB_DIR,
    check_complete_checkpoint,
    check_out_path,
    checkpoint_file,
    has_checkpoint,
    is_cache_directory,
    no_checkpoint,
)
from htcli.model import given_differences
from htcli.presets import PRESETS, model_config
from htcli.runlock import RunLock
from htcli.runlog import parse_event


class RunFinished(HtcliError):
    """A resume of a run that has trained all its steps: with resume "auto" (a job requeued after its run
    finished, killed after its last save), there is nothing to do, not an error. out and step: the run's,
    for a front end's note."""

    def __init__(self, message: str, *, out: Path, step: int) -> None:
        super().__init__(message, fields=("steps",))
        self.out, self.step = out, step


def resolve_resume(resume: bool | str, out: Path) -> bool:
    """resume as asked: True, False, or "auto" (True exactly when out holds a checkpoint)."""
    if resume == "auto":
        return has_checkpoint(Path(out))
    if isinstance(resume, bool):
        return resume
    raise HtcliError(f"resume must be true, false or auto, got {resume!r}", fields=("resume",))


def open_run(out: Path, config: TrainConfig, resume: bool, lock: RunLock, *, main: bool) -> tuple | None:
    """The checkpoint to resume from (None for a new run), everything about out checked (see the
    module docstring). rank 0 (`main`) holds `lock` afterwards where out existed already; a new
    directory is locked when it is made."""
    check_out_path(out)
    failure = None
    if main and out.is_dir():
        try:
            if not resume and not has_checkpoint(out):
                check_only_run_files(out)
            lock.acquire(resuming=resume)
            if resume:
                commit_pending(out)
        except HtcliError as error:
            failure = error
    distributed.raise_together(failure)
    if not resume:
        _check_no_checkpoint(out)
        return None
    _check_checkpoint_there(out)
    checkpoint = load_training_state(out, commit=False)
    _check_fits(out, config, *checkpoint)
    return checkpoint


def check_still_new(out: Path) -> None:
    """For a new run whose directory open_run did not find (it locks it only once made): what open_run checks
    of one it finds, now that the lock is held, as another run may have made the directory and saved into it
    since (that run has ended: the lock was free)."""
    if has_checkpoint(out):
        raise HtcliError(
            f"{out} holds a checkpoint now, which another run saved there while this one started: pass resume"
            " to continue it, or choose another out",
            fields=("resume", "out"),
        )
    check_only_run_files(out)


def check_resumable(config: TrainConfig, resume: bool | str) -> None:
    """Where config resumes a run (resume as train takes it), what open_run checks of its checkpoint
    before training, from the checkpoint's metadata alone: one is there, complete, of config's model,
    with steps left (for a config printed and not run)."""
    out = Path(config.out)
    if resolve_resume(resume, out):
        _check_checkpoint_there(out)
        _check_model_and_steps(out, config, read_checkpoint_info(checkpoint_file(out, MODEL_FILE)))


def check_new_out(out: Path) -> None:
    """What open_run checks of a new run's out, without locking or making it (for a config printed and not
    run): a directory or the path of one, holding no checkpoint and nothing but a run's files."""
    check_out_path(out)
    if out.is_dir():
        if not has_checkpoint(out):
            check_only_run_files(out)
        _check_no_checkpoint(out)


def _check_no_checkpoint(out: Path) -> None:
    """A new run's out holds no checkpoint (a damaged one is said as such)."""
    if has_checkpoint(out):
        check_complete_checkpoint(out)
        raise HtcliError(
            f"{out} already holds a checkpoint: pass resume to continue it, or choose another out",
            fields=("resume", "out"),
        )


def _check_checkpoint_there(out: Path) -> None:
    if not has_checkpoint(out):
        raise no_checkpoint(out)
    check_complete_checkpoint(out)


def check_only_run_files(out: Path) -> None:
    """A new run's directory that exists (and holds no checkpoint) holds nothing that the run would
    overwrite or add to: its config.json, log.jsonl and loggers' files, where present, are an htcli run's
    (one that never saved), and it has no folders but the loggers' and a cache of corpus bytes (as
    HTCLI_CACHE_DIR=out/cache makes it) (`--out .` in a project, `--out /`), and no best.safetensors. Other
    files (a `tee run/train.log`, a scheduler's output) and hidden ones may be there."""
    entries = list(os.scandir(out))
    kept = (TENSORBOARD_DIR, WANDB_DIR)
    folders = [
        e.name for e in entries if e.is_dir() and e.name not in kept and not is_cache_directory(Path(e.path))
    ]
    others = sorted(name for name in folders if not name.startswith("."))
    names = {entry.name for entry in entries}
    if CONFIG_FILE in names and not _is_htcli_config(out / CONFIG_FILE):
        others.insert(0, CONFIG_FILE)
    if LOG_FILE in names and not _is_htcli_log(out / LOG_FILE):
        others.insert(0, LOG_FILE)
    if BEST_FILE in names and not others:  # (a run saves it with a checkpoint: one without was put there)
        raise HtcliError(
            f"{out} holds a {BEST_FILE} but no checkpoint (another run's weights, or this run's whose"
            " checkpoint was removed), which a new run would overwrite: move it away, or choose another out",
            fields=("out",),
        )
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise HtcliError(
            f"{out} holds what is not an htcli run's ({shown}), which a new run would overwrite or mix"
            " with its own: choose a new or empty out",
            fields=("out",),
        )


def _is_htcli_config(path: Path) -> bool:
    if not path.is_file():  # (a FIFO would block the read)
        return False
    try:
        saved = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(saved, dict) and "htcli_version" in saved


def _is_htcli_log(path: Path) -> bool:
    """Whether a log's first line is an htcli event (an empty log is a run's that stopped at once)."""
    if not path.is_file():
        return False
    try:
        with open(path, "rb") as file:
            first = file.readline(1 << 16)
    except OSError:
        return False
    return not first.strip() or "event" in (parse_event(first) or {})


def _check_fits(out: Path, config: TrainConfig, info, weights, optimizer_state, state) -> None:
    """The checkpoint continues this config: the same model, steps left, the same number of processes."""
    _check_model_and_steps(out, config, info)
    saved, world_size = state["world_size"], distributed.world_size()
    if saved != world_size:
        how = "without torchrun" if saved == 1 else f"under torchrun with {saved} processes in all"
        streams = (
            "one data stream"
            if saved == 1
            else "each with its slice of one global batch"
            if config.split_global_batch
            else "each with its own data stream"
        )
        raise HtcliError(
            f"cannot resume {out} in {_processes(world_size)}: it was trained in {_processes(saved)}, "
            f"{streams}; resume it {how}"
        )


def _check_model_and_steps(out: Path, config: TrainConfig, info: CheckpointInfo) -> None:
    if info.config != config.model:
        ours, theirs = config.model.to_dict(), info.config.to_dict()
        changed = [k for k in ours if ours[k] != theirs[k]]
        filed = _model_in_config_file(out)
        if all(k in filed and filed[k] == ours[k] for k in changed):  # (no option asked for them)
            shown = {k: (json.dumps(ours[k]), json.dumps(theirs[k])) for k in changed}  # (as the file has)
            differences = ", ".join(
                f"{k} {shown[k][0]} there, {shown[k][1]} in the checkpoint" for k in changed
            )
            back = ", ".join(f"{k} to {shown[k][1]}" for k in changed)
            raise HtcliError(
                f"cannot resume {out}: its {CONFIG_FILE} (edited, or another run's?) does not describe its "
                f"checkpoint's model ({differences}): set {back} in {out / CONFIG_FILE}"
            )
        raise _model_differs(out, ours, theirs, changed)
    if info.step >= config.steps:
        message = f"{out} is already at step {info.step} of steps {config.steps}: pass a larger steps"
        if info.step == config.steps:
            raise RunFinished(message, out=out, step=info.step)
        raise HtcliError(message, fields=("steps",))


def _model_differs(out: Path, ours: dict, theirs: dict, changed: list[str]) -> HtcliError:
    """The refusal of a resume whose model is not its checkpoint's: the fields that differ (a level decay
    that another attention derived aside: it was named, never given), or, where the asked sizes are one
    preset's and the checkpoint's another's (a run without its config.json resumed with resume auto takes
    the default preset, and was told to drop options never given), that preset."""
    changed = given_differences(changed, ours)
    differences = ", ".join(
        f"{k} {on_off(theirs[k])} in the checkpoint, {on_off(ours[k])} asked" for k in changed
    )
    presets = [_preset_of(sizes) for sizes in (theirs, ours)]
    if all(presets) and presets[0] != presets[1]:
        length = model_config(presets[0]).max_seq_len
        length = "" if theirs["max_seq_len"] == length else f" with max_seq_len {theirs['max_seq_len']}"
        return HtcliError(
            f"cannot resume {out}: its checkpoint's sizes are preset {presets[0]}'s, the ones asked preset"
            f" {presets[1]}'s ({differences}): give preset {presets[0]}{length}",
            fields=[*changed, "preset", "max_seq_len"],
        )
    return HtcliError(
        f"cannot resume {out}: the model differs from its checkpoint ({differences}); drop those options,"
        " or give the checkpoint's values",
        fields=changed,  # (all a config file's: said as its own)
    )


def _preset_of(model: dict) -> str | None:
    """The preset whose sizes (its context aside) the model config has, if any."""
    sizes = {name for fields in PRESETS.values() for name in fields} - {"max_seq_len"}
    found = [name for name in PRESETS if all(model[s] == getattr(model_config(name), s) for s in sizes)]
    return found[0] if found else None


def _model_in_config_file(out: Path) -> dict:
    """The model options of the run's config.json (none where it cannot be read)."""
    try:
        return saved_config(out)["model"]
    except HtcliError:
        return {}


def _processes(count: int) -> str:
    return "one process" if count == 1 else f"{count} processes"
