"""Which device and number format a command runs in: `auto`, `cpu`, `cuda`, `mps`; `fp32`, `bf16`, `fp16`.

Importing this module does not import torch (the configs check their choices against these lists
while `htcli --help` stays instant); the functions that need torch import it.
"""

from __future__ import annotations

import contextlib
import os
import re
from typing import TYPE_CHECKING

from htcli.errors import HtcliError

if TYPE_CHECKING:
    import torch

DEVICES = ("auto", "cpu", "cuda", "mps")
PRECISIONS = ("fp32", "bf16", "fp16")  # the number formats, by name (torch_dtype maps them)
DTYPES = ("auto", *PRECISIONS)  # auto: see resolve_dtype


def check_choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    """HtcliError naming the field unless value is one of choices."""
    if value not in choices:
        several = f" (repeat {field} for several)" if "," in value and field.endswith("s") else ""
        raise HtcliError(
            f"unknown {field} {value!r}: use one of {', '.join(choices)}{several}", fields=(field,)
        )


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a precision's name (one of PRECISIONS)."""
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def dtype_name(dtype: torch.dtype) -> str:
    """The name of a torch dtype among PRECISIONS."""
    return next(name for name in PRECISIONS if torch_dtype(name) == dtype)


def _mps_available() -> bool:
    import torch

    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def check_device_name(name: str) -> None:
    """HtcliError unless name is one of DEVICES; one GPU of several (`cuda:1`) is chosen with
    CUDA_VISIBLE_DEVICES, which every command and torchrun's ranks read."""
    if re.fullmatch(r"cuda:[0-9]+", name):
        index, visible = int(name.split(":")[1]), os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = [entry.strip() for entry in visible.split(",")] if visible is not None else []
        if visible is None:
            which = f"={index}"
        elif index < len(shown) and all(entry and not entry.startswith("-") for entry in shown[: index + 1]):
            which = f"={shown[index]}"  # (cuda:1 is the second GPU it shows; CUDA reads up to a bad entry)
        else:
            which = f" (it is {visible!r} here)"
        raise HtcliError(
            f"unknown device {name!r}: give device cuda, and choose the GPU with CUDA_VISIBLE_DEVICES{which}"
            " in the command's environment",
            fields=("device",),
        )
    check_choice("device", name, DEVICES)


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an explicit device that is absent is an error."""
    import torch

    check_device_name(name)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HtcliError("CUDA was requested but no GPU is available; use device cpu", fields=("device",))
    if name == "mps" and not _mps_available():
        raise HtcliError(
            "MPS was requested but this machine has no Apple GPU; use device cpu", fields=("device",)
        )
    return torch.device(name)


def usable_device(device: torch.device | str) -> torch.device:
    """A library caller's device (a name of DEVICES, "cuda:1", a torch.device), checked to exist here."""
    import torch

    if isinstance(device, str) and device in DEVICES:
        return resolve_device(device)
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise HtcliError(
            f"unknown device {device!r}: use one of {', '.join(DEVICES)}", fields=("device",)
        ) from None
    resolve_device(device.type if device.type in DEVICES else "cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise HtcliError(
            f"there is no {device} here ({torch.cuda.device_count()} GPUs): give another", fields=("device",)
        )
    return device


def device_name(name: str) -> str:
    """What a device is, for reports: the GPU's model on CUDA, else the device type."""
    import torch

    device = resolve_device(name)
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def resolve_dtype(name: str, device: torch.device, *, training: bool = False) -> torch.dtype:
    """The compute dtype for autocast: `auto` is bf16 on a CUDA GPU that supports it and, for training,
    on a CPU that multiplies bf16 matrices in hardware (cpu_multiplies_bf16); else fp32. (Off a GPU,
    the sample, eval and bench commands stay fp32: a decode step's few rows are slower in bf16, and fp32
    scores are what the tables compare.)"""
    import torch

    check_choice("dtype", name, DTYPES)
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        cpu_bf16 = training and device.type == "cpu" and cpu_multiplies_bf16()
        return torch.bfloat16 if cuda_bf16 or cpu_bf16 else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise HtcliError(
            f"dtype fp16 needs a CUDA GPU (device is {device.type}); use dtype bf16 or fp32",
            fields=("dtype",),
        )
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HtcliError("this GPU does not support bf16; use dtype fp16 or fp32", fields=("dtype",))
    return torch_dtype(name)


def cpu_multiplies_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices in hardware: Intel AMX (Xeons since Sapphire Rapids; the
    OS letting torch use it), or AVX-512 BF16's dot products (AMD Zen 4 and later, Intel Cooper Lake).
    There a training step under bf16 autocast is measured 7-37% faster than fp32 with AMX, 5-37% with
    AVX-512 BF16 on a 2-core AMD EPYC (the tiny preset to the small one at 2,048 bytes; the recipe's model
    28%), Muon's products in bf16 too; without either, bf16 is emulated and slower (`--dtype fp32` or
    `bf16` chooses either anywhere)."""
    import torch

    try:  # (torch's own checks, private: absent from a torch that lacks them means no)
        if torch.cpu._is_avx512_bf16_supported():
            return True
    except (AttributeError, RuntimeError):
        pass
    try:
        return bool(torch.cpu._is_amx_tile_supported() and torch.cpu._init_amx())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision in bf16 or fp16; a no-op for full precision (fp32, or fp64 in tests)."""
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
    if not isinstance(dtype, torch.dtype) or dtype not in floats:  # ("bf16", torch.int64: taken as fp32)
        raise HtcliError(
            f"dtype must be a torch float dtype (torch.float32, torch.bfloat16, torch.float16), got "
            f"{dtype!r}: htcli.device.resolve_dtype turns a name (fp32, bf16, fp16, auto) into one"
        )
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def without_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast switched off where it is on, so that what runs inside keeps its inputs' precision (a
    matrix product under autocast runs in bf16/fp16); where it is off, a no-op that costs less than
    entering torch.autocast (a decode step's hot path)."""
    import torch

    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def keep_freed_memory() -> None:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back to
    the kernel (Linux; elsewhere a no-op). A training step on the CPU allocates and frees the same
    large activations every step; handed back, each returns as fresh pages that fault in on first
    touch (measured: 5-9% of a small model's step on 2 cores). jemalloc and tcmalloc, which PyTorch's
    CPU tuning guide recommends, do the same; this needs no library. For the whole process, for
    good: it keeps its peak memory instead of shrinking between steps."""
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)
    if mallopt is None:  # (musl has none; other libcs ignore glibc's parameter numbers)
        return
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mallopt(m_mmap_threshold, 32 << 20)  # served from the heap, where freed blocks are reused
    mallopt(m_trim_threshold, 1 << 30)  # the heap's top is not given back either


def peak_memory(device: torch.device) -> int:
    """Bytes at the high-water mark so far: the CUDA allocator's on a GPU, else the process's RSS."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB
