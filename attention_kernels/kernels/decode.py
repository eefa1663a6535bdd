"""
Decoding against a KV cache, split along the cache (flash-decoding).

While generating, each sequence brings Tq new tokens (usually 1) and attends to everything in its
cache. One program per query block, as in `kernels/flash.py`, would give a GPU only B * H programs
of a few rows each: most of its SMs idle while each program walks the whole cache alone. Instead
(Dao, Haziza, Massa, Sizov, "Flash-Decoding for long-context inference", 2023):

    split       one program per (sequence, block of new tokens, k/v head, split): its share of the
                keys those tokens see, for every query row that reads this k/v head, [BLOCK_M]
                rows = the GROUP query heads x BLOCK_Q new tokens (K and V are read once for all
                the heads that share them).
                An online softmax over its keys gives a partial output O_s (already divided by
                its own sum) and log-sum-exp L_s, fp32, into a small (rows, splits) buffer.
    merge       one program per query row: L = log(sum_s exp(L_s)), O = sum_s exp(L_s - L) O_s.
                A split that saw no key has L_s = -inf and weight 0; a row that saw none is 0.

The same two kernels serve `kernels.paged`: with PAGED the cache is a pool of pages read through
a block table (`_cache_slots`), and with VARLEN the new tokens are packed (total_q, Hq, D), a
program's rows BLOCK_Q tokens of one sequence, which it finds by bisecting cu_seqlens_q
(`_sequence_of`); a prefill chunk's blocks stop at their own last position. Here, dense:

The cache is (B, Hkv, Tmax, D), sequence b's first cache_seqlens[b] positions valid, the new
tokens' own keys and values among them (the last Tq): the caller writes them into the cache
first, as KV-cache code does. New token t sits at position p = cache_seqlens[b] - Tq + t and sees
keys j <= p (causal, bottom-right, as in `reference.attention`), and with a window (left, 0)
only j >= p - left. Keys outside the window are not read: a split covers
[max(L - Tq - left, 0), L) only.

Serving masks over the new tokens (`tree_mask`, `bidirectional`; constexpr HAS_TREE, HAS_RANGES,
so calls without them compile to the kernels they were before):

    tree        a bool (Tq, Tq) per sequence (speculative decoding's draft tree): among the keys of
                the new tokens' block, [L - Tq, L), new token i sees new token j where
                tree[i, j], in place of causal (and of a window's right side; its left bound still
                holds). The cache before the block is seen as causal and the window say. Read
                only in the tiles that reach the block, whose keys it covers.
    ranges      R [start, end) position ranges per sequence (images, a prefix-LM's prefix): a
                query inside one sees every key of it, whatever the rest says. Each row finds, once,
                the union of the ranges holding its position (an interval: they all hold it), and
                a split's keys stretch to cover it.

`num_splits=None` picks `default_num_splits`: as many splits as it takes to give every SM one
program, but no more than one per MIN_SPLIT_KEYS keys of the longest possible cache (rounded
up), and at most MAX_SPLITS. Decoding reads the
whole cache once and does little arithmetic per byte: it is memory-bound, so its measure is GB/s
against the device's copy bandwidth (`python -m attention_kernels.benchmarks.inference`).

fp8 caches (`k_scale`, `v_scale`; vLLM's convention): k_cache and v_cache may be float8_e4m3fn or
float8_e5m2, holding stored = round(x / scale) with one fp32 scale per tensor or per k/v head, so
x = stored * scale. A tile widens to q's dtype exactly (every fp8 value is a bf16 and an fp16 value)
and the dot runs as for a 16-bit cache; the scales never touch the tiles: a program serves one k/v
head, so k_scale joins the score's scale (scale * k_scale * log2(e)) and v_scale multiplies the
partial output once, in fp32. Without scales (HAS_KV_SCALE) the kernels are what they were.
`kernels.paged`'s append quantizes new tokens: x / scale in fp32, saturated to the format's largest
finite value (448, 57344), rounded to nearest even.

Inference only: no backward (use `flash_attention` to train). Precision as in `kernels/flash.py`.
"""

import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import (INTERPRET, SUPPORTED_DTYPES, _dtype_name, _is_int, autocast_inputs, check_causal, check_flag,
                     check_inputs, check_int32, check_mods, last_dim_contiguous, window_bounds)
from .common import LOG2E, Variant, dot, kernel_op, meta, on_device, pow2, score_mods, stride_args, wrap_triton

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _sequence_of(CU_Q, block, B, BLOCK_Q: tl.constexpr):
    # Which sequence of a packed batch owns query block `block`. Sequence b's blocks are numbered
    # from cu_q[b] // BLOCK_Q + b, which leaves room for all ceil(len_b / BLOCK_Q) of them without
    # a host read (the grid is fixed by total_q and B alone: CUDA graphs can replay it); the gaps
    # are blocks past their sequence's end, which return at once. The last b whose first block is
    # at most `block`, by bisection over the B + 1 offsets.
    lo = B * 0
    hi = B - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(CU_Q + mid) // BLOCK_Q + mid <= block:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _cache_slots(PAGES, b, pos, ok, stride_pb, num_pages, PAGE_SIZE: tl.constexpr, PAGED: tl.constexpr):
    # Where positions `pos` of sequence b's cache live, as (index along the cache's first
    # dimension, index along its position dimension), int64; K's and V's strides make them
    # offsets. Dense (B, Hkv, Tmax, D): (b, pos). Paged (num_pages, PAGE_SIZE, Hkv, D): the page
    # b's block table names for pos // PAGE_SIZE and the slot pos % PAGE_SIZE; a page id outside
    # [0, num_pages) (an unchecked table) is clamped into it, never read outside the cache.
    if PAGED:
        page = tl.load(PAGES + b * stride_pb + pos // PAGE_SIZE, mask=ok, other=0)
        page = tl.minimum(tl.maximum(page, 0), num_pages - 1).to(tl.int64)
        return page, (pos % PAGE_SIZE).to(tl.int64)
    return b + pos.to(tl.int64) * 0, pos.to(tl.int64)


@triton.jit
def _decode_split(
    Q, K, V, SEQLENS, CU_Q, PAGES, O_PART, LSE_PART, SLOPES, TREE, RANGES, K_SCALE, V_SCALE,
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_pb,  # the block table's row stride (paged)
    stride_tb, stride_ti, stride_tj,  # the tree mask (B or 1, tree_len, tree_len), bytes: b 0 when shared
    stride_rb, stride_rr, stride_rx,  # the ranges (B, R, 2)
    stride_ksh, stride_vsh,  # an fp8 cache's scales along k/v heads: 0 for one per tensor
    B, Hkv, Tq, Tmax, num_pages, GROUP,
    tree_len,    # the tree's side: Tq, or max_seqlen_q (an unchecked call's longer sequence reads no further)
    num_ranges,  # R
    q_blocks,  # dense: query blocks per sequence; packed: total_q, the rows of q
    left,      # the window's left bound, or (unbounded) more than any cache length
    right,     # not causal: the window's right bound, or (unbounded) more than any cache length
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    softcap, stride_sb,  # what models add, as in `kernels/flash_fwd.py` (sinks: in the merge)
    NUM_SPLITS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PAGED: tl.constexpr, VARLEN: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_TREE: tl.constexpr, HAS_RANGES: tl.constexpr, BLOCK_R: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
):
    # -- which query block, k/v head and split; the splits of one head are adjacent (L2)
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    h_kv = (pid // NUM_SPLITS % Hkv).to(tl.int64)
    block = pid // NUM_SPLITS // Hkv
    if HAS_KV_SCALE:  # an fp8 cache's keys are stored / k_scale: this head's scale joins the score's
        qk_scale = qk_scale * tl.load(K_SCALE + h_kv * stride_ksh)
    if VARLEN:  # packed new tokens (total_q, Hq, D): sequence b's are rows cu_q[b]:cu_q[b + 1]
        b = _sequence_of(CU_Q, block, B, BLOCK_Q)
        # the sequence's rows among all new tokens; unchecked offsets are clamped into q's rows
        first = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), q_blocks)
        q_len = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), first), q_blocks) - first
        t0 = (block - (first // BLOCK_Q + b)) * BLOCK_Q
        if t0 >= q_len:
            return
        q_off = first
    else:       # (B, Hq, Tq, D)
        b = block // q_blocks
        q_len = Tq
        first = b * Tq
        t0 = block % q_blocks * BLOCK_Q
        q_off = 0
    b = b.to(tl.int64)

    # -- the rows: BLOCK_Q new tokens t0.. of each query head h_kv * GROUP + g that reads this k/v
    # head (K and V are loaded once for all of them); row r = g * BLOCK_Q + (t - t0)
    r = tl.arange(0, BLOCK_M)
    g = r // BLOCK_Q
    t = t0 + r % BLOCK_Q
    row_ok = (g < GROUP) & (t < q_len)
    h = h_kv * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + b * stride_qb + h[:, None] * stride_qh + (q_off + t[:, None]).to(tl.int64) * stride_qt
                + offs_d[None, :] * stride_qd, mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]

    # -- this split's keys: an equal share, whole blocks, of the keys any of the block's rows may see
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), Tmax)  # unchecked lengths never read outside the cache
    pos = L - q_len + t                                                            # [BLOCK_M] each row's position
    lo = tl.maximum(L - q_len + t0 - left, 0) // BLOCK_N * BLOCK_N  # whole tiles: the mask drops what is before
    if HAS_TREE:
        hi = L                                                    # the tree may show any of the new tokens
    elif CAUSAL:
        hi = tl.minimum(L - q_len + t0 + BLOCK_Q, L)                              # past the block's last position
    else:                                                                         # ... and `right` keys past it
        hi = tl.minimum(L - q_len + t0 + BLOCK_Q + right, L)
    if HAS_RANGES:  # -- each row's bidirectional keys [r_lo, r_hi): the ranges holding its position, united
        offs_r = tl.arange(0, BLOCK_R)
        r_ok = offs_r < num_ranges
        ranges = RANGES + b * stride_rb + offs_r * stride_rr
        range_start = tl.load(ranges, mask=r_ok, other=0)                        # [BLOCK_R]
        range_end = tl.load(ranges + stride_rx, mask=r_ok, other=0)              # (0, 0) is empty
        holds = (pos[:, None] >= range_start[None, :]) & (pos[:, None] < range_end[None, :])  # [BLOCK_M, BLOCK_R]
        r_lo = tl.maximum(tl.min(tl.where(holds, range_start[None, :], L), 1), 0)  # [BLOCK_M]; L: in no range
        r_hi = tl.minimum(tl.max(tl.where(holds, range_end[None, :], 0), 1), L)
        lo = tl.minimum(lo, tl.min(tl.where(row_ok, r_lo, L), 0) // BLOCK_N * BLOCK_N)
        hi = tl.maximum(hi, tl.max(tl.where(row_ok, r_hi, 0), 0))
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = lo + split * per_split
    stop = tl.minimum(start + per_split, hi)

    tree = TREE + b * stride_tb                                                   # sequence b's (tree_len, tree_len)
    slope = tl.zeros([BLOCK_M], dtype=tl.float32)
    if HAS_ALIBI:  # the rows are several query heads: one slope each
        slope = tl.load(SLOPES + b * stride_sb + h, mask=row_ok, other=0.0) * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)                    # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                                  # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)                         # running weights @ V
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        kv_mask = n_ok[:, None] & d_ok[None, :]
        if PAGED and PAGE_SIZE % BLOCK_N == 0:  # tiles start at multiples of BLOCK_N: each lies in one page
            # n0 + 0 * L: a tensor under the interpreter too, whose range() gives ints
            first_dim, slot = _cache_slots(PAGES, b, n0 + 0 * L, True, stride_pb, num_pages, PAGE_SIZE, PAGED)
            slot = slot + tl.arange(0, BLOCK_N)                                   # [BLOCK_N], one table read
        else:
            first_dim, slot = _cache_slots(PAGES, b, offs_n, n_ok, stride_pb, num_pages, PAGE_SIZE, PAGED)  # [BLOCK_N]
        # [BLOCK_N, BLOCK_D] in q's dtype: an fp8 cache's values widen exactly (a no-op for any other)
        k = tl.load(K + (first_dim * stride_kb + slot * stride_kt + h_kv * stride_kh)[:, None]
                    + offs_d[None, :] * stride_kd, mask=kv_mask, other=0.0).to(Q.dtype.element_ty)
        v = tl.load(V + (first_dim * stride_vb + slot * stride_vt + h_kv * stride_vh)[:, None]
                    + offs_d[None, :] * stride_vd, mask=kv_mask, other=0.0).to(Q.dtype.element_ty)

        # -- scores, masked: past this split, after the row's own position, before its window
        s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale                   # [BLOCK_M, BLOCK_N] fp32
        s, _ = score_mods(s, pos, offs_n, softcap, slope[:, None], HAS_SOFTCAP, HAS_ALIBI)
        past = offs_n[None, :] - pos[:, None]
        if CAUSAL:
            visible = (past >= -left) & (past <= 0)
        else:
            visible = (past >= -left) & (past <= right)
        if HAS_TREE:  # the new tokens' keys: as the tree says, within the window's left bound
            if n0 + BLOCK_N > L - q_len:  # only tiles that reach them; the cache before pays nothing
                col = offs_n - (L - q_len)                                        # [BLOCK_N] which new token
                is_new = (col >= 0) & (col < tree_len)
                seen = tl.load(tree + t[:, None] * stride_ti + col[None, :] * stride_tj,
                               mask=(row_ok & (t < tree_len))[:, None] & (n_ok & is_new)[None, :], other=0)
                visible = tl.where((col >= 0)[None, :], (seen != 0) & (past >= -left), visible)
        if HAS_RANGES:
            visible = visible | ((offs_n[None, :] >= r_lo[:, None]) & (offs_n[None, :] < r_hi[:, None]))
        s = tl.where(n_ok[None, :] & visible, s, float("-inf"))
        # -- online softmax, as in flash's forward (a row with no key yet keeps m = -inf)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PRECISION, UPCAST)
        m_i = m_new

    # -- the split's partial result: O_s = acc / l (0 when it saw no key), L_s base 2 (-inf then)
    if HAS_KV_SCALE:  # an fp8 cache's values are stored / v_scale: once here, not per tile
        acc = acc * tl.load(V_SCALE + h_kv * stride_vsh)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    row = (first + t).to(tl.int64) * (GROUP * Hkv) + h                            # [BLOCK_M] (new token, head)
    part = row * NUM_SPLITS + split
    tl.store(O_PART + part[:, None] * HEAD_DIM + offs_d[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(LSE_PART + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)


@triton.jit
def _decode_merge(
    O_PART, LSE_PART, O, LSE, SINKS,
    stride_ob, stride_oh, stride_ot, stride_od,
    Hq, Tq,  # packed: Tq = total_q and stride_ob = 0, so that every row is "sequence 0"
    NUM_SPLITS: tl.constexpr, BLOCK_S: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)                                            # new token * Hq + h
    h = row % Hq
    t = row // Hq % Tq
    b = row // Hq // Tq
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_ok = offs_s < NUM_SPLITS
    d_ok = offs_d < HEAD_DIM

    # -- weights exp(L_s - max L): 0 for splits that saw no key; all 0 when the row saw none
    lse = tl.load(LSE_PART + row * NUM_SPLITS + offs_s, mask=s_ok, other=float("-inf"))  # [BLOCK_S] base 2
    m = tl.max(lse, 0)
    if HAS_SINKS:  # the head's sink joins the denominator here, once for all splits (GPT-OSS)
        sink = tl.load(SINKS + h) * 1.4426950408889634
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.math.exp2(lse - m)
    total = tl.sum(w, 0)
    if HAS_SINKS:
        total += tl.math.exp2(sink - m)
    o_part = tl.load(O_PART + (row * NUM_SPLITS + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                     mask=s_ok[:, None] & d_ok[None, :], other=0.0)                # [BLOCK_S, BLOCK_D] fp32
    total_safe = tl.where(total == 0.0, 1.0, total)
    o = tl.sum(w[:, None] * o_part, 0) / total_safe
    tl.store(O + b * stride_ob + h * stride_oh + t * stride_ot + offs_d * stride_od,
             o.to(O.dtype.element_ty), mask=d_ok)
    tl.store(LSE + (b * Hq + h) * Tq + t,
             tl.where(total == 0.0, float("-inf"), (m + tl.math.log2(total_safe)) * 0.6931471805599453))


@triton.jit
def _append_kv(
    K_NEW, V_NEW, K, V, SEQLENS, CU_Q, PAGES, K_SCALE, V_SCALE,
    stride_nt, stride_nh, stride_nd, stride_wt, stride_wh, stride_wd,  # k_new, v_new (total_q, Hkv, D)
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_pb, stride_ksh, stride_vsh, Tmax, num_pages, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PAGE_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr, HAS_KV_SCALE: tl.constexpr,
):
    # Sequence b's new keys and values, rows cu_q[b]:cu_q[b + 1] of k_new and v_new, written at
    # positions cache_seqlens[b]... of its pages; one program per (sequence, BLOCK_T tokens, k/v head).
    # Positions past the table's capacity are not written (an unchecked call's lengths). Into an
    # fp8 pool (FP8_MAX > 0, its largest finite value) as round(x / scale), saturated: the
    # conversion alone would make a value past FP8_MAX NaN (e4m3fn) or inf (e5m2).
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(2).to(tl.int64)
    first = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)   # unchecked offsets: inside k_new's rows
    end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), first), total_q)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = tl.load(SEQLENS + b) + t
    ok = (t < end - first) & (pos >= 0) & (pos < Tmax)
    offs_d = tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    src = (first + t).to(tl.int64)
    k = tl.load(K_NEW + src[:, None] * stride_nt + h * stride_nh + offs_d[None, :] * stride_nd, mask=mask)
    v = tl.load(V_NEW + src[:, None] * stride_wt + h * stride_wh + offs_d[None, :] * stride_wd, mask=mask)
    if FP8_MAX > 0:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if HAS_KV_SCALE:  # round(x / scale) as vLLM's cache write: IEEE division (`/` is approximate on a GPU)
            k = tl.div_rn(k, tl.load(K_SCALE + h * stride_ksh))
            v = tl.div_rn(v, tl.load(V_SCALE + h * stride_vsh))
        k = tl.minimum(tl.maximum(k, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v, -FP8_MAX), FP8_MAX)
    k = k.to(K.dtype.element_ty)  # round to nearest even; a no-op into a pool of k_new's dtype
    v = v.to(V.dtype.element_ty)
    page, slot = _cache_slots(PAGES, b, pos, ok, stride_pb, num_pages, PAGE_SIZE, True)
    tl.store(K + (page * stride_kb + slot * stride_kt + h * stride_kh)[:, None] + offs_d[None, :] * stride_kd, k,
             mask=mask)
    tl.store(V + (page * stride_vb + slot * stride_vt + h * stride_vh)[:, None] + offs_d[None, :] * stride_vd, v,
             mask=mask)


# ----------------------------------------------------------------------------- config

MIN_SPLIT_KEYS = 256  # a split shorter than this spends more on its launch share and merge than it saves
MAX_SPLITS = 64
INTERPRETER_SMS = 4   # the interpreter has no SMs; pretend a few, so that num_splits=None splits there too
FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # the fp8 caches, their largest finite values


def sm_count(device):
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETER_SMS


def blocks(rows, block_d, itemsize):
    """(BLOCK_M, BLOCK_N, num_warps): every row of a k/v head in one block up to 64 (tl.dot needs
    16); key blocks of 64 while a K row is at most 256 bytes, else 32 (32 under the interpreter,
    so that tests cross several); 8 warps past 128 bytes. Compiled for an H100 with
    `python -m attention_kernels.benchmarks.onchip --kernel decode-split`, these spill no registers except at fp32
    D = 256 (24 bytes), where 4 warps or 64 keys spill hundreds to thousands."""
    row_bytes = block_d * itemsize
    block_m = min(pow2(rows), 64)
    block_n = 32 if INTERPRET or row_bytes > 256 else 64
    return block_m, block_n, 4 if row_bytes <= 128 else 8


def default_num_splits(B, Hkv, row_blocks, keys, device):
    """The rule for num_splits=None: ceil(SMs / (B * Hkv * row_blocks)) splits, enough for one
    program per SM, but no more than keys / MIN_SPLIT_KEYS (rounded up) and MAX_SPLITS; at least 1.
    `keys` is the most keys a row may read: Tmax, or left + Tq with a window."""
    programs = B * Hkv * row_blocks
    return max(1, min(triton.cdiv(sm_count(device), programs), triton.cdiv(keys, MIN_SPLIT_KEYS), MAX_SPLITS))


# ----------------------------------------------------------------------------- launcher


def as_lengths(lengths, B, device, read_values=True):
    """cache_seqlens as the kernels read it, int32 (B,) on q's device: from an int (every
    sequence's length), a list or tuple of B ints, or an integer tensor (int64 is converted:
    a copy; int32 is taken as it is). Anything else is left for `check_int32` to refuse. An int64
    tensor's range is read on the host only with read_values (check_seqlens): a value past int32
    is then refused, where unchecked it wraps and the kernel clamps it into the cache."""
    if _is_int(lengths):
        return torch.full((B,), int(lengths), dtype=torch.int32, device=device)
    if isinstance(lengths, (list, tuple)):
        if not all(_is_int(n) for n in lengths):
            raise TypeError(f"cache_seqlens must be an int32 tensor of shape (B,) = ({B},), an int64 one, a list of "
                            f"{B} ints or one int; got {type(lengths).__name__} {list(lengths)[:8]!r}")
        return torch.tensor([int(n) for n in lengths], dtype=torch.int32, device=device)
    if isinstance(lengths, torch.Tensor) and lengths.dtype == torch.int64 and lengths.device == device:
        if read_values and lengths.numel() and not -2**31 <= int(lengths.min()) <= int(lengths.max()) < 2**31:
            raise ValueError(f"cache_seqlens must lie in [0, Tmax] (int32), got values from {int(lengths.min())} "
                             f"to {int(lengths.max())}")
        return lengths.to(torch.int32)
    return lengths


def _check_seqlens(cache_seqlens, B, Tmax, device, read_values):
    check_int32("cache_seqlens", cache_seqlens, (B,), device, want=f"(B,) = ({B},)")
    if not read_values:
        return
    lengths = cache_seqlens.tolist()  # one host read: a length past Tmax would read outside the cache
    bad = [(b, L) for b, L in enumerate(lengths) if not 0 <= L <= Tmax]
    if bad:
        raise ValueError(f"cache_seqlens must lie in [0, Tmax = {Tmax}] (the cache's length), got "
                         + ", ".join(f"{L} for sequence {b}" for b, L in bad[:4]))


def check_cache_inputs(q, k_cache, v_cache, scale, names=("q", "k_cache", "v_cache")):
    """`check_inputs` for q and a KV cache, which may be fp8 (k_cache and v_cache of one FP8_MAX
    format) beside a 16- or 32-bit q. The shared check takes one dtype for all three, so it is shown
    stand-ins in an fp8 cache's place: q's dtype, the cache's shape and device, nothing allocated
    (a broadcast scalar). Returns q, k_cache, v_cache and the scale as `check_inputs` does."""
    fp8 = [isinstance(t, torch.Tensor) and t.dtype in FP8_MAX for t in (k_cache, v_cache)]
    if not any(fp8) or not isinstance(q, torch.Tensor):
        return check_inputs(q, k_cache, v_cache, scale, names=names)
    _, nk, nv = names
    if not all(fp8) or k_cache.dtype != v_cache.dtype:
        dtype = lambda t: _dtype_name(t.dtype) if isinstance(t, torch.Tensor) else type(t).__name__
        raise TypeError(f"{nk} and {nv} must share one dtype (an fp8 cache is float8_e4m3fn or float8_e5m2 for "
                        f"both), got {nk} {dtype(k_cache)}, {nv} {dtype(v_cache)}")
    stand_in = lambda t: torch.empty((), dtype=q.dtype, device=t.device).expand(t.shape)
    q, _, _, scale = check_inputs(q, stand_in(k_cache), stand_in(v_cache), scale, names=names)
    return q, last_dim_contiguous(k_cache), last_dim_contiguous(v_cache), scale


def check_kv_scales(k_scale, v_scale, cache, Hkv):
    """An fp8 cache's scales as the kernels take them (vLLM's k_scale and v_scale: the cache holds
    round(x / scale), x = stored * scale): fp32 tensors on the cache's device of one value (per
    tensor) or Hkv (per k/v head), a Python float made one (a copy from the host), one left out
    1.0. (None, None) when neither is given: the kernels then read no scale (as 1.0). Tensor
    values are not read (no host sync): they must be finite and > 0."""
    if k_scale is None and v_scale is None:
        return None, None
    if cache.dtype not in FP8_MAX:
        raise ValueError(f"k_scale and v_scale are for fp8 caches (float8_e4m3fn, float8_e5m2), got a "
                         f"{_dtype_name(cache.dtype)} cache")
    accepted = f"a float, or a float32 tensor of shape (), (1,) or (Hkv,) = ({Hkv},) on the cache's device"
    scales = []
    for name, s in (("k_scale", k_scale), ("v_scale", v_scale)):
        s = 1.0 if s is None else s
        if isinstance(s, numbers.Real) and not isinstance(s, bool):
            if not (math.isfinite(s) and s > 0):
                raise ValueError(f"{name} must be finite and > 0, got {s}")
            s = torch.full((1,), float(s), dtype=torch.float32, device=cache.device)
        elif not isinstance(s, torch.Tensor):
            raise TypeError(f"{name} must be {accepted}, or None; got {type(s).__name__}")
        elif s.dtype != torch.float32 or s.dim() > 1 or s.numel() not in (1, Hkv) or s.device != cache.device:
            raise ValueError(f"{name} must be {accepted}; got {_dtype_name(s.dtype)} of shape {tuple(s.shape)} on "
                             f"{s.device}")
        scales.append(s.reshape(-1))                                          # (1,) or (Hkv,)
    return tuple(scales)


def kv_scale_args(placeholder, k_scale, v_scale):
    """The kernels' fp8 scale arguments: the scales and their strides along k/v heads (0 for one
    per tensor); without them an unread placeholder and HAS_KV_SCALE False."""
    stride = lambda s: 0 if s is None or s.numel() == 1 else s.stride(0)
    return dict(K_SCALE=placeholder if k_scale is None else k_scale, V_SCALE=placeholder if v_scale is None else v_scale,
                stride_ksh=stride(k_scale), stride_vsh=stride(v_scale), HAS_KV_SCALE=k_scale is not None)


def refuse_gradients(name, *tensors):
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        raise RuntimeError(f"{name} has no backward (it is for inference); call it under "
                           "torch.no_grad(), or use flash_attention to train")


def check_num_splits(num_splits):
    if num_splits is not None and (isinstance(num_splits, bool) or not isinstance(num_splits, int)
                                   or not 1 <= num_splits <= MAX_SPLITS):
        raise ValueError(f"num_splits must be None or an int from 1 to {MAX_SPLITS} (the merge kernel holds every "
                         f"split's partial output of a row at once), got {num_splits!r}")


def check_serving_masks(tree_mask, bidirectional, B, Tq, device, tokens="Tq"):
    """Check the masks over the new tokens and return them as the kernels take them (None stays
    None): tree_mask a bool tensor (B, T, T) or (T, T), T = Tq (`tokens` names it: max_seqlen_q
    when packed, each sequence's tree in the top-left corner of its (T, T)); bidirectional an
    integer tensor (B, R, 2) or (B, 2) of [start, end) positions, returned int32 (int64 clamped
    into int32's range on the device: every position lies inside it, so no range changes). On
    q's device. Their values are not read: no host sync, so unchecked calls stay graph-capturable."""
    if tree_mask is not None:
        shapes = ((B, Tq, Tq), (Tq, Tq))
        accepted = (f"a bool tensor of shape (B, {tokens}, {tokens}) = {shapes[0]} or ({tokens}, {tokens}) = "
                    f"{shapes[1]}, [b, i, j] True where new token i of sequence b sees new token j")
        if tokens != "Tq":
            accepted += " (padded per sequence; a flat packed mask, FlashInfer's custom_mask layout, is not taken)"
        if not isinstance(tree_mask, torch.Tensor):
            raise TypeError(f"tree_mask must be {accepted}, or None; got {type(tree_mask).__name__}")
        if tree_mask.dtype != torch.bool or tuple(tree_mask.shape) not in shapes:
            raise ValueError(f"tree_mask must be {accepted}; got {_dtype_name(tree_mask.dtype)} of shape "
                             f"{tuple(tree_mask.shape)}")
        if tree_mask.device != device:
            raise ValueError(f"tree_mask must be on q's device {device}, got {tree_mask.device}")
    if bidirectional is not None:
        accepted = (f"an int32 or int64 tensor of shape (B, R, 2) or (B, 2), B = {B}: each sequence's [start, end) "
                    "position ranges that see each other whole")
        if not isinstance(bidirectional, torch.Tensor):
            raise TypeError(f"bidirectional must be {accepted}, or None; got {type(bidirectional).__name__}")
        if bidirectional.dtype not in (torch.int32, torch.int64) or bidirectional.dim() not in (2, 3) \
                or bidirectional.shape[0] != B or bidirectional.shape[-1] != 2:
            raise ValueError(f"bidirectional must be {accepted}; got {_dtype_name(bidirectional.dtype)} of shape "
                             f"{tuple(bidirectional.shape)}")
        if bidirectional.device != device:
            raise ValueError(f"bidirectional must be on q's device {device}, got {bidirectional.device}")
        if bidirectional.dtype == torch.int64:
            bidirectional = bidirectional.clamp(-2**31, 2**31 - 1).to(torch.int32)
    return tree_mask, bidirectional


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, num_splits=None, window=None,
                     return_lse=False, check_seqlens=True, softcap=None, sinks=None, alibi_slopes=None, causal=True,
                     tree_mask=None, bidirectional=None, k_scale=None, v_scale=None):
    """Attention of Tq new tokens per sequence to a KV cache, the cache split across programs.

    q (B, Hq, Tq, D), Tq the new tokens (1 to 16 is the usual; any works); k_cache, v_cache
    (B, Hkv, Tmax, D), Hq % Hkv == 0, any strides; cache_seqlens (B,): sequence b's valid cache
    length, the new tokens' keys included (they are its last Tq), an int32 tensor (an int64 one,
    a list of ints, or one int for every sequence are converted). Equal to
    `reference.decode_attention`: causal, each new token sees the cache up to itself; `window`
    (left, 0) limits it to the `left` keys before it. `causal=False`: each new token sees the
    whole valid cache (cross-attention to an encoder's keys, or new tokens that see each other),
    or with a window (left, right) the keys from `left` before its position to `right` after it,
    its position being bottom-right aligned as in `flash_attention`. num_splits: how many programs share one
    cache (None: `default_num_splits`). With `return_lse`, also each row's log-sum-exp, (B, Hq, Tq)
    fp32 natural log. No backward. num_splits larger than the cache's key blocks is clamped to
    them (a split holds at least one block); past MAX_SPLITS it is refused. softcap, sinks and
    alibi_slopes as in `flash_attention`; a new token's ALiBi distance is from its own position.

    Serving masks (`docs/serving.md`), equal to the reference's: `tree_mask` (B, Tq, Tq) or
    (Tq, Tq) bool, True where new token i sees new token j (a speculative draft tree, each token
    seeing its ancestors and itself): among the new tokens' keys it replaces causal and the
    window's right side, the window's left bound still holding; the cache before them is seen as
    without it. `bidirectional` (B, R, 2) or (B, 2) int32 (or int64) [start, end) position ranges
    (positions in the cache, 0 first): a query at a position inside a range also sees every key
    of that range below the sequence's length, whatever causal, the window or the tree say
    (Gemma 3's images, a prefix-LM's prefix); a range with start >= end is empty (padding).

    fp8 caches: k_cache and v_cache float8_e4m3fn (or float8_e5m2) beside q in fp16, bf16 or fp32,
    holding round(x / scale) (vLLM's convention): `k_scale`, `v_scale` a float or an fp32 tensor
    of one value or (Hkv,), one per k/v head (None: 1.0). Equal to attention over the dequantized
    cache, stored * scale (`reference.decode_attention` with the same scales). A tensor's values
    are not read on the host (finite and > 0 is the caller's to keep).

    Checking that every length lies in [0, Tmax] reads cache_seqlens on the host: a sync per
    call, which also rules out capturing the call in a CUDA graph. `check_seqlens=False` skips
    that read (its shape, dtype and device are still checked); the kernel then clamps each
    length into [0, Tmax], so it never reads outside the cache, but an out-of-range length is
    the caller's bug, not an error.
    """
    if isinstance(k_cache, torch.Tensor) and k_cache.dtype in FP8_MAX:
        q, = autocast_inputs(q)  # an fp8 cache is not autocast: its values are stored / scale
    else:
        q, k_cache, v_cache = autocast_inputs(q, k_cache, v_cache)
    q, k_cache, v_cache, scale = check_cache_inputs(q, k_cache, v_cache, scale)
    B, Hq, Tq, D = q.shape
    Tmax = k_cache.shape[2]
    check_flag(return_lse, "return_lse")
    read_values = check_flag(check_seqlens, "check_seqlens")
    cache_seqlens = as_lengths(cache_seqlens, B, q.device, read_values)
    _check_seqlens(cache_seqlens, B, Tmax, q.device, read_values)
    cache_seqlens = cache_seqlens.contiguous()  # the kernels read it as contiguous: a strided view moved lengths
    left, right = window_bounds(window, causal=check_causal(causal))
    refuse_gradients("decode_attention", q, k_cache, v_cache, sinks)
    check_num_splits(num_splits)
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=B)
    tree_mask, bidirectional = check_serving_masks(tree_mask, bidirectional, B, Tq, q.device)
    k_scale, v_scale = check_kv_scales(k_scale, v_scale, k_cache, k_cache.shape[1])
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=slopes)
    o, lse = _run_decode(q, k_cache, v_cache, cache_seqlens, scale, num_splits, variant, tree_mask, bidirectional,
                         k_scale, v_scale)
    return (o, lse) if return_lse else o


def _run_decode(q, k_cache, v_cache, cache_seqlens, scale, num_splits, variant, tree_mask=None, bidirectional=None,
                k_scale=None, v_scale=None):
    """The split and merge kernels on checked dense inputs, through the op `attention_kernels::decode`;
    returns (out, lse)."""
    return torch.ops.attention_kernels.decode(q, k_cache, v_cache, cache_seqlens, scale=scale, num_splits=num_splits,
                                              left=variant.left, right=variant.right, softcap=variant.softcap,
                                              sinks=variant.sinks, alibi_slopes=variant.alibi_slopes,
                                              tree_mask=tree_mask, bidirectional=bidirectional, k_scale=k_scale,
                                              v_scale=v_scale)


def split_kv(q, k_cache, v_cache, seqlens, scale, num_splits, variant, o, lse, *, B, Tq, Hkv, Tmax,
             q_strides, k_strides, v_strides, o_strides, cu_q=None, pages=None, page_size=1, tree_mask=None,
             bidirectional=None, k_scale=None, v_scale=None):
    """The split launch and the merge (`merge_splits`), for a dense cache and q (decode_attention)
    or a paged cache and packed q (`kernels.paged`). Strides as the kernels take them, (b, h, t, d)
    for q and o (b = 0 when packed: every row is "sequence 0" with Tq = total_q) and (b or page, h,
    t or slot, d) for the cache; Tq is the longest sequence's new tokens (packed: max_seqlen_q),
    Tmax each sequence's capacity. The variant's window is (left, right), right 0 when causal; it
    has no dropout. tree_mask (B, Tq, Tq) or (Tq, Tq) bool and bidirectional (B, R, 2) or (B, 2)
    int32, checked (`check_serving_masks`), or None; k_scale, v_scale an fp8 cache's (`check_kv_scales`),
    or None. Fills o and lse."""
    Hq, D = q.shape[-2] if cu_q is not None else q.shape[1], q.shape[-1]
    group = Hq // Hkv
    block_m, block_n, num_warps = blocks(group * max(Tq, 1), pow2(D), q.element_size())
    block_m = max(block_m, triton.next_power_of_2(group))                   # every head of a group in one block
    block_q = block_m // triton.next_power_of_2(group)                       # new tokens per block
    rows = o.numel() // D                                                    # new tokens x Hq
    if cu_q is None:
        q_blocks = triton.cdiv(Tq, block_q)
        grid_blocks = B * q_blocks
    else:  # sequence b's blocks start at cu_q[b] // block_q + b (see _sequence_of): room for all of them
        q_blocks = q.shape[0]  # the kernel clamps unchecked offsets to it
        grid_blocks = q.shape[0] // block_q + B
    left = variant.left
    if num_splits is None:  # a range may reach back past the window: then any key
        keys = Tmax if left < 0 or bidirectional is not None else min(Tmax, left + Tq)
        num_splits = default_num_splits(1, Hkv, grid_blocks, keys, q.device)
    num_splits = min(num_splits, triton.cdiv(Tmax, block_n))  # a split holds one key block at least

    o_part = torch.empty((rows, num_splits, D), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((rows, num_splits), device=q.device, dtype=torch.float32)
    with on_device(q):
        wrap_triton(_decode_split)[(grid_blocks * Hkv * num_splits,)](
            Q=q, K=k_cache, V=v_cache, SEQLENS=seqlens, CU_Q=seqlens if cu_q is None else cu_q,
            PAGES=seqlens if pages is None else pages, O_PART=o_part, LSE_PART=lse_part,
            **stride_args("bhtd", q=q_strides, k=k_strides, v=v_strides),
            **serving_mask_args(seqlens, tree_mask, bidirectional), **kv_scale_args(seqlens, k_scale, v_scale),
            stride_pb=0 if pages is None else pages.stride(0), B=B, Hkv=Hkv, Tq=Tq, Tmax=Tmax,
            num_pages=1 if pages is None else k_cache.shape[0], GROUP=group, q_blocks=q_blocks,
            left=left if left >= 0 else Tmax + Tq, right=variant.right if variant.right >= 0 else Tmax + Tq,
            qk_scale=scale * LOG2E, **variant.score_args(lse), CAUSAL=variant.right == 0,
            NUM_SPLITS=num_splits, BLOCK_M=block_m, BLOCK_Q=block_q, BLOCK_N=block_n, PAGE_SIZE=page_size,
            PAGED=pages is not None, VARLEN=cu_q is not None, num_warps=num_warps, **meta(q),
        )
        merge_splits(o_part, lse_part, o, lse, variant, Hq=Hq, Tq=Tq if cu_q is None else q.shape[0],
                     o_strides=o_strides)


def serving_mask_args(placeholder, tree_mask, bidirectional):
    """The split kernel's tree and ranges arguments: the tree as bytes (torch's bool viewed as
    uint8) with its (b, i, j) strides, b's 0 when one tree serves every sequence; the ranges with
    their (b, r, x) strides, r's 0 for one range per sequence. Without either, an unread
    placeholder tensor and constexprs that leave them out of the kernel."""
    tree, ranges = tree_mask, bidirectional
    num_ranges = 0 if ranges is None else 1 if ranges.dim() == 2 else int(ranges.shape[1])  # BLOCK_R: specialised
    tree_strides = (0, 0, 0) if tree is None else ((0,) if tree.dim() == 2 else ()) + tree.stride()
    range_strides = (0, 0, 0) if ranges is None else (ranges.stride(0), 0, ranges.stride(1)) if ranges.dim() == 2 \
        else ranges.stride()
    return dict(TREE=placeholder if tree is None else tree.view(torch.uint8), **stride_args("bij", t=tree_strides),
                RANGES=placeholder if ranges is None else ranges, **stride_args("brx", r=range_strides),
                tree_len=0 if tree is None else tree.shape[-1],
                num_ranges=num_ranges, HAS_TREE=tree is not None, HAS_RANGES=ranges is not None,
                BLOCK_R=pow2(num_ranges, least=2))


def merge_splits(o_part, lse_part, o, lse, variant, *, Hq, Tq, o_strides):
    """Each row's splits into o and lse, the sinks in the denominator (`_decode_merge`); Tq and
    o's (b, h, t, d) strides as in `split_kv`, packed: total_q and a batch stride of 0."""
    rows, num_splits, D = o_part.shape
    wrap_triton(_decode_merge)[(rows,)](
        O_PART=o_part, LSE_PART=lse_part, O=o, LSE=lse, **variant.sink_args(lse),
        **stride_args("bhtd", o=o_strides), Hq=Hq, Tq=Tq, NUM_SPLITS=num_splits,
        BLOCK_S=pow2(num_splits, least=2), HEAD_DIM=D, BLOCK_D=pow2(D), num_warps=4,
    )


# The op comes after the launchers it calls: torch reads which kernels an op launches when it is
# registered, from its source and the functions it names.
def _decode_outputs(q, **unused):
    """The op's (out, lse): out like q, lse (B, Hq, Tq) fp32; also its fake implementation."""
    return torch.empty_like(q), torch.empty(q.shape[:3], device=q.device, dtype=torch.float32)


@kernel_op("decode", fake=_decode_outputs)
def _decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float,
               num_splits: Optional[int], left: int, right: int, softcap: float, sinks: Optional[Tensor],
               alibi_slopes: Optional[Tensor], tree_mask: Optional[Tensor] = None,
               bidirectional: Optional[Tensor] = None, k_scale: Optional[Tensor] = None,
               v_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """decode_attention's launch as the torch op `attention_kernels::decode` (checked inputs): torch.compile
    sees one op, with no graph break, and check_seqlens=False leaves nothing read on the host. It calls
    split_kv itself: torch finds an op's kernels by reading its source and the functions it calls."""
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    B, Hq, Tq, D = q.shape
    o, lse = _decode_outputs(q)
    split_kv(q, k_cache, v_cache, cache_seqlens, scale, num_splits, variant, o, lse, B=B, Tq=Tq,
             Hkv=k_cache.shape[1], Tmax=k_cache.shape[2], q_strides=q.stride(), k_strides=k_cache.stride(),
             v_strides=v_cache.stride(), o_strides=o.stride(), tree_mask=tree_mask, bidirectional=bidirectional,
             k_scale=k_scale, v_scale=v_scale)
    return o, lse
