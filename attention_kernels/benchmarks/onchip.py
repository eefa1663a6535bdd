"""
What runs on an H100 or H200: compile the kernels for sm_90 exactly as Triton's JIT does for a
real launch, on any machine, no GPU needed, and read each binary.

    python -m attention_kernels.benchmarks.onchip                                   # every kernel, its candidates
    python -m attention_kernels.benchmarks.onchip --kernel flash-dkdv --dtype bfloat16 --head-dims 128
    python -m attention_kernels.benchmarks.onchip --kernel flash-fwd --tma           # the forward through TMA too
    python -m attention_kernels.benchmarks.onchip --search --kernel flash-dq --head-dims 128   # every tile
    python -m attention_kernels.benchmarks.onchip --json > binaries.jsonl            # one JSON object a binary

How: each kernel's own launcher runs on CPU tensors of a real shape ((B, H, T, D) = (2, 16,
--seq, D) by default; --gqa, --full, --window, --varlen change the call) with its Triton launch
intercepted, and the recorded arguments go through Triton's own argument binder for an sm_90
target. So the binary is the one the JIT builds for that call: integers equal to 1 become
constants, pointers and integers divisible by 16 carry alignment hints, the head dim's stride 1
is known. (Compiling from a bare signature, as this tool once did, gives binaries that never run:
scalar loads, no pipelining, spills that the real one does not have.)

For each binary: shared memory, registers, bytes spilled to local memory per thread, and from the
SASS and the TTGIR: the matrix instruction (HGMMA is Hopper's wgmma; HMMA the older mma.sync; FMA
none), the global loads (UTMALDG: TMA; LDGSTS: cp.async; LDG: plain), how many of the loops
that load are software-pipelined, and the instruction count. Flash kernels are compiled with
each autotuning candidate `kernels.tuning` keeps for the call (`--search`: every tile instead),
the fused kernels with the block their launcher picks for each row length (`--search`: the
candidates in `ROW_CANDIDATES`), the decode kernels with theirs. Exits 1 if a binary needs more
shared memory than a block may have (227 KiB).

Needs Triton's CUDA backend (the Linux wheel carries ptxas and cuobjdump); TRITON_INTERPRET must
be unset. A compile takes a few seconds; --jobs compiles in parallel processes.
"""

import argparse
import contextlib
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import create_function_from_signature

from attention_kernels.kernels import blockmap, common, decode, flash, fused, mods, paged, tuning

SM90 = GPUTarget("cuda", 90, 32)
SHARED_LIMIT = 227 * 1024  # bytes of shared memory one block may use on an H100 / H200
ROW_CANDIDATES = [(128, 8), (64, 4), (64, 8), (32, 2), (32, 4), (16, 1), (16, 2), (16, 4)]  # fused --search
SEARCH_TILES = [(m, n) for m in (16, 32, 64, 128) for n in (32, 64, 128)]
KERNELS = ["flash-fwd", "flash-dq", "flash-dkdv", "flash-delta", "fused-fwd", "fused-dq", "decode-split",
           "decode-merge", "paged-split", "paged-split-tiles", "paged-append"]
KERNEL_NAMES = {"_flash_fwd": "flash-fwd", "_flash_bwd_dq": "flash-dq", "_flash_bwd_dkdv": "flash-dkdv",
                "_fused_fwd": "fused-fwd", "_fused_bwd_dq": "fused-dq", "_decode_split": "decode-split",
                "_decode_merge": "decode-merge", "_flash_bwd_delta": "flash-delta", "_append_kv": "paged-append"}

# ----------------------------------------------------------------------------- the launch


@dataclass
class Launch:
    """One recorded kernel launch: the kernel (a JITFunction or an Autotuner) and its arguments."""
    kernel: object
    args: tuple
    kwargs: dict

    @property
    def fn(self):
        return self.kernel.fn if isinstance(self.kernel, Autotuner) else self.kernel

    @property
    def name(self):
        if self.kwargs.get("PAGED"):  # pages holding whole key tiles take the kernel's other loop
            return "paged-split-tiles" if self.kwargs["PAGE_SIZE"] % self.kwargs["BLOCK_N"] == 0 else "paged-split"
        return KERNEL_NAMES[self.fn.__name__]


@contextlib.contextmanager
def recording():
    """Within: the kernels' launchers record their launches into the yielded list instead of
    launching (their `wrap_triton` is swapped for a recorder)."""
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append(Launch(self.kernel, args, kwargs))

    modules = (flash, fused, decode, paged)
    saved = [m.wrap_triton for m in modules]
    for m in modules:
        m.wrap_triton = Recorder
    try:
        yield launches
    finally:
        for m, w in zip(modules, saved):
            m.wrap_triton = w


@dataclass(frozen=True)
class Call:
    """The attention call whose launches are compiled."""
    dtype: torch.dtype
    D: int
    T: int = 4096
    B: int = 2
    Hq: int = 16
    Hkv: int = 16
    causal: bool = True
    window: tuple = None
    varlen: bool = False
    mods: bool = False  # with a soft-cap, sinks and ALiBi slopes (what models add)
    dropout: bool = False  # with attention dropout (flash and fused)
    mask: str = None  # flash, dense: "bool" or "float" (its gradient too) attn_mask, or "function" (a mask and
                      # a score function), each with the block map of 8 documents


def launches_of(call):
    """Every kernel launch of a forward and a backward with these shapes, as the launchers make
    them (CPU tensors stand in for GPU ones: only their shapes, strides, dtypes and alignment
    matter to the binder)."""
    B, T, D = call.B, call.T, call.D
    if call.varlen:  # a packed batch of two sequences, 3/4 and 1/4 of B * T
        q = torch.empty(B * T, call.Hq, D, dtype=call.dtype)
        k = torch.empty(B * T, call.Hkv, D, dtype=call.dtype)
        cu = torch.tensor([0, B * T * 3 // 4, B * T], dtype=torch.int32)
        batch = flash._packed(q, k, cu, cu, B * T * 3 // 4, B * T * 3 // 4)
        lse = torch.empty(call.Hq, B * T)
    else:
        q = torch.empty(B, call.Hq, T, D, dtype=call.dtype)
        k = torch.empty(B, call.Hkv, T, D, dtype=call.dtype)
        batch = flash._dense(q, k)
        lse = torch.empty(B, call.Hq, T)
    v = torch.empty_like(k)
    left, right = flash.window_bounds(call.window, call.causal)
    variant = common.Variant(left=left, right=right)
    if call.mods:
        variant = variant._replace(softcap=30.0, sinks=torch.zeros(call.Hq), alibi_slopes=torch.ones(call.Hq))
    if call.dropout:
        variant = variant._replace(dropout_p=0.1, seed=1)
    if call.mask:
        variant = _masked(variant, call)
    scale = D ** -0.5
    with recording() as launches:
        residual = call.dtype != torch.float32  # a training call: the forward keeps O's rounding residual
        o, _, res = flash._run_forward(q, k, v, batch, scale, variant, residual)
        flash._run_backward(q, k, v, o, res, lse, torch.empty_like(q), None, batch, scale, variant,
                            mask_grad=call.mask == "float")
        if call.mask:  # the flash kernels only
            return launches
        if not call.varlen and call.window is None:
            row = common.pow2(min(T, fused.max_seqlen(D, call.dtype)))
            fq, fk = q[:, :, :row], k[:, :, :row]
            whole = variant._replace(left=-1, right=0 if call.causal else -1)  # fused: causal or full only
            fused._run_forward(fq, fk, fk, scale, whole)
            fused._run_backward(fq, fk, fk, lse[:, :, :row], torch.empty_like(fq), None, scale, whole)
            if not call.dropout:  # decoding is inference: no dropout
                decode._run_decode(q[:, :, :1], k, v, torch.full((B,), T, dtype=torch.int32), scale, 4,
                                   variant._replace(left=-1, right=0))
        if call.varlen and not call.dropout:  # serving: a paged cache, appending the new tokens
            # pages of 16: each key's row found through the table; of 256: whole key tiles in a page
            # (the append and merge again the same, which jobs_for builds once by name)
            for page in (16, 256):
                pool = torch.empty(B * T // page + 1, page, call.Hkv, D, dtype=call.dtype)
                table = torch.zeros(2, B * T // page + 1, dtype=torch.int32)
                paged._run_paged(q, pool, pool, table, cu[1:], cu, B * T * 3 // 4, k, k, scale, 4,
                                 variant._replace(right=0))
    return launches


def _masked(variant, call):
    """The variant of a masked call (`Call.mask`): 8 documents of T / 8, as a bool or float
    attn_mask or as mask and score functions (`kernels.mods`), with their block map."""
    T = call.T
    ids = torch.arange(T) // max(1, T // 8)
    visible = ids[:, None] == ids[None, :]                                   # (T, T)
    bm = blockmap.block_map(visible, T, T, causal=call.causal, window=call.window).kernel_tensors()
    if call.mask == "bool":
        return variant._replace(attn_mask=visible, block_map=bm)
    if call.mask == "float":
        return variant._replace(attn_mask=torch.zeros(T, T).masked_fill(~visible, float("-inf")), block_map=bm)
    mask_mod, score_mod = mods.documents(ids), mods.softcap(30.0, device="cpu")
    return variant._replace(mods=common.function_key(mask_mod, score_mod), mask_mod_args=mask_mod.args,
                            score_mod_args=score_mod.args, block_map=bm)


# ----------------------------------------------------------------------------- compile


def compile_like_jit(launch, config=None, target=SM90, **overrides):
    """Compile a launch for `target` (sm_90) through Triton's own binder, as its JIT would for
    these arguments. `config`: (BLOCK_M, BLOCK_N, num_warps, num_stages) for an autotuned
    kernel; `overrides`: constexprs and options replacing the launch's (BLOCK_M=, num_warps=, TMA=)."""
    fn = launch.fn
    kwargs = dict(launch.kwargs)
    if config is not None:
        m, n, w, s = config
        kwargs.update(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=s)
    kwargs.update(overrides)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__)


def _tool(name):
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _loops(ttgir):
    """(loops that load global memory, of them pipelined): a pipelined loop's loads are
    asynchronous copies into a ring of shared-memory buffers, issued stages ahead."""
    loads, pipelined = 0, 0
    for match in re.finditer(r"scf\.for ", ttgir):
        depth, i = 0, re.compile(r"\{\s*\n").search(ttgir, match.end()).start()  # the brace that opens the body
        for j in range(i, len(ttgir)):  # the loop's body: up to its matching brace
            depth += {"{": 1, "}": -1}.get(ttgir[j], 0)
            if depth == 0:
                break
        body = ttgir[i:j]
        if "scf.for " in body:  # an outer loop (dk/dv's over query heads): its inner ones count
            continue
        if re.search(r"tt\.load |tt\.descriptor_load|async_copy_global_to_local|async_tma_copy", body):
            loads += 1
            pipelined += bool(re.search(r"async_copy_global_to_local|async_tma_copy", body))
    return loads, pipelined


def loop_sizes(sass):
    """Instructions in each working loop body of a SASS listing, in program order: a loop is a
    branch back to an earlier address (Triton's loops are not nested here, but for dk/dv's over
    the query heads, which encloses the others); working, it copies global memory to shared or
    multiplies (not the paged kernel's bisection for its sequence, nor spin-waits)."""
    sizes = []
    for addr, target in re.findall(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?BRA\s+(?:`\()?0x([0-9a-f]+)", sass):
        addr, target = int(addr, 16), int(target, 16)
        if target < addr:
            body = sass[sass.find(f"/*{target:04x}*/"):sass.find(f"/*{addr:04x}*/")]
            if re.search(r"\b(LDGSTS|UTMALDG|HMMA|HGMMA|FFMA)\b", body):
                sizes.append((addr - target) // 16 + 1)
    return sizes


@dataclass
class Binary:
    shared: int        # bytes of shared memory per block
    registers: int     # per thread
    spilled: int       # bytes of stack per thread: registers spilled to local memory
    mma: str           # HGMMA (wgmma), HMMA (mma.sync) or FMA (no tensor cores)
    loads: str         # the global loads: UTMALDG, LDGSTS and LDG counts
    loops: str         # loops that load global memory: "pipelined/all"
    instructions: int  # SASS instructions in the binary
    main_loop: int     # instructions in the smallest loop body: the unmasked blocks' steady state
    pipelined: bool    # every loop that loads global memory is software-pipelined


def inspect(compiled):
    """Read a compiled kernel's resources and its SASS."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True,
                               text=True).stdout
        sass = subprocess.run([_tool("cuobjdump"), "--dump-sass", f.name], capture_output=True, text=True).stdout
    regs, stack = re.search(r"REG:(\d+) STACK:(\d+)", usage).groups()
    count = lambda op: len(re.findall(rf"\b{op}\b", sass))
    mma = "HGMMA" if count("HGMMA") else "HMMA" if count("HMMA") else "FMA"
    loads = ", ".join(f"{op} {count(op)}" for op in ("UTMALDG", "LDGSTS", "LDG") if count(op))
    loading, pipelined = _loops(compiled.asm["ttgir"])
    instructions = len(re.findall(r"^\s+/\*[0-9a-f]{4,}\*/", sass, re.M))
    loops = [n for n in loop_sizes(sass) if n > 8]  # not spin-waits on a barrier
    return Binary(compiled.metadata.shared, int(regs), int(stack), mma, loads or "none", f"{pipelined}/{loading}",
                  instructions, min(loops) if loops else 0, loading > 0 and pipelined == loading)


# ----------------------------------------------------------------------------- what to compile


def flash_configs(launch, search):
    """The tiles to compile a flash launch with: the candidates its autotuner keeps (from
    `kernels.tuning`), or with `search` every tile with 4 and 8 warps, 2 and 3 stages."""
    named = {**dict(zip(launch.fn.arg_names, launch.args)), **launch.kwargs}
    kernel = launch.name.split("-")[1]
    if search:
        return [(m, n, w, s) for m, n in SEARCH_TILES for w in (4, 8) for s in (2, 3)]
    return tuning.candidates(kernel, named["Q"].element_size(), named["BLOCK_D"], named["q_bucket"], named["k_bucket"])


def jobs_for(call, kernels, search=False, tma=False, limit=None):
    """[(index, launch, config, overrides)]: every binary to build for this call, the launch
    being the index-th of `launches_of(call)`."""
    jobs, seen = [], set()
    for index, launch in enumerate(launches_of(call)):
        if launch.name not in kernels or launch.name in seen:  # the fused backward's dk/dv is flash's again
            continue
        seen.add(launch.name)
        if isinstance(launch.kernel, Autotuner) or launch.name in ("flash-fwd", "flash-dq", "flash-dkdv"):
            for config in flash_configs(launch, search)[:limit]:
                jobs.append((index, launch, config, {}))
                if tma and launch.name == "flash-fwd":
                    jobs.append((index, launch, config, {"TMA": True}))
        elif launch.name.startswith("fused") and search:
            jobs += [(index, launch, None, dict(BLOCK_M=m, num_warps=w)) for m, w in ROW_CANDIDATES]
        else:
            jobs.append((index, launch, None, {}))
    return jobs


def describe(call, launch, config, overrides):
    kw = {**launch.kwargs, **overrides}
    if config is not None:
        m, n, w, s = config
        tile = f"{m}x{n} w{w} s{s}"
    else:
        tile = f"{kw.get('BLOCK_M')}x{kw.get('ROW', kw.get('BLOCK_N', '-'))} w{kw.get('num_warps', 4)}"
    mask = "window" if call.window else "causal" if call.causal else "full"
    variant = ("varlen " if call.varlen else "") + ("mods " if call.mods else "") + (
        "dropout " if call.dropout else "") + (f"{call.mask} " if call.mask else "") + ("tma" if kw.get("TMA") else "")
    return dict(kernel=launch.name, dtype=str(call.dtype).replace("torch.", ""), D=call.D, T=call.T,
                group=call.Hq // call.Hkv, mask=mask, tile=tile, variant=variant.strip())


def _build(job):
    call, index, config, overrides = job
    launch = launches_of(call)[index]
    try:
        return asdict(inspect(compile_like_jit(launch, config, **overrides)))
    except Exception as e:  # a tile that cannot compile is a finding, not a crash of the sweep
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"}


def run(calls, kernels, search=False, tma=False, limit=None, jobs=1):
    """Compile every binary of these calls; yield (description, binary fields) as they finish."""
    work = []
    for call in calls:
        for index, launch, config, overrides in jobs_for(call, kernels, search, tma, limit):
            work.append((describe(call, launch, config, overrides), (call, index, config, overrides)))
    if jobs > 1:
        # spawned, not forked: a fork of a process that has started torch's threads can hang
        with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            yield from zip((w[0] for w in work), pool.map(_build, [w[1] for w in work]))
    else:
        for desc, job in work:
            yield desc, _build(job)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--kernel", nargs="+", default=KERNELS, choices=KERNELS)
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["float16", "bfloat16", "float32"])
    p.add_argument("--head-dims", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seq", type=int, default=4096, help="T of the call (default 4096)")
    p.add_argument("--gqa", type=int, default=1, help="query heads per k/v head (default 1)")
    p.add_argument("--full", action="store_true", help="full attention instead of causal")
    p.add_argument("--window", type=int, default=None, help="a causal sliding window of this many keys")
    p.add_argument("--varlen", action="store_true", help="a packed batch instead of (B, H, T, D) tensors")
    p.add_argument("--tma", action="store_true", help="flash-fwd: also compile each tile with TMA loads")
    p.add_argument("--mods", action="store_true", help="with a soft-cap, attention sinks and ALiBi slopes")
    p.add_argument("--dropout", action="store_true", help="flash and fused: with attention dropout")
    p.add_argument("--mask", choices=["bool", "float", "function"], default=None,
                   help="flash: a bool or float attn_mask (and its gradient), or mask and score functions, "
                        "each with a block map")
    p.add_argument("--search", action="store_true", help="every tile (flash) or ROW_CANDIDATES (fused)")
    p.add_argument("--limit", type=int, default=None, help="flash: only the first N candidates")
    p.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    p.add_argument("--json", action="store_true", help="one JSON object per binary instead of a table")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("unset TRITON_INTERPRET: this compiles for the GPU")

    calls = [Call(getattr(torch, d), D, args.seq, Hq=16, Hkv=16 // args.gqa, causal=not args.full,
                  window=(args.window, 0) if args.window else None, varlen=args.varlen, mods=args.mods,
                  dropout=args.dropout, mask=args.mask)
             for d in args.dtype for D in args.head_dims]
    over = False
    if not args.json:
        print(f"{'kernel':17} {'dtype':8} {'D':>4} {'mask':6} {'tile':15} {'variant':11} {'shared':>7} "
              f"{'regs':>4} {'spill':>5} {'mma':5} {'loops':5} {'instr':>6} {'main':>5}  loads", flush=True)
    for desc, binary in run(calls, args.kernel, args.search, args.tma, args.limit, args.jobs):
        over |= binary.get("shared", 0) > SHARED_LIMIT
        if args.json:
            print(json.dumps({**desc, **binary}), flush=True)
        elif "error" in binary:
            print(f"{desc['kernel']:17} {desc['dtype']:8} {desc['D']:4} {desc['mask']:6} {desc['tile']:15} "
                  f"{desc['variant']:11} {binary['error']}", flush=True)
        else:
            flag = "  OVER THE SHARED-MEMORY LIMIT" if binary["shared"] > SHARED_LIMIT else ""
            print(f"{desc['kernel']:17} {desc['dtype']:8} {desc['D']:4} {desc['mask']:6} {desc['tile']:15} "
                  f"{desc['variant']:11} {binary['shared'] // 1024:>5}Ki {binary['registers']:4} "
                  f"{binary['spilled']:5} {binary['mma']:5} {binary['loops']:5} {binary['instructions']:6} "
                  f"{binary['main_loop']:5}  "
                  f"{binary['loads']}{flag}", flush=True)
    sys.exit(1 if over else 0)


if __name__ == "__main__":
    main()
