"""
What fits on chip: compile the kernels ahead of time for an H100 (sm_90) on any machine, no GPU
needed, and read each configuration's shared memory, registers and spills.

    python -m benchmarks.onchip                     # every kernel's configs, see below
    python -m benchmarks.onchip --kernel flash-fwd --dtype bfloat16 --head-dims 128
    python -m benchmarks.onchip --search --kernel fused-fwd --dtype float16 --head-dims 64

By default it compiles, for each kernel, dtype and head dim:
  - fused-fwd, fused-dq: the block sizes `kernels/fused.py` would launch for each row length
    ROW (Tk rounded up to a power of two) up to `max_seqlen`;
  - flash-fwd, flash-dq, flash-dkdv: the autotuning candidates of `kernels/flash.py` for that
    dtype and head dim (`--limit N`: only the first N of them), for (B, H, T, D) tensors and,
    with `--varlen`, for packed ones too, with `--window`, with a left window bound too;
  - decode-split, decode-merge: the blocks `kernels/decode.py` launches for one new token with
    4:1 grouped heads, 4 splits;
and flags any that needs more than the 227 KiB of shared memory an H100 gives a block (such a
launch fails); it exits 1 if one does. `--search` instead tries candidate block sizes for the
fused kernels in order and prints the first that fits with no register spills, or else the one
that spills least: that is how `max_seqlen` and `row_config` were chosen; for the flash kernels
it compiles every (BLOCK_M, BLOCK_N, warps), which is how `flash.CANDIDATES` were chosen. Needs Triton's CUDA
backend (the Linux wheel ships its ptxas and cuobjdump); TRITON_INTERPRET must be unset.
Compiling takes a few seconds a configuration, longer when it spills.
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

from kernels import common, decode, flash, fused

H100 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100
# --search candidates for the whole-row kernels, in order of preference: (BLOCK_M, num_warps)
ROW_CANDIDATES = [(128, 8), (64, 4), (64, 8), (32, 2), (32, 4), (16, 1), (16, 2), (16, 4)]
TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
KERNELS = {  # name: (kernel, its pointers to q-dtype tensors)
    "fused-fwd": (fused._fused_fwd, ("Q", "K", "V", "O")),
    "fused-dq": (fused._fused_bwd_dq, ("Q", "K", "V", "DO", "DQ")),
    "flash-fwd": (flash._flash_fwd, ("Q", "K", "V", "O")),
    "flash-dq": (flash._flash_bwd_dq, ("Q", "K", "V", "DO", "DQ")),
    "flash-dkdv": (flash._flash_bwd_dkdv, ("Q", "K", "V", "DO", "DK", "DV")),
    "decode-split": (decode._decode_split, ("Q", "K", "V")),
    "decode-merge": (decode._decode_merge, ("O",)),
}


def compile_for_h100(kernel, dtype, head_dim, blocks, num_warps, num_stages=3, varlen=False, window=False):
    """Compile a kernel for sm_90 with the given block constexprs (BLOCK_M and ROW for the fused
    kernels, BLOCK_M and BLOCK_N for flash and decode); return (shared bytes, registers, stack
    bytes per thread), stack being where registers spill."""
    fn, pointers = KERNELS[kernel]
    dot_precision, _ = common.precision(dtype)
    constexprs = dict(HEAD_DIM=head_dim, BLOCK_D=common.pow2(head_dim), CAUSAL=True, VARLEN=varlen, LEFT_BOUNDED=window,
                      PRECISION=dot_precision, UPCAST=False, **blocks)
    constexprs = {name: value for name, value in constexprs.items() if name in fn.arg_names}
    signature = {}
    for name in fn.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in pointers:
            signature[name] = "*" + TRITON_TYPES[dtype]
        elif name in ("LSE", "DELTA", "O_PART", "LSE_PART"):
            signature[name] = "*fp32"
        elif name in ("CU_Q", "CU_K", "SEQLENS"):
            signature[name] = "*i32"
        elif name in ("scale", "qk_scale"):
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
    compiled = triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=H100,
                              options={"num_warps": num_warps, "num_stages": num_stages})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    return compiled.metadata.shared, int(regs), int(stack)


def report(kernel, dtype, D, row, name, result, note=""):
    shared, regs, stack = result
    flag = "  OVER THE SHARED-MEMORY LIMIT" if shared > SHARED_LIMIT else ""
    print(f"{kernel:10} {str(dtype)[6:]:9} {D:4} {row:>5}  {name}: {shared // 1024} KiB shared, {regs} regs, "
          f"{stack} B spilled{note}{flag}", flush=True)
    return shared > SHARED_LIMIT


def row_candidate(block_m, num_warps, row):
    return f"BLOCK_M {block_m}, {num_warps} warps", dict(BLOCK_M=block_m, ROW=row), num_warps


def search(kernel, dtype, D, row):
    """The first whole-row candidate within the shared-memory limit that spills nothing, else the
    one that spills least."""
    fits = []
    for cand in ROW_CANDIDATES:
        name, blocks, num_warps = row_candidate(*cand, row)
        result = compile_for_h100(kernel, dtype, D, blocks, num_warps)
        if result[0] <= SHARED_LIMIT:
            fits.append((result[2], name, result))
            if result[2] == 0:
                break
    if not fits:
        print(f"{kernel:10} {str(dtype)[6:]:9} {D:4} {row:>5}  nothing fits in 227 KiB of shared memory")
        return
    _, name, result = min(fits, key=lambda f: f[0])
    report(kernel, dtype, D, row, name, result)


def check_fused(kernel, dtype, D, rows):
    """The launcher's own config for each row length."""
    over = False
    for row in rows:
        name, blocks, num_warps = row_candidate(*fused.row_config(4096, row, D, dtype), row)
        over |= report(kernel, dtype, D, row, name, compile_for_h100(kernel, dtype, D, blocks, num_warps))
    return over


def check_flash(kernel, dtype, D, limit, every=False, varlen=False, window=False):
    """The autotuning candidates for this dtype and head dim (the first `limit`); with `every`,
    every (BLOCK_M, BLOCK_N, warps) with 2 stages instead, to choose candidates from."""
    if every:
        cands = [(m, n, w, 2) for m in (16, 32, 64, 128) for n in (32, 64, 128) for w in (4, 8)]
    else:
        cands = flash.candidates(kernel.split("-")[1], dtype.itemsize, common.pow2(D))[:limit]
    over = False
    variants = [("", {})] + ([(", packed", dict(varlen=True))] if varlen else [])
    if window and "LEFT_BOUNDED" in KERNELS[kernel][0].arg_names:  # dk/dv has no window variant
        variants.append((", windowed", dict(window=True)))
    for m, n, w, s in cands:
        for label, variant in variants:
            name = f"BLOCK_M {m}, BLOCK_N {n}, {w} warps, {s} stages{label}"
            result = compile_for_h100(kernel, dtype, D, dict(BLOCK_M=m, BLOCK_N=n), w, s, **variant)
            over |= report(kernel, dtype, D, "-", name, result)
    return over


def check_decode(kernel, dtype, D):
    """The blocks decode_attention launches for one new token with 4 query heads per k/v head."""
    block_m, block_n, num_warps = decode.blocks(4, common.pow2(D), dtype.itemsize)
    blocks = dict(NUM_SPLITS=4, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_S=4)
    if kernel == "decode-merge":
        num_warps = 4
    result = compile_for_h100(kernel, dtype, D, blocks, num_warps=num_warps)
    return report(kernel, dtype, D, "-", f"BLOCK_M {block_m}, BLOCK_N {block_n}, {num_warps} warps, 4 splits", result)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--kernel", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    p.add_argument("--dtype", nargs="+", default=["float16", "float32"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[16, 32, 64, 128, 256])
    p.add_argument("--rows", nargs="+", type=int, help="fused row lengths (default: 128, 256 and max_seqlen)")
    p.add_argument("--limit", type=int, default=None, help="flash: compile only the first N kept candidates")
    p.add_argument("--varlen", action="store_true", help="flash: also compile the packed (varlen) variant")
    p.add_argument("--window", action="store_true", help="flash: also compile the left-bounded window variant")
    p.add_argument("--search", action="store_true", help="fused: search candidate block sizes instead; "
                   "flash: compile every (BLOCK_M, BLOCK_N, warps) with 2 stages")
    args = p.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("unset TRITON_INTERPRET: this compiles for the GPU")

    over = False
    print(f"{'kernel':10} {'dtype':9} {'D':>4} {'ROW':>5}  config: shared memory, registers, bytes spilled per thread")
    for kernel in args.kernel:
        for dtype in (getattr(torch, d) for d in args.dtype):
            for D in args.head_dims:
                if kernel.startswith("flash"):
                    over |= check_flash(kernel, dtype, D, args.limit, every=args.search, varlen=args.varlen,
                                        window=args.window)
                    continue
                if kernel.startswith("decode"):
                    over |= check_decode(kernel, dtype, D)
                    continue
                limit = fused.max_seqlen(D, dtype)
                rows = args.rows or sorted({r for r in (128, 256, limit) if r <= limit})
                if args.search:
                    for row in rows:
                        search(kernel, dtype, D, row)
                else:
                    over |= check_fused(kernel, dtype, D, rows)
    raise SystemExit(1 if over else 0)


if __name__ == "__main__":
    main()
