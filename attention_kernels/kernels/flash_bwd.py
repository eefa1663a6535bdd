"""
Flash attention's backward kernels. P = exp2(S * c - LSE) is recomputed tile by tile from the
forward's base-2 log-sum-exp (c = scale * log2(e); one fused multiply-add per score).

    delta       delta_i = rowsum(dO_i * O_i) - dLSE_i                one program per query block
                (16-bit: O plus the forward's rounding residual, so delta matches dP)
    dk, dv      one key block, K and V resident; loop over the query blocks that see it, and over
                the query heads that share this k/v head:
                    dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
                                                                     one program per key block
    dq          one query block, Q and dO resident; loop over the key blocks it sees:
                    dS = P * (dO V^T - delta);  dQ += dS K           one program per query block
dK and dQ are multiplied by the scale once, at the end. dLSE is the gradient that reaches the
log-sum-exp when a caller uses it (merging attention over chunks does): d lse_i / d S_ij = P_ij,
so it only shifts delta.

Each program writes only its own rows, so there are no atomics and gradients are bitwise
identical run to run; a shared k/v head's gradient is summed over its query heads inside the
kernel, never by expanding K and V in memory. The loops are split like the forward's
(`key_blocks`, `query_blocks`): unmasked blocks load without row masks and skip the compare and
select; the pointers advance by a block, the 64-bit row offsets computed once.

A user's attn_mask (HAS_ATTN_MASK) is added to the recomputed logits as in the forward
(`common.attn_mask_scores`); every row may then be one the mask hides whole (lse = -inf), so
the unmasked blocks guard lse too. A float mask's gradient (MASK_GRAD) is dS itself, the
gradient of the logit it is added to (after the soft-cap: not through its derivative): the dq
kernel, which visits each (query block, key block) tile of a head once, stores it into a
(B, Hq, Tq, Tk) fp32 buffer, zeros where no block is visited; the launcher sums it over the
dimensions the mask was broadcast along. One writer per element: no atomics, bitwise repeatable.
"""

import triton
import triton.language as tl

from .common import (attn_mask_scores, dropout_keep, dot, dot_acc, head_and_query_block, mask_function,
                     score_function, score_function_grad, score_mods)
from .flash_fwd import key_blocks, listed_blocks, load_tile, query_blocks, sequence, store_tile, tile_pointers


@triton.jit
def _flash_bwd_delta(
    O, RES, DO, DLSE, DELTA,
    stride_ob, stride_oh, stride_ot,      # RES has O's strides; the head dim has unit stride
    stride_dob, stride_doh, stride_dot,
    Hq, Tq,
    HAS_RES: tl.constexpr, HAS_DLSE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # delta_i = rowsum(dO_i * O_i) = sum_j P_ij dP_ij, computed so that it cancels dP exactly
    # where it should: with one visible key, P = 1 and O = V, and the true dS = dP - delta is 0.
    # So O is the one dP sees (16-bit: the stored O plus its rounding residual RES; without RES a
    # peaky row's dS carries O's rounding, 2^-9 of |dO| |V|), and the sum runs as the kernels'
    # dots run: under the interpreter in float64, rounded once; fp32 on a GPU (IEEE dots, one FMA
    # chain along D) as the same chain; 16-bit (tensor cores) as an fp32 sum.
    b, h, _, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, 1)
    m0 = m_block * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Tq
    o_base = O + b * stride_ob + h * stride_oh
    do_base = DO + b * stride_dob + h * stride_doh
    if UPCAST or PRECISION != "ieee":
        o = load_tile(tile_pointers(o_base, m0, stride_ot, BLOCK_M, BLOCK_D), offs_m, Tq, True, HEAD_DIM, BLOCK_D)
        do = load_tile(tile_pointers(do_base, m0, stride_dot, BLOCK_M, BLOCK_D), offs_m, Tq, True, HEAD_DIM, BLOCK_D)
        if UPCAST:
            o = o.to(tl.float64)
        else:
            o = o.to(tl.float32)
        if HAS_RES:
            r_base = RES + b * stride_ob + h * stride_oh
            o += load_tile(tile_pointers(r_base, m0, stride_ot, BLOCK_M, BLOCK_D), offs_m, Tq, True, HEAD_DIM,
                           BLOCK_D).to(o.dtype)
        delta = tl.sum(o * do.to(o.dtype), 1).to(tl.float32)
    else:  # fp32 on a GPU: the FMA chain of an IEEE tl.dot, d = 0, 1, ..., HEAD_DIM - 1
        rows = offs_m.to(tl.int64)
        delta = tl.zeros([BLOCK_M], dtype=tl.float32)
        for d in range(HEAD_DIM):
            o_d = tl.load(o_base + rows * stride_ot + d, mask=row_ok, other=0.0)
            do_d = tl.load(do_base + rows * stride_dot + d, mask=row_ok, other=0.0)
            delta = tl.fma(do_d, o_d, delta)
    row = (b * Hq + h) * Tq + offs_m
    if HAS_DLSE:  # the base-2 log-sum-exp's gradient, in natural units: dlse2 * log2(e)
        delta -= tl.load(DLSE + row, mask=row_ok, other=0.0) * 1.4426950408889634
    tl.store(DELTA + row, delta, mask=row_ok)


# ----------------------------------------------------------------------------- dq


@triton.jit
def _dq_inner(
    dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm, stride_maskn, dmask_base,
    offs_m, Tq, Tk, left, right, lo, hi, qk_scale, softcap, slope, seed, bh, q_off, k_off, p_drop, keep_scale,
    b, h, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, score_mod_args, MASK_MOD: tl.constexpr, mask_mod_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
    BOOL_MASK: tl.constexpr, MASK_GRAD: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    k_ptrs = tile_pointers(k_base, lo, stride_kt, BLOCK_N, BLOCK_D)
    v_ptrs = tile_pointers(v_base, lo, stride_vt, BLOCK_N, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        k = load_tile(k_ptrs, offs_n, Tk, MASK, HEAD_DIM, BLOCK_D)              # [BLOCK_N, BLOCK_D]
        v = load_tile(v_ptrs, offs_n, Tk, MASK, HEAD_DIM_V, BLOCK_DV)
        s = dot(q, tl.trans(k), PRECISION, UPCAST)                              # [BLOCK_M, BLOCK_N] fp32, raw
        if HAS_SOFTCAP or HAS_ALIBI or HAS_ATTN_MASK or HAS_SCORE_MOD or HAS_MASK_MOD:
            s, t = score_mods(s * qk_scale, offs_m + (Tk - Tq), offs_n, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_SCORE_MOD or HAS_MASK_MOD:  # as in the forward
                q_idx = tl.minimum(offs_m, Tq - 1)[:, None]
                kv_idx = tl.minimum(offs_n, Tk - 1)[None, :]
            if HAS_SCORE_MOD:  # the chain rule's factor at the function's input
                g = score_function_grad(s, b, h, q_idx, kv_idx, SCORE_GRAD, score_mod_args)
                s = score_function(s, b, h, q_idx, kv_idx, SCORE_MOD, score_mod_args)
            if HAS_ATTN_MASK:
                s = attn_mask_scores(s, mask_base, offs_m, offs_n, Tq, Tk, stride_maskm, stride_maskn, BOOL_MASK)
            if HAS_MASK_MOD:
                s = mask_function(s, b, h, q_idx, kv_idx, MASK_MOD, mask_mod_args)
            p = tl.math.exp2(s - lse[:, None])
        else:
            p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASK:
            past = offs_n[None, :] - (offs_m[:, None] + (Tk - Tq))  # as in `mask_scores`
            p = tl.where((offs_n < Tk)[None, :] & (past >= -left) & (past <= right), p, 0.0)
        # -- dS = P * (dP - delta) with dP = dO V^T;  dQ += dS K
        dp = dot(do, tl.trans(v), PRECISION, UPCAST)                            # [BLOCK_M, BLOCK_N] fp32
        if HAS_DROPOUT:  # the gradient reaches only the weights the forward kept, scaled as they were
            dp = tl.where(dropout_keep(seed, bh, offs_m[:, None] + q_off, offs_n[None, :] + k_off, p_drop),
                          dp * keep_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if MASK_GRAD:  # d loss / d mask = dS, natural units: the mask is added after the cap
            inside = (offs_m < Tq)[:, None] & (offs_n < Tk)[None, :]
            tl.store(dmask_base + offs_m.to(tl.int64)[:, None] * Tk + offs_n[None, :], ds, mask=inside)
        if HAS_SCORE_MOD:  # through the user's function (p = 0 where it gave -inf: g is not read there)
            ds = tl.where(p > 0.0, ds * g, 0.0)
        if HAS_SOFTCAP:  # through the cap: d(cap tanh(s / cap)) / ds = 1 - tanh^2
            ds = ds * (1.0 - t * t)
        dq = dot_acc(dq, ds.to(k.dtype), k, PRECISION, UPCAST)                    # [BLOCK_M, BLOCK_D] fp32
        k_ptrs += BLOCK_N * stride_kt
        v_ptrs += BLOCK_N * stride_vt
    return dq


@triton.jit
def _flash_bwd_dq(
    Q, K, V, DO, DQ, LSE, DELTA, CU_Q, CU_K,
    ATTN_MASK,                        # as in the forward (`kernels/flash_fwd.py`)
    DMASK,                            # the mask's gradient, (B, Hq, Tq, Tk) fp32 contiguous (MASK_GRAD)
    KV_COUNTS, KV_INDEX,              # the block map, as in the forward
    stride_qb, stride_qh, stride_qt,  # batch, head, row; the head dim has unit stride (`checks.last_dim_contiguous`)
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dqb, stride_dqh, stride_dqt,
    stride_lb, stride_lh,  # LSE and DELTA
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_kcb, stride_kch, stride_kcm, stride_kib, stride_kih, stride_kim,  # KV_COUNTS, KV_INDEX
    Hq, Tq, Tk,
    left, right,
    scale, qk_scale,
    softcap, SLOPES, stride_sb,      # as in the forward (`kernels/flash_fwd.py`)
    seed, p_drop, keep_scale,        # dropout, as in the forward
    drop_q0, drop_k0, drop_h0,       # its position offsets, as in the forward
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    score_mod_args, mask_mod_args,   # as in the forward
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,  # v's, o's and do's head dim, and its power of two
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr,  # the user's functions, or None
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr, MAP_M: tl.constexpr, MAP_N: tl.constexpr,
    VARLEN: tl.constexpr, LEFT_BOUNDED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    q0, Tq, k0, Tk = sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m0 = m_block * BLOCK_M
    if VARLEN:
        if m0 >= Tq:
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < Tq
    q = load_tile(tile_pointers(Q + b * stride_qb + h * stride_qh + q0 * stride_qt, m0, stride_qt, BLOCK_M, BLOCK_D),
                  offs_m, Tq, True, HEAD_DIM, BLOCK_D)                          # [BLOCK_M, BLOCK_D], resident
    do = load_tile(tile_pointers(DO + b * stride_dob + h * stride_doh + q0 * stride_dot, m0, stride_dot, BLOCK_M,
                                 BLOCK_DV), offs_m, Tq, True, HEAD_DIM_V, BLOCK_DV)  # [BLOCK_M, BLOCK_DV], resident
    row = b * stride_lb + h * stride_lh + q0 + offs_m
    lse = tl.load(LSE + row, mask=row_ok, other=0.0)
    lse = tl.where(lse == float("-inf"), 0.0, lse)                              # empty rows: every p is masked
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    k_base = K + b * stride_kb + h_kv * stride_kh + k0 * stride_kt
    v_base = V + b * stride_vb + h_kv * stride_vh + k0 * stride_vt
    mask_base = ATTN_MASK + b * stride_maskb + h * stride_maskh
    dmask_base = DMASK + (b * Hq + h) * Tq * Tk
    bh = b * Hq + h + drop_h0  # dropout's head, as in the forward
    if HAS_BLOCK_MAP:  # the key blocks the map lists (`kernels/flash_fwd.py`)
        index, n_partial, n_listed = listed_blocks(KV_COUNTS, KV_INDEX, b, h, m0 // MAP_M, stride_kcb, stride_kch,
                                                   stride_kcm, stride_kib, stride_kih, stride_kim)
        for i in range(0, n_partial):
            lo = tl.load(index + i) * MAP_N
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm,
                           stride_maskn, dmask_base,
                           offs_m, Tq, Tk, left, right, lo, tl.minimum(lo + MAP_N, Tk),
                           qk_scale, softcap, slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                           SCORE_GRAD, score_mod_args,
                           MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                           HAS_ATTN_MASK, BOOL_MASK, MASK_GRAD, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
        for i in range(n_partial, n_listed):
            lo = tl.load(index + i) * MAP_N
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm,
                           stride_maskn, dmask_base,
                           offs_m, Tq, Tk, left, right, lo, lo + MAP_N,
                           qk_scale, softcap, slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                           SCORE_GRAD, score_mod_args,
                           MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                           False, BOOL_MASK, MASK_GRAD, HAS_SCORE_MOD, False, PRECISION, UPCAST)
    else:
        lo, a, z, hi = key_blocks(m0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
        if LEFT_BOUNDED:
            dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm,
                           stride_maskn, dmask_base,
                           offs_m, Tq, Tk, left, right, lo, a,
                           qk_scale, softcap, slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                           SCORE_GRAD, score_mod_args,
                           MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                           HAS_ATTN_MASK, BOOL_MASK, MASK_GRAD, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
        else:
            a = 0
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm,
                       stride_maskn, dmask_base,
                           offs_m, Tq, Tk, left, right, a, z,
                       qk_scale, softcap, slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                       SCORE_GRAD, score_mod_args,
                           MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                       HAS_ATTN_MASK, BOOL_MASK, MASK_GRAD, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
        dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, stride_kt, stride_vt, mask_base, stride_maskm,
                       stride_maskn, dmask_base,
                           offs_m, Tq, Tk, left, right, z, hi,
                       qk_scale, softcap, slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                       SCORE_GRAD, score_mod_args,
                           MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True,
                           HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT,
                       HAS_ATTN_MASK, BOOL_MASK, MASK_GRAD, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
    store_tile(tile_pointers(DQ + b * stride_dqb + h * stride_dqh + q0 * stride_dqt, m0, stride_dqt, BLOCK_M, BLOCK_D),
               (dq * scale).to(DQ.dtype.element_ty), offs_m, Tq, HEAD_DIM, BLOCK_D)


# ----------------------------------------------------------------------------- dk, dv


@triton.jit
def _dkdv_inner(
    dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot, mask_base, stride_maskm, stride_maskn,
    offs_n, Tq, Tk, left, right, lo, hi, qk_scale, softcap, slope, seed, bh, q_off, k_off, p_drop, keep_scale,
    b, h, SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, score_mod_args, MASK_MOD: tl.constexpr, mask_mod_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, HAS_ATTN_MASK: tl.constexpr,
    BOOL_MASK: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Masked blocks load query rows past Tq as q = dO = 0 with lse = delta = 0, so they add
    # exactly 0 to dK and dV; keys past Tk only touch rows of dK, dV that are never stored.
    q_ptrs = tile_pointers(q_base, lo, stride_qt, BLOCK_M, BLOCK_D)
    do_ptrs = tile_pointers(do_base, lo, stride_dot, BLOCK_M, BLOCK_DV)
    for start in range(lo, hi, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M)
        q = load_tile(q_ptrs, offs_m, Tq, MASK, HEAD_DIM, BLOCK_D)              # [BLOCK_M, BLOCK_D]
        do = load_tile(do_ptrs, offs_m, Tq, MASK, HEAD_DIM_V, BLOCK_DV)
        if MASK:  # rows past Tq, and rows that see no key (lse = -inf), are masked below
            lse = tl.load(lse_base + offs_m, mask=offs_m < Tq, other=0.0)
            lse = tl.where(lse == float("-inf"), 0.0, lse)
            delta = tl.load(delta_base + offs_m, mask=offs_m < Tq, other=0.0)
        else:  # every row of a full block sees every key here: lse is finite, unless the mask hides them
            lse = tl.load(lse_base + offs_m)
            delta = tl.load(delta_base + offs_m)
            if HAS_ATTN_MASK or HAS_MASK_MOD or HAS_SCORE_MOD:
                lse = tl.where(lse == float("-inf"), 0.0, lse)

        # -- P^T for this tile, keys along rows and queries along columns  [BLOCK_N, BLOCK_M] fp32
        st = dot(k, tl.trans(q), PRECISION, UPCAST)
        if HAS_SOFTCAP or HAS_ALIBI or HAS_ATTN_MASK or HAS_SCORE_MOD or HAS_MASK_MOD:  # transposed: keys along rows
            st, tt = score_mods(st * qk_scale, offs_n, offs_m + (Tk - Tq), softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_SCORE_MOD or HAS_MASK_MOD:  # transposed: queries along columns
                q_idx = tl.minimum(offs_m, Tq - 1)[None, :]
                kv_idx = tl.minimum(offs_n, Tk - 1)[:, None]
            if HAS_SCORE_MOD:
                gt = score_function_grad(st, b, h, q_idx, kv_idx, SCORE_GRAD, score_mod_args)
                st = score_function(st, b, h, q_idx, kv_idx, SCORE_MOD, score_mod_args)
            if HAS_ATTN_MASK:
                st = attn_mask_scores(st, mask_base, offs_n, offs_m, Tk, Tq, stride_maskn, stride_maskm, BOOL_MASK)
            if HAS_MASK_MOD:
                st = mask_function(st, b, h, q_idx, kv_idx, MASK_MOD, mask_mod_args)
            pt = tl.math.exp2(st - lse[None, :])
        else:
            pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASK:
            past = offs_n[:, None] - (offs_m[None, :] + (Tk - Tq))  # as in `mask_scores`, transposed
            pt = tl.where((offs_n < Tk)[:, None] & (past >= -left) & (past <= right), pt, 0.0)
        # -- dV += P^T dO;  dS^T = P^T * (V dO^T - delta);  dK += dS^T Q
        if HAS_SCORE_MOD:
            # dV first, then P^T folds in the score function's derivative: one [BLOCK_N, BLOCK_M]
            # tile fewer live across the dP dot (the dk/dv kernel is the one that spills)
            if HAS_DROPOUT:  # the same draws as below
                keep = dropout_keep(seed, bh, offs_m[None, :] + q_off, offs_n[:, None] + k_off,
                                    p_drop)
                dv = dot_acc(dv, tl.where(keep, pt * keep_scale, 0.0).to(do.dtype), do, PRECISION, UPCAST)
            else:
                dv = dot_acc(dv, pt.to(do.dtype), do, PRECISION, UPCAST)
            pt = tl.where(pt > 0.0, pt * gt, 0.0)
            dpt = dot(v, tl.trans(do), PRECISION, UPCAST)
            if HAS_DROPOUT:
                dpt = tl.where(keep, dpt * keep_scale, 0.0)
        else:
            dpt = dot(v, tl.trans(do), PRECISION, UPCAST)                       # [BLOCK_N, BLOCK_M] fp32
            if HAS_DROPOUT:  # dV from the kept weights, scaled; dP only through them
                keep = dropout_keep(seed, bh, offs_m[None, :] + q_off, offs_n[:, None] + k_off, p_drop)
                dv = dot_acc(dv, tl.where(keep, pt * keep_scale, 0.0).to(do.dtype), do, PRECISION, UPCAST)
                dpt = tl.where(keep, dpt * keep_scale, 0.0)
            else:
                dv = dot_acc(dv, pt.to(do.dtype), do, PRECISION, UPCAST)          # [BLOCK_N, BLOCK_DV] fp32
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk = dot_acc(dk, dst.to(q.dtype), q, PRECISION, UPCAST)                  # [BLOCK_N, BLOCK_D] fp32
        q_ptrs += BLOCK_M * stride_qt
        do_ptrs += BLOCK_M * stride_dot
    return dk, dv


@triton.jit
def _flash_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE, DELTA, CU_Q, CU_K,
    ATTN_MASK,                        # as in the forward (`kernels/flash_fwd.py`)
    Q_COUNTS, Q_INDEX,                # the block map's transpose: per key block, the query blocks
    stride_qb, stride_qh, stride_qt,  # batch, head, row; the head dim has unit stride (`checks.last_dim_contiguous`)
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_dob, stride_doh, stride_dot,
    stride_dkb, stride_dkh, stride_dkt,
    stride_dvb, stride_dvh, stride_dvt,
    stride_lb, stride_lh,  # LSE and DELTA
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    stride_qcb, stride_qch, stride_qcn, stride_qib, stride_qih, stride_qin,  # Q_COUNTS, Q_INDEX
    Hq, Hkv, Tq, Tk,
    left, right,
    scale, qk_scale,
    softcap, SLOPES, stride_sb,      # as in the forward (`kernels/flash_fwd.py`)
    seed, p_drop, keep_scale,        # dropout, as in the forward
    drop_q0, drop_k0, drop_h0,       # its position offsets, as in the forward
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    score_mod_args, mask_mod_args,   # as in the forward
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,  # v's, do's and dv's
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    SCORE_MOD: tl.constexpr, SCORE_GRAD: tl.constexpr, MASK_MOD: tl.constexpr,  # the user's functions, or None
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr, MAP_M: tl.constexpr, MAP_N: tl.constexpr,
    VARLEN: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    num_n_blocks = tl.cdiv(Tk, BLOCK_N)
    pid = tl.program_id(0)
    bh = pid // num_n_blocks
    n0 = pid % num_n_blocks * BLOCK_N  # the first key blocks, seen by the most queries, start first
    b = (bh // Hkv).to(tl.int64)
    h_kv = (bh % Hkv).to(tl.int64)
    q0, Tq, k0, Tk = sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    if n0 >= Tk:  # a packed sequence shorter than the longest
        return

    offs_n = n0 + tl.arange(0, BLOCK_N)  # keys of this program
    k_base = K + b * stride_kb + h_kv * stride_kh + k0 * stride_kt
    v_base = V + b * stride_vb + h_kv * stride_vh + k0 * stride_vt
    k = load_tile(tile_pointers(k_base, n0, stride_kt, BLOCK_N, BLOCK_D), offs_n, Tk, True, HEAD_DIM, BLOCK_D)
    v = load_tile(tile_pointers(v_base, n0, stride_vt, BLOCK_N, BLOCK_DV), offs_n, Tk, True, HEAD_DIM_V, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)                        # resident with K, V
    dv = tl.zeros([BLOCK_N, BLOCK_DV], dtype=tl.float32)

    # -- query blocks: those before lo and from hi on see none of our keys; [a, z) see all of them
    lo, a, z, hi = query_blocks(n0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
    for g in range(GROUP):  # every query head served by this k/v head: the GQA sum stays on chip
        h = h_kv * GROUP + g
        drop_bh = b * Hq + h + drop_h0  # dropout's head, as in the forward
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
        q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qt
        do_base = DO + b * stride_dob + h * stride_doh + q0 * stride_dot
        lse_base = LSE + b * stride_lb + h * stride_lh + q0
        delta_base = DELTA + b * stride_lb + h * stride_lh + q0
        mask_base = ATTN_MASK + b * stride_maskb + h * stride_maskh
        if HAS_BLOCK_MAP:  # the query blocks the map's transpose lists for this key block
            index, n_partial, n_listed = listed_blocks(Q_COUNTS, Q_INDEX, b, h, n0 // MAP_N, stride_qcb, stride_qch,
                                                       stride_qcn, stride_qib, stride_qih, stride_qin)
            for i in range(0, n_partial):
                m_lo = tl.load(index + i) * MAP_M
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     mask_base, stride_maskm, stride_maskn, offs_n, Tq, Tk, left, right, m_lo,
                                     tl.minimum(m_lo + MAP_M, Tq),
                                     qk_scale, softcap, slope, seed, drop_bh, drop_q0, drop_k0, p_drop, keep_scale, b,
                                     h, SCORE_MOD, SCORE_GRAD,
                                     score_mod_args, MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                     BLOCK_M, True, HAS_SOFTCAP, HAS_ALIBI,
                                     HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION,
                                     UPCAST)
            for i in range(n_partial, n_listed):
                m_lo = tl.load(index + i) * MAP_M
                dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     mask_base, stride_maskm, stride_maskn, offs_n, Tq, Tk, left, right, m_lo,
                                     m_lo + MAP_M,
                                     qk_scale, softcap, slope, seed, drop_bh, drop_q0, drop_k0, p_drop, keep_scale, b,
                                     h, SCORE_MOD, SCORE_GRAD,
                                     score_mod_args, MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                     BLOCK_M, False, HAS_SOFTCAP, HAS_ALIBI,
                                     HAS_DROPOUT, False, BOOL_MASK, HAS_SCORE_MOD, False, PRECISION, UPCAST)
        else:
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     mask_base, stride_maskm, stride_maskn, offs_n, Tq, Tk, left, right, lo, a,
                                 qk_scale, softcap, slope, seed, drop_bh, drop_q0, drop_k0, p_drop, keep_scale, b, h,
                                 SCORE_MOD, SCORE_GRAD,
                                     score_mod_args, MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                     BLOCK_M, True, HAS_SOFTCAP, HAS_ALIBI,
                                 HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     mask_base, stride_maskm, stride_maskn, offs_n, Tq, Tk, left, right, a, z,
                                 qk_scale, softcap, slope, seed, drop_bh, drop_q0, drop_k0, p_drop, keep_scale, b, h,
                                 SCORE_MOD, SCORE_GRAD,
                                     score_mod_args, MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                     BLOCK_M, False, HAS_SOFTCAP, HAS_ALIBI,
                                 HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)
            dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, stride_qt, stride_dot,
                                     mask_base, stride_maskm, stride_maskn, offs_n, Tq, Tk, left, right, z, hi,
                                 qk_scale, softcap, slope, seed, drop_bh, drop_q0, drop_k0, p_drop, keep_scale, b, h,
                                 SCORE_MOD, SCORE_GRAD,
                                     score_mod_args, MASK_MOD, mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV,
                                     BLOCK_M, True, HAS_SOFTCAP, HAS_ALIBI,
                                 HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION, UPCAST)

    store_tile(tile_pointers(DK + b * stride_dkb + h_kv * stride_dkh + k0 * stride_dkt, n0, stride_dkt, BLOCK_N,
                             BLOCK_D),
               (dk * scale).to(DK.dtype.element_ty), offs_n, Tk, HEAD_DIM, BLOCK_D)
    store_tile(tile_pointers(DV + b * stride_dvb + h_kv * stride_dvh + k0 * stride_dvt, n0, stride_dvt, BLOCK_N,
                             BLOCK_DV), dv.to(DV.dtype.element_ty), offs_n, Tk, HEAD_DIM_V, BLOCK_DV)
