"""Where a run's metrics go besides log.jsonl: TensorBoard event files, Weights & Biases.

Each logger takes the run's events (the dicts of htcli.runlog) and sends their numbers under one tag
each (`train/loss`, `val/bpb`, ...) at the event's step. A resumed run continues the same curves:
TensorBoard drops what a crash left past the checkpoint (purge_step), W&B resumes the same run (its
id kept in the run directory) and never takes a step twice. The libraries are optional extras,
imported only when asked for.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import secrets
import threading
from pathlib import Path

from htcli.errors import HtcliError
from htcli.files import TENSORBOARD_DIR, WANDB_ID_FILE, atomic_file, check_not_special

WANDB_PROJECT = "htcli"  # the W&B project unless WANDB_PROJECT says otherwise
INSTALL = {
    "tensorboard": ("tensorboard", "pip install 'htcli[tensorboard]' (or pip install tensorboard)"),
    "wandb": ("wandb", "pip install 'htcli[wandb]' (or pip install wandb)"),
}
# the numbers of each event, by tag
TAGS = {
    "step": {
        "loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm",
        "tokens_per_s": "train/tokens_per_s", "step_seconds": "train/step_seconds", "tflops": "train/tflops",
        "mfu": "train/mfu", "peak_memory": "train/peak_memory_bytes", "context": "train/context",
    },
    "eval": {"val_bpb": "val/bpb", "val_loss": "val/loss"},
}  # fmt: skip


def check_loggers(names: list[str]) -> None:
    """HtcliError naming the install command for a logger whose library is missing."""
    for name in names:
        module, install = INSTALL[name]
        try:
            importlib.import_module(module)
        except ImportError:
            raise HtcliError(
                f"loggers {name} needs the {module} package: {install}", fields=("loggers",)
            ) from None


def scalars(record: dict) -> dict[str, float]:
    """The numbers of an event, by tag (none for events without a step)."""
    tags = TAGS.get(record.get("event"), {})
    return {tag: record[key] for key, tag in tags.items() if isinstance(record.get(key), int | float)}


def open_loggers(
    names: list[str], out: Path, config: dict, step: int, *, resumed: bool = True, moving: Path | None = None
) -> list:
    """The loggers named, writing into (or next to) the run directory out; step is the step the run
    starts from (0 for a new run); resumed: whether it continues a checkpoint; moving: a path of out that
    follows it where it is moved (/proc/self/fd/N), for TensorBoard, which writes from this process and
    opens its event file again by path at every write."""
    makers = {"tensorboard": functools.partial(TensorBoardLogger, moving=moving), "wandb": WandbLogger}
    if "tensorboard" not in names and (out / TENSORBOARD_DIR).is_dir():
        purge_tensorboard(out / TENSORBOARD_DIR, step)
    loggers = []
    try:
        for name in names:
            loggers.append(makers[name](out, config, step, resumed=resumed))
    except BaseException:
        close_loggers(loggers)
        raise
    return loggers


def close_loggers(loggers: list) -> None:
    for logger in loggers:
        logger.close()


def purge_tensorboard(where: Path, step: int) -> None:
    """The run's TensorBoard events past step dropped when read (a marker that a writer leaves there), for a
    session without TensorBoard: a crash's steps past the checkpoint, which it redoes, stayed there with their
    old values (a later session with TensorBoard dropped only those past its own first step)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # (no TensorBoard now: nothing can read the files here either)
        return
    _quiet_writer_threads()
    SummaryWriter(str(where), purge_step=step + 1).close()


class TensorBoardLogger:
    """Event files in OUT/tensorboard: `tensorboard --logdir OUT` (or a folder of runs) shows them."""

    def __init__(
        self, out: Path, config: dict, step: int, *, resumed: bool = True, moving: Path | None = None
    ):
        from torch.utils.tensorboard import SummaryWriter

        where = out / TENSORBOARD_DIR
        if where.exists() and not where.is_dir():
            raise HtcliError(f"{where} is not a directory: TensorBoard's event files go there; move it away")
        self.what = f"TensorBoard's event files in {where}"
        _quiet_writer_threads()
        # events past the checkpoint (written before a crash; for a new run, by one that never saved) are
        # dropped when read
        self.writer = SummaryWriter(str((moving or out) / TENSORBOARD_DIR), purge_step=step + 1)

    def __call__(self, record: dict) -> None:
        step, walltime = record.get("step"), record.get("time")
        for tag, value in scalars(record).items():
            self.writer.add_scalar(tag, value, step, walltime=walltime)
        if record.get("event") == "sample":
            self.writer.add_text("sample", record["text"], step, walltime=walltime)

    def close(self) -> None:
        self.writer.close()


def _quiet_writer_threads() -> None:
    """TensorBoard's writer thread that fails (a full disk) prints its traceback, then the writer raises the
    error again in the thread that logs, where htcli says it in one line: the thread's print is dropped."""
    if getattr(threading.excepthook, "quiets_tensorboard", False):
        return
    hook = threading.excepthook

    def quiet(args) -> None:
        if not (isinstance(args.exc_value, OSError) and type(args.thread).__name__ == "_AsyncWriterThread"):
            hook(args)

    quiet.quiets_tensorboard = True
    threading.excepthook = quiet


WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")  # what W&B's settings accept


def _wandb_advice(reason: str) -> str:
    """What to do about W&B's reason for not starting (every reason was told to log in)."""
    said = reason.lower()
    if "project name" in said:  # (not a 403's "reach out to the project owner": a login's matter)
        return f"set WANDB_PROJECT to a project name W&B takes (unset: {WANDB_PROJECT})"
    if any(word in said for word in ("timed out", "timeout", "deadline", "connect", "network", "resolve")):
        return (
            "W&B's server could not be reached: check the network, or set WANDB_MODE=offline to log on disk"
        )
    return "run `wandb login` or set WANDB_API_KEY, or WANDB_MODE=offline to log on disk"


class WandbLogger:
    """A W&B run (project WANDB_PROJECT, default htcli; named after the run directory; files in
    OUT/wandb). WANDB_MODE=offline keeps it on disk for `wandb sync`."""

    def __init__(self, out: Path, config: dict, step: int, *, resumed: bool = True):
        mode = os.environ.get("WANDB_MODE")
        if mode and mode not in WANDB_MODES:  # (W&B's error advised logging in)
            raise HtcliError(
                f"loggers wandb: WANDB_MODE={mode!r} is not a W&B mode: set online, offline or disabled",
                fields=("loggers",),
            )
        import wandb

        self.what = f"W&B's files in {out / 'wandb'}"
        settings = wandb.Settings(console="off", silent=True, disable_git=True, save_code=False)
        run_id, made = wandb_id(out, new=not resumed)
        try:
            self.run = wandb.init(
                project=os.environ.get("WANDB_PROJECT", WANDB_PROJECT), name=out.name, id=run_id,
                resume="allow", dir=str(out), config=config, settings=settings,
            )  # fmt: skip
        except Exception as error:  # (wandb's own: no login, no network, a bad project name, ...)
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise HtcliError(
                f"loggers wandb could not start ({reason}): {_wandb_advice(reason)}", fields=("loggers",)
            ) from None
        if made:  # (kept once W&B has started: a start that failed leaves the run directory as it was)
            with atomic_file(out / WANDB_ID_FILE, "w") as file:
                file.write(run_id + "\n")

    def __call__(self, record: dict) -> None:
        metrics = scalars(record)
        step = record.get("step")
        # a resumed run redoes the steps past its checkpoint: W&B keeps what it has of them
        if metrics and step >= self.run.step:
            self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


def wandb_id(out: Path, *, new: bool = False) -> tuple[str, bool]:
    """The W&B run id of the run directory, and whether it is made now (to be kept in OUT/wandb-id once W&B
    has started): made once; made again for a new run (one that starts where a run that never saved left
    its id: its W&B run's steps would hide the new ones)."""
    path = out / WANDB_ID_FILE
    if path.exists() and not new:
        check_not_special(path)
        try:
            run_id = path.read_text().strip()
        except (OSError, ValueError) as error:
            raise HtcliError(f"cannot read {path}: {getattr(error, 'strerror', None) or error}") from None
        if not re.fullmatch(r"[\w-]{1,128}", run_id, re.ASCII):  # (W&B's error advised logging in)
            raise HtcliError(
                f"{path} holds no W&B run id ({run_id[:20]!r}): write the run's id in it, or remove it to log"
                " to a new W&B run"
            )
        return run_id, False
    return secrets.token_hex(4), True
