"""
Flash attention's forward kernel, and the block geometry its backward shares.

One program per (query block, batch x head) (Dao et al., FlashAttention-2, Algorithm 1):
    load the query block Q_i, [BLOCK_M, D], once
    for each key block K_j, V_j, [BLOCK_N, D], up to the causal limit:
        S = Q_i K_j^T                              raw scores, [BLOCK_M, BLOCK_N] fp32
        m_new = max(m, rowmax(S) * c)              the running max, base 2 (c = scale * log2(e))
        P = exp2(S * c - m_new)                    one fused multiply-add per score
        l = l * exp2(m - m_new) + rowsum(P)        the running sum, rescaled when the max grows
        acc = acc * exp2(m - m_new) + P V_j        [BLOCK_M, D] fp32
    O_i = acc / l (once, at the end); LSE_i = m + log2(l), base 2 (see `kernels/flash.py`)
    (RESIDUAL: also R_i = O_i - round(O_i), what rounding O to a 16-bit dtype dropped, so that the
    backward's delta = rowsum(dO * O) sees the O its dP sees; `kernels/flash_bwd.py`)

The mask is a window around each query's diagonal key (bottom-right alignment): query i sees key
j when i - left <= j - (Tk - Tq) <= i + right; causal is (left, right) = (unbounded, 0), full
attention unbounded on both sides. `key_blocks` splits the keys into the blocks no row sees
(skipped), the blocks every row sees whole (an unmasked loop: no compare, no select, no row mask
on the loads) and the edges (masked). The loops advance pointers (or TMA coordinates) by a
block; the 64-bit row offsets are computed once, outside them.

A user's attn_mask (HAS_ATTN_MASK; bool, or float added to the logits) is read tile by tile
within those blocks (`common.attn_mask_scores`): any of its entries may hide a key, so every
block takes the path that keeps a row with no visible key at m = -inf (the unmasked blocks still
load K and V without row masks). No block is skipped for the mask itself: a mask costs the
blocks causal or the window visit, plus a [BLOCK_M, BLOCK_N] load of the mask per block.

Loads: with TMA (Hopper's tensor memory accelerator, `tl.make_tensor_descriptor`), one 2-D
descriptor per program over its head's [T, D] rows: the copy engine zero-fills rows past T and
columns past D, so no load is masked. Without it (pre-Hopper, the interpreter's default, or a
layout TMA cannot address), pointer loads that Triton pipelines with cp.async.
"""

import triton
import triton.language as tl

from .common import (attn_mask_scores, dropout_keep, dot, dot_acc, head_and_query_block, mask_function, mask_scores,
                     score_function, score_mods)

# ----------------------------------------------------------------------------- block geometry


@triton.jit
def sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN: tl.constexpr):
    # Where sequence b starts in the rows of q and of k, v, and its lengths: a batch of equal
    # lengths starts at row 0 of its own slice; a packed batch reads them from cu_seqlens.
    if VARLEN:
        q0 = tl.load(CU_Q + b)
        k0 = tl.load(CU_K + b)
        return q0.to(tl.int64), tl.load(CU_Q + b + 1) - q0, k0.to(tl.int64), tl.load(CU_K + b + 1) - k0
    else:
        return 0, Tq, 0, Tk


@triton.jit
def blocks_to_visit(first_any, end_any, first_all, end_all, n, BLOCK: tl.constexpr):
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
def key_blocks(m0, Tq, Tk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Query rows [m0, m1) see keys [i + off - left, i + off + right] each (off = Tk - Tq).
    off = Tk - Tq
    m1 = tl.minimum(m0 + BLOCK_M, Tq)
    return blocks_to_visit(m0 + off - left, m1 + off + right, m1 - 1 + off - left, m0 + off + right + 1, Tk, BLOCK_N)


@triton.jit
def query_blocks(n0, Tq, Tk, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    # Keys [n0, n1) are seen by queries [j - off - right, j - off + left] each.
    off = Tk - Tq
    n1 = tl.minimum(n0 + BLOCK_N, Tk)
    return blocks_to_visit(n0 - off - right, n1 - off + left, n1 - 1 - off - right, n0 - off + left + 1, Tq, BLOCK_M)


@triton.jit
def listed_blocks(COUNTS, INDEX, b, h, row, stride_cb, stride_ch, stride_cr, stride_ib, stride_ih, stride_ir):
    # A block map's list for one (batch, head, row of blocks) (`kernels/blockmap.py`): where its
    # block indices start, how many partial blocks lead it, and how many blocks it lists in all
    counts = COUNTS + b * stride_cb + h * stride_ch + row * stride_cr
    n_partial = tl.load(counts)
    return INDEX + b * stride_ib + h * stride_ih + row * stride_ir, n_partial, n_partial + tl.load(counts + 1)


@triton.jit
def tile_pointers(base, first, stride_t, ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    # Pointers to rows [first, first + ROWS) of a head whose rows start at `base`, [ROWS, BLOCK_D]:
    # the one 64-bit multiply per tile, outside the loops (the head dim has unit stride).
    rows = (first + tl.arange(0, ROWS)).to(tl.int64)
    return base + rows[:, None] * stride_t + tl.arange(0, BLOCK_D)[None, :]


@triton.jit
def load_tile(ptrs, offs_rows, n, ROW_MASK: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    # A [ROWS, BLOCK_D] tile: rows at or past n, and columns past HEAD_DIM (80, 96: padded to a
    # power of two), load as 0. Masks only where they can bite: none for a full block of a head
    # dim that is a power of two, which is what lets the loads go out as whole 16-byte vectors.
    if ROW_MASK:
        mask = (offs_rows < n)[:, None]
        if HEAD_DIM != BLOCK_D:
            mask = mask & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
        x = tl.load(ptrs, mask=mask, other=0.0)
    elif HEAD_DIM != BLOCK_D:
        x = tl.load(ptrs, mask=(tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :], other=0.0)
    else:
        x = tl.load(ptrs)
    return x


@triton.jit
def store_tile(ptrs, x, offs_rows, n, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    mask = (offs_rows < n)[:, None]
    if HEAD_DIM != BLOCK_D:
        mask = mask & (tl.arange(0, BLOCK_D) < HEAD_DIM)[None, :]
    tl.store(ptrs, x, mask=mask)


# ----------------------------------------------------------------------------- forward


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt, mask_base, stride_maskm, stride_maskn,
    offs_m, Tq, Tk, left, right, lo, hi, qk_scale, softcap, slope, seed, bh, q_off, k_off, p_drop, keep_scale,
    b, h, SCORE_MOD: tl.constexpr, score_mod_args, MASK_MOD: tl.constexpr, mask_mod_args,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # Key blocks [lo, hi): k_src, v_src are TMA descriptors or the head's base pointers.
    if not TMA:
        k_ptrs = tile_pointers(k_src, lo, stride_kt, BLOCK_N, BLOCK_D)
        v_ptrs = tile_pointers(v_src, lo, stride_vt, BLOCK_N, BLOCK_DV)
    for start in range(lo, hi, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        if TMA:
            k = k_src.load([start, 0])                                          # [BLOCK_N, BLOCK_D], smem
            v = v_src.load([start, 0])
        else:
            k = load_tile(k_ptrs, offs_n, Tk, MASK, HEAD_DIM, BLOCK_D)
            v = load_tile(v_ptrs, offs_n, Tk, MASK, HEAD_DIM_V, BLOCK_DV)
            k_ptrs += BLOCK_N * stride_kt
            v_ptrs += BLOCK_N * stride_vt

        s = dot(q, tl.trans(k), PRECISION, UPCAST)                              # [BLOCK_M, BLOCK_N] fp32, raw
        if MASK or HAS_SOFTCAP or HAS_ALIBI or HAS_ATTN_MASK or HAS_SCORE_MOD or HAS_MASK_MOD:
            s, _ = score_mods(s * qk_scale, offs_m + (Tk - Tq), offs_n, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
            if HAS_SCORE_MOD or HAS_MASK_MOD:  # positions clamped into the sequence: a function may index by them
                q_idx = tl.minimum(offs_m, Tq - 1)[:, None]
                kv_idx = tl.minimum(offs_n, Tk - 1)[None, :]
            if HAS_SCORE_MOD:
                s = score_function(s, b, h, q_idx, kv_idx, SCORE_MOD, score_mod_args)
            if HAS_ATTN_MASK:
                s = attn_mask_scores(s, mask_base, offs_m, offs_n, Tq, Tk, stride_maskm, stride_maskn, BOOL_MASK)
            if HAS_MASK_MOD:
                s = mask_function(s, b, h, q_idx, kv_idx, MASK_MOD, mask_mod_args)
            if MASK:
                s = mask_scores(s, offs_m, offs_n, Tq, Tk, left, right)         # base-2 logits, -inf outside
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # a row that has seen no key yet keeps m = -inf: subtract 0 so exp2 gives 0, not nan
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.math.exp2(s - m_use[:, None])
        else:
            # -- every score is visible and unmodified: the max of the raw scores, scaled once
            #    (scale > 0), and each logit's scale and shift in one fused multiply-add
            m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
            m_use = m_new
            p = tl.math.exp2(s * qk_scale - m_use[:, None])
        # -- rescale what was summed against the old max; add this block
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:  # the weights are dropped after the softmax: the row sum keeps them all
            p = tl.where(dropout_keep(seed, bh, offs_m[:, None] + q_off, offs_n[None, :] + k_off, p_drop),
                         p * keep_scale, 0.0)
        acc = dot_acc(acc * alpha[:, None], p.to(v.dtype), v, PRECISION, UPCAST)  # [BLOCK_M, BLOCK_D] fp32, registers
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _flash_fwd(
    Q, K, V, O, RES, LSE, CU_Q, CU_K,  # RES: like O (read only with RESIDUAL)
    SINKS, SLOPES,         # (Hq,) sink logits, (B or 1, Hq) ALiBi slopes, fp32 (read only when present)
    ATTN_MASK,             # the user's mask as (B, Hq, Tq, Tk), stride 0 where broadcast: uint8 (bool) or
                           # fp16, bf16, fp32 (read only with HAS_ATTN_MASK)
    KV_COUNTS, KV_INDEX,   # the block map (`kernels/blockmap.py`), (B, Hq, nM, 2) and (B, Hq, nM, nN) int32
                           # through stride 0 where broadcast (read only with HAS_BLOCK_MAP)
    stride_qb, stride_qh, stride_qt,  # batch, head, row; the head dim has unit stride (`checks.last_dim_contiguous`)
    stride_kb, stride_kh, stride_kt,
    stride_vb, stride_vh, stride_vt,
    stride_ob, stride_oh, stride_ot,  # RES has O's strides
    stride_lb, stride_lh,  # LSE: (B, Hq, Tq), or (Hq, total_q) packed
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,  # ATTN_MASK: batch, head, query, key
    stride_kcb, stride_kch, stride_kcm, stride_kib, stride_kih, stride_kim,  # KV_COUNTS, KV_INDEX
    Hq, Tq, Tk,            # Tq, Tk: the lengths, or (VARLEN) the longest, which sizes the grid
    left, right,           # the window, unbounded sides as wide as Tq + Tk (`common.window_args`)
    qk_scale,              # scale * log2(e): the softmax runs in base 2
    softcap,               # the soft-cap * log2(e), base 2 (read only with HAS_SOFTCAP)
    stride_sb,             # SLOPES' batch stride: 0 when one slope serves every sequence of a head
    seed, p_drop, keep_scale,  # dropout: the Philox seed, the probability, 1 / (1 - p) (HAS_DROPOUT)
    drop_q0, drop_k0, drop_h0,  # added to dropout's query and key positions and head: a piece of a longer call
    q_bucket, k_bucket, window_key,  # read only by the autotuner's key
    score_mod_args, mask_mod_args,   # tuples of the tensors the user's functions captured (`kernels/mods.py`)
    GROUP: tl.constexpr,   # query heads per k/v head
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,  # q's and k's head dim, and its power of two
    HEAD_DIM_V: tl.constexpr, BLOCK_DV: tl.constexpr,  # v's and o's (DeepSeek's MLA: 128 beside 192)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TMA: tl.constexpr, RESIDUAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    SCORE_MOD: tl.constexpr, MASK_MOD: tl.constexpr,  # the user's @triton.jit functions, or None
    HAS_SCORE_MOD: tl.constexpr, HAS_MASK_MOD: tl.constexpr,
    HAS_BLOCK_MAP: tl.constexpr,  # the block map's blocks, which the tiles divide: BLOCK_M | MAP_M, BLOCK_N | MAP_N
    MAP_M: tl.constexpr, MAP_N: tl.constexpr,
    VARLEN: tl.constexpr, LEFT_BOUNDED: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(tl.cdiv(Tq, BLOCK_M), Hq, GROUP)
    q0, Tq, k0, Tk = sequence(CU_Q, CU_K, b, Tq, Tk, VARLEN)
    m0 = m_block * BLOCK_M
    if VARLEN:
        if m0 >= Tq:  # a packed sequence shorter than the longest
            return
    offs_m = m0 + tl.arange(0, BLOCK_M)  # query rows of this program
    q_base = Q + b * stride_qb + h * stride_qh + q0 * stride_qt
    o_base = O + b * stride_ob + h * stride_oh + q0 * stride_ot
    k_base = K + b * stride_kb + h_kv * stride_kh + k0 * stride_kt
    v_base = V + b * stride_vb + h_kv * stride_vh + k0 * stride_vt
    mask_base = ATTN_MASK + b * stride_maskb + h * stride_maskh
    if TMA:  # one descriptor per head and sequence: the copy engine zero-fills past Tq, Tk and D
        q_src = tl.make_tensor_descriptor(q_base, [Tq, HEAD_DIM], [stride_qt, 1], [BLOCK_M, BLOCK_D])
        k_src = tl.make_tensor_descriptor(k_base, [Tk, HEAD_DIM], [stride_kt, 1], [BLOCK_N, BLOCK_D])
        v_src = tl.make_tensor_descriptor(v_base, [Tk, HEAD_DIM_V], [stride_vt, 1], [BLOCK_N, BLOCK_DV])
        q = q_src.load([m0, 0])                                               # [BLOCK_M, BLOCK_D]
    else:
        k_src, v_src = k_base, v_base
        q = load_tile(tile_pointers(q_base, m0, stride_qt, BLOCK_M, BLOCK_D), offs_m, Tq, True, HEAD_DIM, BLOCK_D)

    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634     # base 2
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)              # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                            # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)                   # running weights @ V
    bh = b * Hq + h + drop_h0  # dropout's head: a ring piece's packed sequence b is head b * Hq + h
    if HAS_BLOCK_MAP:  # -- the key blocks the map lists: partial ones with every mask, full ones with none
        index, n_partial, n_listed = listed_blocks(KV_COUNTS, KV_INDEX, b, h, m0 // MAP_M, stride_kcb, stride_kch,
                                                   stride_kcm, stride_kib, stride_kih, stride_kim)
        for i in range(0, n_partial):
            lo = tl.load(index + i) * MAP_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                       mask_base, stride_maskm, stride_maskn,
                                       offs_m, Tq, Tk, left, right, lo, tl.minimum(lo + MAP_N, Tk), qk_scale, softcap,
                                       slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                                       score_mod_args, MASK_MOD,
                                       mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True, TMA,
                                       HAS_SOFTCAP, HAS_ALIBI,
                                       HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD,
                                       PRECISION, UPCAST)
        for i in range(n_partial, n_listed):
            lo = tl.load(index + i) * MAP_N
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                       mask_base, stride_maskm, stride_maskn,
                                       offs_m, Tq, Tk, left, right, lo, lo + MAP_N, qk_scale, softcap,
                                       slope, seed, bh, drop_q0, drop_k0, p_drop, keep_scale, b, h, SCORE_MOD,
                                       score_mod_args, MASK_MOD,
                                       mask_mod_args, HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False, TMA,
                                       HAS_SOFTCAP, HAS_ALIBI,
                                       HAS_DROPOUT, False, BOOL_MASK, HAS_SCORE_MOD, False, PRECISION, UPCAST)
    else:
        # -- key blocks: masked before the window's full part, unmasked inside it, masked after
        lo, a, z, hi = key_blocks(m0, Tq, Tk, left, right, BLOCK_M, BLOCK_N)
        if LEFT_BOUNDED:
            acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                       mask_base, stride_maskm, stride_maskn,
                                       offs_m, Tq, Tk, left, right, lo, a, qk_scale, softcap, slope, seed, bh,
                                       drop_q0, drop_k0, p_drop,
                                       keep_scale, b, h, SCORE_MOD, score_mod_args, MASK_MOD, mask_mod_args,
                                       HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True, TMA, HAS_SOFTCAP,
                                       HAS_ALIBI,
                                       HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD,
                                       PRECISION, UPCAST)
        else:  # causal or full: every row sees key 0 on, and a loop from a literal 0 spills fewer registers
            a = 0
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                   mask_base, stride_maskm, stride_maskn,
                                   offs_m, Tq, Tk, left, right, a, z, qk_scale, softcap, slope, seed, bh, drop_q0,
                                   drop_k0, p_drop,
                                   keep_scale, b, h, SCORE_MOD, score_mod_args, MASK_MOD, mask_mod_args,
                                   HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, False, TMA, HAS_SOFTCAP, HAS_ALIBI,
                                   HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION,
                                   UPCAST)
        acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_src, v_src, stride_kt, stride_vt,
                                   mask_base, stride_maskm, stride_maskn,
                                   offs_m, Tq, Tk, left, right, z, hi, qk_scale, softcap, slope, seed, bh, drop_q0,
                                   drop_k0, p_drop,
                                   keep_scale, b, h, SCORE_MOD, score_mod_args, MASK_MOD, mask_mod_args,
                                   HEAD_DIM, BLOCK_D, HEAD_DIM_V, BLOCK_DV, BLOCK_N, True, TMA, HAS_SOFTCAP, HAS_ALIBI,
                                   HAS_DROPOUT, HAS_ATTN_MASK, BOOL_MASK, HAS_SCORE_MOD, HAS_MASK_MOD, PRECISION,
                                   UPCAST)

    if HAS_SINKS:  # the head's sink logit joins the denominator (weight, no value): GPT-OSS
        sink = tl.load(SINKS + h) * 1.4426950408889634                     # base 2
        m_sink = tl.maximum(m_i, sink)
        m_use = tl.where(m_sink == float("-inf"), 0.0, m_sink)             # no key and a sink of -inf: 0, not nan
        alpha = tl.math.exp2(m_i - m_use)                                  # 0 for a row that saw no key
        l_i = l_i * alpha + tl.math.exp2(sink - m_use)
        acc = acc * alpha[:, None]
        m_i = m_sink
    # -- divide by the row sum once; a row that saw no key has l = 0 and gives 0 / 1 = 0
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o32 = acc / l_safe[:, None]                                            # [BLOCK_M, BLOCK_D] fp32
    o = o32.to(O.dtype.element_ty)
    if TMA:
        o_dst = tl.make_tensor_descriptor(o_base, [Tq, HEAD_DIM_V], [stride_ot, 1], [BLOCK_M, BLOCK_DV])
        o_dst.store([m0, 0], o)
    else:
        store_tile(tile_pointers(o_base, m0, stride_ot, BLOCK_M, BLOCK_DV), o, offs_m, Tq, HEAD_DIM_V, BLOCK_DV)
    if RESIDUAL:  # what the rounding dropped, in the same dtype: O + R holds O to about 2^-16
        r = (o32 - o.to(tl.float32)).to(O.dtype.element_ty)
        r_base = RES + b * stride_ob + h * stride_oh + q0 * stride_ot
        if TMA:
            r_dst = tl.make_tensor_descriptor(r_base, [Tq, HEAD_DIM_V], [stride_ot, 1], [BLOCK_M, BLOCK_DV])
            r_dst.store([m0, 0], r)
        else:
            store_tile(tile_pointers(r_base, m0, stride_ot, BLOCK_M, BLOCK_DV), r, offs_m, Tq, HEAD_DIM_V, BLOCK_DV)
    lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))  # base 2
    tl.store(LSE + b * stride_lb + h * stride_lh + q0 + offs_m, lse, mask=offs_m < Tq)
