"""
Plots made from a sweep's CSV: TFLOP/s against T per implementation, and peak memory against T.
One panel per (mode, causal, dtype, D); rows that did not run (unsupported, oom) are left out.

    python -m benchmarks.plots runs/sweep-<time>/sweep.csv [--out DIR]
"""

import argparse
import csv
import os
from collections import defaultdict


def read(csv_path):
    with open(csv_path, newline="") as f:
        return [r for r in csv.DictReader(f) if r["status"] == "ok"]


def _panels(rows, value):
    """{(mode, causal, dtype, D): {impl: [(T, value), ...]}} sorted by T."""
    panels = defaultdict(lambda: defaultdict(list))
    for r in rows:
        key = (r["mode"], r["causal"], r["dtype"], int(r["D"]))
        panels[key][r["impl"]].append((int(r["T"]), float(r[value])))
    for lines in panels.values():
        for points in lines.values():
            points.sort()
    return dict(sorted(panels.items()))


def _figure(panels, ylabel, title, path, logy=False):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, ((mode, causal, dtype, D), lines) in zip(axes.flat, panels.items()):
        for impl, points in sorted(lines.items()):
            ts, ys = zip(*points)
            ax.plot(ts, ys, marker="o", label=impl, linestyle="--" if impl.startswith("sdpa") else "-")
        ax.set_xscale("log", base=2)
        if logy:
            ax.set_yscale("log", base=2)
        ax.set_title(f"{mode}, {'causal' if causal == 'True' else 'full'}, {dtype}, D={D}")
        ax.set_xlabel("sequence length T")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot(csv_path, out_dir):
    """Write tflops.png and memory.png next to (or into out_dir for) a sweep CSV; return their paths."""
    rows = read(csv_path)
    device = rows[0]["device"] if rows else "no rows ran"
    return [
        _figure(_panels(rows, "tflops"), "TFLOP/s", f"attention throughput, {device}",
                os.path.join(out_dir, "tflops.png")),
        _figure(_panels([r for r in rows if r["peak_mib"]], "peak_mib"), "peak MiB beyond the inputs",
                f"attention memory, {device}", os.path.join(out_dir, "memory.png"), logy=True),
    ]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--out", help="folder for the PNGs (default: the CSV's)")
    args = p.parse_args()
    for path in plot(args.csv, args.out or os.path.dirname(os.path.abspath(args.csv))):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
