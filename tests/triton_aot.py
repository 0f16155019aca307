"""Compile the Triton kernels for an H100 (sm_90) without a GPU: catches what Triton's CPU
interpreter lets through. Run as a script (TRITON_INTERPRET unset); prints one line per kernel."""

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from htcli.attention import triton_kernels as kernels

R, D, DTYPE = 128, 64, "bf16"
INTS = {"c": "i32", "nb": "i32", "c_parent": "i32", "stride_qr": "i32", "stride_qn": "i32", "scale": "fp32"}
LOW = {  # pointers in the inputs' dtype; every other pointer is fp32
    "forward_kernel": ("Q", "K", "V", "OUT"),
    "dq_kernel": ("Q", "K", "V", "G", "PDQ", "DQ"),
    "dkdv_kernel": ("Q", "K", "V", "G", "PDK", "PDV", "DK", "DV"),
    "pool_kernel": ("QP", "KP", "VP", "Q", "K", "V"),
    "pool_grad_kernel": ("GP", "G"),
    "delta_kernel": ("DOUT", "OUT"),
}
TILES = {"forward_kernel": (128, 64), "dq_kernel": (128, 32), "dkdv_kernel": (32, 128)}


def source(fn, constants: dict) -> ASTSource:
    types = {}
    for name in fn.arg_names:
        if name in constants:
            types[name] = "constexpr"
        elif name in INTS or name in ("c_prev", "count"):
            types[name] = INTS.get(name, "i32")
        else:
            types[name] = "*" + (DTYPE if name in LOW[fn.__name__] else "fp32")
    return ASTSource(fn, types, {(fn.arg_names.index(k),): v for k, v in constants.items()})


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    jobs = [
        (kernels.pool_kernel, dict(D=D, BLOCK=64, POOL_Q=True)),
        (kernels.pool_grad_kernel, dict(D=D, BLOCK=64)),
        (kernels.delta_kernel, dict(D=D, BLOCK=64)),
    ]
    for name, (block_q, block_k) in TILES.items():
        for causal in (False, True):
            for level0 in (False, True):
                constants = dict(R=R, BLOCK_Q=block_q, BLOCK_K=block_k, D=D, LEVEL0=level0, CAUSAL=causal,
                                 HAS_PARENT=True, PRECISION="tf32")  # fmt: skip
                jobs.append((getattr(kernels, name), constants))
    for fn, constants in jobs:
        compiled = triton.compile(source(fn, constants), target=target, options={"num_warps": 8})
        assert "cubin" in compiled.asm
        print("compiled", fn.__name__, constants.get("CAUSAL"), constants.get("LEVEL0"), flush=True)


if __name__ == "__main__":
    main()
