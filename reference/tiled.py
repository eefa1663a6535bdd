"""
The flash kernel's forward, written to be read: the same output as `attention`, computed key
block by key block with an online softmax, in the update rule and the order of
`kernels/flash.py` (`_fwd_inner`), so that `reference.explain --tiled` can show each step.
Tested to agree with `kernels.flash_attention` and with `attention`.

For each query row, after each block of keys:
    s      = q @ k_block^T * scale * log2(e)     the block's scores as base-2 logits (exp2(s) = e^(q.k*scale))
    m_new  = max(m, rowmax(s))                    the running max
    alpha  = exp2(m - m_new)                      rescales what was summed against the old max
    p      = exp2(s - m_new)
    l      = l * alpha + rowsum(p)                the running sum of weights
    acc    = acc * alpha + p @ v_block            the running weighted sum of values
and at the end out = acc / l, lse = (m + log2 l) * ln(2). A row that has seen no key yet keeps
m = -inf, l = 0, acc = 0 (exp2 is taken against 0 then, never -inf - -inf).
"""

import math

import torch

from .naive import apply_mask, causal_mask, compute_dtype, expand_kv, scores

LOG2E = 1.4426950408889634  # 1/ln(2)


def online_softmax_step(m, l, acc, s, v):
    """One key block's update of the running max m (.., Tq), sum l (.., Tq) and accumulator acc
    (.., Tq, D), given its base-2 scores s (.., Tq, N) and values v (.., N, D). Returns the new
    m, l, acc and the two quantities worth showing: alpha (.., Tq) and p (.., Tq, N)."""
    m_new = torch.maximum(m, s.amax(dim=-1))                           # (.., Tq)
    m_use = m_new.masked_fill(m_new == float("-inf"), 0.0)             # (.., Tq) no key seen yet: exp2(-inf) = 0
    alpha = torch.exp2(m - m_use)                                      # (.., Tq)
    p = torch.exp2(s - m_use[..., None])                               # (.., Tq, N)
    l = l * alpha + p.sum(dim=-1)                                      # (.., Tq)
    acc = acc * alpha[..., None] + p @ v                               # (.., Tq, N) @ (.., N, D) -> (.., Tq, D)
    return m_new, l, acc, alpha, p


def flash_forward(q, k, v, causal=True, scale=None, block_size=16, on_block=None):
    """softmax(mask(q @ k^T * scale)) @ v, one block of `block_size` keys at a time.

    q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), as `attention`. Returns (out, lse), lse in natural
    log. `on_block(start, end, state)`, if given, is called after each key block with a dict of
    that block's s, visible, m_old, m, alpha, p, l, acc (all rows, every batch and head).
    """
    in_dtype, dt = q.dtype, compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hq, Tq, D = q.shape
    Tk = k.shape[2]
    q = q.to(dt)                                                       # (B, Hq, Tq, D)
    k, v = expand_kv(k.to(dt), Hq), expand_kv(v.to(dt), Hq)            # (B, Hq, Tk, D)
    visible_all = causal_mask(Tq, Tk, q.device) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)

    m = torch.full((B, Hq, Tq), float("-inf"), dtype=dt, device=q.device)  # running max (base 2)
    l = torch.zeros(B, Hq, Tq, dtype=dt, device=q.device)              # running sum
    acc = torch.zeros(B, Hq, Tq, D, dtype=dt, device=q.device)         # running weights @ v
    for start in range(0, Tk, block_size):
        end = min(start + block_size, Tk)
        visible = visible_all[:, start:end]                            # (Tq, N)
        s = apply_mask(scores(q, k[:, :, start:end], scale * LOG2E), visible)  # (B, Hq, Tq, N) as the kernel: one multiply
        m_old = m
        m, l, acc, alpha, p = online_softmax_step(m, l, acc, s, v[:, :, start:end])
        if on_block:
            on_block(start, end, dict(s=s, visible=visible, m_old=m_old, m=m, alpha=alpha, p=p, l=l, acc=acc))

    out = acc / l.masked_fill(l == 0, 1.0)[..., None]                 # (B, Hq, Tq, D) divided once, at the end
    lse = torch.where(l == 0, float("-inf"), (m + torch.log2(l.masked_fill(l == 0, 1.0))) / LOG2E)  # (B, Hq, Tq)
    return out.to(in_dtype), lse
