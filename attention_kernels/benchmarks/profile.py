"""
Profile one shape of one implementation: warm up (a GPU autotunes here), then run a few
iterations under torch.profiler, each inside an NVTX range, write a Chrome trace and print a
per-kernel summary.

    python -m attention_kernels.benchmarks.profile --impl flash --mode fwd+bwd -B 4 -T 4096 -C 2048 -H 16
    python -m attention_kernels.benchmarks.profile --impl flash --mode fwd --ncu      # print the ncu command line
    python -m attention_kernels.benchmarks.profile --impl flash --proton              # Triton's proton, if installed

Open the trace (default profile-<impl>-<mode>.json) in https://ui.perfetto.dev or
chrome://tracing. `--ncu` prints the Nsight Compute command that captures one launch of the
impl's Triton kernel inside the profiled range (so after warm-up and autotuning), and exits.
Defaults: B=4, T=4096, C=2048, H=16 (D=128) on a GPU; B=1, T=64, C=64, H=2 on the CPU, where the
kernels run under Triton's interpreter and the times say nothing about GPU speed.
"""

import argparse
import contextlib
import shlex
import sys

import torch

from .impls import DEVICE, IMPLS, make_call  # first: sets up the interpreter on a CPU
from .sweep import DTYPES, check_shape, positive

# The Triton kernel `--ncu` captures for each of our impls and modes (for SDPA and the
# reference: the first kernel in the range)
KERNEL_NAMES = {
    ("flash", "fwd"): "_flash_fwd", ("flash", "bwd"): "_flash_bwd_dkdv", ("flash", "fwd+bwd"): "_flash_fwd",
    ("fused", "fwd"): "_fused_fwd", ("fused", "bwd"): "_fused_bwd_dq", ("fused", "fwd+bwd"): "_fused_fwd",
}
RANGE = "profiled"  # the NVTX range around the profiled iterations


def nvtx_range(name):
    return torch.cuda.nvtx.range(name) if DEVICE == "cuda" else contextlib.nullcontext()


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def ncu_command(args):
    kernel = KERNEL_NAMES.get((args.impl, args.mode))
    pick = f"-k regex:{kernel} " if kernel else ""
    rest = ["--impl", args.impl, "--mode", args.mode, "-B", args.batch, "-T", args.seqlen, "-C", args.width,
            "-H", args.heads, "--dtype", args.dtype, "--causal", args.causal, "--warmup", args.warmup,
            "--iters", 1, "--no-trace"]
    name = f"{args.impl}-{args.mode.replace('+', '')}-B{args.batch}-T{args.seqlen}-D{args.width // args.heads}"
    return (f"ncu --nvtx --nvtx-include {RANGE}/ {pick}--launch-count 1 --set full -o {name} "
            f"{shlex.quote(sys.executable)} -m attention_kernels.benchmarks.profile {shlex.join(map(str, rest))}")


def run_proton(call, args):
    try:
        import triton.profiler as proton
        name = f"proton-{args.impl}-{args.mode.replace('+', '')}"
        proton.start(name, hook="triton")
    except Exception as e:  # noqa: BLE001  not installed, or no GPU for it to watch
        print(f"proton: not available here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        return
    for _ in range(args.iters):
        with proton.scope(f"{args.impl}/{args.mode}"):
            call()
    sync()
    proton.finalize()
    print(f"proton: wrote {name}.hatchet; view it with: proton-viewer -m time/ms {name}.hatchet")


def main(argv=None):
    gpu = DEVICE == "cuda"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--impl", default="flash", choices=list(IMPLS))
    p.add_argument("--mode", default="fwd+bwd", choices=["fwd", "bwd", "fwd+bwd"])
    p.add_argument("-B", "--batch", type=positive(int), default=4 if gpu else 1)
    p.add_argument("-T", "--seqlen", type=positive(int), default=4096 if gpu else 64)
    p.add_argument("-C", "--width", type=positive(int), default=2048 if gpu else 64)
    p.add_argument("-H", "--heads", type=positive(int), default=16 if gpu else 2)
    p.add_argument("--dtype", default="bf16", choices=list(DTYPES))
    p.add_argument("--causal", choices=["yes", "no"], default="yes")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=positive(int), default=5)
    p.add_argument("--out", help="Chrome trace path (default profile-<impl>-<mode>.json)")
    p.add_argument("--no-trace", action="store_true", help="skip torch.profiler (for ncu runs)")
    p.add_argument("--ncu", action="store_true", help="print the ncu command line for this shape and exit")
    p.add_argument("--proton", action="store_true", help="also profile with Triton's proton")
    args = p.parse_args(argv)
    check_shape(args.batch, args.seqlen, args.width, args.heads)
    if args.ncu:
        print(ncu_command(args))
        return

    B, T, H, D = args.batch, args.seqlen, args.heads, args.width // args.heads
    print(f"{args.impl} {args.mode}: B={B} H={H} T={T} D={D} {args.dtype} causal={args.causal} on "
          f"{torch.cuda.get_device_name() if gpu else 'the CPU (Triton interpreter: not GPU timings)'}")
    call = make_call(args.impl, B, H, T, D, DTYPES[args.dtype], args.causal == "yes", args.mode, seed=0)
    with nvtx_range("warmup"):
        for _ in range(args.warmup):
            call()
    sync()

    if not args.no_trace:
        activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if gpu else [])
        with torch.profiler.profile(activities=activities) as prof, nvtx_range(RANGE):
            for i in range(args.iters):
                with nvtx_range(f"iter {i}"), torch.profiler.record_function(f"{args.impl}/{args.mode}"):
                    call()
            sync()
        out = args.out or f"profile-{args.impl}-{args.mode.replace('+', '')}.json"
        prof.export_chrome_trace(out)
        sort = "cuda_time_total" if gpu else "cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=15))
        print(f"wrote the Chrome trace {out} ({args.iters} iterations after {args.warmup} warm-up); "
              "open it in https://ui.perfetto.dev")
    else:
        with nvtx_range(RANGE):
            for _ in range(args.iters):
                call()
        sync()
    if args.proton:
        run_proton(call, args)


if __name__ == "__main__":
    main()
