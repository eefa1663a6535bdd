"""
The benchmark sweep: each implementation over batch B, sequence length T, model width C and head
count H (head dim D = C / H), dtype, causal or not, and mode (fwd, bwd, fwd+bwd), against every
backend of torch's `scaled_dot_product_attention` in the same run.

    python -m attention_kernels.benchmarks.sweep                     # `standard` preset on a GPU, `scaling` on the CPU
    python -m attention_kernels.benchmarks.sweep --preset scaling    # T doubling: time and memory growth
    python -m attention_kernels.benchmarks.sweep -B 4 -T 1024 4096 -C 2048 -H 16 32 --mode fwd --impl flash sdpa-flash

Presets (shapes as (B, T, C, H)):
    standard   the FlashAttention papers' shapes: B * T = 16k tokens, C = 2048, H = 32 and 16
               (D = 64 and 128), T from 512 to 16k. GPU only.
    seed       B = 4, T = 8, C = 16, H = 4: the project's founding example, one shape.
    scaling    T doubling from 128 to 32k at B = 1, C = 1024, H = 16 (D = 64): quadratic memory
               for the reference, linear for flash. On the CPU, T from 16 to 256 at C = 32, H = 2
               (about a minute on 2 cores), the default there: it shows how time and memory grow.
Instead of a preset, flags -B, -T, -C, -H (lists; missing ones default to B 1, T 1024, C 1024,
H 16) give the product of their values; --tokens N sets B = N // T for each T.

Writes into --out (default runs/sweep-<time>/): sweep.csv, one row per impl x shape x dtype x
causal x mode (schema in CSV_FIELDS); tflops.png, time.png and memory.png against T, made from the CSV
(`python -m attention_kernels.benchmarks.plots sweep.csv` redraws them); log.txt, everything printed. The printed
table gives each impl's speed as a ratio to the fastest SDPA backend on the same row. An impl
that refuses a shape is recorded as unsupported, out-of-memory as oom; the sweep goes on. It
exits 1 if an implementation failed in any other way.
"""

import argparse
import csv
import datetime
import importlib.util
import os
import subprocess
import sys
import time

import torch

from .impls import DEVICE, IMPLS, is_sdpa, make_call, refusal  # first: sets up the interpreter on a CPU
from .measure import MODES, ceilings, flops, min_bytes, peak_mib, time_ms

PRESETS = {
    "standard": [(16384 // T, T, 2048, H) for H in (32, 16) for T in (512, 1024, 2048, 4096, 8192, 16384)],
    "seed": [(4, 8, 16, 4)],
    "scaling": [(1, 2**i, 1024, 16) for i in range(7, 16)],
}
CPU_SCALING = [(1, T, 32, 2) for T in (16, 32, 64, 128, 256)]  # the interpreter runs ~1 s a call at T = 512
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CSV_FIELDS = ["impl", "B", "H", "T", "D", "C", "dtype", "causal", "mode", "status",
              "ms_p20", "ms_p50", "ms_p80", "tflops", "gbps", "peak_mib",
              "frac_matmul_ceiling", "frac_copy_ceiling", "vs_best_sdpa",
              "device", "torch", "triton", "commit", "timestamp"]
CPU_NOTE = ("NOTE: no CUDA GPU, so the kernels run under Triton's CPU interpreter (numpy). These "
            "timings say nothing about GPU speed; they show the sweep's flow end to end.")


# ----------------------------------------------------------------------------- shapes


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def shapes_from(args):
    """The (B, T, C, H) list: a preset's, or the product of the flags'."""
    if not any((args.batch, args.seqlen, args.width, args.heads, args.tokens)):
        preset = args.preset or ("standard" if DEVICE == "cuda" else "scaling")
        if DEVICE == "cpu" and preset == "standard":
            raise SystemExit("the standard preset needs a GPU (T up to 16k under the CPU interpreter would "
                             "take hours); on the CPU use --preset scaling (the default there) or --preset seed")
        return CPU_SCALING if (DEVICE == "cpu" and preset == "scaling") else PRESETS[preset]
    if args.preset:
        raise SystemExit("give either --preset or shape flags (-B, -T, -C, -H, --tokens), not both: "
                         "the flags replace the preset's shapes")
    if args.tokens and args.batch:
        raise SystemExit("give either -B/--batch or --tokens (which sets B = tokens // T), not both")
    shapes = []
    for T in args.seqlen or [1024]:
        for B in ([max(1, args.tokens // T)] if args.tokens else args.batch or [1]):
            for C in args.width or [1024]:
                for H in args.heads or [16]:
                    shapes.append((B, T, C, H))
    return shapes


def positive(kind):
    """An argparse type: kind(text) if above 0, else argparse's usage error (exit 2)."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


def check_shape(B, T, C, H):
    if C % H:
        raise SystemExit(f"H={H} does not divide C={C}: the head dim D = C / H must be a whole number. "
                         f"For C={C}, H may be one of {divisors(C)}")
    if C // H > 256:
        raise SystemExit(f"C={C}, H={H} gives head dim D={C // H}; the kernels take D up to 256")


# ----------------------------------------------------------------------------- one row


def run_row(impl, B, H, T, D, dtype, causal, mode, seed):
    """(status, (p20, p50, p80) ms, peak MiB) of one implementation on one shape and mode."""
    try:
        call = make_call(impl, B, H, T, D, dtype, causal, mode, seed)
        ms = time_ms(call)     # first: a GPU's autotuning happens in its warm-up
        peak = peak_mib(call)
        return "ok", ms, peak
    except Exception as e:  # noqa: BLE001  recorded, and the sweep goes on
        if DEVICE == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
            return "oom", None, None
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        if refusal(e):
            return f"unsupported: {first_line}", None, None
        return f"error: {type(e).__name__}: {first_line}", None, None
    finally:
        call = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- the run


class Progress:
    """A one-line progress bar with an ETA, on stderr."""

    def __init__(self, total):
        self.total, self.done, self.start = total, 0, time.perf_counter()
        self.tty = sys.stderr.isatty()  # redrawn in place on a terminal; else a line every 10%

    def step(self, label):
        self.done += 1
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        bar = "#" * (30 * self.done // self.total)
        line = f"[{bar:<30}] {self.done}/{self.total} {_clock(elapsed)} elapsed, ETA {_clock(eta)}  {label:<50.50}"
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if self.done == self.total else ""))
        elif self.done % max(1, self.total // 10) == 0 or self.done == self.total:
            sys.stderr.write(line.rstrip() + "\n")
        sys.stderr.flush()


def _clock(seconds):
    return str(datetime.timedelta(seconds=round(seconds)))


def environment():
    """What every CSV row records about where it was measured."""
    import triton
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (Triton interpreter)"
    return dict(device=name, torch=torch.__version__, triton=triton.__version__, commit=commit,
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def fmt(x, spec):
    """x right-aligned in the spec's width with at least one space before it; blank if None."""
    width = int(spec.split(".")[0])
    return (" " + format(x, spec[len(str(width)):])).rjust(width) if x is not None else " " * width


def run_log(out_dir):
    """Make out_dir and return say(line), which prints the line and appends it to out_dir/log.txt;
    say.close() closes the log."""
    os.makedirs(out_dir, exist_ok=True)
    log = open(os.path.join(out_dir, "log.txt"), "w")

    def say(line=""):
        print(line)
        log.write(line + "\n")
        log.flush()
    say.close = log.close
    return say


def sweep(shapes, dtypes, causals, modes, impls, out_dir, plots=True):
    """Run every row, write out_dir/sweep.csv, log.txt and the plots; return the rows."""
    say = run_log(out_dir)
    env = environment()
    say(f"attention sweep on {env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    say(" ".join(sys.argv))
    if DEVICE == "cpu":
        say(CPU_NOTE)
    tflops_ceiling, gbps_ceiling, what = ceilings()
    say(f"ceilings: {tflops_ceiling:.1f} TFLOP/s, {gbps_ceiling:.0f} GB/s ({what})")

    rows, failed = [], False
    progress = Progress(len(shapes) * len(dtypes) * len(causals) * len(modes) * len(impls))
    csv_file = open(os.path.join(out_dir, "sweep.csv"), "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    writer.writeheader()
    seed = 0
    for B, T, C, H in shapes:
        D = C // H
        for dtype_name, dtype in dtypes.items():
            for causal in causals:
                for mode in modes:
                    group = []
                    for impl in impls:
                        seed += 1
                        progress.step(f"{impl} {mode} B={B} T={T} C={C} H={H} {dtype_name}")
                        status, ms, peak = run_row(impl, B, H, T, D, dtype, causal, mode, seed)
                        failed |= status.startswith("error")
                        row = dict(impl=impl, B=B, H=H, T=T, D=D, C=C, dtype=dtype_name, causal=causal, mode=mode,
                                   status=status, **env)
                        if ms:
                            work, traffic = flops(B, H, T, T, D, causal, mode), min_bytes(B, H, T, T, D, dtype.itemsize, mode)
                            tflops, gbps = work / ms[1] * 1e-9, traffic / ms[1] * 1e-6
                            row.update(ms_p20=ms[0], ms_p50=ms[1], ms_p80=ms[2], tflops=tflops, gbps=gbps,
                                       peak_mib=peak, frac_matmul_ceiling=tflops / tflops_ceiling,
                                       frac_copy_ceiling=gbps / gbps_ceiling)
                        group.append(row)
                    # each impl's speed against the fastest SDPA backend of the same shape and mode
                    sdpa = [r["ms_p50"] for r in group if is_sdpa(r["impl"]) and r.get("ms_p50")]
                    for row in group:
                        if sdpa and row.get("ms_p50"):
                            row["vs_best_sdpa"] = min(sdpa) / row["ms_p50"]
                        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
                    csv_file.flush()
                    rows += group
    csv_file.close()

    say()
    say(f"{'mode':8}{'causal':7}{'dtype':6}{'B':>4}{'H':>4}{'T':>7}{'D':>5}  {'impl':15}{'ms p50':>10}"
        f"{'TFLOP/s':>10}{'GB/s':>9}{'peak MiB':>10}{'x SDPA':>8}  status")
    for r in rows:
        say(f"{r['mode']:8}{str(r['causal']):7}{r['dtype']:6}{r['B']:>4}{r['H']:>4}{r['T']:>7}{r['D']:>5}  "
            f"{r['impl']:15}{fmt(r.get('ms_p50'), '10.4g')}{fmt(r.get('tflops'), '10.3g')}{fmt(r.get('gbps'), '9.3g')}"
            f"{fmt(r.get('peak_mib'), '10.3g')}{fmt(r.get('vs_best_sdpa'), '8.3g')}  {r['status']}")
    say("x SDPA: the fastest SDPA backend's time on the same row divided by this impl's (above 1 is faster)")
    if DEVICE == "cpu":
        say(CPU_NOTE)
    if plots:
        from .plots import plot
        for path in plot(os.path.join(out_dir, "sweep.csv"), out_dir):
            say(f"wrote {path}")
    say(f"wrote {os.path.join(out_dir, 'sweep.csv')} ({len(rows)} rows) and {os.path.join(out_dir, 'log.txt')}")
    say.close()
    return rows, failed


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--preset", choices=list(PRESETS), help="default: standard on a GPU, scaling on the CPU")
    p.add_argument("-B", "--batch", type=positive(int), nargs="+")
    p.add_argument("-T", "--seqlen", type=positive(int), nargs="+")
    p.add_argument("-C", "--width", type=positive(int), nargs="+", help="model width C = H * D")
    p.add_argument("-H", "--heads", type=positive(int), nargs="+")
    p.add_argument("--tokens", type=positive(int), help="tokens per batch: B = tokens // T")
    p.add_argument("--dtype", nargs="+", default=["bf16"], choices=list(DTYPES))
    p.add_argument("--causal", choices=["yes", "no", "both"], default="both")
    p.add_argument("--mode", nargs="+", default=["fwd", "fwd+bwd"], choices=list(MODES))
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=list(IMPLS))
    p.add_argument("--out", help="output folder (default: runs/sweep-<time>)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        p.error("the plots need matplotlib: pip install -e '.[bench]' (or pass --no-plots)")

    shapes = shapes_from(args)
    for shape in shapes:
        check_shape(*shape)
    causals = {"yes": [True], "no": [False], "both": [True, False]}[args.causal]
    out = args.out or os.path.join("runs", "sweep-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    _, failed = sweep(shapes, {d: DTYPES[d] for d in args.dtype}, causals, args.mode, args.impl, out,
                      plots=not args.no_plots)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
