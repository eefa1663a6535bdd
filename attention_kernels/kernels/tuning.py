"""
Which tiles the flash kernels launch with, on a GPU.

Two tables:
  - `CANDIDATES`: the tiles the autotuner may time for a shape class, chosen by compiling each for
    sm_90 the way the JIT specialises a real launch (`python -m attention_kernels.benchmarks.onchip --search`) and
    keeping those that run on wgmma (HGMMA) with no register spills, and 16-row tiles only where
    the queries (or keys) are too few for more.
  - `kernels/tuned.json`: the tile measured fastest, per GPU name and shape class, written by a
    GPU run (`python -m attention_kernels.benchmarks.gpu_check --out DIR`, then `python -m attention_kernels.kernels.tuning merge
    DIR/tuned.json`), never by hand. The launchers read it first; a class it lacks is autotuned
    among the candidates on its first launch. ATTENTION_KERNELS_AUTOTUNE=1 times the candidates
    of every class, measured or not; ATTENTION_KERNELS_AUTOTUNE=0 never times: the table's tile,
    else the class's first candidate (one compile per class: quick checks, tests).

A shape class: kernel, dtype, head dim rounded up to a power of two, Tq and Tk rounded up to
powers of two, the mask (causal, full, or a window and its span), the query heads per k/v head,
packed or not, and for the forward whether it loads through TMA.

    python -m attention_kernels.kernels.tuning show                 # the measured table
    python -m attention_kernels.kernels.tuning merge DIR/tuned.json # add a GPU run's measurements to it
"""

import argparse
import functools
import json
import os
import sys

import torch

TUNED_FILE = os.path.join(os.path.dirname(__file__), "tuned.json")
AUTOTUNE_ENV = "ATTENTION_KERNELS_AUTOTUNE"  # "1": time the candidates, table or not; "0": never time

# ----------------------------------------------------------------------------- candidates

# (BLOCK_M, BLOCK_N, num_warps, num_stages) by kernel and (dtype size, BLOCK_D). BLOCK_M counts
# query rows and BLOCK_N keys in every kernel: fwd and dq keep BLOCK_M query rows resident and
# loop over key blocks; dk/dv keeps BLOCK_N keys resident and loops over query blocks.
# Figures: registers, bytes spilled, MMA kind, for bf16 with (B, H, T, D) = (2, 16, 4096, D)
# compiled with Triton 3.6 for sm_90 (`python -m attention_kernels.benchmarks.onchip --search`).
CANDIDATES = {
    "fwd": {
        (2, 64): [
            (128, 128, 8, 3),  # 231 regs, 0 B, HGMMA
            (128, 64, 8, 3),   # 161 regs, 0 B, HGMMA
            (64, 64, 4, 3),    # 153 regs, 0 B, HGMMA
            (64, 32, 4, 3),    # HGMMA; area 64 x 32: short keys only
            (16, 64, 4, 2),    # HMMA (16 rows is below wgmma's 64): few queries only (decoding)
            (16, 32, 4, 2),
        ],
        (2, 128): [
            (128, 128, 8, 2),  # 255 regs, 0 B, HGMMA, 160 KiB
            (128, 128, 8, 3),  # 253 regs, 0 B, HGMMA, 224 KiB: a third stage just fits
            (128, 64, 8, 3),   # 212 regs, 0 B, HGMMA
            (64, 64, 8, 3),    # 172 regs, 0 B, HGMMA
            (64, 32, 8, 3),    # short keys only
            (16, 32, 4, 2),    # HMMA: few queries only
        ],
        (2, 256): [
            (128, 64, 8, 2),   # 254 regs, 0 B, HGMMA, 192 KiB
            (128, 32, 8, 3),   # 224 regs, 0 B, HGMMA
            (64, 64, 8, 2),    # 234 regs, 0 B, HGMMA
            (16, 32, 8, 2),    # HMMA: few queries only
        ],
        # fp32: IEEE dots run on FMA units (no tensor cores); small tiles that do not spill
        (4, 64): [(32, 32, 4, 2), (16, 32, 8, 2)],
        (4, 128): [(16, 32, 8, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
    "dq": {
        (2, 64): [
            (128, 64, 8, 3),   # 169 regs, 0 B, HGMMA
            (128, 32, 8, 3),   # 92 regs, 0 B, HGMMA
            (64, 64, 8, 3),    # 141 regs, 0 B, HGMMA
            (64, 32, 4, 3),    # short keys only
            (16, 32, 4, 2),    # HMMA: few queries only
        ],
        (2, 128): [
            (128, 64, 8, 2),   # 228 regs, 0 B, HGMMA
            (128, 32, 8, 2),   # 134 regs, 0 B, HGMMA
            (64, 64, 8, 2),    # 213 regs, 0 B, HGMMA
            (16, 32, 4, 2),    # HMMA: few queries only
        ],
        (2, 256): [
            (128, 32, 8, 2),   # 223 regs, 0 B, HGMMA; every larger tile spills
            (64, 32, 8, 2),    # 212 regs, 0 B, HGMMA; short keys only
            (16, 32, 8, 2),    # HMMA: few queries only
        ],
        (4, 64): [(32, 32, 4, 2), (16, 32, 4, 2)],
        (4, 128): [(32, 32, 8, 2), (16, 32, 4, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
    "dkdv": {  # BLOCK_N keys resident (the wgmma rows), BLOCK_M queries a step
        (2, 64): [
            (64, 128, 8, 2),   # 210 regs, 0 B, HGMMA
            (32, 128, 8, 2),   # 170 regs, 0 B, HGMMA
            (64, 64, 8, 3),    # 186 regs, 0 B, HGMMA
            (16, 64, 4, 2),    # HGMMA: few queries only
            (16, 32, 4, 2),    # HMMA: few keys only
        ],
        (2, 128): [
            (64, 128, 8, 2),   # 246 regs, 0 B, HGMMA
            (32, 128, 8, 2),   # 212 regs, 0 B, HGMMA
            (64, 64, 8, 2),    # 220 regs, 0 B, HGMMA
            (16, 128, 8, 2),   # 224 regs, 0 B, HGMMA: few queries only
            (16, 32, 8, 2),    # HMMA: few keys only
        ],
        (2, 256): [  # dK and dV for 64 keys of 256 dims are 128 fp32 registers a thread: no
            (16, 64, 8, 2),    # HGMMA tile fits without spilling; 8 B spilled, HGMMA
            (64, 32, 8, 2),    # 205 regs, 0 B, HMMA
            (16, 32, 8, 2),    # 168 regs, 0 B, HMMA
        ],
        (4, 64): [(16, 32, 4, 2)],
        (4, 128): [(16, 32, 8, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
}
SHORT = 64  # a length bucket at most this is short: small tiles may win there, and only there


def t_bucket(T):
    """A length as the autotuner and the tables key it: rounded up to a power of two, 16 to 16384."""
    return min(max(16, 1 << max(0, int(T) - 1).bit_length()), 16384)


def window_key(left, right, Tk):
    """How many keys a window spans (an unbounded side counts as Tk), rounded up to a power of
    two: the autotuner's key for the mask, so causal, full and narrow windows differ."""
    side = lambda w: w if 0 <= w < Tk else Tk
    return max(16, 1 << (side(left) + side(right)).bit_length())


def candidates(kernel, itemsize, block_d, q_bucket=16384, k_bucket=16384):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may time for this shape class:
    the class's list without tiles longer than the sequences (if none is that short, the
    smallest), and without tiles smaller than 64 x 64 unless a sequence is short (at most
    `SHORT`): small tiles only pay where a few queries (decoding) or keys leave nothing larger."""
    every = CANDIDATES[kernel][(itemsize, max(64, block_d))]
    fits = [c for c in every if c[0] <= q_bucket and c[1] <= k_bucket]
    if not fits:
        return [min(every, key=lambda c: c[0] * c[1])]
    large = [c for c in fits if c[0] * c[1] >= 64 * 64 or min(q_bucket, k_bucket) <= SHORT]
    return large or fits


# ----------------------------------------------------------------------------- shape classes


def mask_name(left, right, Tq, Tk):
    """"causal", "full" or "window<span>" for a window as the kernels take it (`window_args`:
    an unbounded side is Tq + Tk)."""
    unbounded = Tq + Tk
    if left >= unbounded and right == 0:
        return "causal"
    if left >= unbounded and right >= unbounded:
        return "full"
    return f"window{window_key(left if left < unbounded else -1, right if right < unbounded else -1, Tk)}"


def shape_class(kernel, args):
    """The measured table's key for one launch, from the kernel's arguments by name."""
    dtype = str(args["Q"].dtype).replace("torch.", "")
    mask = mask_name(args["left"], args["right"], args["Tq"], args["Tk"])
    layout = "varlen" if args["VARLEN"] else "dense"
    name = f"{kernel} {dtype} d{args['BLOCK_D']} q{args['q_bucket']} k{args['k_bucket']} {mask} g{args['GROUP']} {layout}"
    return name + (" tma" if args.get("TMA") else "")


@functools.lru_cache(maxsize=None)
def measured():
    """The measured table: {GPU name: {shape class: entry}}, entry {"config": [BLOCK_M, BLOCK_N,
    num_warps, num_stages], "ms": ..., "run": ...}."""
    if not os.path.exists(TUNED_FILE):
        return {}
    with open(TUNED_FILE) as f:
        return json.load(f)


_extra = {}  # entries installed in this process (`use`): a GPU run times with what it just tuned


def use(table):
    """Install measured entries ({GPU name: {class: entry}}) for this process, ahead of the file's."""
    for gpu, entries in table.items():
        _extra.setdefault(gpu, {}).update(entries)


@functools.lru_cache(maxsize=None)
def device_name(index):
    return torch.cuda.get_device_name(index)


def lookup(kernel, args):
    """The measured (BLOCK_M, BLOCK_N, num_warps, num_stages) for this launch's class on this
    GPU, or None: not measured, not on a GPU, or ATTENTION_KERNELS_AUTOTUNE=1."""
    q = args["Q"]
    if os.environ.get(AUTOTUNE_ENV) == "1" or not q.is_cuda:
        return None
    gpu, cls = device_name(q.device.index or 0), shape_class(kernel, args)
    entry = _extra.get(gpu, {}).get(cls) or measured().get(gpu, {}).get(cls)
    return tuple(entry["config"]) if entry else None


def choose(kernel, args):
    """The tiles the autotuner may time for one launch: the measured one if there is one, else
    the class's candidates (only the first with ATTENTION_KERNELS_AUTOTUNE=0)."""
    # a v head dim other than q's (MLA) is not in the measured table, and its wider side sizes the tiles
    wide = max(args["BLOCK_D"], args.get("BLOCK_DV", 0))
    best = lookup(kernel, args) if wide == args["BLOCK_D"] == args.get("BLOCK_DV", wide) else None
    if best is not None:
        return [best]
    kept = candidates(kernel, args["Q"].element_size(), wide, args["q_bucket"], args["k_bucket"])
    return kept[:1] if os.environ.get(AUTOTUNE_ENV) == "0" else kept


def merge(path, into=TUNED_FILE):
    """Add a GPU run's measured entries to the table (a newer run's entry replaces an older one)."""
    with open(path) as f:
        new = json.load(f)
    table = json.load(open(into)) if os.path.exists(into) else {}
    count = 0
    for gpu, entries in new.items():
        for cls, entry in entries.items():
            if not (isinstance(entry.get("config"), list) and len(entry["config"]) == 4):
                raise ValueError(f"{path}: entry {gpu!r} / {cls!r} has no [BLOCK_M, BLOCK_N, warps, stages] config")
            table.setdefault(gpu, {})[cls] = entry
            count += 1
    with open(into, "w") as f:
        json.dump({gpu: dict(sorted(e.items())) for gpu, e in sorted(table.items())}, f, indent=1)
        f.write("\n")
    measured.cache_clear()
    return count


def main(argv=None):
    p = argparse.ArgumentParser(description="The flash kernels' measured tile table.")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("show", help="print the measured table")
    m = sub.add_parser("merge", help="add a GPU run's tuned.json to kernels/tuned.json")
    m.add_argument("path")
    args = p.parse_args(argv)
    if args.command == "merge":
        if not os.path.exists(args.path):
            sys.exit(f"no such file: {args.path}")
        print(f"merged {merge(args.path)} entries into {TUNED_FILE}")
    else:
        table = measured()
        if not table:
            print(f"{TUNED_FILE}: no measurements yet (run benchmarks.gpu_check on a GPU)")
        for gpu, entries in table.items():
            print(gpu)
            for cls, entry in entries.items():
                print(f"  {cls:60} {entry['config']}  {entry.get('ms', '?')} ms  ({entry.get('run', '?')})")


if __name__ == "__main__":
    main()
