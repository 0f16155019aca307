"""Which device and number format a command runs in: `auto`, `cpu`, `cuda`, `mps`; `fp32`, `bf16`, `fp16`."""

from __future__ import annotations

import contextlib

import torch

from htcli.config import DEVICES, DTYPES, check_choice
from htcli.errors import HtcliError

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA, then MPS, then the CPU; an explicit device that is absent is an error."""
    check_choice("--device", name, DEVICES)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise HtcliError("CUDA was requested but no GPU is available; use --device cpu")
    if name == "mps" and not _mps_available():
        raise HtcliError("MPS was requested but this machine has no Apple GPU; use --device cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The compute dtype for autocast: `auto` is bf16 on a CUDA GPU that supports it, else fp32."""
    check_choice("--dtype", name, DTYPES)
    if name == "auto":
        cuda_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    if name == "fp16" and device.type != "cuda":
        raise HtcliError(f"--dtype fp16 needs a CUDA GPU (device is {device.type}); use --dtype bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise HtcliError("this GPU does not support bf16; use --dtype fp16 or fp32")
    return TORCH_DTYPES[name]


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in TORCH_DTYPES.items() if value == dtype)


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Mixed precision in bf16 or fp16; a no-op for full precision (fp32, or fp64 in tests)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
