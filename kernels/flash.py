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
Key blocks wholly above the causal diagonal are never visited. Blocks that every row of the
query block sees whole are processed without a mask; only blocks that cross the diagonal or the
end of the keys are masked. The Tq x Tk scores never touch GPU memory: extra memory is the
(B, H, Tq) log-sum-exp.

Backward, with P = exp2(S - LSE) recomputed tile by tile from the saved log-sum-exp:
    delta       delta_i = rowsum(dO_i * O_i)                     one program per query block
    dk, dv      one key block; loop over query blocks (from the causal start) and over the query
                heads that share this k/v head: dV += P^T dO, dK += dS^T Q * scale,
                with dS = P * (dO V^T - delta)                   one program per key block
    dq          one query block; loop over key blocks: dQ += dS K * scale
                                                                 one program per query block
Each program writes only its own rows, so there are no atomics and gradients are bitwise
identical run to run; a shared k/v head's gradient is summed over its query heads inside the
kernel, never by expanding K and V in memory. The fused kernel's backward uses the dk/dv kernel
too (`dkdv`).

Block sizes: on a GPU `triton.autotune` picks among a pruned set, keyed on head dim, dtype,
causal and Tq, Tk rounded up to powers of two; under the interpreter one fixed small set
(`INTERPRETER_BLOCKS`). Row and element offsets are 64-bit, and the grid is one flat axis, so
B * H past 65 535 and tensors past 2**31 elements work. Precision as in `kernels/fused.py`:
fp32 accumulation, IEEE fp32 dots for fp32 inputs, bf16 dots upcast under the interpreter.
"""

import torch
import triton
from torch import Tensor
import triton.language as tl

from kernels.checks import INTERPRET, check_inputs, last_dim_contiguous
from kernels.common import (LOG2E, dot, forward_outputs, gradient_outputs, head_and_query_block, kernel_op,
                            mask_scores, meta, on_device, pow2, strides, wrap_triton)

# ----------------------------------------------------------------------------- forward


@triton.jit
def _key_blocks(m0, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr):
    # For query rows [m0, m0 + BLOCK_M): keys [0, full) are seen whole by every row (no mask),
    # keys [full, end) need the mask; keys past `end` are seen by no row and never visited.
    if CAUSAL:
        last_row = tl.minimum(m0 + BLOCK_M, Tq) - 1
        end = tl.minimum(last_row + 1 + (Tk - Tq), Tk)
        full = tl.maximum(tl.minimum(m0 + 1 + (Tk - Tq), Tk), 0) // BLOCK_N * BLOCK_N
    else:
        end = Tk
        full = Tk // BLOCK_N * BLOCK_N
    return full, end


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
    offs_m, offs_d, Tq, Tk, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_key_block(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       start, offs_d, Tk, HEAD_DIM, BLOCK_N, MASK)

        # -- scores, base-2 logits                                   [BLOCK_M, BLOCK_N] fp32, registers
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale
        if MASK:
            s = mask_scores(s, offs_m, offs_n, Tq, Tk, CAUSAL)
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
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    Hq, Tq, Tk, GROUP,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    q_bucket, k_bucket,  # Tq, Tk rounded up to powers of two: read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    qo_mask = (offs_m < Tq)[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qo_mask, other=0.0)                                   # [BLOCK_M, BLOCK_D], registers

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)              # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                            # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                   # running weights @ V
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    full, end = _key_blocks(m0, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, Tq, Tk, 0, full, qk_scale,
                               HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION, UPCAST)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                               offs_m, offs_d, Tq, Tk, full, end, qk_scale,
                               HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION, UPCAST)

    # -- divide by the row sum once; a row that saw no key has l = 0 and gives 0 / 1 = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od,
             o.to(O.dtype.element_ty), mask=qo_mask)
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)  # ln(2)
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=offs_m < Tq)


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
    tl.store(DELTA + (b * Hq + h) * Tq + offs_m, tl.sum(o * do, 1), mask=offs_m < Tq)


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
    offs_m, offs_d, Tq, Tk, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    for start in range(lo, hi, BLOCK_N):
        offs_n, k, v = _load_key_block(k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                                       start, offs_d, Tk, HEAD_DIM, BLOCK_N, MASK)
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale                 # [BLOCK_M, BLOCK_N] fp32
        if MASK:
            s = mask_scores(s, offs_m, offs_n, Tq, Tk, CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        # -- dS = P * (dP - delta) with dP = dO V^T;  dQ += dS K
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)                         # [BLOCK_M, BLOCK_N] fp32
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k, PRECISION, UPCAST)                      # [BLOCK_M, BLOCK_D] fp32
    return dq


@triton.jit
def _flash_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    Hq, Tq, Tk, GROUP,
    scale, qk_scale,
    q_bucket, k_bucket,  # read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m.to(tl.int64)
    row_ok = offs_m < Tq
    qd_mask = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)                                      # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)                                     # [BLOCK_M, BLOCK_D]
    lse = tl.load(LSE + (b * Hq + h) * Tq + offs_m, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634     # base 2; empty rows: all s are -inf
    delta = tl.load(DELTA + (b * Hq + h) * Tq + offs_m, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh
    v_base = V + b * stride_vb + h_kv * stride_vh
    full, end = _key_blocks(m0, Tq, Tk, BLOCK_M, BLOCK_N, CAUSAL)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, Tq, Tk, 0, full, qk_scale,
                   HEAD_DIM, BLOCK_N, False, CAUSAL, PRECISION, UPCAST)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_kd, stride_vt, stride_vd,
                   offs_m, offs_d, Tq, Tk, full, end, qk_scale,
                   HEAD_DIM, BLOCK_N, True, CAUSAL, PRECISION, UPCAST)
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             (dq * scale).to(DQ.dtype.element_ty), mask=qd_mask)


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base,
    stride_qt, stride_qd, stride_dot, stride_dod,
    offs_n, offs_d, Tq, Tk, lo, hi, qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
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
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=0.0)
        lse = tl.where(lse == float("-inf"), 0.0, lse) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)

        # -- P^T for this tile, keys along rows and queries along columns  [BLOCK_N, BLOCK_M] fp32
        st = dot(k, tl.trans(q), PRECISION, UPCAST) * qk_scale
        if MASK:
            visible = (offs_n < Tk)[:, None]
            if CAUSAL:
                visible = visible & (offs_n[:, None] <= offs_m[None, :] + (Tk - Tq))
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
    Q, K, V, DO, DK, DV, LSE, DELTA,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dkb, stride_dkh, stride_dkt, stride_dkd,
    stride_dvb, stride_dvh, stride_dvt, stride_dvd,
    Hq, Hkv, Tq, Tk, GROUP,
    scale, qk_scale,
    q_bucket, k_bucket,  # read only by the autotuner's key
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    num_n_blocks = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n_blocks
    n0 = pid % num_n_blocks * BLOCK_N  # the first key blocks, seen by the most queries, start first
    b = (bh // Hkv).to(tl.int64)
    h_kv = (bh % Hkv).to(tl.int64)

    offs_n = n0 + tl.arange(0, BLOCK_N)  # keys of this program
    offs_d = tl.arange(0, BLOCK_D)
    keys = offs_n.to(tl.int64)
    kd_mask = (offs_n < Tk)[:, None] & (offs_d < HEAD_DIM)[None, :]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + keys[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kd_mask, other=0.0)                                      # [BLOCK_N, BLOCK_D]
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + keys[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kd_mask, other=0.0)                                      # [BLOCK_N, BLOCK_D]
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    # Query i sees key j when i >= j - (Tk - Tq): query blocks before `lo` see none of our keys,
    # those from `full` on see all of them; [lo, full) cross the diagonal and need the mask.
    # Without causality only the keys past Tk need one, and they are never stored.
    if CAUSAL:
        lo = tl.maximum(n0 - (Tk - Tq), 0) // BLOCK_M * BLOCK_M
        full = tl.minimum(tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - (Tk - Tq), 0), BLOCK_M), tl.cdiv(Tq, BLOCK_M)) * BLOCK_M
    else:
        lo = 0
        full = 0
    for g in range(GROUP):  # every query head served by this k/v head: the GQA sum stays on chip
        h = h_kv * GROUP + g
        q_base = Q + b * stride_qb + h * stride_qh
        do_base = DO + b * stride_dob + h * stride_doh
        lse_base = LSE + (b * Hq + h) * Tq
        delta_base = DELTA + (b * Hq + h) * Tq
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, offs_d, Tq, Tk, lo, full, qk_scale,
                             HEAD_DIM, BLOCK_M, True, CAUSAL, PRECISION, UPCAST)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                             stride_qt, stride_qd, stride_dot, stride_dod,
                             offs_n, offs_d, Tq, Tk, full, Tq, qk_scale,
                             HEAD_DIM, BLOCK_M, False, CAUSAL, PRECISION, UPCAST)

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
# compiling every (BLOCK_M, BLOCK_N, warps) with `python -m benchmarks.onchip --search`. The
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
    return triton.autotune(configs, key=["HEAD_DIM", "CAUSAL", "GROUP", "q_bucket", "k_bucket"],  # + dtypes
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


@kernel_op("flash_forward", fake=forward_outputs)
def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float) -> tuple[Tensor, Tensor]:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    o, lse = forward_outputs(q)
    grid = lambda meta: (B * Hq * triton.cdiv(Tq, meta["BLOCK_M"]),)
    with on_device(q):
        wrap_triton(_fwd_kernel)[grid](
            q, k, v, o, lse, *strides(q, k, v, o),
            Hq, Tq, Tk, Hq // Hkv, scale * LOG2E, t_bucket(Tq), t_bucket(Tk),
            **meta(q, causal), **_blocks("fwd"),
        )
    return o, lse


def dkdv(q, k, v, do, lse, delta, causal, scale):
    """dK and dV from the saved log-sum-exp and delta = rowsum(dO * O) (fused uses it too)."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = lambda meta: (B * Hkv * triton.cdiv(Tk, meta["BLOCK_N"]),)
    wrap_triton(_dkdv_kernel)[grid](
        q, k, v, do, dk, dv, lse, delta, *strides(q, k, v, do, dk, dv),
        Hq, Hkv, Tq, Tk, Hq // Hkv, scale, scale * LOG2E, t_bucket(Tq), t_bucket(Tk),
        **meta(q, causal), **_blocks("dkdv"),
    )
    return dk, dv


@kernel_op("flash_backward", fake=gradient_outputs)
def _backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, do: Tensor, causal: bool,
              scale: float) -> tuple[Tensor, Tensor, Tensor]:
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    do = last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    with on_device(q):
        wrap_triton(_flash_bwd_delta)[(B * Hq * triton.cdiv(Tq, DELTA_BLOCK_M),)](
            o, do, delta, *strides(o, do), Hq, Tq,
            HEAD_DIM=meta(q, causal)["HEAD_DIM"], BLOCK_D=meta(q, causal)["BLOCK_D"], BLOCK_M=DELTA_BLOCK_M,
        )
        dk, dv = dkdv(q, k, v, do, lse, delta, causal, scale)
        dq = torch.empty_like(q)
        grid = lambda meta: (B * Hq * triton.cdiv(Tq, meta["BLOCK_M"]),)
        wrap_triton(_dq_kernel)[grid](
            q, k, v, do, dq, lse, delta, *strides(q, k, v, do, dq),
            Hq, Tq, Tk, Hq // Hkv, scale, scale * LOG2E, t_bucket(Tq), t_bucket(Tk),
            **meta(q, causal), **_blocks("dq"),
        )
    return dq, dk, dv


# ----------------------------------------------------------------------------- autograd


def _save(ctx, inputs, output):
    q, k, v, causal, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.causal, ctx.scale = causal, scale
    ctx.mark_non_differentiable(lse)


def _gradients(ctx, do, dlse):
    q, k, v, o, lse = ctx.saved_tensors
    dq, dk, dv = _backward(q, k, v, o, lse, do, ctx.causal, ctx.scale)
    return dq, dk, dv, None, None


_forward.register_autograd(_gradients, setup_context=_save)


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, scale=None, return_lse=False):
    """Causal (by default) scaled dot-product attention, tiled: any sequence length, memory
    linear in T.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0; the semantics of
    `reference.attention` (bottom-right causal alignment, zeros for rows that see no key).
    With `return_lse`, also returns each row's log-sum-exp (natural log, fp32, (B, Hq, Tq)).
    """
    q, k, v, scale = check_inputs(q, k, v, scale)
    o, lse = _forward(q, k, v, bool(causal), scale)
    return (o, lse) if return_lse else o
