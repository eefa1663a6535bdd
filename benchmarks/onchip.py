"""
What fits on chip: compile the fused kernels ahead of time for an H100 (sm_90) on any machine,
no GPU needed, and read each configuration's shared memory, registers and spills.

    python -m benchmarks.onchip                     # the launcher's own configs, up to max_seqlen
    python -m benchmarks.onchip --search --kernel fwd --dtype float16 --head-dims 64

By default it compiles, for each kernel, dtype, head dim and row length ROW (Tk rounded up to a
power of two) up to `max_seqlen`, the block sizes `kernels/fused.py` would launch, and flags
any that needs more than the 227 KiB of shared memory an H100 gives a block (such a launch
fails); it exits 1 if one does. `--search` instead tries the candidate block sizes in order and
prints the first that fits with no register spills, or else the one that spills least: that is
how `max_seqlen`, `row_config` and `dkdv_config` were chosen. Needs Triton's CUDA backend (the
Linux wheel ships its ptxas and cuobjdump); TRITON_INTERPRET must be unset. Compiling takes a
few seconds a configuration, longer when it spills.
"""

import argparse
import os
import re
import subprocess
import tempfile

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels import fused

H100 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100
# --search candidates, in order of preference: (BLOCK_M, num_warps) for the whole-row kernels,
# (BLOCK_M, BLOCK_N, num_warps) for dk/dv
ROW_CANDIDATES = [(128, 8), (64, 4), (64, 8), (32, 2), (32, 4), (16, 1), (16, 2), (16, 4)]
DKDV_CANDIDATES = [(64, 64, 8), (32, 64, 4), (32, 64, 8), (32, 32, 4), (32, 32, 8), (16, 32, 4), (16, 16, 2)]
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
KERNELS = {
    "fwd": (fused._fused_fwd, ("Q", "K", "V", "O")),
    "dq": (fused._fused_bwd_dq, ("Q", "K", "V", "DO", "DQ")),
    "dkdv": (fused._bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV")),
}


def compile_for_h100(kernel, dtype, head_dim, num_warps, **blocks):
    """Compile a fused kernel for sm_90 with the given block constexprs (BLOCK_M and ROW, or
    BLOCK_M and BLOCK_N for dkdv); return (shared bytes, registers, stack bytes per thread),
    stack being where registers spill."""
    fn, pointers = KERNELS[kernel]
    precision, _ = fused._precision(dtype)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=fused._pow2(head_dim), CAUSAL=True, PRECISION=precision,
                      UPCAST=False, **blocks)
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPES[dtype]
        elif name in ("LSE", "DELTA"):
            signature[name] = "*fp32"
        elif name in ("scale", "qk_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=H100,
                              options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return compiled.metadata.shared, int(regs), int(stack)


def describe(kernel, cand, row):
    """A candidate's printable name and the block constexprs it compiles with."""
    if kernel == "dkdv":
        return "BLOCK_M {}, BLOCK_N {}, {} warps".format(*cand), dict(BLOCK_M=cand[0], BLOCK_N=cand[1])
    return "BLOCK_M {}, {} warps".format(*cand), dict(BLOCK_M=cand[0], ROW=row)


def report(kernel, dtype, D, row, cand, result):
    shared, regs, stack = result
    name, _ = describe(kernel, cand, row)
    flag = "  OVER THE SHARED-MEMORY LIMIT" if shared > SHARED_LIMIT else ""
    print(f"{kernel:6} {str(dtype)[6:]:9} {D:4} {row:>5}  {name}: {shared // 1024} KiB shared, {regs} regs, "
          f"{stack} B spilled{flag}", flush=True)


def launcher_config(kernel, dtype, D, row):
    if kernel == "dkdv":
        return fused.dkdv_config(D, dtype)
    return fused.row_config(4096, row, D, dtype)


def search(kernel, dtype, D, row):
    """The first candidate within the shared-memory limit that spills nothing, else the one that
    spills least."""
    fits = []
    for cand in DKDV_CANDIDATES if kernel == "dkdv" else ROW_CANDIDATES:
        result = compile_for_h100(kernel, dtype, D, cand[-1], **describe(kernel, cand, row)[1])
        if result[0] <= SHARED_LIMIT:
            fits.append((result[2], cand, result))
            if result[2] == 0:
                break
    if not fits:
        print(f"{kernel:6} {str(dtype)[6:]:9} {D:4} {row:>5}  nothing fits in 227 KiB of shared memory")
        return
    _, cand, result = min(fits, key=lambda f: f[0])
    report(kernel, dtype, D, row, cand, result)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    p.add_argument("--rows", nargs="+", type=int, help="row lengths (default: 128, 256 and max_seqlen)")
    p.add_argument("--search", action="store_true", help="search candidate block sizes instead")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")

    over = False
    print(f"{'kernel':6} {'dtype':9} {'D':>4} {'ROW':>5}  config: shared memory, registers, bytes spilled per thread")
    for kernel in args.kernel:
        for dtype in (getattr(torch, d) for d in args.dtype):
            for D in args.head_dims:
                limit = fused.max_seqlen(D, dtype)
                rows = args.rows or sorted({r for r in (128, 256, limit) if r <= limit})
                for row in rows if kernel != "dkdv" else ["-"]:
                    if args.search:
                        search(kernel, dtype, D, row)
                        continue
                    cand = launcher_config(kernel, dtype, D, row)
                    result = compile_for_h100(kernel, dtype, D, cand[-1], **describe(kernel, cand, row)[1])
                    report(kernel, dtype, D, row, cand, result)
                    over |= result[0] > SHARED_LIMIT
    raise SystemExit(1 if over else 0)


if __name__ == "__main__":
    main()
