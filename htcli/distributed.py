"""Data-parallel training over several processes, started by torch's own launcher (torchrun).

torchrun describes each process in its environment: RANK (0 .. WORLD_SIZE-1 over all machines),
WORLD_SIZE, LOCAL_RANK (the GPU to use on this machine), MASTER_ADDR and MASTER_PORT. `process_group`
checks them, joins the group (NCCL on CUDA, gloo on the CPU) and leaves it at the end; the helpers below
are what the training loop needs, and each is a no-op (or the identity) in a single process, so the same
code runs either way. Every collective gives up after HTCLI_DIST_TIMEOUT seconds, so a rank that crashed
or hangs brings the others down with an error instead of leaving them waiting forever.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import math
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from htcli.device import resolve_device
from htcli.errors import HtcliError
from htcli.stop import to_devnull

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")  # any of these: we were started by a launcher
ADDRESS_VARIABLES = ("MASTER_ADDR", "MASTER_PORT")  # where rank 0 waits for the others
TIMEOUT_VARIABLE = "HTCLI_DIST_TIMEOUT"
MAX_TIMEOUT = 30 * 24 * 3600.0  # a wait the collectives' clocks can hold
DEFAULT_TIMEOUT = 300.0  # seconds a collective waits for the slowest rank (rank 0 saving, sampling)
LAUNCH_HINT = (
    "start htcli with torchrun, which sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT"
)
# what gloo and NCCL errors say when a peer is gone or too slow (they raise plain RuntimeErrors)
LOST_PEER = re.compile(r"gloo|nccl|timed out|timeout|connection (closed|reset|refused)", re.IGNORECASE)


@dataclass(frozen=True)
class Launch:
    """This process's place in the job."""

    rank: int = 0  # over all machines
    world_size: int = 1  # processes in the job
    local_rank: int = 0  # on this machine: which GPU it uses

    @property
    def main(self) -> bool:
        """Rank 0 alone logs, prints and saves."""
        return self.rank == 0


def launch_from_env(environ: Mapping[str, str] = os.environ) -> Launch:
    """The launch torchrun's variables describe, checked; a single process when none is set."""
    present = [name for name in LAUNCH_VARIABLES if name in environ]
    if not present:
        return Launch()
    for name in LAUNCH_VARIABLES:
        if name not in environ:
            raise HtcliError(
                f"{name} is not set but {present[0]} is: {LAUNCH_HINT}, or unset {' and '.join(present)} "
                "to train in one process"
            )
    rank, world_size, local_rank = (_whole_number(environ, name) for name in LAUNCH_VARIABLES)
    if world_size < 1:
        raise HtcliError(f"WORLD_SIZE is {world_size}: it must be at least 1; {LAUNCH_HINT}")
    if not 0 <= rank < world_size:
        raise HtcliError(
            f"RANK {rank} is outside 0..{world_size - 1} (WORLD_SIZE is {world_size}): {LAUNCH_HINT}"
        )
    local_world_size = _whole_number(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else None
    if not 0 <= local_rank <= rank or (local_world_size is not None and local_rank >= local_world_size):
        limit = f"below LOCAL_WORLD_SIZE ({local_world_size}) and " if local_world_size is not None else ""
        raise HtcliError(f"LOCAL_RANK {local_rank} must be {limit}between 0 and RANK ({rank}): {LAUNCH_HINT}")
    if world_size > 1:
        for name in ADDRESS_VARIABLES:
            if not environ.get(name):
                raise HtcliError(f"{name} is not set, but WORLD_SIZE is {world_size}: {LAUNCH_HINT}")
        port = _whole_number(environ, "MASTER_PORT")
        if not 0 < port < 65536:
            raise HtcliError(f"MASTER_PORT {port} is not a port number (1..65535): {LAUNCH_HINT}")
    return Launch(rank, world_size, local_rank)


def _whole_number(environ: Mapping[str, str], name: str) -> int:
    try:
        return int(environ[name])
    except ValueError:
        raise HtcliError(f"{name} is {environ[name]!r}, not a whole number: {LAUNCH_HINT}") from None


def timeout_from_env(environ: Mapping[str, str] = os.environ) -> float:
    """Seconds a collective may wait: HTCLI_DIST_TIMEOUT, default DEFAULT_TIMEOUT."""
    text = environ.get(TIMEOUT_VARIABLE, "").strip()
    if not text:
        return DEFAULT_TIMEOUT
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not (math.isfinite(seconds) and 0 < seconds <= MAX_TIMEOUT):
        raise HtcliError(
            f"{TIMEOUT_VARIABLE} must be a positive number of seconds, got {text!r} "
            f"(at most {MAX_TIMEOUT:.0f}: 30 days)"
        )
    return seconds


@contextlib.contextmanager
def _native_stderr_held() -> Iterator[None]:
    """What torch's C++ layer writes to stderr (file descriptor 2) while a rank joins the group, dropped:
    a rank that waits for rank 0 logs each failed try with a C++ stack trace; htcli says what failed."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        to_devnull([2])
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def process_group(device_name: str = "auto") -> Iterator[Launch]:
    """Join the process group torchrun set up (no group for a single process), and leave it at the end.

    Inside, a collective that fails because another rank crashed or did not answer within the timeout
    becomes an HtcliError naming this rank.
    """
    launch = launch_from_env()
    if launch.world_size == 1:
        yield launch
        return
    timeout = timeout_from_env()
    device = resolve_device(device_name)
    if device.type not in ("cuda", "cpu"):
        raise HtcliError(
            f"training in several processes runs on CUDA GPUs or the CPU, not {device.type}: "
            "use device cuda or cpu",
            fields=("device",),
        )
    if device.type == "cuda":
        gpus = torch.cuda.device_count()
        if launch.local_rank >= gpus:
            raise HtcliError(
                f"LOCAL_RANK {launch.local_rank} needs GPU {launch.local_rank}, but this machine has {gpus}: "
                f"start at most {gpus} processes per machine (torchrun --nproc-per-node {gpus})"
            )
        torch.cuda.set_device(launch.local_rank)
    address = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
    others = "the other process" if launch.world_size == 2 else f"the other {launch.world_size - 1} processes"
    _import_dynamo()
    try:
        with _native_stderr_held():
            dist.init_process_group(
                "nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout)
            )
    except (RuntimeError, ValueError) as error:
        raise HtcliError(
            f"rank {launch.rank} could not join {others} at {address} "
            f"within {timeout:g} s ({_first_sentence(error)}): run the same torchrun command on every "
            f"machine, with an address all of them reach ({TIMEOUT_VARIABLE} sets the wait)"
        ) from None
    try:
        yield launch
    except RuntimeError as error:
        if not LOST_PEER.search(str(error)):
            raise
        raise HtcliError(
            f"rank {launch.rank} lost contact with the other processes ({_first_sentence(error)}): another "
            f"rank failed (its output says why) or did not answer within {timeout:g} s (raise "
            f"{TIMEOUT_VARIABLE} if it was only slow)"
        ) from None
    finally:
        # the DistributedDataParallel wrapper sits in reference cycles that hold the group: free them
        # first, so that the group's C++ threads end here and not at interpreter exit, where gloo's
        # teardown can abort the process ("terminate called without an active exception")
        gc.collect()
        dist.destroy_process_group()


def _import_dynamo() -> None:
    """torch._dynamo imported before the group exists (DistributedDataParallel imports it): imported after,
    it keeps a reference to the default group that destroy_process_group does not drop, so gloo's threads
    outlive the group and the interpreter's exit can abort ("terminate called without an active
    exception", seen as a rare rank failure at the end of a run that had saved)."""
    import torch._dynamo  # noqa: F401


def _first_sentence(error: BaseException) -> str:
    """A torch error's gist: its first sentence, without the C++ source location gloo puts in front."""
    lines = str(error).strip().splitlines() or [type(error).__name__]
    return re.sub(r"^\[[^\]]*\]\s*", "", lines[0]).split(". ")[0].rstrip(".")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def local_device(device: torch.device) -> torch.device:
    """The device this rank trains on: its own GPU (set from LOCAL_RANK) under a process group."""
    if device.type == "cuda" and is_distributed():
        return torch.device("cuda", torch.cuda.current_device())
    return device


def data_parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """The model wrapped so backward averages gradients over ranks (the model itself in one process)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # the model's only buffers are rotary-embedding caches that every rank computes alike: no need to
    # broadcast them before every forward (the option's name changed in torch 2.13)
    parameters = inspect.signature(DistributedDataParallel).parameters
    sync = "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers"
    return DistributedDataParallel(model, device_ids=device_ids, **{sync: False})


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Each value summed over all ranks (in float64); the values themselves in a single process."""
    if not is_distributed():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any (e.g. one rank got Ctrl-C: all stop at the same step)."""
    return all_sum([float(flag)], device)[0] > 0


def all_gather(value: object) -> list:
    """Every rank's value (picklable), in rank order; [value] in a single process."""
    if not is_distributed():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def raise_together(error: Exception | None, *, own_first: bool = False) -> None:
    """Raise on every rank the first rank's error, if any rank has one (a collective: all ranks call it).
    own_first, for errors each rank meets on its own machine (a corpus missing there): a rank that has one
    raises its own, the others the first rank's, naming that rank (an error not htcli's by its type)."""
    mine = None
    if error is not None:
        said = str(error) if isinstance(error, HtcliError) else f"{type(error).__name__}: {error}"
        mine = (said, getattr(error, "fields", ()))
    errors = all_gather(mine)
    if own_first and error is not None:
        raise error
    for index, found in enumerate(errors):
        if found is not None:
            said = f"rank {index}: {found[0]}" if own_first else found[0]
            raise HtcliError(said, fields=found[1])


def barrier(device: torch.device) -> None:
    """Wait until every rank gets here."""
    if is_distributed():
        dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)
