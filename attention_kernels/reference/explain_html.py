"""
The explain trace as one page: every matrix of the forward pass, of the backward pass and of the
flash kernel's tiles, in one self-contained HTML file (no network: the numbers and a small script
are inline), written by

    python -m attention_kernels.reference.explain -T 8 -C 16 --heads 4 --block-size 2 --html attention.html

Pointing at a number (the mouse, or the keyboard: Tab to a matrix, arrow keys within it)
highlights the cells it was computed from and shows its arithmetic: a score's products and sum, a
weight's row of exponentials, a dS entry's row of the softmax Jacobian. A stepper walks the flash
kernel's key blocks for one query block and ends on the naive output.

Every number on the page is computed here, in Python, by the trace's own functions
(`explain.trace`, `explain.trace_backward`, `tiled.flash_forward`), and embedded as JSON, the
arithmetic shown (each product of a sum, each exponential of a row) included. The page's script
(`explain_page.html`) lays them out and looks them up; it computes no attention.
"""

import itertools
import json
import math
import os
from importlib.resources import files

import torch

from .trace import make_inputs, make_upstream, named, trace, trace_backward
from .tiled import flash_forward

# ----------------------------------------------------------------------------- the matrices


def flat(t):
    """A tensor's values in order, as JSON takes them: -inf as null, a mask's True/False as 1/0."""
    if t.dtype == torch.bool:
        return [int(x) for x in t.flatten().tolist()]
    return [None if x == float("-inf") else x + 0.0 for x in t.flatten().tolist()]  # + 0.0: no -0


DIGITS = 4  # the arithmetic's products, sums and exponentials are embedded as the page shows them: 4 decimals


def shown(t):
    """A tensor of derived arithmetic (products, exponentials) as nested lists, to DIGITS decimals."""
    return (t.round(decimals=DIGITS) + 0.0).tolist()


def is_whole(t):
    finite = t[torch.isfinite(t)] if t.dtype != torch.bool else t
    return t.dtype == torch.bool or (bool(finite.numel()) and bool((finite == finite.round()).all()))


class Page:
    """The matrices the page shows, and one flat index over all their cells, so that one int names
    a cell: a matrix's cells are numbered from its offset, 2-d slice by slice, row by row."""

    def __init__(self):
        self.matrices, self.tensors, self.size = {}, {}, 0

    def add(self, key, name, step, t):
        t = t.detach().cpu()
        rows, cols = t.shape[-2:]
        lead = list(itertools.product(*map(range, t.shape[:-2])))  # leading index of each 2-d slice
        self.matrices[key] = dict(key=key, name=name, step=step, shape=list(t.shape), lead=lead, rows=rows,
                                  cols=cols, offset=self.size, values=flat(t), whole=is_whole(t),
                                  mask=t.dtype == torch.bool, how={"kind": "input"})
        self.tensors[key] = t
        self.size += len(lead) * rows * cols

    def ref(self, key, s, i, j):
        m = self.matrices[key]
        return m["offset"] + (s * m["rows"] + i) * m["cols"] + j

    def slice(self, key, s):
        """Slice s of a matrix as a 2-d tensor."""
        return self.tensors[key][self.matrices[key]["lead"][s]]

    def each_slice(self, key):
        m = self.matrices[key]
        return [(s, tuple(lead)) for s, lead in enumerate(m["lead"])]

    def explain(self, key, formula, kind, cells=None, **how):
        """How the cells of `key` were computed: `kind` says how the page shows a cell, `cells`
        holds what each cell needs (in the flat order of its values)."""
        self.matrices[key]["how"] = dict(kind=kind, formula=formula, **how)
        if cells is not None:
            self.matrices[key]["cells"] = cells


def line(page, key, s, transposed):
    """How to walk row i of slice s of `key` (or of its transpose: column i): the first cell's
    ref and the step to the next; `first(i)` gives the ref of row i's first cell."""
    m = page.matrices[key]
    if transposed:
        return lambda i: page.ref(key, s, 0, i), m["cols"]
    return lambda i: page.ref(key, s, i, 0), 1


def sums_of_products(page, key, operands):
    """Cells of `key` that are sums of products, as a matrix product's are: operands(s) lists, for
    slice s, the pairs (A, B) whose products add up into it, each (a_key, a_slice, a_transposed,
    b_key, b_slice, b_transposed) for a product A @ B, whose cell (i, j) sums A[i, k] * B[k, j]
    over k. A cell gets, per pair, [the ref of A[i, 0], the step to A[i, 1], the same for B[0, j],
    the products], and their sum."""
    m = page.matrices[key]
    cells = [None] * len(m["values"])
    for s, _ in page.each_slice(key):
        groups, total = [], 0
        for a_key, sa, ta, b_key, sb, tb in operands(s):
            A, B = page.slice(a_key, sa), page.slice(b_key, sb)
            A, B = A.T if ta else A, B.T if tb else B                    # (R, K), (K, Cc)
            a_first, a_step = line(page, a_key, sa, ta)
            b_first, b_step = line(page, b_key, sb, not tb)              # column j of B: row j of its transpose
            groups.append((a_first, a_step, b_first, b_step, shown(A[:, None, :] * B.T[None, :, :])))  # (R, Cc, K)
            total = total + A @ B                                        # (R, Cc)
        total = shown(total)
        for i in range(m["rows"]):
            for j in range(m["cols"]):
                terms = [[a_first(i), a_step, b_first(j), b_step, products[i][j]]
                         for a_first, a_step, b_first, b_step, products in groups]
                cells[page.ref(key, s, i, j) - m["offset"]] = {"terms": terms, "sum": total[i][j]}
    return cells


def copies(page, key, source_of):
    """Cells of `key` that are cells of another matrix moved (a head split or join): source_of(s,
    i, j) gives the source's ref."""
    m = page.matrices[key]
    return [source_of(s, i, j) for s, _ in page.each_slice(key) for i in range(m["rows"]) for j in range(m["cols"])]


# ----------------------------------------------------------------------------- forward and backward


def explain_steps(page, B, H, T, C, seed, integers):
    D = C // H
    scale = 1.0 / math.sqrt(D)
    drawn = lambda seed: (f"small integers drawn from seed {seed}" if integers
                          else f"drawn from seed {seed} (torch.randn, rounded to two decimals)")
    page.explain("1:x", f"given: {drawn(seed)}", "input")
    for name in "qkv":
        page.explain(f"2:W_{name}", f"given: {drawn(seed)}" + ("" if integers else ", divided by √C"), "input")

    for name in "qkv":  # 3: the projections (B, T, C) = (B, T, C) @ (C, C); 4: split, slice s = b * H + h
        page.explain(f"3:{name}", f"{name}[b, t, e] = Σ_c x[b, t, c] · W_{name}[c, e]", "sum",
                     sums_of_products(page, f"3:{name}", lambda s, n=name: [("1:x", s, False, f"2:W_{n}", 0, False)]))
        page.explain(f"4:{name}", f"{name}[b, h, t, d] = {name}[b, t, h·D + d], D = {D}", "copy",
                     copies(page, f"4:{name}", lambda s, t, d, n=name: page.ref(f"3:{n}", s // H, t, s % H * D + d)))
    heads = lambda a, ta, b, tb: lambda s: [(a, s, ta, b, s, tb)]
    page.explain("5:scores", "scores[b, h, i, j] = Σ_d q[b, h, i, d] · k[b, h, j, d]", "sum",
                 sums_of_products(page, "5:scores", heads("4:q", False, "4:k", True)))
    page.explain("6:scaled", f"scaled[b, h, i, j] = scores[b, h, i, j] · 1/√D, 1/√{D} = {scale:.4f}", "scale",
                 copies(page, "6:scaled", lambda s, i, j: page.ref("5:scores", s, i, j)), factor=scale)
    page.explain("7:mask", "mask[i, j] = 1 where key j ≤ query i (the past and the present), 0 for the future",
                 "mask")
    page.explain("8:masked", "masked[b, h, i, j] = scaled[b, h, i, j] where mask[i, j] = 1, else -inf", "masked",
                 [[page.ref("6:scaled", s, i, j), page.ref("7:mask", 0, i, j)] for s, _ in page.each_slice("8:masked")
                  for i in range(T) for j in range(T)])

    # 9: softmax, each row: m = its max, e_j = exp(s_j - m), weight_j = e_j / sum(e)
    rows = []
    for s, _ in page.each_slice("8:masked"):
        S = page.slice("8:masked", s)                                # (T, T)
        m = S.amax(dim=-1, keepdim=True)                             # (T, 1) as `softmax` subtracts it
        e = torch.exp(S - m)                                         # (T, T) exp(-inf) = 0
        e_sum = shown(e.sum(dim=-1))                                 # (T,)
        e = shown(e)
        rows += [{"src": page.ref("8:masked", s, i, 0), "m": m[i, 0].item(), "e": e[i], "sum": e_sum[i]}
                 for i in range(T)]
    page.explain("9:weights", "weights[b, h, i, j] = exp(masked[i, j] - m_i) / Σ_k exp(masked[i, k] - m_i), "
                 "m_i = the row's max", "softmax", rows=rows)
    page.explain("10:out", "out[b, h, i, d] = Σ_j weights[b, h, i, j] · v[b, h, j, d]", "sum",
                 sums_of_products(page, "10:out", heads("9:weights", False, "4:v", False)))
    page.explain("11:y", f"y[b, t, c] = out[b, c // D, t, c % D], D = {D}", "copy",
                 copies(page, "11:y", lambda b, t, c: page.ref("10:out", b * H + c // D, t, c % D)))

    # backward
    page.explain("12:dy", f"given: the loss is L = sum(y · g) for a g {drawn(seed + 1)}, so dL/dy = g", "input")
    page.explain("13:dO", "dO[b, h, t, d] = dy[b, t, h·D + d]", "copy",
                 copies(page, "13:dO", lambda s, t, d: page.ref("12:dy", s // H, t, s % H * D + d)))
    page.explain("14:dV", "dV[b, h, j, d] = Σ_i weights[b, h, i, j] · dO[b, h, i, d]", "sum",
                 sums_of_products(page, "14:dV", heads("9:weights", True, "13:dO", False)))
    page.explain("15:dP", "dP[b, h, i, j] = Σ_d dO[b, h, i, d] · v[b, h, j, d]", "sum",
                 sums_of_products(page, "15:dP", heads("13:dO", False, "4:v", True)))
    delta = [None] * (B * H * T)
    for s, _ in page.each_slice("16:delta"):
        products = page.slice("15:dP", s) * page.slice("9:weights", s)  # (T, T)
        sums, products = shown(products.sum(dim=-1)), shown(products)
        for i in range(T):
            delta[s * T + i] = {"terms": [[page.ref("15:dP", s, i, 0), 1, page.ref("9:weights", s, i, 0), 1,
                                           products[i]]], "sum": sums[i]}
    page.explain("16:delta", "delta[b, h, i] = Σ_j dP[b, h, i, j] · weights[b, h, i, j]", "sum", delta)

    # 17: dS, row by row through the softmax's Jacobian J[k, j] = dP_k/dS_j = P_k (δ_kj - P_j)
    jacobians, cells = [], []
    for s, _ in page.each_slice("17:dS"):
        P, dP = page.slice("9:weights", s), page.slice("15:dP", s)       # (T, T) each
        for i in range(T):
            J = torch.diag(P[i]) - P[i][:, None] * P[i][None, :]         # (T, T) symmetric
            jacobians.append(shown(J))
            products = (dP[i][:, None] * J).T                            # (T, T) row j: dP_k * J[k, j] over k
            sums, products = shown(products.sum(dim=-1)), shown(products)
            cells += [{"terms": [[page.ref("15:dP", s, i, 0), 1, None, None, products[j]]], "sum": sums[j]}
                      for j in range(T)]
    page.explain("17:dS", "dS[b, h, i, j] = Σ_k dP[b, h, i, k] · J_i[k, j], the softmax's Jacobian of row i: "
                 "J_i[k, j] = ∂weights[i, k]/∂scores[i, j] = P_k (δ_kj - P_j), so dS = P_j (dP_j - delta_i)",
                 "jacobian",
                 cells, jacobians=jacobians, P="9:weights", dP="15:dP", delta="16:delta")
    page.explain("18:dQ", f"dQ[b, h, i, d] = (Σ_j dS[b, h, i, j] · k[b, h, j, d]) · 1/√D, 1/√{D} = {scale:.4f}",
                 "sum", sums_of_products(page, "18:dQ", heads("17:dS", False, "4:k", False)), factor=scale)
    page.explain("19:dK", f"dK[b, h, j, d] = (Σ_i dS[b, h, i, j] · q[b, h, i, d]) · 1/√D, 1/√{D} = {scale:.4f}",
                 "sum", sums_of_products(page, "19:dK", heads("17:dS", True, "4:q", False)), factor=scale)
    for small, big in (("dq", "18:dQ"), ("dk", "19:dK"), ("dv", "14:dV")):
        page.explain(f"20:{small}", f"{small}[b, t, c] = {big[3:]}[b, c // D, t, c % D], D = {D}", "copy",
                     copies(page, f"20:{small}", lambda b, t, c, big=big: page.ref(big, b * H + c // D, t, c % D)))
    for name in "qkv":
        page.explain(f"21:dW_{name}", f"dW_{name}[c, e] = Σ_b Σ_t x[b, t, c] · d{name}[b, t, e], over all tokens",
                     "sum", sums_of_products(page, f"21:dW_{name}",
                                             lambda s, n=name: [("1:x", b, True, f"20:d{n}", b, False)
                                                                for b in range(B)]))
    page.explain("22:dx", "dx[b, t, c] = Σ_e dq[b, t, e] · W_q[c, e] + Σ_e dk[b, t, e] · W_k[c, e] "
                 "+ Σ_e dv[b, t, e] · W_v[c, e]", "sum",
                 sums_of_products(page, "22:dx", lambda s: [(f"20:d{n}", s, False, f"2:W_{n}", 0, True)
                                                            for n in "qkv"]))


# ----------------------------------------------------------------------------- the flash tiles


def flash_tiles(q, k, v, naive_out, block_size):
    """`flash_forward` block by block, cut per (batch, head) and per query block: each key block's
    tile of base-2 scores, the running max before and after, the rescale factor, the running sum
    and the accumulator of the block's rows; at the end acc / l beside the naive output."""
    B, H, T, D = q.shape
    states = []
    out, _ = flash_forward(q, k, v, causal=True, block_size=block_size,
                           on_block=lambda start, end, st: states.append((start, end, {n: x.clone() for n, x in
                                                                                       st.items()})))
    grid = torch.cat([st["s"] for _, _, st in states], dim=-1)        # (B, H, T, T) base-2 logits, masked
    qblocks = [(q0, min(q0 + block_size, T)) for q0 in range(0, T, block_size)]
    runs = []
    for b, h in itertools.product(range(B), range(H)):
        for q0, q1 in qblocks:
            rows = lambda x, b=b, h=h, q0=q0, q1=q1: x[b, h, q0:q1]   # this head's query block
            steps = [dict(k0=start, k1=end, skipped=not bool(st["visible"][q0:q1].any()), s=flat(rows(st["s"])),
                          rowmax=flat(rows(st["s"]).amax(dim=-1)), m_old=flat(rows(st["m_old"])), m=flat(rows(st["m"])),
                          alpha=flat(rows(st["alpha"])), p=flat(rows(st["p"])), l=flat(rows(st["l"])),
                          acc=flat(rows(st["acc"])))
                     for start, end, st in states]
            runs.append(dict(b=b, h=h, q0=q0, q1=q1, steps=steps, out=flat(rows(out)), naive=flat(rows(naive_out)),
                             diff=(rows(out) - rows(naive_out)).abs().max().item()))
    return dict(block=block_size, D=D, grid=[flat(grid[b, h]) for b, h in itertools.product(range(B), range(H))],
                qblocks=qblocks, runs=runs, diff=(out - naive_out).abs().max().item())


# ----------------------------------------------------------------------------- the page


def page_data(B=1, T=2, C=3, n_head=1, seed=0, integers=False, block_size=1):
    """Everything the page shows, as JSON-ready data."""
    x, w = make_inputs(B, T, C, seed, integers)
    forward, q, k, v = trace(x, *w, n_head)
    dy = make_upstream(B, T, C, seed, integers)
    backward = trace_backward(forward, dy)
    page, steps = Page(), []
    for n, step in enumerate(forward + backward, 1):
        keys = []
        for name, t in step.tensors.items():
            page.add(f"{n}:{name}", name, n, t)
            keys.append(f"{n}:{name}")
        steps.append(dict(n=n, title=step.title, why=step.why, dims=step.dims, keys=keys,
                          part="forward" if n <= len(forward) else "backward"))
    explain_steps(page, B, n_head, T, C, seed, integers)
    args = f"-B {B} -T {T} -C {C} --heads {n_head} --seed {seed}" + (" --integers" if integers else "")
    return dict(B=B, T=T, C=C, H=n_head, D=C // n_head, seed=seed, integers=integers,
                command=f"python -m attention_kernels.reference.explain {args} --block-size {block_size} --html PATH",
                steps=steps, matrices=list(page.matrices.values()),
                tiles=flash_tiles(q, k, v, named(forward)["out"], block_size))


def render(data):
    """The page's HTML: the template with the data inline (as JSON that cannot close its tag)."""
    template = files("attention_kernels.reference").joinpath("explain_page.html").read_text(encoding="utf-8")
    payload = json.dumps(data, separators=(",", ":"), allow_nan=False).replace("<", "\\u003c")
    return template.replace("/*DATA*/null", payload, 1)


def write_page(path, **kwargs):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(render(page_data(**kwargs)))
