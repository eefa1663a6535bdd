"""
Flash attention: keys and values in tiles, an online softmax, any sequence length.

Forward, one program per (query block, batch x head) (Dao et al., FlashAttention-2, Algorithm 1):
    load the query block Q_i, [BLOCK_M, D], once
    for each key block K_j, V_j, [BLOCK_N, D], up to the causal limit:
        S = Q_i K_j^T * scale * log2(e)          base-2 logits, [BLOCK_M, BLOCK_N] fp32
        m_new = max(m, rowmax(S))                 the running max of each row
        P = exp2(S - m_new)
        l = l * exp2(m - m_new) + rowsum(P)       the running sum, rescaled when the max grows
        acc = acc * exp2(m - m_new) + P V_j       [BLOCK_M, D] fp32
    O_i = acc / l (once, at the end); LSE_i = (m + log2 l) * ln 2
The mask is a window around each query's diagonal key (bottom-right alignment): query i sees key
j when i - left <= j - (Tk - Tq) <= i + right; causal is (left, right) = (unbounded, 0), full
attention unbounded on both sides, a sliding window anything narrower. Key blocks that no row
of the query block sees are never visited (`_blocks_to_visit`), so a fixed window costs time
linear in T; blocks that every row sees whole run without a mask; only blocks that cross the
window's edges or the end of the keys are masked. The Tq x Tk scores never touch GPU memory:
extra memory is the (B, H, Tq) log-sum-exp.

Packed batches (`flash_attention_varlen`): the same kernels with VARLEN set. Sequence b's rows
of q, k, v are cu_seqlens[b]:cu_seqlens[b + 1] of (total, H, D) tensors; the grid is sized for
the longest sequence, and a program whose block starts past its own sequence's end returns at
once. Each sequence is aligned and masked on its own, so none sees another.

Backward, with P = exp2(S - LSE) recomputed tile by tile from the saved log-sum-exp:
    delta       delta_i = rowsum(dO_i * O_i)                     one program per query block
    dk, dv      one key block; loop over the query blocks that see it and over the query
                heads that share this k/v head: dV += P^T dO, dK += dS^T Q * scale,
                with dS = P * (dO V^T - delta)                   one program per key block
    dq          one query block; loop over key blocks: dQ += dS K * scale
                                                                 one program per query block
Each program writes only its own rows, so there are no atomics and gradients are bitwise
identical run to run; a shared k/v head's gradient is summed over its query heads inside the
kernel, never by expanding K and V in memory. The fused kernel's backward uses the dk/dv kernel
too (`dkdv`).

Block sizes: on a GPU `triton.autotune` picks among a pruned set, keyed on head dim, dtype,
packed or not, windowed or not, and Tq, Tk and the window's span rounded up to powers of two;
under the interpreter one fixed small set (`INTERPRETER_BLOCKS`). Row and element offsets are 64-bit, and the grid is one flat axis, so
B * H past 65 535 and tensors past 2**31 elements work. Precision as in `kernels/fused.py`:
fp32 accumulation, IEEE fp32 dots for fp32 inputs, bf16 dots upcast under the interpreter.
"""

from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor
import triton.language as tl

from kernels.checks import INTERPRET, check_inputs, check_varlen_inputs, last_dim_contiguous, window_bounds
from kernels.common import (LOG2E, dot, forward_outputs, gradient_outputs, head_and_query_block, kernel_op,
                            mask_scores, meta, on_device, pow2, strides, window_args, wrap_triton)

# ----------------------------------------------------------------------------- helpers


@triton.jit
def _sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN: tl.constexpr):
    # Where sequence b starts in the rows of q and of k, v, and its lengths: a batch of equal
    # lengths starts at row 0 of its own slice; a packed batch reads them from cu_seqlens.
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        return q0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, k0.to(tl.int64), tl.load(CU_K + b + 1) - k0
    else:
        return 0, Tq, 0, Tk


@triton.jit
def _blocks_to_visit(first_any, end_any, first_all, end_all, n, BLOCK: tl.constexpr):
    # A tile of rows sees positions [first_any, end_any) of [0, n) in all (some row sees each),
    # and [first_all, end_all) with every row. Of the blocks of n: [lo, hi) are visited, and of
    # those, [a, b) are seen whole by every row and need no mask; lo <= a <= b <= hi, and the
    # blocks outside [lo, hi) are skipped (a window costs its width, not n).
    lo = tl.maximum(first_any, 0) // BLOCK * BLOCK
    hi = tl.maximum(tl.minimum(end_any, n), lo)
    a = tl.minimum(tl.maximum(tl.cdiv(tl.maximum(first_all, 0), BLOCK) * BLOCK, lo), hi)
    b = tl.maximum(tl.minimum(tl.minimum(end_all, n) // BLOCK * BLOCK, hi), a)
    return lo, a, b, hi


@triton.jit
def _key_blocks(m0, Tq, Tk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Query rows [m0, m1) see keys [i + off - left, i + off + right] each (off = Tk - Tq).
    off = Tk - Tq
    m1 = tl.minimum(m0 + BLOCK_M, Tq)
    return _blocks_to_visit(m0 + off - left, m1 + off + right, m1 - 1 + off - left, m0 + off + right + 1, Tk, BLOCK_N)


@triton.jit
def _query_blocks(n0, Tq, Tk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [n0, n1) are seen by queries [j - off - right, j - off + left] each.
    off = Tk - Tq
    n1 = tl.minimum(n0 + BLOCK_N, Tk)
    return _blocks_to_visit(n0 - off - right, n1 - off + left, n1 - 1 - off - right, n0 - off + left + 1, Tq, BLOCK_M)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _load_key_block(
    k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd, start, offs_d, Tk,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
):
    # keys [start, start + BLOCK_N): their K and V tiles, [BLOCK_N, BLOCK_D]; only a masked
    # block can run past Tk
    offs_n = start + tl.arange(0, BLOCK_N)
    keys = offs_n.to(tl.int64)
    kv_mask = (offs_d < HEAD_DIM)[None, :]
    if MASK:
        kv_mask = kv_mask & (offs_n < Tk)[:, None]
    k = tl.load(k_base + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0)
    v = tl.load(v_base + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0)
    return offs_n, k, v


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, Tq, Tk, left, right, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_key_block(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       start, offs_d, Tk, HEAD_DIM, BLOCK_N, MASK)

        # -- scores, base-2 logits                                   [BLOCK_M, BLOCK_N] fp32, registers
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        if MASK:
            s = mask_scores(s, offs_m, offs_n, Tq, Tk, left, right)
        # -- update the running max m_i; exponentiate against it
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASK:  # a row that has seen no key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_use = m_new
        alpha = tl.math.exp2(m_i - m_use)  # rescales what was summed against the old max
        p = tl.math.exp2(s - m_use[:, None])
        # -- update the running sum l_i and the accumulator
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd(
    Q, K, V, O, LSE, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_lb, stride_lh,  # LSE: (B, Hq, Tq), or (Hq, total_q) packed
    Hq, Tq, Tk, GROUP,     # Tq, Tk: the lengths, or (VARLEN) the longest, which sizes the grid
    left, right,           # the window, unbounded sides as wide as Tq + Tk (`common.window_args`)
    qk_scale,              # scale * log2(e): the softmax runs in base 2
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, LEFT_BOUNDED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    q0, Tq, k0, Tk = _sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m0 = m_block * BLOCK_M
    if VARLEN:
        if m0 >= Tq:  # a packed sequence shorter than the longest
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_d = tl.arange(0, BLOCK_D)
    rows = q0 + offs_m.to(tl.int64)
    qo_mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qo_mask, other=0.0)                                   # [BLOCK_M, BLOCK_D], registers

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)              # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                            # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                   # running weights @ V
    k_base = K + b * stride_kb + h_kv * stride_kh + k0 * stride_kt
    v_base = V + b * stride_vb + h_kv * stride_vh + k0 * stride_vt
    # -- key blocks: masked before the window's full part, unmasked inside it, masked after
    lo, a, z, hi = _key_blocks(m0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
    if LEFT_BOUNDED:
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                   offs_m, offs_d, Tq, Tk, left, right, lo, a, qk_scale,
                                   HEAD_DIM, BLOCK_N, True, PRECISION, UPCAST)
    else:  # causal or full: every row sees key 0 on, and a loop from a literal 0 spills fewer registers
        a = 0
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, Tq, Tk, left, right, a, z, qk_scale,
                               HEAD_DIM, BLOCK_N, False, PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, Tq, Tk, left, right, z, hi, qk_scale,
                               HEAD_DIM, BLOCK_N, True, PRECISION, UPCAST)

    # -- divide by the row sum once; a row that saw no key has l = 0 and gives 0 / 1 = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=qo_mask)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    tl.store(LSE + b * stride_lb + h * stride_lh + rows, lse, mask=offs_m < Tq)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _flash_bwd_delta(
    O, DO, DELTA,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_dob, stride_doh, stride_dot, stride_dod,
    Hq, Tq,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    b, h, _, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, 1)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    o = tl.load(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
                mask=mask, other=0.0).to(tl.float32)                          # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=mask, other=0.0).to(tl.float32)                         # [BLOCK_M, BLOCK_D]
    tl.store(DELTA + (b * Hq + h) * Tq + rows, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, Tq, Tk, left, right, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_key_block(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       start, offs_d, Tk, HEAD_DIM, BLOCK_N, MASK)
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale                 # [BLOCK_M, BLOCK_N] fp32
        if MASK:
            s = mask_scores(s, offs_m, offs_n, Tq, Tk, left, right)
        p = tl.math.exp2(s - lse[:, None])
        # -- dS = P * (dP - delta) with dP = dO V^T;  dQ += dS K
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)                         # [BLOCK_M, BLOCK_N] fp32
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)                      # [BLOCK_M, BLOCK_D] fp32
    return dq


@triton.jit
def _flash_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_lb, stride_lh,  # LSE and DELTA
    Hq, Tq, Tk, GROUP,
    left, right,
    scale, qk_scale,
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, LEFT_BOUNDED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    q0, Tq, k0, Tk = _sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m0 = m_block * BLOCK_M
    if VARLEN:
        if m0 >= Tq:
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = q0 + offs_m.to(tl.int64)
    row_ok = offs_m < Tq
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)                                      # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)                                     # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634     # base 2; empty rows: all s are -inf
    delta = tl.load(DELTA + b * stride_lb + h * stride_lh + rows, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh + k0 * stride_kt
    v_base = V + b * stride_vb + h_kv * stride_vh + k0 * stride_vt
    lo, a, z, hi = _key_blocks(m0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
    if LEFT_BOUNDED:
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                       offs_m, offs_d, Tq, Tk, left, right, lo, a, qk_scale,
                       HEAD_DIM, BLOCK_N, True, PRECISION, UPCAST)
    else:
        a = 0
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, Tq, Tk, left, right, a, z, qk_scale,
                   HEAD_DIM, BLOCK_N, False, PRECISION, UPCAST)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, Tq, Tk, left, right, z, hi, qk_scale,
                   HEAD_DIM, BLOCK_N, True, PRECISION, UPCAST)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, offs_d, Tq, Tk, left, right, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Query rows past Tq load as q = dO = 0 with lse = delta = 0, so they add exactly 0 to dK and
    # dV without a mask; keys past Tk only touch rows of dK, dV that are never stored.
    d_ok = offs_d < HEAD_DIM
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        row_ok = offs_m < Tq
        rows = offs_m.to(tl.int64)
        qd_mask = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_base + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd, mask=qd_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod, mask=qd_mask, other=0.0)
        lse = tl.load(lse_base + rows, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)

        # -- P^T for this tile, keys along rows and queries along columns  [BLOCK_N, BLOCK_M] fp32
        st = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        if MASK:
            past = offs_n[:, None] - (offs_m[None, :] + (Tk - Tq))  # as in mask_scores, transposed
            visible = (offs_n < Tk)[:, None] & (past >= -left) & (past <= right)
            st = tl.where(visible, st, float("-inf"))
        pt = tl.math.exp2(st - lse[None, :])
        # -- dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
        dv += dot(pt.to(do.dtype), do, PRECISION, UPCAST)
        dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
        dst = pt * (dpt - delta[None, :])
        dk += dot(dst.to(q.dtype), q, PRECISION, UPCAST)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    stride_lb, stride_lh,  # LSE and DELTA
    Hq, Hkv, Tq, Tk, GROUP,
    left, right,
    scale, qk_scale,
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    num_n_blocks = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n_blocks
    n0 = pid % num_n_blocks * BLOCK_N  # the first key blocks, seen by the most queries, start first
    b = (bh // Hkv).to(tl.int64)
    h_kv = (bh % Hkv).to(tl.int64)
    q0, Tq, k0, Tk = _sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    if n0 >= Tk:  # a packed sequence shorter than the longest
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)  # keys of this program
    offs_d = tl.arange(0, BLOCK_D)
    keys = k0 + offs_n.to(tl.int64)
    kd_mask = (offs_n < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kd_mask, other=0.0)                                      # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kd_mask, other=0.0)                                      # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # -- query blocks: those before lo and from hi on see none of our keys; [a, z) see all of them
    lo, a, z, hi = _query_blocks(n0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
    for g in range(GROUP):  # every query head served by this k/v head: the GQA sum stays on chip
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qt
        do_base = DO + b * stride_dob + h * stride_doh + q0 * stride_dot
        lse_base = LSE + b * stride_lb + h * stride_lh + q0
        delta_base = DELTA + b * stride_lb + h * stride_lh + q0
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, offs_d, Tq, Tk, left, right, lo, a, qk_scale,
                             HEAD_DIM, BLOCK_M, True, PRECISION, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, offs_d, Tq, Tk, left, right, a, z, qk_scale,
                             HEAD_DIM, BLOCK_M, False, PRECISION, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, offs_d, Tq, Tk, left, right, z, hi, qk_scale,
                             HEAD_DIM, BLOCK_M, True, PRECISION, UPCAST)

    tl.store(DK + b * stride_dkb + h_kv * stride_dkh + keys[:, None] * stride_dkt + offs_d[None, :] * stride_dkd,
             (dk * scale).to(DK.dtype.element_ty), mask=kd_mask)
    tl.store(DV + b * stride_dvb + h_kv * stride_dvh + keys[:, None] * stride_dvt + offs_d[None, :] * stride_dvd,
             dv.to(DV.dtype.element_ty), mask=kd_mask)


# ----------------------------------------------------------------------------- config

# Under the interpreter: one fixed small set, BLOCK_M != BLOCK_N so that the diagonal logic is
# exercised with unequal blocks. (BLOCK_M, BLOCK_N) per kernel; tests swap in others.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)}
DELTA_BLOCK_M = 64

# On a GPU, candidates for triton.autotune, (BLOCK_M, BLOCK_N, num_warps, num_stages), by kernel
# and by (dtype size, BLOCK_D), BLOCK_D being the head dim rounded up to a power of two (D <= 64
# uses the 64 list): configurations that compile for an H100 with no register spills, found by
# compiling every (BLOCK_M, BLOCK_N, warps) with `python -m benchmarks.onchip --search`, for
# (B, H, T, D) tensors without a left window bound (`--varlen --window` show that the packed and
# windowed variants spill some, e.g. 224 B in fwd 128 x 64 at bf16 D = 128; and since windows
# came in, the dense fwd 128 x 128 at bf16 D = 128 spills 280 B, for the GPU campaign to retune). The
# 16-bit dk/dv at D = 256 spills in every one, so the least is kept (fp32 at D = 256 likewise).
# Small BLOCK_M serves short Tq (decoding). Which is fastest is the autotuner's measurement on
# the user's GPU; these only keep it from timing configurations that cannot win.
CANDIDATES = {
    "fwd": {
        (2, 64): [(128, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2)],
        (2, 128): [(128, 128, 8, 2), (128, 64, 8, 3), (64, 64, 8, 3), (64, 32, 8, 3), (16, 32, 4, 2)],
        (2, 256): [(32, 32, 8, 2), (16, 32, 8, 2)],
        (4, 64): [(32, 32, 4, 2), (16, 32, 8, 2)],
        (4, 128): [(16, 32, 8, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
    "dq": {
        (2, 64): [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 3), (16, 32, 4, 2)],
        (2, 128): [(64, 32, 8, 2), (32, 64, 8, 2), (32, 32, 4, 2), (16, 64, 4, 2), (16, 32, 4, 2)],
        (2, 256): [(32, 32, 8, 2), (16, 64, 8, 2), (16, 32, 8, 2)],
        (4, 64): [(32, 32, 4, 2), (16, 32, 4, 2)],
        (4, 128): [(32, 32, 8, 2), (16, 32, 4, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
    "dkdv": {
        (2, 64): [(64, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 4, 3), (16, 64, 4, 2), (16, 32, 4, 2)],
        (2, 128): [(32, 32, 8, 2), (16, 32, 8, 2)],
        (2, 256): [(16, 32, 8, 2)],
        (4, 64): [(16, 32, 4, 2)],
        (4, 128): [(16, 32, 8, 2)],
        (4, 256): [(16, 32, 8, 2)],
    },
}


def t_bucket(T):
    """The autotuner's key for a length: T rounded up to a power of two, 16 to 16384."""
    return min(pow2(T), 16384)


def window_key(left, right, Tk):
    """The autotuner's key for a mask: how many keys the window spans (an unbounded side counts
    as Tk), rounded up as lengths are; full attention, causal and a narrow window differ."""
    side = lambda w: w if 0 <= w < Tk else Tk
    return t_bucket(side(left) + side(right) + 1)


def candidates(kernel, itemsize, block_d):
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) the autotuner may try for this shape class."""
    return CANDIDATES[kernel][(itemsize, max(64, block_d))]


def _prune(kernel):
    # The autotuner holds every candidate of the kernel; keep this shape class's, and only
    # blocks no longer than the sequences (else the smallest).
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        allowed = candidates(kernel, args["Q"].element_size(), args["BLOCK_D"])
        mine = [c for c in configs if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]
        short = [c for c in mine if c.kwargs["BLOCK_M"] <= args["q_bucket"] and c.kwargs["BLOCK_N"] <= args["k_bucket"]]
        return short or [min(mine, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]
    return prune


def _tuned(kernel, fn):
    every = sorted({c for table in CANDIDATES[kernel].values() for c in table})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every]
    key = ["HEAD_DIM", "GROUP", "q_bucket", "k_bucket", "window_key", "VARLEN", "LEFT_BOUNDED"]  # + dtypes
    return triton.autotune(configs, key=[name for name in key if name in fn.arg_names],  # dk/dv: no LEFT_BOUNDED
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


if INTERPRET:  # autotuning is far too slow there: one fixed set of blocks
    _fwd_kernel, _dq_kernel, _dkdv_kernel = _flash_fwd, _flash_bwd_dq, _flash_bwd_dkdv
else:
    _fwd_kernel, _dq_kernel, _dkdv_kernel = (_tuned("fwd", _flash_fwd), _tuned("dq", _flash_bwd_dq),
                                             _tuned("dkdv", _flash_bwd_dkdv))


def _blocks(kernel):
    """Keyword arguments that fix the blocks under the interpreter (none on a GPU: autotuned)."""
    if not INTERPRET:
        return {}
    block_m, block_n = INTERPRETER_BLOCKS[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


# ----------------------------------------------------------------------------- launchers


class Batch(NamedTuple):
    """How the rows of q and k, v are laid out. (B, H, T, D) tensors: B sequences of Tq, Tk rows.
    Packed (total, H, D) tensors: B = len(cu_seqlens) - 1 sequences, sequence b in rows
    cu_seqlens[b]:cu_seqlens[b + 1], Tq and Tk then the longest (they size the grid)."""
    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    cu_q: Optional[Tensor] = None
    cu_k: Optional[Tensor] = None

    @property
    def packed(self):
        return self.cu_q is not None

    def strides(self, *tensors):
        """Four strides per tensor, (batch, head, row, d); packed tensors have no batch stride,
        each program offsets to its sequence's first row."""
        if not self.packed:
            return strides(*tensors)
        return [s for t in tensors for s in (0, t.stride(1), t.stride(0), t.stride(2))]

    def row_strides(self, lse):
        """(batch, head) strides of the fp32 per-row tensors, LSE and delta: (B, Hq, Tq), or
        (Hq, total_q) packed, where a program adds its sequence's first row."""
        return (0, lse.stride(0)) if self.packed else (lse.stride(0), lse.stride(1))

    def sequences(self, q):
        """The kernels' CU_Q, CU_K arguments (q as an unread placeholder when not packed)."""
        return (self.cu_q, self.cu_k) if self.packed else (q, q)

    def sizes(self, left, right):
        """Tq, Tk, GROUP, left, right: what every flash kernel takes after Hq (Hkv for dk/dv)."""
        return (self.Tq, self.Tk, self.Hq // self.Hkv, *window_args(left, right, self.Tq, self.Tk))

    def autotune_keys(self, left, right):
        return dict(q_bucket=t_bucket(self.Tq), k_bucket=t_bucket(self.Tk), window_key=window_key(left, right, self.Tk))


def _dense(q, k):
    B, Hq, Tq, D = q.shape
    return Batch(B, Hq, k.shape[1], Tq, k.shape[2])


def _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return Batch(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


def _run_forward(q, k, v, batch, left, right, scale):
    o = torch.empty_like(q)
    lse_shape = (batch.Hq, q.shape[0]) if batch.packed else (batch.B, batch.Hq, batch.Tq)
    lse = torch.empty(lse_shape, device=q.device, dtype=torch.float32)
    grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
    with on_device(q):
        wrap_triton(_fwd_kernel)[grid](
            q, k, v, o, lse, *batch.sequences(q), *batch.strides(q, k, v, o), *batch.row_strides(lse),
            batch.Hq, *batch.sizes(left, right), scale * LOG2E, **batch.autotune_keys(left, right),
            VARLEN=batch.packed, LEFT_BOUNDED=left >= 0, **meta(q), **_blocks("fwd"),
        )
    return o, lse


def dkdv(q, k, v, do, lse, delta, window, scale, batch=None):
    """dK and dV from the saved log-sum-exp and delta = rowsum(dO * O) (fused uses it too)."""
    batch = batch or _dense(q, k)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = lambda meta: (batch.B * batch.Hkv * triton.cdiv(batch.Tk, meta["BLOCK_N"]),)
    wrap_triton(_dkdv_kernel)[grid](
        q, k, v, do, dk, dv, lse, delta, *batch.sequences(q), *batch.strides(q, k, v, do, dk, dv),
        *batch.row_strides(lse), batch.Hq, batch.Hkv, *batch.sizes(*window), scale, scale * LOG2E,
        **batch.autotune_keys(*window), VARLEN=batch.packed, **meta(q), **_blocks("dkdv"),
    )
    return dk, dv


def _run_backward(q, k, v, o, lse, do, batch, left, right, scale):
    do = last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    # delta is per row: a packed batch is one sequence of all its rows here
    rows = Batch(1, batch.Hq, batch.Hkv, q.shape[0], 0, batch.cu_q, batch.cu_k) if batch.packed else batch
    d = meta(q)
    with on_device(q):
        wrap_triton(_flash_bwd_delta)[(rows.B * rows.Hq * triton.cdiv(rows.Tq, DELTA_BLOCK_M),)](
            o, do, delta, *rows.strides(o, do), rows.Hq, rows.Tq,
            HEAD_DIM=d["HEAD_DIM"], BLOCK_D=d["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M,
        )
        dk, dv = dkdv(q, k, v, do, lse, delta, (left, right), scale, batch)
        dq = torch.empty_like(q)
        grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
        wrap_triton(_dq_kernel)[grid](
            q, k, v, do, dq, lse, delta, *batch.sequences(q), *batch.strides(q, k, v, do, dq),
            *batch.row_strides(lse), batch.Hq, *batch.sizes(left, right), scale, scale * LOG2E,
            **batch.autotune_keys(left, right), VARLEN=batch.packed, LEFT_BOUNDED=left >= 0, **d, **_blocks("dq"),
        )
    return dq, dk, dv


@kernel_op("flash_forward", fake=forward_outputs)
def _forward(q: Tensor, k: Tensor, v: Tensor, left: int, right: int, scale: float) -> tuple[Tensor, Tensor]:
    return _run_forward(q, k, v, _dense(q, k), left, right, scale)


@kernel_op("flash_backward", fake=gradient_outputs)
def _backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, left: int, right: int,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    return _run_backward(q, k, v, o, lse, do, _dense(q, k), left, right, scale)


def _packed_outputs(q, *args):
    """The varlen forward's (out, lse): out like q (total_q, Hq, D), lse (Hq, total_q) fp32."""
    return torch.empty_like(q), torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)


@kernel_op("flash_varlen_forward", fake=_packed_outputs)
def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, left: int, right: int,
                    scale: float) -> tuple[Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run_forward(q, k, v, batch, left, right, scale)


@kernel_op("flash_varlen_backward", fake=gradient_outputs)
def _varlen_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, cu_seqlens_q: Tensor,
                     cu_seqlens_k: Tensor, max_seqlen_q: int, max_seqlen_k: int, left: int, right: int,
                     scale: float) -> tuple[Tensor, Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run_backward(q, k, v, o, lse, do, batch, left, right, scale)


# ----------------------------------------------------------------------------- autograd


def _save(ctx, inputs, output):
    q, k, v, *rest = inputs  # rest: (left, right, scale), packed: cu_seqlens and max_seqlen first
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, *[x for x in rest if isinstance(x, Tensor)])
    ctx.rest = [x for x in rest if not isinstance(x, Tensor)]
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, do, dlse):
    q, k, v, o, lse, *cu_seqlens = ctx.saved_tensors
    grads = (_varlen_backward if cu_seqlens else _backward)(q, k, v, o, lse, do, *cu_seqlens, *ctx.rest)
    return (*grads, *[None] * (len(cu_seqlens) + len(ctx.rest)))


_forward.register_autograd(_gradients, setup_context=_save)
_varlen_forward.register_autograd(_gradients, setup_context=_save)


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, scale=None, return_lse=False, window=None):
    """Causal (by default) scaled dot-product attention, tiled: any sequence length, memory
    linear in T.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0; the semantics of
    `reference.attention` (bottom-right causal alignment, zeros for rows that see no key).
    `window` (left, right): query i sees only keys i - left <= j - (Tk - Tq) <= i + right, -1
    for an unbounded side (FlashAttention's window_size); causal means right = 0. Key blocks
    outside the window are skipped, so a fixed window costs time linear in T.
    With `return_lse`, also returns each row's log-sum-exp (natural log, fp32, (B, Hq, Tq)).
    """
    q, k, v, scale = check_inputs(q, k, v, scale)
    left, right = window_bounds(window, causal)
    o, lse = _forward(q, k, v, left, right, scale)
    return (o, lse) if return_lse else o


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           scale=None, return_lse=False, window=None, check_seqlens=True):
    """Attention over a packed batch of sequences of different lengths, forward and backward,
    no sequence seeing another (FlashAttention's flash_attn_varlen_func).

    q (total_q, Hq, D); k, v (total_k, Hkv, D): the sequences one after another. cu_seqlens_q,
    cu_seqlens_k: int32 (B + 1,), 0 first, non-decreasing, ending at total_q (total_k);
    sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q. Lengths 0 are allowed, but not
    all of them: total_q and total_k must be at least 1.
    max_seqlen_q, max_seqlen_k: the longest lengths (at least; they size the grid). Causal
    alignment and `window` per sequence as in `flash_attention`. The semantics of
    `reference.varlen_attention`. With `return_lse`, also the log-sum-exp, (Hq, total_q) fp32.
    Checking the values of cu_seqlens and max_seqlen reads the offsets on the host once per call,
    a sync and a graph break under torch.compile (the op itself,
    `torch.ops.attention_kernels.flash_varlen_forward`, has none). `check_seqlens=False` skips
    that read, for callers that built the offsets themselves (the transformers integration):
    offsets that break the rules above then read and write outside the tensors.
    """
    q, k, v, cu_seqlens_q, cu_seqlens_k, scale = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                                     max_seqlen_q, max_seqlen_k, scale,
                                                                     check_seqlens)
    left, right = window_bounds(window, causal)
    o, lse = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                             left, right, scale)
    return (o, lse) if return_lse else o
