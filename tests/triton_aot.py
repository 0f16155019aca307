"""Compile the Triton kernels for an H100 (sm_90) without a GPU: catches what Triton's CPU
interpreter lets through. Run as a script (TRITON_INTERPRET unset); prints one line per kernel."""

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from htcli.attention import triton_kernels as kernels
from htcli.attention import triton_launch as launch

R, D, DTYPE = 128, 64, "bf16"
INTS = {"c": "i32", "nb": "i32", "c_parent": "i32", "stride_qr": "i32", "stride_qn": "i32", "scale": "fp32"}
LOW = {  # pointers in the inputs' dtype (except those a job widens); every other pointer is fp32
    "forward_kernel": ("Q", "K", "V", "OUT"),
    "dq_kernel": ("Q", "K", "V", "G", "PDQ", "DQ"),
    "dkdv_kernel": ("Q", "K", "V", "G", "PDK", "PDV", "DK", "DV"),
    "pool_kernel": ("QP", "KP", "VP", "Q", "K", "V"),
    "pool_grad_kernel": ("GP", "G"),
    "delta_kernel": ("DOUT", "OUT"),
}
KINDS = {"forward_kernel": "forward", "dq_kernel": "dq", "dkdv_kernel": "dkdv"}


# coarse levels' gradients: level 1 adds level 2's, kept in fp32; levels >= 2 keep theirs in fp32 too
# (triton_launch.FP32_FROM_LEVEL); level 0 adds level 1's, in the inputs' dtype
WIDE = {
    "dq_kernel": [("PDQ",), ("PDQ", "DQ")],
    "dkdv_kernel": [("PDK", "PDV"), ("PDK", "PDV", "DK", "DV")],
    "forward_kernel": [()],
}


def source(fn, constants: dict, wide: tuple = ()) -> ASTSource:
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INTS or name in ("c_prev", "count"):
            types[name] = INTS.get(name, "i32")
        else:
            low = name in LOW[fn.__name__] and name not in wide
            types[name] = "*" + (DTYPE if low else "fp32")
    return ASTSource(fn, types, {(fn.arg_names.index(k),): v for k, v in constants.items()})


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    jobs = [
        (kernels.pool_kernel, dict(D=D, BLOCK=64, POOL_Q=True), (), {}),  # (default warps, as launched)
        (kernels.pool_grad_kernel, dict(D=D, BLOCK=64), (), {}),
        (kernels.delta_kernel, dict(D=D, BLOCK=64), (), {}),
    ]
    for name, kind in KINDS.items():  # the tiles, warps and stages htcli launches with
        shipped = launch._launch_options(kind, R, torch.zeros(1, R, D, dtype=torch.bfloat16))
        block_q, block_k = shipped["BLOCK_Q"], shipped["BLOCK_K"]
        options = {key: shipped[key] for key in ("num_warps", "num_stages") if key in shipped}
        for causal in (False, True):
            for level0 in (False, True):
                # coarse levels with and without level decay (models without it: old ones, --level-decay 0)
                for decay in (False,) if level0 else (True, False):
                    constants = dict(R=R, BLOCK_Q=block_q, BLOCK_K=block_k, D=D, LEVEL0=level0, CAUSAL=causal,
                                     HAS_PARENT=True, HAS_DECAY=decay, PRECISION="tf32")  # fmt: skip
                    for wide in [()] if level0 else WIDE[name]:
                        jobs.append((getattr(kernels, name), constants, wide, options))
    for fn, constants, wide, options in jobs:
        compiled = triton.compile(source(fn, constants, wide), target=target, options=options)
        assert "cubin" in compiled.asm
        print("compiled", fn.__name__, constants.get("CAUSAL"), constants.get("LEVEL0"), wide, flush=True)


if __name__ == "__main__":
    main()
