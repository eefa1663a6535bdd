"""
Attention step by step: every intermediate of causal self-attention, from the input x to the
output, with its shape, its values and one line on what it does and why; the backward pass, from
the output's gradient back to x and the weights; the same output and gradients the flash
kernel's way, block by block; and the steps drawn as one figure.

    python -m attention_kernels.reference.explain                         # B=1, T=2, C=3, one head: the project's seed
    python -m attention_kernels.reference.explain --integers              # small integer inputs, checkable by hand
    python -m attention_kernels.reference.explain -T 8 -C 16 --heads 4 --png attention.png
    python -m attention_kernels.reference.explain --tiled --block-size 1  # running max, sum and accumulator per key block
    python -m attention_kernels.reference.explain --backward              # then every gradient, checked against autograd
    python -m attention_kernels.reference.explain --tiled --backward      # and the flash backward's tiles: P recomputed
    python -m attention_kernels.reference.explain -T 8 -C 16 --heads 4 --block-size 2 --html attention.html
                                                                          # one page: point at a number, see its sources

The numbers come from the project's own code: the reference's named steps (`reference/naive.py`)
and the flash kernel's update rule (`reference/tiled.py`, tested against `kernels.flash_attention`).
The backward's formulas are written out here, by hand, and checked against torch's autograd.
"""

import argparse
import importlib.util
import math
import os
import sys

import torch

from .naive import attention
from .trace import (Step, autograd_gradients, join_heads, make_inputs, make_upstream, named,  # noqa: F401
                    split_heads, trace, trace_backward)
from .tiled import LOG2E, flash_backward, flash_forward, row_delta


# ----------------------------------------------------------------------------- printing


def fmt_matrix(t, indent="    "):
    """A 2-d tensor as aligned text: integers as integers, -inf as -inf, masks as 0/1."""
    t = t.detach().cpu()
    if t.dtype == torch.bool:
        cells = [["1" if x else "0" for x in row] for row in t.tolist()]
    else:
        finite = t[torch.isfinite(t)]
        whole = bool(finite.numel()) and bool((finite == finite.round()).all())
        cells = [["-inf" if x == float("-inf") else (f"{x + 0.0:.0f}" if whole else f"{x + 0.0:.4f}") for x in row]
                 for row in t.tolist()]  # x + 0.0: a -0 (P = 0 times a negative) prints as 0
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


def print_steps(steps, first=1):
    for n, step in enumerate(steps, first):
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

    out, lse = flash_forward(q, k, v, causal=True, block_size=block_size, on_block=show)
    print("\nout = acc / l")
    print_tensor(out)
    print(f"check: tiled and naive outputs agree, max difference {(out - naive_out).abs().max().item():.3g}")
    return out, lse


def print_backward_header(forward):
    where = {name: n for n, step in enumerate(forward, 1) for name in step.tensors}  # the last step of each name
    print(f"\n--- the backward pass: from the loss's gradient dy back to the weights and x ---\n"
          f"Q, K, V are step {where['q']}'s q, k, v; S the scaled scores of step {where['scaled']}, P the weights "
          f"of step {where['weights']}, O the out of step {where['out']}. A gradient dZ = dL/dZ has Z's shape: "
          "how much the loss L moves per unit of each entry of Z.")


def print_autograd_check(ours, theirs):
    """Each gradient's max difference from autograd's; returns the largest."""
    print("\ncheck: torch's autograd through reference.attention (float64, the same dy) gives the same gradients")
    worst = 0.0
    for name, truth in theirs.items():
        diff = (ours[name] - truth).abs().max().item()
        worst = max(worst, diff)
        print(f"  {name:<5} max |difference| {diff:.3g}")
    return worst


def print_tiled_backward(q, k, v, out, lse, dO, block_size, untiled):
    """The flash backward's way: tile by tile, P recomputed from the forward's log-sum-exp.
    Returns the largest difference from the untiled gradients `untiled` (dQ, dK, dV)."""
    print(f"\n--- the same gradients the flash kernel's way: tiles of {block_size} key(s) x {block_size} query(s) "
          "(reference/tiled.py) ---")
    print("P is T x T, so the forward kept none of it, only each row's log-sum-exp lse = m + log2(l) (base 2, as the "
          "kernel keeps it); each tile recomputes its part of P as exp2(s - lse). The loop runs over key blocks and, "
          "within each, over query blocks, as the kernel's dK/dV program: a key block's dK and dV are complete when "
          "its loop ends, while dQ adds up across key blocks (the kernel does dQ in a second pass, one program per "
          "query block, so that no two programs write the same rows).")
    print("\ndelta = rowsum(dO * O), one number per query row: from the forward's output, no P needed")
    print_tensor(row_delta(out, dO)[..., None])
    print("lse (base 2) = the forward's lse * log2(e)")
    print_tensor((lse * LOG2E)[..., None])

    def show(k0, k1, q0, q1, st):
        print(f"\nkeys {k0}..{k1 - 1}, queries {q0}..{q1 - 1}", end="")
        if st is None:
            print(": every key here comes after every query here, so no weight and no gradient: the tile is skipped")
            return
        print()
        for label, key in (("p = exp2(s - lse), recomputed: the forward's weights here", "p"),
                           ("dP = dO @ V_block^T", "dp"), ("dS = p * (dP - delta)", "ds"),
                           (f"dV rows {k0}..{k1 - 1}, after += p^T @ dO", "dv"),
                           (f"dK rows {k0}..{k1 - 1}, after += dS^T @ Q   (times the scale at the end)", "dk"),
                           (f"dQ rows {q0}..{q1 - 1}, after += dS @ K_block   (times the scale at the end)", "dq")):
            print(f"  {label}")
            print_tensor(st[key])

    grads = flash_backward(q, k, v, out, lse, dO, causal=True, block_size=block_size, on_tile=show)
    for name, g, how in zip(("dQ", "dK", "dV"), grads, ("its sum * scale", "its sum * scale", "its sum")):
        print(f"\n{name} = {how}")
        print_tensor(g)
    diffs = [(g - u).abs().max().item() for g, u in zip(grads, untiled)]
    print("check: tiled and untiled backward agree, max difference "
          + ", ".join(f"{name} {d:.3g}" for name, d in zip(("dQ", "dK", "dV"), diffs)))
    return max(diffs)


# ----------------------------------------------------------------------------- picture


SAME_WITH_ONE_HEAD = ("split into heads", "dO = dy split into heads", "dq, dk, dv = dQ, dK, dV joined back to C")


def draw(steps, path, backward=()):
    """The steps as one figure: each matrix an annotated heatmap (batch 0, head 0), in order; the
    backward's steps, if given, from a fresh row on, in another colour."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = 3

    def panels_of(steps, first, colours):
        panels = []
        for n, step in enumerate(steps, first):
            one_head = any(t.dim() == 4 and t.shape[1] == 1 for t in step.tensors.values())
            if step.title in SAME_WITH_ONE_HEAD and one_head:
                continue  # one head: the same matrices as the step before
            for name, t in step.tensors.items():
                m = t[0, 0] if t.dim() == 4 else t[0] if t.dim() == 3 else t
                where = " (batch 0, head 0)" if t.dim() == 4 else " (batch 0)" if t.dim() == 3 else ""
                panels.append((f"{n}. {name}  {tuple(t.shape)}{where}", step.title, m.detach().cpu(), colours))
        return panels

    panels = panels_of(steps, 1, "coolwarm")
    if backward:
        panels += [None] * (-len(panels) % cols)  # the backward starts a row of its own
        panels += panels_of(backward, len(steps) + 1, "PuOr_r")
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 5.2 * rows), squeeze=False)
    for ax, panel in zip(axes.flat, panels):
        if panel is None:
            ax.set_visible(False)
            continue
        title, subtitle, m, colours = panel
        values = m.double()
        finite = torch.isfinite(values)
        top = values[finite].abs().max().item() if finite.any() else 1.0
        shown = values.masked_fill(~finite, float("nan"))
        cmap = matplotlib.colormaps["Greens" if m.dtype == torch.bool else colours]
        cmap = cmap.with_extremes(bad="#bbbbbb")  # -inf: grey
        lo, hi = (0, 2) if m.dtype == torch.bool else (-top or -1, top or 1)  # a mask's 1 in light green
        ax.imshow(shown.numpy(), cmap=cmap, vmin=lo, vmax=hi)
        size = max(6, min(12, 110 // max(m.shape)))
        for (i, j), x in zip([(i, j) for i in range(m.shape[0]) for j in range(m.shape[1])], values.flatten().tolist()):
            text = "-inf" if x == float("-inf") else f"{x + 0.0:.0f}" if x == round(x) else f"{x + 0.0:.2f}"
            ax.text(j, i, text, ha="center", va="center", fontsize=size)
        ax.set_title(f"{title}\n{subtitle}", fontsize=9)
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(f"causal self-attention, step by step: forward (steps 1-{len(steps)}), then backward (steps "
                 f"{len(steps) + 1}-{len(steps) + len(backward)}, purple and orange) (python -m attention_kernels.reference.explain "
                 "--backward)" if backward else "causal self-attention, step by step (python -m attention_kernels.reference.explain)",
                 fontsize=15)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ----------------------------------------------------------------------------- main

TOLERANCE = 1e-12  # float64 gradients computed two ways differ by rounding alone, ~1e-16


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
    p.add_argument("--block-size", type=int, default=1, help="keys per block for --tiled (backward: and queries)")
    p.add_argument("--backward", action="store_true",
                   help="continue through the backward pass and check it against autograd; exits 1 if they differ")
    p.add_argument("--png", help="also draw the steps into this PNG file")
    p.add_argument("--html", help="also write one self-contained page of the forward, the backward and the flash "
                   "tiles (keys of --block-size per step), where pointing at a number shows what it was computed from")
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
        _, lse = print_tiled(q, k, v, args.block_size, out)
    backward, failures = [], []
    if args.backward:
        dy = make_upstream(args.batch, args.seqlen, args.channels, args.seed, args.integers)
        backward = trace_backward(steps, dy)
        print_backward_header(steps)
        print_steps(backward, first=len(steps) + 1)
        grads = named(backward)
        if print_autograd_check(grads, autograd_gradients(x, w_q, w_k, w_v, args.heads, dy)) > TOLERANCE:
            failures.append("the backward disagrees with autograd")
        if args.tiled:
            if print_tiled_backward(q, k, v, out, lse, grads["dO"], args.block_size,
                                    [grads[n] for n in ("dQ", "dK", "dV")]) > TOLERANCE:
                failures.append("the tiled backward disagrees with the untiled one")
    if args.png:
        os.makedirs(os.path.dirname(os.path.abspath(args.png)), exist_ok=True)
        draw(steps, args.png, backward)
        print(f"\nwrote {args.png}")
    if args.html:
        from .explain_html import write_page  # it imports this module's trace
        write_page(args.html, B=args.batch, T=args.seqlen, C=args.channels, n_head=args.heads, seed=args.seed,
                   integers=args.integers, block_size=args.block_size)
        print(f"\nwrote {args.html}")
    if failures:
        sys.exit(f"error: {' and '.join(failures)} by more than {TOLERANCE:g} (see the checks above)")


if __name__ == "__main__":
    main()
