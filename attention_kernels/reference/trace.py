"""
The trace of causal self-attention that `reference.explain` prints and draws and its page shows:
every intermediate of the forward, from the input x to the output, as named steps with their
shapes and one line on what each does; the backward's, written out by hand; and torch's autograd
for the check.
"""

import math
from dataclasses import dataclass

import torch

from .naive import apply_mask, attention, causal_mask, scores, softmax, weighted_sum


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


def make_upstream(B=1, T=2, C=3, seed=0, integers=False):
    """dy (B, T, C), the gradient the backward starts from: that of the loss L = sum(y * g) for a
    fixed g, which is g itself. Drawn from seed + 1, rounded as the inputs (integers: -1, 0, 1)."""
    g = torch.Generator().manual_seed(seed + 1)
    if integers:
        return torch.randint(-1, 2, (B, T, C), generator=g).double()
    return torch.randn(B, T, C, generator=g, dtype=torch.float64).round(decimals=2)


def split_heads(t, n_head):
    B, T, C = t.shape
    return t.view(B, T, n_head, C // n_head).transpose(1, 2)  # (B, T, C) -> (B, T, H, D) -> (B, H, T, D)


def join_heads(t):
    B, H, T, D = t.shape
    return t.transpose(1, 2).reshape(B, T, H * D)           # (B, H, T, D) -> (B, T, H, D) -> (B, T, C)


def named(steps):
    """Every tensor of the steps by its name; a later step's wins (q, k, v: those split into heads)."""
    return {name: t for step in steps for name, t in step.tensors.items()}


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

    q, k, v = (split_heads(t, n_head) for t in (q, k, v))    # (B, H, T, D)
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
    joined = join_heads(out)                                 # (B, T, C)
    steps.append(Step("heads joined back to C", "the H outputs of D channels side by side again, one "
                      "C-channel vector per token", {"y": joined}, "(B, T, C)"))
    return steps, q, k, v


def trace_backward(forward, dy):
    """The backward pass of `trace`'s steps for the upstream gradient dy (B, T, C), written out by
    hand (no autograd) as a list of Steps: per head dO, dV, dP, delta, dS, dQ, dK, then back
    through the head split and the projections to dW_q, dW_k, dW_v and dx. A gradient dZ has Z's
    shape: entry by entry, how much the loss moves per unit of Z."""
    t = named(forward)
    x, w_q, w_k, w_v = t["x"], t["W_q"], t["W_k"], t["W_v"]   # (B, T, C), (C, C) x 3
    Q, K, V, P, O = t["q"], t["k"], t["v"], t["weights"], t["out"]  # (B, H, T, D) but P: (B, H, T, T)
    B, H, T, D = Q.shape
    scale = 1.0 / math.sqrt(D)
    steps = [Step("dy = g", "where the backward starts: the loss here is L = sum(y * g) for a fixed random g "
                  "(from seed + 1, rounded like x), so dL/dy = g; in a model, dy comes from the layers above",
                  {"dy": dy}, "(B, T, C)")]

    dO = split_heads(dy, H)                                  # (B, H, T, D)
    steps.append(Step("dO = dy split into heads", "joining the heads only moved numbers, so their gradients move "
                      "back the same way", {"dO": dO}, "(B, H, T, D)"))
    dV = P.transpose(-2, -1) @ dO                            # (B, H, T, T) @ (B, H, T, D) -> (B, H, T, D)
    steps.append(Step("dV = P^T @ dO", "O_i = sum_j P_ij V_j: value j reaches output i with weight P_ij, so its "
                      "gradient is the P-weighted sum of dO over the queries that see it (the last key is seen "
                      "by the last query alone)", {"dV": dV}, "(B, H, T, D)"))
    dP = dO @ V.transpose(-2, -1)                            # (B, H, T, D) @ (B, H, D, T) -> (B, H, T, T)
    steps.append(Step("dP = dO @ V^T", "more weight on key j moves output i towards V_j, so dP_ij = dO_i . V_j; "
                      "hidden keys get a dP too, which the next steps multiply by P = 0", {"dP": dP}, "(B, H, T, T)"))
    delta = (dP * P).sum(dim=-1, keepdim=True)               # (B, H, T, 1)
    same = ((dO * O).sum(dim=-1, keepdim=True) - delta).abs().max().item()  # sum_j P_ij dO_i.V_j = dO_i.O_i
    steps.append(Step("delta = rowsum(dP * P)", "the P-weighted average of row i's dP. A row's weights sum to 1, so "
                      "raising all its scores by the same amount changes nothing: only how far each dP_ij is from "
                      f"this average counts. Equal to rowsum(dO * O) (max difference {same:.2g}), which needs no P",
                      {"delta": delta}, "(B, H, T, 1)"))
    dS = P * (dP - delta)                                    # (B, H, T, T)
    steps.append(Step("dS = P * (dP - delta)", "the softmax's backward: a score's gradient is its weight times how "
                      "far its dP is above the row's average. Where the mask hid a key, P = 0, so dS = 0 exactly: no "
                      "gradient reaches the future. A row that sees one key has P = 1 whatever its score: dS = 0 too",
                      {"dS": dS}, "(B, H, T, T)"))
    dQ = dS @ K * scale                                      # (B, H, T, T) @ (B, H, T, D) -> (B, H, T, D)
    steps.append(Step(f"dQ = dS @ K * scale, scale = {scale:.4f}", "S_ij = Q_i . K_j * scale, so moving Q_i along "
                      "K_j raises S_ij: Q_i's gradient is the dS-weighted sum of the keys it sees, times the scale",
                      {"dQ": dQ}, "(B, H, T, D)"))
    dK = dS.transpose(-2, -1) @ Q * scale                    # (B, H, T, T) @ (B, H, T, D) -> (B, H, T, D)
    steps.append(Step("dK = dS^T @ Q * scale", "the same dot product seen from the key: K_j's gradient is the "
                      "dS-weighted sum of the queries that see it, times the scale. Its rows sum to 0: adding one "
                      "vector to every key shifts each row's scores uniformly, which changes nothing",
                      {"dK": dK}, "(B, H, T, D)"))
    dq, dk, dv = join_heads(dQ), join_heads(dK), join_heads(dV)  # (B, T, C) each
    steps.append(Step("dq, dk, dv = dQ, dK, dV joined back to C", "the head split only moved numbers: these are "
                      "the gradients of step 3's q, k, v", {"dq": dq, "dk": dk, "dv": dv}, "(B, T, C)"))
    rows = x.reshape(B * T, -1)                              # (B*T, C) every token of every sequence
    dW = [rows.T @ g.reshape(B * T, -1) for g in (dq, dk, dv)]  # (C, B*T) @ (B*T, C) -> (C, C) each
    steps.append(Step("dW_q, dW_k, dW_v = x^T @ dq, x^T @ dk, x^T @ dv", "q = x @ W_q: entry (c, e) of W_q moves "
                      "every token's q[e] by its x[c], so its gradient sums x[c] * dq[e] over all B*T tokens; "
                      "these are what the optimizer steps with", dict(zip(("dW_q", "dW_k", "dW_v"), dW)), "(C, C)"))
    dx = dq @ w_q.T + dk @ w_k.T + dv @ w_v.T                # (B, T, C) @ (C, C) -> (B, T, C), three times
    steps.append(Step("dx = dq @ W_q^T + dk @ W_k^T + dv @ W_v^T", "x fed all three projections, so its gradient "
                      "is the sum of what comes back through each; it flows on to the layers below x",
                      {"dx": dx}, "(B, T, C)"))
    return steps


def autograd_gradients(x, w_q, w_k, w_v, n_head, dy):
    """dx, dW_q, dW_k, dW_v from torch's autograd through `reference.attention`, in float64: what
    the hand-written backward is checked against."""
    x, w_q, w_k, w_v = (t.detach().double().requires_grad_() for t in (x, w_q, w_k, w_v))
    q, k, v = (split_heads(x @ w, n_head) for w in (w_q, w_k, w_v))  # (B, H, T, D) each
    join_heads(attention(q, k, v)).backward(dy.double())     # (B, T, C), its gradient dy
    return {"dx": x.grad, "dW_q": w_q.grad, "dW_k": w_k.grad, "dW_v": w_v.grad}


# ----------------------------------------------------------------------------- printing
