"""
Multi-head latent attention (MLA) decoding over a paged latent cache, split along the cache.

DeepSeek V2/V3 and Kimi K2 cache one latent vector per position instead of per-head keys and
values: c (kv_lora_rank = 512 wide) and a rotary key part (64). Serving engines decode with the
weights absorbed into the query (FlashMLA, FlashInfer's MLA, vLLM's and SGLang's Triton MLA), so
that every query head attends to the same single head of width D = 576:

    q        (total_q, Hq, D)               each new token's Hq heads, absorbed: [q_nope W_UK, q_rope]
    kv_cache (num_pages, page_size, D)      one latent row per position: [c, k_rope]
    value    kv_cache[..., :head_dim_v]     the latent c itself: the same pages, no second cache
    out      (total_q, Hq, head_dim_v)      (the caller multiplies by W_UV afterwards)

That is multi-query attention with a wide head. All Hq heads read one cache, so the point is to
load each latent tile once for as many heads as fit a program's rows:

    split    one program per (block of new tokens of one sequence, block of heads, split):
             rows = BLOCK_Q new tokens x BLOCK_H heads (BLOCK_M = 64 at most; 128 heads of one
             decoding token take two programs). Each tile of BLOCK_N cache rows is loaded once,
             [BLOCK_N, D] in two column pieces, latent [BLOCK_N, BLOCK_DV] and rotary
             [BLOCK_N, BLOCK_DR]; scores are the two dots summed, S = Q_c C^T + Q_r R^T, and the
             latent piece, already loaded, is the value: acc += P C. The output row is 512 wide,
             one [BLOCK_M, BLOCK_DV] fp32 accumulator across 8 warps. Online softmax in base 2
             as in `kernels/decode.py`; a split writes O_s (divided by its own sum) and L_s.
    merge    decode's merge kernel (`merge_splits`): one program per (new token, head),
             L = log(sum_s exp(L_s)), O = sum_s exp(L_s - L) O_s.

New tokens are packed as in `paged_attention` (cu_seqlens_q, any number per sequence: decoding,
speculative drafts of up to 16, a prefill chunk) and see the cache before them and themselves
(causal, bottom-right). With kv_new (total_q, D) the call first writes their latent rows into
the pages at cache_seqlens[b]... (`_mla_append`) and attends to cache_seqlens + q_len keys.

The cache is read through the block table as in `kernels/paged.py` (`_cache_slots`): a page that
holds whole key tiles costs one table read per tile, a smaller page one per key. The grid depends
on total_q, B, Hq, max_seqlen_q and num_splits alone (a block finds its sequence by bisecting
cu_seqlens_q), so check=False calls can be captured in a CUDA graph.

Limits: head_dim_v up to 512 and D - head_dim_v up to 128 (DeepSeek's 512 + 64); causal only; no
soft-cap, window, sinks or ALiBi (MLA models use none); inference only, no backward.
"""

import math
import numbers
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import (MAX_SCALE, SUPPORTED_DTYPES, _dtype_name, as_int, check_device, check_flag,
                     check_int32)
from .common import LOG2E, Variant, dot, kernel_op, on_device, pow2, precision, wrap_triton
from .paged import check_table_values
from .decode import (_cache_slots, _sequence_of, check_num_splits, default_num_splits, merge_splits,
                     refuse_gradients)

# ----------------------------------------------------------------------------- kernels


@triton.jit
def _mla_split(
    Q, KV, SEQLENS, CU_Q, PAGES, O_PART, LSE_PART,
    stride_qt, stride_qh, stride_qd,  # q (total_q, Hq, D)
    stride_kp, stride_ks, stride_kd,  # the pool (num_pages, page_size, D)
    stride_pb,                        # the block table's row stride
    B, Hq, total_q, num_pages, Tmax, head_blocks,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    NUM_SPLITS: tl.constexpr, HEAD_DIM_V: tl.constexpr, ROPE_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_DR: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr, PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    # -- which query block, head block and split; the splits of one block are adjacent (L2)
    pid = tl.program_id(0)
    split = pid % NUM_SPLITS
    head_block = pid // NUM_SPLITS % head_blocks
    block = pid // NUM_SPLITS // head_blocks
    b = _sequence_of(CU_Q, block, B, BLOCK_Q)
    # the sequence's rows among all new tokens; unchecked offsets are clamped into q's rows
    first = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)
    q_len = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), first), total_q) - first
    t0 = (block - (first // BLOCK_Q + b)) * BLOCK_Q
    if t0 >= q_len:
        return
    b = b.to(tl.int64)

    # -- the rows: BLOCK_Q new tokens t0.. times BLOCK_H heads; row r = (t - t0) * BLOCK_H + (h - h0)
    r = tl.arange(0, BLOCK_M)
    h = head_block * BLOCK_H + r % BLOCK_H
    t = t0 + r // BLOCK_H
    row_ok = (h < Hq) & (t < q_len)
    q_rows = Q + (first + t).to(tl.int64) * stride_qt + h.to(tl.int64) * stride_qh                # [BLOCK_M]
    offs_dv = tl.arange(0, BLOCK_DV)
    dv_ok = offs_dv < HEAD_DIM_V
    offs_dr = HEAD_DIM_V + tl.arange(0, BLOCK_DR)                 # the rotary columns, after the latent ones
    dr_ok = offs_dr < HEAD_DIM_V + ROPE_DIM
    q_c = tl.load(q_rows[:, None] + offs_dv[None, :] * stride_qd, mask=row_ok[:, None] & dv_ok[None, :],
                  other=0.0)                                                              # [BLOCK_M, BLOCK_DV]
    if ROPE_DIM > 0:
        q_r = tl.load(q_rows[:, None] + offs_dr[None, :] * stride_qd, mask=row_ok[:, None] & dr_ok[None, :],
                      other=0.0)                                                          # [BLOCK_M, BLOCK_DR]

    # -- this split's keys: an equal share, whole tiles, of [0, the block's last position]
    L = tl.minimum(tl.maximum(tl.load(SEQLENS + b), 0), Tmax)  # unchecked lengths never read past the table
    pos = L - q_len + t                                                                   # [BLOCK_M] each row's position
    hi = tl.minimum(L - q_len + t0 + BLOCK_Q, L)
    per_split = tl.cdiv(tl.cdiv(tl.maximum(hi, 0), NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    stop = tl.minimum(start + per_split, hi)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)                           # running max, base 2
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)                                         # running sum
    acc = tl.zeros([BLOCK_M, BLOCK_DV], dtype=tl.float32)                               # running P @ C, registers
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_ok = offs_n < stop
        if PAGE_SIZE % BLOCK_N == 0:  # tiles start at multiples of BLOCK_N: each lies in one page
            # n0 + 0 * L: a tensor under the interpreter too, whose range() gives ints
            page, slot = _cache_slots(PAGES, b, n0 + 0 * L, True, stride_pb, num_pages, PAGE_SIZE, True)
            slot = slot + tl.arange(0, BLOCK_N)                                         # [BLOCK_N], one table read
        else:
            page, slot = _cache_slots(PAGES, b, offs_n, n_ok, stride_pb, num_pages, PAGE_SIZE, True)  # [BLOCK_N]
        kv_rows = KV + page * stride_kp + slot * stride_ks                              # [BLOCK_N]
        # -- the latent tile: keys' first columns and the values at once
        c = tl.load(kv_rows[:, None] + offs_dv[None, :] * stride_kd, mask=n_ok[:, None] & dv_ok[None, :],
                    other=0.0)                                                          # [BLOCK_N, BLOCK_DV]
        s = dot(q_c, tl.trans(c), PRECISION, UPCAST)                                    # [BLOCK_M, BLOCK_N] fp32
        if ROPE_DIM > 0:  # -- the rotary columns: the rest of each key
            k_r = tl.load(kv_rows[:, None] + offs_dr[None, :] * stride_kd, mask=n_ok[:, None] & dr_ok[None, :],
                          other=0.0)                                                    # [BLOCK_N, BLOCK_DR]
            s += dot(q_r, tl.trans(k_r), PRECISION, UPCAST)
        # -- masked: past this split, after the row's own position
        s = tl.where(n_ok[None, :] & (offs_n[None, :] <= pos[:, None]), s * qk_scale, float("-inf"))
        # -- online softmax (a row with no key yet keeps m = -inf)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + dot(p.to(c.dtype), c, PRECISION, UPCAST)
        m_i = m_new

    # -- the split's partial result: O_s = acc / l (0 when it saw no key), L_s base 2 (-inf then)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    part = ((first + t).to(tl.int64) * Hq + h) * NUM_SPLITS + split                     # [BLOCK_M] (token, head, split)
    tl.store(O_PART + part[:, None] * HEAD_DIM_V + offs_dv[None, :], acc / l_safe[:, None],
             mask=row_ok[:, None] & dv_ok[None, :])
    tl.store(LSE_PART + part, tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe)), mask=row_ok)


@triton.jit
def _mla_append(
    KV_NEW, KV, SEQLENS, CU_Q, PAGES,
    stride_nt, stride_nd,             # kv_new (total_q, D)
    stride_kp, stride_ks, stride_kd,  # the pool (num_pages, page_size, D)
    stride_pb, Tmax, num_pages, total_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    # Sequence b's new latent rows, rows cu_q[b]:cu_q[b + 1] of kv_new, written at positions
    # cache_seqlens[b]... of its pages; one program per (sequence, BLOCK_T tokens, BLOCK_D columns).
    # Positions past the table's capacity are not written (an unchecked call's lengths).
    b = tl.program_id(0).to(tl.int64)
    first = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), total_q)   # unchecked offsets: inside kv_new's rows
    end = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), first), total_q)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    pos = tl.load(SEQLENS + b) + t
    ok = (t < end - first) & (pos >= 0) & (pos < Tmax)
    offs_d = tl.program_id(2) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    row = tl.load(KV_NEW + (first + t).to(tl.int64)[:, None] * stride_nt + offs_d[None, :] * stride_nd, mask=mask)
    page, slot = _cache_slots(PAGES, b, pos, ok, stride_pb, num_pages, PAGE_SIZE, True)
    tl.store(KV + (page * stride_kp + slot * stride_ks)[:, None] + offs_d[None, :] * stride_kd, row, mask=mask)


# ----------------------------------------------------------------------------- config

MAX_HEAD_DIM_V = 512  # the accumulator's width: DeepSeek's kv_lora_rank
MAX_ROPE_DIM = 128    # D - head_dim_v: DeepSeek's rotary part is 64
APPEND_BLOCK_T, APPEND_BLOCK_D = 16, 64  # the append's tile: new tokens x columns


def mla_blocks(Hq, max_seqlen_q, itemsize):
    """(BLOCK_M, BLOCK_H, BLOCK_Q, BLOCK_N, num_warps). Rows: every head of a new token, up to
    64 (tl.dot needs 16; 64 rows are one warpgroup's wgmma), then as many new tokens as fill
    them; 16 in fp32, which 'ieee' precision keeps off the tensor cores. 8 warps: the 64 x 512
    fp32 accumulator is 128 registers a thread. Keys: tiles of 16 latent rows at 64 rows, 32
    below. Compiled for sm_90 (`docs/mla.md`), D = 576, 2 stages: bf16 and fp16 at 64 rows use
    195 to 232 registers and spill none (HGMMA, cp.async pipelined), where 32-key tiles reach
    255 registers and spill up to 80 bytes and 4 warps 1 KB; fp32 at 16 rows spills 8 bytes at
    most (at 64 rows, 9 KB)."""
    block_m = min(pow2(Hq * max_seqlen_q), 64 if itemsize < 4 else 16)
    block_h = min(triton.next_power_of_2(Hq), block_m)
    return block_m, block_h, block_m // block_h, 16 if block_m == 64 else 32, 8


# ----------------------------------------------------------------------------- launcher


def _scale_of(scale, D):
    if scale is None:
        return 1.0 / math.sqrt(D)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    if not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise ValueError(f"scale must be > 0 and at most {MAX_SCALE:g} (larger ones overflow the kernel's fp32 "
                         f"logits), got {scale}")
    return float(scale)


def _one_head(t, name, dims, layout):
    """A latent tensor of `dims` dimensions, or FlashMLA's with a head dimension of 1 before D."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() == dims + 1 and t.shape[-2] == 1:
        t = t.squeeze(-2)                                  # a view: writes reach the caller's tensor
    if t.dim() != dims:
        raise ValueError(f"{name} must have shape {layout} (or with a head dimension of 1 before D), got "
                         f"{tuple(t.shape)}")
    return t


def check_mla_inputs(q, kv_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, kv_new, head_dim_v,
                     scale, read_values):
    """Validate an MLA call; return q, kv_cache (num_pages, page_size, D), kv_new (total_q, D) or
    None, max_seqlen_q, head_dim_v and the scale. With read_values, one host read of cu_seqlens_q,
    cache_seqlens and block_table checks the offsets, that every length fits the table, that every
    page read or written is in the pool, and that no page written is named twice."""
    if not isinstance(q, torch.Tensor):
        raise TypeError(f"q must be a torch.Tensor (total_q, Hq, D), got {type(q).__name__}")
    if q.dim() != 3 or 0 in q.shape:
        raise ValueError(f"q must have shape (total_q, Hq, D), the new tokens packed, every size >= 1, got "
                         f"{tuple(q.shape)}")
    if q.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q has dtype {_dtype_name(q.dtype)}; supported: "
                        + ", ".join(_dtype_name(d) for d in SUPPORTED_DTYPES))
    check_device(q, "q")
    total_q, _, D = q.shape
    kv_cache = _one_head(kv_cache, "kv_cache", 3, "(num_pages, page_size, D)")
    if kv_cache.dtype != q.dtype or kv_cache.device != q.device:
        raise ValueError(f"kv_cache must have q's dtype {_dtype_name(q.dtype)} and device {q.device}, got "
                         f"{_dtype_name(kv_cache.dtype)} on {kv_cache.device}")
    num_pages, page_size, Dk = kv_cache.shape
    if 0 in kv_cache.shape or Dk != D:
        raise ValueError(f"kv_cache must have shape (num_pages, page_size, D) = (>= 1, >= 1, {D}), D as q's, got "
                         f"{tuple(kv_cache.shape)}")
    if kv_cache.stride(-1) != 1:  # the pool is written in place: a contiguous copy would take the appends
        raise ValueError(f"kv_cache must have unit stride along D (it is read and written in place), got strides "
                         f"{kv_cache.stride()}")
    head_dim_v = as_int(head_dim_v, "head_dim_v")
    if not (1 <= head_dim_v <= min(D, MAX_HEAD_DIM_V) and D - head_dim_v <= MAX_ROPE_DIM):
        raise ValueError(f"head_dim_v must be an int from max(1, D - {MAX_ROPE_DIM}) to min(D, {MAX_HEAD_DIM_V}) "
                         f"(the values are each latent row's first head_dim_v columns), D = {D}, got {head_dim_v}")
    if kv_new is not None:
        kv_new = _one_head(kv_new, "kv_new", 2, "(total_q, D)")
        if tuple(kv_new.shape) != (total_q, D):
            raise ValueError(f"kv_new must have shape (total_q, D) = {(total_q, D)}, one latent row per new token "
                             f"of q, got {tuple(kv_new.shape)}")
        if kv_new.dtype != kv_cache.dtype or kv_new.device != kv_cache.device:
            raise ValueError(f"kv_new must have the cache's dtype {_dtype_name(kv_cache.dtype)} and device "
                             f"{kv_cache.device}, got {_dtype_name(kv_new.dtype)} on {kv_new.device}")
    check_int32("cu_seqlens_q", cu_seqlens_q, (None,), q.device, "B + 1 offsets of the new tokens")
    B = cu_seqlens_q.shape[0] - 1
    if B < 1:
        raise ValueError(f"cu_seqlens_q must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens_q.shape)}")
    check_int32("block_table", block_table, (B, None), q.device, "sequence b's pages, B = len(cu_seqlens_q) - 1")
    if block_table.shape[1] < 1:
        raise ValueError(f"block_table must name at least one page per sequence, got shape {tuple(block_table.shape)}")
    check_int32("cache_seqlens", cache_seqlens, (B,), q.device, "each sequence's positions in the cache")
    max_seqlen_q = as_int(max_seqlen_q, "max_seqlen_q")
    if not 1 <= max_seqlen_q <= total_q:
        raise ValueError(f"max_seqlen_q must be an int from 1 to total_q = {total_q} (the most new tokens of one "
                         f"sequence, which sizes the grid), got {max_seqlen_q!r}")
    scale = _scale_of(scale, D)
    if not check_flag(read_values, "check"):
        return q, kv_cache, kv_new, max_seqlen_q, head_dim_v, scale

    check_table_values(cu_seqlens_q, cache_seqlens, block_table, total_q, max_seqlen_q, page_size, num_pages,
                       appends=kv_new is not None, new="kv_new", pool="kv_cache")
    return q, kv_cache, kv_new, max_seqlen_q, head_dim_v, scale


def mla_decode(q, kv_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, kv_new=None, head_dim_v=512,
               scale=None, num_splits=None, return_lse=False, check=True):
    """Multi-head latent attention of new tokens against a paged latent cache (DeepSeek V2/V3, Kimi K2).

    q (total_q, Hq, D): each sequence's new tokens packed, sequence b's rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] (int32 (B + 1,); max_seqlen_q the most of one sequence),
    the weights already absorbed (D = 576: 512 latent + 64 rotary). kv_cache (num_pages,
    page_size, D), or FlashMLA's (num_pages, page_size, 1, D): one latent row per position, unit
    stride along D; the values are its first head_dim_v columns (512), read from the same pages.
    block_table int32 (B, max_pages), any page size; cache_seqlens int32 (B,). Without kv_new,
    sequence b's keys are its first cache_seqlens[b] positions, its new tokens' own the last. With
    kv_new (total_q, D) (or (total_q, 1, D)): first written at positions cache_seqlens[b]... of b's
    pages, then attended to with the rest, cache_seqlens[b] + q_len keys. cache_seqlens is not
    changed. Causal: a new token sees the cache before it and itself.

    scale: the softmax's, default 1/sqrt(D). DeepSeek's is that of its 192-wide q.k head before
    absorption (times its YaRN factor), 1/sqrt(192) * mscale^2: pass it.

    Equal to `reference.mla_decode`. Returns out (total_q, Hq, head_dim_v), with return_lse also
    the log-sum-exp (Hq, total_q) fp32, natural log. num_splits: programs sharing one sequence's
    cache (None: enough for one program per SM, at most one per 256 keys). fp16, bf16, fp32 (q
    and the cache in one dtype). check: as in `paged_attention` (False: no host read, for CUDA
    graphs; the kernels clamp offsets, lengths and page ids instead). No backward.
    """
    q, kv_cache, kv_new, max_seqlen_q, head_dim_v, scale = check_mla_inputs(
        q, kv_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, kv_new, head_dim_v, scale, check)
    check_flag(return_lse, "return_lse")
    check_num_splits(num_splits)
    refuse_gradients("mla_decode", q, kv_cache, kv_new)
    q = q if q.stride(-1) == 1 else q.contiguous()
    block_table, cache_seqlens, cu_seqlens_q = (t.contiguous() for t in (block_table, cache_seqlens, cu_seqlens_q))
    seqlens = cache_seqlens
    if kv_new is not None:
        torch.ops.attention_kernels.mla_append(kv_new, kv_cache, block_table, cache_seqlens, cu_seqlens_q,
                                               max_seqlen_q)
        seqlens = cache_seqlens + (cu_seqlens_q[1:] - cu_seqlens_q[:-1])  # on the device: no host read
    o, lse = torch.ops.attention_kernels.mla(q, kv_cache, block_table, seqlens, cu_seqlens_q, max_seqlen_q,
                                             head_dim_v, scale, num_splits)
    return (o, lse) if return_lse else o


@kernel_op("mla_append", fake=lambda **_: None, mutates=("kv_cache",))
def _mla_append_op(kv_new: Tensor, kv_cache: Tensor, block_table: Tensor, cache_seqlens: Tensor,
                   cu_seqlens_q: Tensor, max_seqlen_q: int) -> None:
    """Write each sequence's new latent rows into its pages after its cache_seqlens[b] (checked,
    contiguous index tensors)."""
    B = cu_seqlens_q.shape[0] - 1
    num_pages, page_size, D = kv_cache.shape
    with on_device(kv_new):
        wrap_triton(_mla_append)[(B, triton.cdiv(max_seqlen_q, APPEND_BLOCK_T), triton.cdiv(D, APPEND_BLOCK_D))](
            KV_NEW=kv_new, KV=kv_cache, SEQLENS=cache_seqlens, CU_Q=cu_seqlens_q, PAGES=block_table,
            stride_nt=kv_new.stride(0), stride_nd=kv_new.stride(1), stride_kp=kv_cache.stride(0),
            stride_ks=kv_cache.stride(1), stride_kd=kv_cache.stride(2), stride_pb=block_table.stride(0),
            Tmax=block_table.shape[1] * page_size, num_pages=num_pages, total_q=kv_new.shape[0], HEAD_DIM=D,
            BLOCK_D=APPEND_BLOCK_D, BLOCK_T=APPEND_BLOCK_T, PAGE_SIZE=page_size,
        )


def _mla_outputs(q, head_dim_v, **unused):
    """The op's (out, lse): out (total_q, Hq, head_dim_v) in q's dtype, lse (Hq, total_q) fp32;
    also its fake implementation."""
    total_q, Hq, _ = q.shape
    return (torch.empty((total_q, Hq, head_dim_v), device=q.device, dtype=q.dtype),
            torch.empty((Hq, total_q), device=q.device, dtype=torch.float32))


@kernel_op("mla", fake=_mla_outputs)
def _mla_op(q: Tensor, kv_cache: Tensor, block_table: Tensor, seqlens: Tensor, cu_seqlens_q: Tensor,
            max_seqlen_q: int, head_dim_v: int, scale: float, num_splits: Optional[int]) -> tuple[Tensor, Tensor]:
    """The split and merge kernels over each sequence's seqlens[b] latent rows in its pages
    (checked, contiguous index tensors): (out, lse)."""
    B = cu_seqlens_q.shape[0] - 1
    total_q, Hq, D = q.shape
    num_pages, page_size, _ = kv_cache.shape
    Tmax = block_table.shape[1] * page_size
    block_m, block_h, block_q, block_n, num_warps = mla_blocks(Hq, max_seqlen_q, q.element_size())
    head_blocks = triton.cdiv(Hq, block_h)
    grid_blocks = total_q // block_q + B  # sequence b's blocks start at cu_q[b] // block_q + b (`_sequence_of`)
    if num_splits is None:
        num_splits = default_num_splits(1, 1, grid_blocks * head_blocks, Tmax, q.device)
    num_splits = min(num_splits, triton.cdiv(Tmax, block_n))  # a split holds one key tile at least
    o, lse = _mla_outputs(q, head_dim_v)
    o_part = torch.empty((total_q * Hq, num_splits, head_dim_v), device=q.device, dtype=torch.float32)
    lse_part = torch.empty((total_q * Hq, num_splits), device=q.device, dtype=torch.float32)
    dot_precision, upcast = precision(q.dtype)
    with on_device(q):
        wrap_triton(_mla_split)[(grid_blocks * head_blocks * num_splits,)](
            Q=q, KV=kv_cache, SEQLENS=seqlens, CU_Q=cu_seqlens_q, PAGES=block_table, O_PART=o_part,
            LSE_PART=lse_part, stride_qt=q.stride(0), stride_qh=q.stride(1), stride_qd=q.stride(2),
            stride_kp=kv_cache.stride(0), stride_ks=kv_cache.stride(1), stride_kd=kv_cache.stride(2),
            stride_pb=block_table.stride(0), B=B, Hq=Hq, total_q=total_q, num_pages=num_pages, Tmax=Tmax,
            head_blocks=head_blocks, qk_scale=scale * LOG2E, NUM_SPLITS=num_splits, HEAD_DIM_V=head_dim_v,
            ROPE_DIM=D - head_dim_v, BLOCK_DV=pow2(head_dim_v), BLOCK_DR=pow2(D - head_dim_v),
            BLOCK_M=block_m, BLOCK_H=block_h, BLOCK_Q=block_q, BLOCK_N=block_n, PAGE_SIZE=page_size,
            PRECISION=dot_precision, UPCAST=upcast, num_warps=num_warps, num_stages=2,
        )
        # packed: every row is "sequence 0" of total_q new tokens, o's (b, h, t, d) strides
        merge_splits(o_part, lse_part, o, lse, Variant(), Hq=Hq, Tq=total_q,
                     o_strides=(0, o.stride(1), o.stride(0), o.stride(2)))
    return o, lse
