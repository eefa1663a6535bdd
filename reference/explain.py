"""
Attention step by step: every intermediate of causal self-attention, from the input x to the
output, with its shape, its values and one line on what it does and why; the same output the
flash kernel's way, key block by key block; and the steps drawn as one figure.

    python -m reference.explain                         # B=1, T=2, C=3, one head: the project's seed
    python -m reference.explain --integers              # small integer inputs, checkable by hand
    python -m reference.explain -T 8 -C 16 --heads 4 --png attention.png
    python -m reference.explain --tiled --block-size 1  # running max, sum and accumulator per key block

The numbers come from the project's own code: the reference's named steps (`reference/naive.py`)
and the flash kernel's update rule (`reference/tiled.py`, tested against `kernels.flash_attention`).
"""

import argparse
import importlib.util
import math
import os
from dataclasses import dataclass

import torch

from .naive import apply_mask, attention, causal_mask, scores, softmax, weighted_sum
from .tiled import flash_forward


@dataclass
class Step:
    title: str     # what the step computes
    why: str       # one line: what it does and why
    tensors: dict  # name -> tensor, with its dimension names in `dims`
    dims: str      # e.g. "(B, H, T, T)"


# ----------------------------------------------------------------------------- the trace


def make_inputs(B=1, T=2, C=3, seed=0, integers=False):
    """x (B, T, C) and the projection weights W_q, W_k, W_v (C, C), float64. Random values are
    rounded to two decimals so that what is printed is exactly what is computed."""
    g = torch.Generator().manual_seed(seed)
    if integers:
        x = torch.randint(-2, 3, (B, T, C), generator=g).double()
        w = [torch.randint(-1, 2, (C, C), generator=g).double() for _ in range(3)]
    else:
        x = torch.randn(B, T, C, generator=g, dtype=torch.float64).round(decimals=2)
        w = [(torch.randn(C, C, generator=g, dtype=torch.float64) / math.sqrt(C)).round(decimals=2) for _ in range(3)]
    return x, w


def trace(x, w_q, w_k, w_v, n_head):
    """Every intermediate of causal self-attention on x, as a list of Steps, computed with the
    reference's named steps; returns (steps, q, k, v) with q, k, v split into heads."""
    B, T, C = x.shape
    D = C // n_head
    scale = 1.0 / math.sqrt(D)
    steps = [Step("x", "the input: T tokens, each a vector of C channels", {"x": x}, "(B, T, C)"),
             Step("projection weights", "learned matrices that turn each token into a query, a key and a value",
                  {"W_q": w_q, "W_k": w_k, "W_v": w_v}, "(C, C)")]

    q, k, v = x @ w_q, x @ w_k, x @ w_v                        # (B, T, C) each
    steps.append(Step("q, k, v = x @ W_q, x @ W_k, x @ W_v",
                      "q: what each token looks for; k: what it offers to be found by; v: what it passes on",
                      {"q": q, "k": k, "v": v}, "(B, T, C)"))

    def heads(t):
        return t.view(B, T, n_head, D).transpose(1, 2)      # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)
    q, k, v = heads(q), heads(k), heads(v)                   # (B, H, T, D)
    steps.append(Step("split into heads", f"C = H * D: each of the H = {n_head} heads attends on its own, "
                      f"over its D = {D} channels", {"q": q, "k": k, "v": v}, "(B, H, T, D)"))

    raw = scores(q, k, 1.0)                                  # (B, H, T, T)
    steps.append(Step("scores = q @ k^T", "row i, column j: how well query i matches key j (a dot product)",
                      {"scores": raw}, "(B, H, T, T)"))
    s = scores(q, k, scale)                                  # (B, H, T, T)
    steps.append(Step(f"scaled = scores * 1/sqrt(D) = scores * {scale:.4f}",
                      "a dot product of D channels grows like sqrt(D); scaled back to about 1, the softmax "
                      "stays soft instead of picking one key (and its gradients do not vanish)", {"scaled": s},
                      "(B, H, T, T)"))
    visible = causal_mask(T, T)                              # (T, T)
    steps.append(Step("causal mask", "lower-triangular: token i may see tokens 0..i only, because a model "
                      "predicting the next token cannot look at the future", {"mask": visible}, "(T, T)"))
    s = apply_mask(s, visible)                               # (B, H, T, T)
    steps.append(Step("masked = scaled, with -inf where the mask is 0",
                      "-inf, not a large negative number: exp(-inf) is exactly 0, so a hidden key gets "
                      "exactly zero weight", {"masked": s}, "(B, H, T, T)"))
    w = softmax(s)                                           # (B, H, T, T)
    sums = ", ".join(f"{x:.4f}" for x in w.sum(-1).flatten()[:8].tolist())
    steps.append(Step("weights = softmax(masked) along each row",
                      f"exp, then divide by the row's sum: weights >= 0 that sum to 1 (row sums: {sums})",
                      {"weights": w}, "(B, H, T, T)"))
    out = weighted_sum(w, v)                                 # (B, H, T, D)
    steps.append(Step("out = weights @ v", "each token's output is the average of the values it may see, "
                      "weighted by attention", {"out": out}, "(B, H, T, D)"))
    joined = out.transpose(1, 2).reshape(B, T, C)            # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)
    steps.append(Step("heads joined back to C", "the H outputs of D channels side by side again, one "
                      "C-channel vector per token", {"y": joined}, "(B, T, C)"))
    return steps, q, k, v


# ----------------------------------------------------------------------------- printing


def fmt_matrix(t, indent="    "):
    """A 2-d tensor as aligned text: integers as integers, -inf as -inf, masks as 0/1."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        cells = [["1" if x else "0" for x in row] for row in t.tolist()]
    else:
        finite = t[torch.isfinite(t)]
        whole = bool(finite.numel()) and bool((finite == finite.round()).all())
        cells = [["-inf" if x == float("-inf") else (f"{x:.0f}" if whole else f"{x:.4f}") for x in row]
                 for row in t.tolist()]
    width = max(len(c) for row in cells for c in row)
    return "\n".join(indent + "[ " + "  ".join(c.rjust(width) for c in row) + " ]" for row in cells)


def slices(t):
    """(label, 2-d matrix) for every leading index of a 2-, 3- or 4-d tensor."""
    if t.dim() == 2:
        return [("", t)]
    if t.dim() == 3:
        return [(f"b={b}" if t.shape[0] > 1 else "", t[b]) for b in range(t.shape[0])]
    many = t.shape[0] * t.shape[1] > 1
    return [(f"b={b}, h={h}" if many else "", t[b, h]) for b in range(t.shape[0]) for h in range(t.shape[1])]


def print_tensor(t):
    for label, m in slices(t):
        if label:
            print(f"   {label}:")
        print(fmt_matrix(m))


def print_steps(steps):
    for n, step in enumerate(steps, 1):
        print(f"\n{n}. {step.title}   {step.dims}")
        print(f"   {step.why}")
        for name, t in step.tensors.items():
            print(f"  {name}  shape {tuple(t.shape)}")
            print_tensor(t)


def print_tiled(q, k, v, block_size, naive_out):
    """The flash kernel's way: one block of keys at a time, every state printed."""
    print(f"\n--- the same output the flash kernel's way: {block_size} key(s) at a time (reference/tiled.py) ---")
    print("The kernel works in base 2: s = q.k * scale * log2(e), so exp2(s) = exp(q.k * scale); m is the running "
          "max of s, l the running sum of exp2(s - m), acc the running sum of exp2(s - m) * v.")

    def show(start, end, st):
        print(f"\nkeys {start}..{end - 1}")
        for label, key in (("s, masked (base-2 logits)", "s"), ("p = exp2(s - m)", "p")):
            print(f"  {label}")
            print_tensor(st[key])
        B, H, T = st["m"].shape
        for b in range(B):
            for h in range(H):
                where = f"b={b}, h={h}, " if B * H > 1 else ""
                for i in range(T):
                    m_old, m_new, alpha, l = (st[n][b, h, i].item() for n in ("m_old", "m", "alpha", "l"))
                    grew = f"  the max grew: earlier sums x alpha = {alpha:.4f}" if -math.inf < m_old < m_new else ""
                    print(f"  {where}row {i}: m {m_old:.4f} -> {m_new:.4f}, l = {l:.4f}{grew}")
        print("  acc")
        print_tensor(st["acc"])

    out, _ = flash_forward(q, k, v, causal=True, block_size=block_size, on_block=show)
    print("\nout = acc / l")
    print_tensor(out)
    print(f"check: tiled and naive outputs agree, max difference {(out - naive_out).abs().max().item():.3g}")
    return out


# ----------------------------------------------------------------------------- picture


def draw(steps, path):
    """The steps as one figure: each matrix an annotated heatmap (batch 0, head 0), in order."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for n, step in enumerate(steps, 1):
        if step.title == "split into heads" and next(iter(step.tensors.values())).shape[1] == 1:
            continue  # one head: the same matrices as q, k, v
        for name, t in step.tensors.items():
            m = t[0, 0] if t.dim() == 4 else t[0] if t.dim() == 3 else t
            where = " (batch 0, head 0)" if t.dim() == 4 else " (batch 0)" if t.dim() == 3 else ""
            panels.append((f"{n}. {name}  {tuple(t.shape)}{where}", step.title, m.detach().cpu()))
    cols = 3
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5.2 * rows), squeeze=False)
    for ax, (title, subtitle, m) in zip(axes.flat, panels):
        values = m.double()
        finite = torch.isfinite(values)
        top = values[finite].abs().max().item() if finite.any() else 1.0
        shown = values.masked_fill(~finite, float("nan"))
        cmap = matplotlib.colormaps["Greens" if m.dtype == torch.bool else "coolwarm"].with_extremes(bad="#bbbbbb")  # -inf: grey
        lo, hi = (0, 2) if m.dtype == torch.bool else (-top or -1, top or 1)  # a mask's 1 in light green
        ax.imshow(shown.numpy(), cmap=cmap, vmin=lo, vmax=hi)
        size = max(6, min(12, 110 // max(m.shape)))
        for (i, j), x in zip([(i, j) for i in range(m.shape[0]) for j in range(m.shape[1])], values.flatten().tolist()):
            text = "-inf" if x == float("-inf") else f"{x:.0f}" if x == round(x) else f"{x:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle("causal self-attention, step by step (python -m reference.explain)", fontsize=15)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("-B", "--batch", type=int, default=1)
    p.add_argument("-T", "--seqlen", type=int, default=2)
    p.add_argument("-C", "--channels", type=int, default=3, help="model width C = heads * D")
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--integers", action="store_true", help="small integer inputs and weights")
    p.add_argument("--tiled", action="store_true", help="also compute it the flash kernel's way")
    p.add_argument("--block-size", type=int, default=1, help="keys per block for --tiled")
    p.add_argument("--png", help="also draw the steps into this PNG file")
    args = p.parse_args(argv)
    if args.png and importlib.util.find_spec("matplotlib") is None:
        p.error("--png needs matplotlib: pip install matplotlib")
    for name in ("batch", "seqlen", "channels", "heads", "block_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.channels % args.heads:
        p.error(f"--heads {args.heads} does not divide C={args.channels}: each head takes D = C / heads "
                f"channels; for C={args.channels} heads may be one of "
                f"{[h for h in range(1, args.channels + 1) if args.channels % h == 0]}")

    x, (w_q, w_k, w_v) = make_inputs(args.batch, args.seqlen, args.channels, args.seed, args.integers)
    print(f"causal self-attention on B={args.batch} sequence(s) of T={args.seqlen} tokens, C={args.channels} "
          f"channels, {args.heads} head(s) of D={args.channels // args.heads}"
          + (", integer inputs" if args.integers else f", seed {args.seed}"))
    steps, q, k, v = trace(x, w_q, w_k, w_v, args.heads)
    print_steps(steps)
    out = steps[-2].tensors["out"]
    print(f"\ncheck: reference.attention(q, k, v) gives the same output, max difference "
          f"{(attention(q, k, v) - out).abs().max().item():.3g}")
    if args.tiled:
        print_tiled(q, k, v, args.block_size, out)
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        draw(steps, args.png)
        print(f"\nwrote {args.png}")


if __name__ == "__main__":
    main()
