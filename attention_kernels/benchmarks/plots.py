"""
Plots made from a sweep's CSV, each against the sequence length T per implementation: TFLOP/s,
time and peak memory. One panel per (mode, causal, dtype, D); rows that did not run
(unsupported, oom) are left out.

    python -m attention_kernels.benchmarks.plots runs/sweep-<time>/sweep.csv [--out DIR]

Both axes are logarithmic, so that growth in T reads as a slope (T^2 for the reference's memory,
T for flash's) and kernels a thousand times apart share a panel. Lines often lie on one another
(fused's and flash's memory are the same): each implementation has its own colour, marker and
dash, and lines are drawn in a fixed order with hollow markers that shrink from one line to the
next, so every one stays visible.
"""

import argparse
import csv
import os
from collections import defaultdict

# Drawing order, and so each implementation's colour, marker and dash; other names come after.
ORDER = ["reference", "fused", "flash", "sdpa-math", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn"]
MARKERS = "os^Dv<>ph*"
DASHES = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 1)), (0, (8, 3)), (0, (3, 1, 1, 1))]


def line_styles(names):
    """{name: ax.plot keywords} for the lines of one panel, in drawing order: colour, marker and
    dash fixed per name; marker size and line width shrinking down the order, so that a line
    drawn over another leaves the first one's edges showing."""
    others = sorted(set(names) - set(ORDER))

    def place(name):
        return ORDER.index(name) if name in ORDER else len(ORDER) + others.index(name)
    styles = {}
    for rank, name in enumerate(sorted(names, key=place)):
        i = place(name)
        styles[name] = dict(color=f"C{i % 10}", marker=MARKERS[i % len(MARKERS)], linestyle=DASHES[i % len(DASHES)],
                            markersize=max(3.0, 11.0 - 1.6 * rank), linewidth=max(0.8, 3.0 - 0.45 * rank),
                            markerfacecolor="none", markeredgewidth=1.4, alpha=0.9, zorder=2 + rank)
    return styles


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


def _figure(panels, ylabel, title, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(panels))
    cols = min(n, 2)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6.5 * cols, 4.2 * rows), squeeze=False)
    for ax, ((mode, causal, dtype, D), lines) in zip(axes.flat, panels.items()):
        for impl, style in line_styles(lines).items():
            ts, ys = zip(*lines[impl])
            ax.plot(ts, ys, label=impl, **style)
        ax.set_xscale("log", base=2)
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
    """Write tflops.png, time.png and memory.png for a sweep CSV into out_dir (made if missing);
    return their paths."""
    rows = read(csv_path)
    device = rows[0]["device"] if rows else "no rows ran"
    os.makedirs(out_dir, exist_ok=True)
    return [
        _figure(_panels(rows, "tflops"), "TFLOP/s", f"attention throughput, {device}",
                os.path.join(out_dir, "tflops.png")),
        _figure(_panels(rows, "ms_p50"), "ms per call (p50)", f"attention time, {device}",
                os.path.join(out_dir, "time.png")),
        _figure(_panels([r for r in rows if r["peak_mib"]], "peak_mib"), "peak MiB beyond the inputs",
                f"attention memory, {device}", os.path.join(out_dir, "memory.png")),
    ]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("csv")
    p.add_argument("--out", help="folder for the PNGs, made if missing (default: the CSV's)")
    args = p.parse_args(argv)
    if not os.path.isfile(args.csv):
        p.error(f"no such file: {args.csv} (a sweep's CSV: runs/sweep-<time>/sweep.csv)")
    for path in plot(args.csv, args.out or os.path.dirname(os.path.abspath(args.csv))):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
