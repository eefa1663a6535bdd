"""
The flash kernel's forward and backward, written to be read: the same output as `attention`,
computed key block by key block with an online softmax, in the update rule and the order of
`kernels/flash.py` (`_fwd_inner`), and the same gradients as autograd's, tile by tile from the
forward's log-sum-exp (`kernels/flash_bwd.py`), so that `reference.explain --tiled` can show each
step. Tested to agree with `kernels.flash_attention` and with `attention`.

For each query row, after each block of keys:
    s      = q @ k_block^T * scale * log2(e)     the block's scores as base-2 logits (exp2(s) = e^(q.k*scale))
    m_new  = max(m, rowmax(s))                    the running max
    alpha  = exp2(m - m_new)                      rescales what was summed against the old max
    p      = exp2(s - m_new)
    l      = l * alpha + rowsum(p)                the running sum of weights
    acc    = acc * alpha + p @ v_block            the running weighted sum of values
and at the end out = acc / l, lse = (m + log2 l) * ln(2). A row that has seen no key yet keeps
m = -inf, l = 0, acc = 0 (exp2 is taken against 0 then, never -inf - -inf).

The backward keeps no P (it is Tq x Tk): given dout, each row's delta = rowsum(dout * out) once,
then for each block of keys and each block of queries that sees any of them:
    p      = exp2(s - lse * log2(e))              P recomputed from q, k and the forward's lse
    dv    += p^T @ dout                           every query that sees these keys adds its share
    dp     = dout @ v_block^T
    ds     = p * (dp - delta)                     the softmax's backward
    dk    += ds^T @ q
    dq    += ds @ k_block
and at the end dq, dk times the scale. Keys outer, queries inner is the kernel's dk/dv program;
the kernel runs dq as a second pass (one program per query block, keys inner) so that no two
programs add into the same rows, but it sums the same tiles.
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


def row_delta(out, dout):
    """delta_i = rowsum(dout_i * out_i) = sum_j P_ij dP_ij: the backward's one number per query
    row, computed from the output, so no P is needed."""
    return (dout * out).sum(dim=-1)                                    # (B, Hq, Tq)


def flash_backward(q, k, v, out, lse, dout, causal=True, scale=None, block_size=16, on_tile=None):
    """dq, dk, dv of `flash_forward`'s output for the upstream gradient dout, one tile of
    `block_size` queries x `block_size` keys at a time, P recomputed from `lse` (B, Hq, Tq).

    q, out, dout (B, Hq, Tq, D), k and v (B, Hkv, Tk, D), as `flash_forward`; the gradients of
    grouped k/v heads are summed over the query heads they serve. `on_tile(k0, k1, q0, q1,
    state)`, if given, is called for each tile, keys k0..k1-1 and queries q0..q1-1: with None for
    a tile no query sees (skipped, as the kernel skips it), else a dict of that tile's s, p, dp,
    ds and the rows of dv, dk, dq it added into (unscaled; live views, clone to keep them).
    """
    in_dtype, dt = q.dtype, compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    q, out, dout = q.to(dt), out.to(dt), dout.to(dt)                   # (B, Hq, Tq, D)
    k, v = expand_kv(k.to(dt), Hq), expand_kv(v.to(dt), Hq)            # (B, Hq, Tk, D)
    lse2 = lse.to(dt) * LOG2E                                          # (B, Hq, Tq) base 2, as the kernel keeps it
    lse2 = lse2.masked_fill(lse2 == float("-inf"), 0.0)                # (B, Hq, Tq) a row with no key: p = 0
    delta = row_delta(out, dout)                                       # (B, Hq, Tq)
    visible_all = causal_mask(Tq, Tk, q.device) if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)

    dq = torch.zeros(B, Hq, Tq, D, dtype=dt, device=q.device)          # summed over key blocks
    dk = torch.zeros(B, Hq, Tk, D, dtype=dt, device=q.device)          # summed over query blocks
    dv = torch.zeros(B, Hq, Tk, D, dtype=dt, device=q.device)          # summed over query blocks
    for k0 in range(0, Tk, block_size):
        k1 = min(k0 + block_size, Tk)
        for q0 in range(0, Tq, block_size):
            q1 = min(q0 + block_size, Tq)
            visible = visible_all[q0:q1, k0:k1]                        # (M, N)
            if not visible.any():                                      # no query here sees these keys: no gradient
                if on_tile:
                    on_tile(k0, k1, q0, q1, None)
                continue
            qb, dob, kb, vb = q[:, :, q0:q1], dout[:, :, q0:q1], k[:, :, k0:k1], v[:, :, k0:k1]  # (B, Hq, M or N, D)
            s = apply_mask(scores(qb, kb, scale * LOG2E), visible)     # (B, Hq, M, N) base-2 logits, as the forward's
            p = torch.exp2(s - lse2[:, :, q0:q1, None])                # (B, Hq, M, N) the forward's P, recomputed
            dv[:, :, k0:k1] += p.transpose(-2, -1) @ dob              # (B, Hq, N, M) @ (B, Hq, M, D) -> (B, Hq, N, D)
            dp = dob @ vb.transpose(-2, -1)                            # (B, Hq, M, D) @ (B, Hq, D, N) -> (B, Hq, M, N)
            ds = p * (dp - delta[:, :, q0:q1, None])                   # (B, Hq, M, N)
            dk[:, :, k0:k1] += ds.transpose(-2, -1) @ qb              # (B, Hq, N, M) @ (B, Hq, M, D) -> (B, Hq, N, D)
            dq[:, :, q0:q1] += ds @ kb                                 # (B, Hq, M, N) @ (B, Hq, N, D) -> (B, Hq, M, D)
            if on_tile:
                on_tile(k0, k1, q0, q1, dict(s=s, p=p, dp=dp, ds=ds, dv=dv[:, :, k0:k1], dk=dk[:, :, k0:k1],
                                             dq=dq[:, :, q0:q1]))

    dq, dk = dq * scale, dk * scale                                    # the scale once, at the end
    group = Hq // Hkv                                                  # query heads per k/v head
    dk = dk.view(B, Hkv, group, Tk, D).sum(dim=2)                      # (B, Hkv, Tk, D)
    dv = dv.view(B, Hkv, group, Tk, D).sum(dim=2)                      # (B, Hkv, Tk, D)
    return dq.to(in_dtype), dk.to(in_dtype), dv.to(in_dtype)
