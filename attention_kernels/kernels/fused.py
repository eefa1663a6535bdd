"""
Fused attention: the reference's four steps in one Triton kernel, whole rows on chip.

For a block of BLOCK_M query rows, one program
    1. loads the whole K of its head, [ROW, D] with ROW = Tk rounded up to a power of two,
    2. computes every score of those rows at once, S = Q K^T * scale, [BLOCK_M, ROW] fp32,
    3. masks what a row may not see (causal, and the padding past Tk) with -inf,
    4. takes an exact softmax over the whole row (max, exp, sum: no online rescaling),
    5. multiplies by V and writes O and each row's log-sum-exp.
The Tq x Tk score matrix never touches GPU memory. The price is the row length: K, V and the
score tile must fit on chip, so Tk is limited (see `max_seqlen`); beyond it use
`flash_attention`, which tiles the keys.

Backward (dq, dk, dv):
    dq          whole rows again: P = softmax of the row, recomputed   one program per query block
                exactly; dP = dO V^T; delta_i = sum_j P_ij dP_ij
                (= sum_d dO_id O_id), stored; dS = P * (dP - delta);
                dQ = dS K * scale
    dk, dv      the flash kernel's (`kernels.flash.dkdv`), with P = exp(S - L) from the forward's
                log-sum-exp L: one key block, looping over query blocks and over the query heads
                that share this k/v head: dV += P^T dO, dK += dS^T Q * scale
                                                                 one program per key block
No atomics: gradients are bitwise identical run to run, and a shared k/v head's gradient is
summed over its query heads inside the kernel, never by expanding K and V in memory.

Precision: fp16 / bf16 / fp32 inputs, fp32 accumulation and softmax. fp32 inputs use IEEE fp32
dots (not tf32), so they give fp32-accurate results. Under Triton's interpreter, bf16 dot
operands are upcast to fp32, because the interpreter multiplies bf16 bit patterns as integers
(triton-lang/triton#11584); on a GPU they stay bf16.
"""

from typing import Optional

import torch
import triton
from torch import Tensor
import triton.language as tl

from .checks import (INTERPRET, autocast_inputs, check_attn_mask, check_causal, check_flag, check_inputs, check_mods,
                     last_dim_contiguous)
from .common import (LOG2E, Variant, attn_mask_scores, dot, dropout_keep, forward_outputs, gradient_outputs,
                     head_and_query_block, kernel_op, mask_scores, meta, on_device, pow2, register_autograd, score_mods,
                     strides, wrap_triton)
from .dropout import check_dropout
from .flash import LN2, dkdv, sink_gradient

# ----------------------------------------------------------------------------- forward


@triton.jit
def _row_softmax(s, offs_m, offs_n, Tq, Tk, h, b, SINKS, SLOPES, softcap, stride_sb, mask_base, stride_maskm,
                 stride_maskn, CAUSAL: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
                 RETURN_TANH: tl.constexpr = False):
    # Whole rows of base-2 logits s, [BLOCK_M, ROW]: modified (`score_mods`), the user's attn_mask
    # applied (`attn_mask_scores`, after the mods, as in the reference), masked, and turned
    # into unnormalised weights p = exp2(s - m) with their sum l, the head's sink in l (GPT-OSS);
    # returns (the row max m, or with RETURN_TANH the soft-cap's tanh for the chain rule), p, l.
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(SLOPES + b * stride_sb + h) * 1.4426950408889634
    s, t = score_mods(s, offs_m + (Tk - Tq), offs_n, softcap, slope, HAS_SOFTCAP, HAS_ALIBI)
    if HAS_ATTN_MASK:  # may hide a whole row: m = -inf is caught below as for causal's empty rows
        s = attn_mask_scores(s, mask_base, offs_m, offs_n, Tq, Tk, stride_maskm, stride_maskn, BOOL_MASK)
    s = mask_scores(s, offs_m, offs_n, Tq, Tk, Tq + Tk, 0 if CAUSAL else Tq + Tk)
    m = tl.max(s, 1)
    if HAS_SINKS:
        sink = tl.load(SINKS + h) * 1.4426950408889634                          # base 2
        m = tl.maximum(m, sink)
    m = tl.where(m == float("-inf"), 0.0, m)  # a row that sees no key (and no sink): exp2 gives 0, not nan
    p = tl.math.exp2(s - m[:, None])                                            # [BLOCK_M, ROW] fp32
    l = tl.sum(p, 1)
    if HAS_SINKS:
        l += tl.math.exp2(sink - m)
    if RETURN_TANH:
        return t, p, l
    else:
        return m, p, l


@triton.jit
def _fused_fwd(
    Q, K, V, O, LSE, SINKS, SLOPES,
    ATTN_MASK,  # the user's mask as (B, Hq, Tq, Tk), stride 0 where broadcast (`common.Variant.mask_args`)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_ob, stride_oh, stride_ot, stride_od,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    Hq, Tq, Tk, GROUP, num_m_blocks,
    qk_scale,  # scale * log2(e): the softmax runs in base 2
    softcap, stride_sb,  # what models add, as in `kernels/flash_fwd.py`
    seed, p_drop, keep_scale,  # dropout, as in `kernels/flash_fwd.py`
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROW: tl.constexpr, CAUSAL: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(num_m_blocks, Hq, GROUP)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)  # query rows of this program
    offs_n = tl.arange(0, ROW)                          # every key
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    rows = offs_m.to(tl.int64)  # Tq * stride_qt may pass 2**31 (Tk may not: it is limited)

    q_ptrs = Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)       # [BLOCK_M, BLOCK_D]
    kt_ptrs = K + b * stride_kb + h_kv * stride_kh + offs_n[None, :] * stride_kt + offs_d[:, None] * stride_kd
    kt = tl.load(kt_ptrs, mask=(offs_n < Tk)[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, ROW] K^T

    # -- scores of whole rows, base-2 logits, modified and masked
    s = dot(q, kt, PRECISION, UPCAST) * qk_scale                               # [BLOCK_M, ROW] fp32
    m, p, l = _row_softmax(s, offs_m, offs_n, Tq, Tk, h, b, SINKS, SLOPES, softcap, stride_sb,
                           ATTN_MASK + b * stride_maskb + h * stride_maskh, stride_maskm, stride_maskn,
                           CAUSAL, HAS_SOFTCAP, HAS_SINKS, HAS_ALIBI, HAS_ATTN_MASK,
                           BOOL_MASK)                                           # row max, weights, their sum

    # -- weights @ V, divided by the row sum once at the end
    v_ptrs = V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd
    v = tl.load(v_ptrs, mask=(offs_n < Tk)[:, None] & d_ok[None, :], other=0.0)  # [ROW, BLOCK_D]
    if HAS_DROPOUT:  # after the softmax: l keeps every weight, as in flash
        p = tl.where(dropout_keep(seed, b * Hq + h, offs_m[:, None], offs_n[None, :], p_drop), p * keep_scale, 0.0)
    acc = dot(p.to(v.dtype), v, PRECISION, UPCAST)                              # [BLOCK_M, BLOCK_D] fp32
    l_safe = tl.where(l == 0.0, 1.0, l)                                         # empty row: 0 / 1 = 0
    o = acc / l_safe[:, None]

    o_ptrs = O + b * stride_ob + h * stride_oh + rows[:, None] * stride_ot + offs_d[None, :] * stride_od
    tl.store(o_ptrs, o.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse = tl.where(l == 0.0, float("-inf"), m + tl.math.log2(l_safe))  # base 2 (`kernels/flash.py`), sink included
    tl.store(LSE + (b * Hq + h) * Tq + offs_m, lse, mask=row_ok)


# ----------------------------------------------------------------------------- backward


@triton.jit
def _fused_bwd_dq(
    Q, K, V, DO, DQ, DLSE, DELTA, SINKS, SLOPES,
    ATTN_MASK,  # as in the forward
    DMASK,      # the mask's gradient dS, (B, Hq, Tq, Tk) fp32 contiguous, every element written (MASK_GRAD)
    stride_qb, stride_qh, stride_qt, stride_qd,
    stride_kb, stride_kh, stride_kt, stride_kd,
    stride_vb, stride_vh, stride_vt, stride_vd,
    stride_dob, stride_doh, stride_dot, stride_dod,
    stride_dqb, stride_dqh, stride_dqt, stride_dqd,
    stride_maskb, stride_maskh, stride_maskm, stride_maskn,
    Hq, Tq, Tk, GROUP, num_m_blocks,
    scale, qk_scale, softcap, stride_sb, seed, p_drop, keep_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, ROW: tl.constexpr, CAUSAL: tl.constexpr, HAS_DLSE: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, HAS_SINKS: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
    HAS_ATTN_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, MASK_GRAD: tl.constexpr,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
):
    b, h, h_kv, m_block = head_and_query_block(num_m_blocks, Hq, GROUP)
    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, ROW)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < Tq
    d_ok = offs_d < HEAD_DIM
    qd_mask = row_ok[:, None] & d_ok[None, :]
    kd_mask = (offs_n < Tk)[:, None] & d_ok[None, :]
    rows = offs_m.to(tl.int64)

    q = tl.load(Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qt + offs_d[None, :] * stride_qd,
                mask=qd_mask, other=0.0)                                        # [BLOCK_M, BLOCK_D]
    do = tl.load(DO + b * stride_dob + h * stride_doh + rows[:, None] * stride_dot + offs_d[None, :] * stride_dod,
                 mask=qd_mask, other=0.0)                                       # [BLOCK_M, BLOCK_D]
    k = tl.load(K + b * stride_kb + h_kv * stride_kh + offs_n[:, None] * stride_kt + offs_d[None, :] * stride_kd,
                mask=kd_mask, other=0.0)                                        # [ROW, BLOCK_D]
    v = tl.load(V + b * stride_vb + h_kv * stride_vh + offs_n[:, None] * stride_vt + offs_d[None, :] * stride_vd,
                mask=kd_mask, other=0.0)                                        # [ROW, BLOCK_D]
    # -- recompute P as an exact softmax of the whole row, not from the saved log-sum-exp: then
    #    each row of P sums to 1 to rounding, as the reference's does. dS = P * (dP - delta) is
    #    a small difference of large terms where one key dominates a row, so P from the LSE,
    #    off by a row-wide factor of about |S| x 1e-7, would show in dS when scores are large.
    s = dot(q, tl.trans(k), PRECISION, UPCAST) * qk_scale                    # [BLOCK_M, ROW] fp32
    t, p, l = _row_softmax(s, offs_m, offs_n, Tq, Tk, h, b, SINKS, SLOPES, softcap, stride_sb,
                           ATTN_MASK + b * stride_maskb + h * stride_maskh, stride_maskm, stride_maskn,
                           CAUSAL, HAS_SOFTCAP, HAS_SINKS, HAS_ALIBI, HAS_ATTN_MASK, BOOL_MASK, True)
    p = p / tl.where(l == 0.0, 1.0, l)[:, None]                               # [BLOCK_M, ROW] fp32

    # -- delta = rowsum(P * dP), which equals rowsum(dO * O) but uses this fp32 P rather than the
    #    O rounded to the input dtype, for the same reason. The dk/dv kernel, launched next,
    #    reads it.
    dp = dot(do, tl.trans(v), PRECISION, UPCAST)                             # [BLOCK_M, ROW] fp32
    if HAS_DROPOUT:  # only the kept weights reached O, scaled: so does the gradient
        dp = tl.where(dropout_keep(seed, b * Hq + h, offs_m[:, None], offs_n[None, :], p_drop), dp * keep_scale, 0.0)
    delta = tl.sum(p * dp, 1)
    if HAS_DLSE:  # a used log-sum-exp: d lse_i / d S_ij = P_ij, a shift of delta (base-2 lse, natural units)
        delta -= tl.load(DLSE + (b * Hq + h) * Tq + offs_m, mask=row_ok, other=0.0) * 1.4426950408889634
    tl.store(DELTA + (b * Hq + h) * Tq + offs_m, delta, mask=row_ok)
    # -- dS = P * (dP - delta), through the soft-cap (1 - tanh^2); dQ = dS K * scale
    ds = p * (dp - delta[:, None])
    if MASK_GRAD:  # d loss / d mask = dS (natural units, not through the cap): whole rows, one writer each
        tl.store(DMASK + (b * Hq + h) * Tq * Tk + rows[:, None] * Tk + offs_n[None, :], ds,
                 mask=row_ok[:, None] & (offs_n < Tk)[None, :])
    if HAS_SOFTCAP:
        ds = ds * (1.0 - t * t)
    dq = dot(ds.to(k.dtype), k, PRECISION, UPCAST) * scale                    # [BLOCK_M, BLOCK_D] fp32
    tl.store(DQ + b * stride_dqb + h * stride_dqh + rows[:, None] * stride_dqt + offs_d[None, :] * stride_dqd,
             dq.to(DQ.dtype.element_ty), mask=qd_mask)


# ----------------------------------------------------------------------------- config


def max_seqlen(head_dim, dtype):
    """The longest key row (Tk) the fused kernels keep on chip for this head dim and dtype.

    The K and V tiles of a whole row, [ROW, D], live in shared memory, which an H100 gives a block
    227 KiB of: 16-bit tiles of up to 64K elements fit, fp32 tiles (IEEE dots stage more) of up
    to 16K elements, and ROW stays <= 1024. Measured at compile time for sm_90 by
    `python -m attention_kernels.benchmarks.onchip`; rows past about 256 keys also spill registers (slower, not
    wrong). fp16 / bf16: D <= 64 -> 1024, D <= 128 -> 512, D <= 256 -> 256; fp32: D <= 16 ->
    1024, D <= 32 -> 512, D <= 64 -> 256, D <= 128 -> 128, D <= 256 -> 64.
    """
    budget = 64 * 1024 if dtype.itemsize == 2 else 16 * 1024
    return min(1024, budget // pow2(head_dim))


def check_row(k, dtype):
    D, Tk = k.shape[-1], k.shape[-2]
    limit = max_seqlen(D, dtype)
    if Tk > limit:
        raise ValueError(
            f"fused_attention keeps whole rows on chip: with head dim {D} and {str(dtype)[6:]} it "
            f"takes at most {limit} keys, got Tk={Tk}. Use flash_attention, which tiles the keys "
            "and runs at any length."
        )


def row_config(Tq, row, head_dim, dtype):
    """(BLOCK_M, num_warps) of the whole-row kernels, forward and dq, for ROW keys."""
    if INTERPRET:  # few large programs: the interpreter's cost is per program and per op
        return min(64, pow2(Tq)), 4
    if row <= 128 and dtype.itemsize == 2:  # short rows: more query rows share each K and V load
        block_m, warps = (128, 8) if pow2(head_dim) <= 32 else (64, 4)
    else:  # long rows, and fp32 (IEEE dots hold more in registers): the [16, ROW] score tile
        block_m, warps = 16, 4
    return min(block_m, pow2(Tq)), warps


# ----------------------------------------------------------------------------- launchers


def _run_forward(q, k, v, scale, variant):
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    row = pow2(int(Tk))  # a constexpr: under torch.compile's dynamic shapes this specialises Tk
    block_m, num_warps = row_config(Tq, row, D, q.dtype)
    num_m_blocks = triton.cdiv(Tq, block_m)
    o, lse = forward_outputs(q)
    with on_device(q):
        wrap_triton(_fused_fwd)[(B * Hq * num_m_blocks,)](
            Q=q, K=k, V=v, O=o, LSE=lse, **strides(q=q, k=k, v=v, o=o), Hq=Hq, Tq=Tq, Tk=Tk, GROUP=Hq // Hkv,
            num_m_blocks=num_m_blocks, qk_scale=scale * LOG2E, **variant.score_args(lse), **variant.sink_args(lse),
            **variant.dropout_args(), **variant.mask_args(lse, B, Hq, Tq, Tk), BLOCK_M=block_m, ROW=row,
            CAUSAL=variant.causal, num_warps=num_warps, **meta(q),
        )
    return o, lse


def _run_backward(q, k, v, lse, do, dlse, scale, variant, mask_grad=False):
    """(dq, dk, dv, dsinks), and with mask_grad the float attn_mask's gradient fifth: dS, summed
    over the dimensions the mask was broadcast along, in the mask's dtype."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    do = last_dim_contiguous(do)
    row = pow2(int(Tk))  # a constexpr: under torch.compile's dynamic shapes this specialises Tk
    block_m, num_warps = row_config(Tq, row, D, q.dtype)
    num_m_blocks = triton.cdiv(Tq, block_m)
    dq, delta = torch.empty_like(q), torch.empty_like(lse)
    mask, dmask = variant.attn_mask, None
    if mask_grad:  # no zeros needed: the dq kernel writes every element, whole rows
        dmask = torch.empty(B, Hq, Tq, Tk, device=q.device, dtype=torch.float32)
    with on_device(q):
        wrap_triton(_fused_bwd_dq)[(B * Hq * num_m_blocks,)](
            Q=q, K=k, V=v, DO=do, DQ=dq, DLSE=delta if dlse is None else dlse.contiguous(), DELTA=delta,
            **strides(q=q, k=k, v=v, do=do, dq=dq), Hq=Hq, Tq=Tq, Tk=Tk, GROUP=Hq // Hkv, num_m_blocks=num_m_blocks,
            scale=scale, qk_scale=scale * LOG2E, **variant.score_args(lse), **variant.sink_args(lse),
            **variant.dropout_args(), **variant.mask_args(lse, B, Hq, Tq, Tk), DMASK=lse if dmask is None else dmask,
            MASK_GRAD=dmask is not None, BLOCK_M=block_m, ROW=row, CAUSAL=variant.causal, HAS_DLSE=dlse is not None,
            num_warps=num_warps, **meta(q),
        )
        # the flash kernel's dk/dv: tiles, no row limit
        dk, dv = dkdv(q, k, v, do, lse, delta, scale, variant)
    sinks = variant.sinks
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sink_gradient(sinks, lse, delta)
    if not mask_grad:
        return dq, dk, dv, dsinks
    return dq, dk, dv, dsinks, dmask.sum_to_size(mask.shape).to(mask.dtype)  # the mask's shape: (Tq, Tk), ...


# The ops take the variant's fields by `Variant`'s names, with `causal` for its window: (-1, 0)
# causal, (-1, -1) full; the attn_mask last and optional, and the backward's mask_grad, as the
# dense flash ops take them (`kernels/flash.py`): the backward returns a list, the mask's
# gradient fifth only when asked.


def _variant(causal, softcap, sinks, alibi_slopes, dropout_p, seed, attn_mask=None):
    return Variant(left=-1, right=0 if causal else -1, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                   dropout_p=dropout_p, seed=seed, attn_mask=attn_mask)


@kernel_op("fused_forward", fake=forward_outputs)
def _forward(q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float, softcap: float, sinks: Optional[Tensor],
             alibi_slopes: Optional[Tensor], dropout_p: float, seed: int,
             attn_mask: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    variant = _variant(causal=causal, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                       seed=seed, attn_mask=attn_mask)
    return _run_forward(q, k, v, scale, variant)


@kernel_op("fused_backward", fake=lambda **kwargs: list(gradient_outputs(**kwargs)))
def _backward(q: Tensor, k: Tensor, v: Tensor, lse: Tensor, do: Tensor, dlse: Optional[Tensor], causal: bool,
              scale: float, softcap: float, sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float,
              seed: int, attn_mask: Optional[Tensor] = None, mask_grad: bool = False) -> list[Tensor]:
    variant = _variant(causal=causal, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes, dropout_p=dropout_p,
                       seed=seed, attn_mask=attn_mask)
    return list(_run_backward(q, k, v, lse, do, dlse, scale, variant, mask_grad))


# the backward reads the lse, not o: it gets delta from P and dP
register_autograd(_forward, _backward, outputs=("o", "lse"))


# ----------------------------------------------------------------------------- public


def fused_attention(q, k, v, causal=True, scale=None, return_lse=False, softcap=None, sinks=None, alibi_slopes=None,
                    dropout_p=0.0, dropout_seed=None, attn_mask=None):
    """Causal (by default) scaled dot-product attention in one kernel, whole rows on chip.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0; the semantics of
    `reference.attention` (bottom-right causal alignment, zeros for rows that see no key).
    Tk is limited to `max_seqlen(D, dtype)`; beyond it use `flash_attention`.
    With `return_lse`, also returns each row's log-sum-exp (natural log, fp32, (B, Hq, Tq)).
    softcap, sinks, alibi_slopes, dropout_p and dropout_seed as in `flash_attention` (the same
    seed drops the same weights in both kernels). `attn_mask` as in `flash_attention` (bool True
    attends, or a float added to the scores; its gradient when it requires grad; docs/masks.md).
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    q, k, v, scale = check_inputs(q, k, v, scale)
    check_row(k, q.dtype)
    check_flag(return_lse, "return_lse")
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=q.shape[0])
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    attn_mask = check_attn_mask(attn_mask, q, k)
    variant = Variant(left=-1, right=0 if check_causal(causal) else -1, softcap=softcap, sinks=sinks,
                      alibi_slopes=slopes, dropout_p=dropout_p, seed=seed, attn_mask=attn_mask)
    o, lse2 = _forward(q, k, v, causal=variant.causal, scale=scale, **variant.mod_args(), attn_mask=attn_mask)
    return (o, lse2 * LN2) if return_lse else o
