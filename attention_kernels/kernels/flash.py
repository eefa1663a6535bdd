"""
Flash attention: keys and values in tiles, an online softmax, any sequence length.

The kernels live in `kernels/flash_fwd.py` (the forward, and the block geometry of masks and
windows) and `kernels/flash_bwd.py` (delta, dq, dk/dv); their docstrings give the algorithm.
This file launches them, registers them as torch ops with autograd, and holds the public
functions.

The mask is a window around each query's diagonal key (bottom-right alignment): query i sees key
j when i - left <= j - (Tk - Tq) <= i + right; causal is (unbounded, 0), full attention unbounded
on both sides, a sliding window anything narrower. Key blocks no row sees are skipped, so a fixed
window costs time linear in T. The Tq x Tk scores never touch GPU memory: extra memory is the
(B, H, Tq) log-sum-exp.

Packed batches (`flash_attention_varlen`): the same kernels with VARLEN set. Sequence b's rows
of q, k, v are cu_seqlens[b]:cu_seqlens[b + 1] of (total, H, D) tensors; the grid is sized for
the longest sequence, and a program whose block starts past its own sequence's end returns at
once. Each sequence is aligned and masked on its own, so none sees another.

The log-sum-exp: the kernels keep it in base 2 (log2 of the softmax's denominator, the form the
online softmax runs in), so the backward recomputes P = exp2(S * c - LSE2) from one fp32 value
rounded once; the ops `flash_forward` and `flash_varlen_forward` return that. The public
functions return the natural log, LSE2 * ln(2), which is differentiable: its gradient reaches q
and k through the backward's delta (`kernels/flash_bwd.py`).

Tiles: on a GPU the launchers take a shape class's tile from the measured table
(`kernels/tuning.py`, `kernels/tuned.json`) and otherwise autotune among its candidates; under
the interpreter one fixed small set (`INTERPRETER_BLOCKS`). On Hopper (sm_90+) the forward loads
through TMA descriptors when the layout allows it (`use_tma`). Row and element offsets are
64-bit, and the grid is one flat axis, so B * H past 65 535 and tensors past 2**31 elements work.
Precision: fp32 accumulation, IEEE fp32 dots for fp32 inputs, bf16 dots upcast under the
interpreter (`kernels/common.py`).
"""

import math
import os
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from . import tuning
from .checks import (INTERPRET, autocast_inputs, check_inputs, check_mods, check_varlen_inputs,
                     last_dim_contiguous, window_bounds)
from .dropout import check_dropout
from .common import LOG2E, gradient_outputs, kernel_op, meta, on_device, strides, \
    window_args, wrap_triton
from .flash_bwd import _flash_bwd_delta, _flash_bwd_dkdv, _flash_bwd_dq
from .flash_fwd import _flash_fwd

LN2 = math.log(2.0)

# ----------------------------------------------------------------------------- config

# Under the interpreter: one fixed small set, BLOCK_M != BLOCK_N so that the diagonal logic is
# exercised with unequal blocks. (BLOCK_M, BLOCK_N) per kernel; tests swap in others.
INTERPRETER_BLOCKS = {"fwd": (64, 32), "dq": (64, 32), "dkdv": (32, 64)}
DELTA_BLOCK_M = 64
TMA_ENV = "ATTENTION_KERNELS_TMA"  # "0": never load through TMA; "1": also under the interpreter


def _prune(kernel):
    # The autotuner holds every candidate of the kernel; it times what this returns for the
    # launch's shape class (`tuning.choose`): the measured tile, else the class's candidates.
    def prune(configs, named_args, **kwargs):
        chosen = tuning.choose(kernel, {**named_args, **kwargs})
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]
    return prune


def _tuned(kernel, fn):
    every = sorted({c for table in tuning.CANDIDATES[kernel].values() for c in table})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every]
    key = ["HEAD_DIM", "GROUP", "q_bucket", "k_bucket", "window_key", "VARLEN", "LEFT_BOUNDED", "TMA"]  # + dtypes
    return triton.autotune(configs, key=[name for name in key if name in fn.arg_names],
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


if INTERPRET:  # autotuning is far too slow there: one fixed set of blocks
    _fwd_kernel, _dq_kernel, _dkdv_kernel = _flash_fwd, _flash_bwd_dq, _flash_bwd_dkdv
else:
    _fwd_kernel, _dq_kernel, _dkdv_kernel = (_tuned("fwd", _flash_fwd), _tuned("dq", _flash_bwd_dq),
                                             _tuned("dkdv", _flash_bwd_dkdv))


def _blocks(kernel):
    """Keyword arguments that fix the blocks under the interpreter (none on a GPU: tuned)."""
    if not INTERPRET:
        return {}
    block_m, block_n = INTERPRETER_BLOCKS[kernel]
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4)


def use_tma(*tensors):
    """Whether the forward loads and stores through TMA descriptors: on Hopper or newer (or under
    the interpreter when ATTENTION_KERNELS_TMA=1, to test that path on the CPU), with Triton's
    `tl.make_tensor_descriptor`, outside torch.compile's tracing (its launcher does not allocate
    the descriptors' scratch memory), and when the copy engine can address every tensor: 16-byte
    aligned base and row strides. ATTENTION_KERNELS_TMA=0 turns it off."""
    setting = os.environ.get(TMA_ENV)
    if setting == "0" or not hasattr(triton.language, "make_tensor_descriptor"):
        return False
    t = tensors[0]
    if INTERPRET:
        if setting != "1":
            return False
    elif not (t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9) or torch.compiler.is_compiling():
        return False
    aligned = lambda x: x.data_ptr() % 16 == 0 and all(s * x.element_size() % 16 == 0 for s in x.stride()[:-1])
    return all(aligned(x) for x in tensors)


def _tma_scratch(size, alignment, stream):
    # Device-side descriptors live in global scratch memory Triton asks for at launch.
    return torch.empty(size, dtype=torch.int8, device="cuda")


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
        """Tq, Tk, left, right: what every flash kernel takes after Hq (Hkv for dk/dv)."""
        return (self.Tq, self.Tk, *window_args(left, right, self.Tq, self.Tk))

    def keys(self, left, right):
        """The autotuner's key arguments, and the query heads per k/v head (a constexpr)."""
        return dict(q_bucket=tuning.t_bucket(self.Tq), k_bucket=tuning.t_bucket(self.Tk),
                    window_key=tuning.window_key(left, right, self.Tk), GROUP=self.Hq // self.Hkv)


def _dense(q, k):
    B, Hq, Tq, D = q.shape
    return Batch(B, Hq, k.shape[1], Tq, k.shape[2])


def _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return Batch(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


def _outputs(q, residual, packed):
    """The forward's (out, base-2 lse, residual): out like q; lse (B, Hq, Tq), or (Hq, total_q)
    packed, fp32; the residual like q when asked for, else empty. Also the ops' fake outputs."""
    lse_shape = (q.shape[1], q.shape[0]) if packed else q.shape[:3]
    return (torch.empty_like(q), torch.empty(lse_shape, device=q.device, dtype=torch.float32),
            torch.empty_like(q) if residual else q.new_empty(0))


def needs_residual(q, k, v):
    """Whether the forward also stores O's rounding residual: for 16-bit outputs that a backward
    will differentiate (fp32's O is exact to its own rounding)."""
    return q.dtype != torch.float32 and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))


class Mods(NamedTuple):
    """What models add to plain attention, as the kernels take it (`checks.check_mods`): the
    soft-cap (0: none), the sinks (Hq,) and ALiBi slopes (Hq,) or (B, Hq), fp32, or None; and
    attention-weight dropout with its probability and the call's Philox seed."""
    softcap: float
    sinks: Optional[Tensor]
    slopes: Optional[Tensor]
    dropout_p: float = 0.0
    seed: int = 0

    def dropout(self):
        """The kernels' seed, p_drop, keep_scale arguments."""
        return self.seed, self.dropout_p, 1.0 / (1.0 - self.dropout_p)

    def pointers(self, placeholder):
        """SINKS, SLOPES: the tensors, or an unread placeholder."""
        return (placeholder if self.sinks is None else self.sinks), (placeholder if self.slopes is None else self.slopes)

    def scalars(self):
        """The soft-cap in base 2 and the slopes' batch stride."""
        stride_sb = 0 if self.slopes is None or self.slopes.dim() == 1 else self.slopes.stride(0)
        return self.softcap * LOG2E, stride_sb

    def flags(self, sinks=True, dropout=False):
        """The constexprs of a kernel that takes sinks (the forwards) and dropout (flash's)."""
        flags = dict(HAS_SOFTCAP=self.softcap > 0, HAS_ALIBI=self.slopes is not None)
        if dropout:
            flags["HAS_DROPOUT"] = self.dropout_p > 0
        return {**flags, "HAS_SINKS": self.sinks is not None} if sinks else flags


def _run_forward(q, k, v, batch, left, right, scale, mods, residual):
    o, lse, res = _outputs(q, residual, batch.packed)
    tma = use_tma(q, k, v, o)
    if tma and not INTERPRET:
        triton.set_allocator(_tma_scratch)
    grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
    with on_device(q):
        wrap_triton(_fwd_kernel)[grid](
            q, k, v, o, res if residual else o, lse, *batch.sequences(q), *mods.pointers(lse),
            *batch.strides(q, k, v, o), *batch.row_strides(lse), batch.Hq, *batch.sizes(left, right), scale * LOG2E,
            *mods.scalars(), *mods.dropout(), **batch.keys(left, right), TMA=tma, RESIDUAL=residual,
            **mods.flags(dropout=True),
            VARLEN=batch.packed, LEFT_BOUNDED=left >= 0, **meta(q), **_blocks("fwd"),
        )
    return o, lse, res


def dkdv(q, k, v, do, lse, delta, window, scale, batch=None, mods=Mods(0.0, None, None)):
    """dK and dV from the saved base-2 log-sum-exp and delta (fused uses it too)."""
    batch = batch or _dense(q, k)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    softcap, stride_sb = mods.scalars()
    grid = lambda meta: (batch.B * batch.Hkv * triton.cdiv(batch.Tk, meta["BLOCK_N"]),)
    wrap_triton(_dkdv_kernel)[grid](
        q, k, v, do, dk, dv, lse, delta, *batch.sequences(q), *batch.strides(q, k, v, do, dk, dv),
        *batch.row_strides(lse), batch.Hq, batch.Hkv, *batch.sizes(*window), scale, scale * LOG2E,
        softcap, mods.pointers(lse)[1], stride_sb, *mods.dropout(), **batch.keys(*window),
        **mods.flags(sinks=False, dropout=True),
        VARLEN=batch.packed, **meta(q), **_blocks("dkdv"),
    )
    return dk, dv


def sink_gradient(sinks, lse, delta):
    """d loss / d sink_h = sum over rows of P_sink (dLSE - rowsum(dO * O)) = -sum P_sink * delta,
    with P_sink = exp(sink - LSE), the weight the sink took, and delta as the backward's delta
    kernel leaves it (dLSE subtracted). lse, delta: base-2 LSE and delta, (B, Hq, Tq) or packed
    (Hq, total_q); a torch reduction: deterministic, no atomics."""
    head = lse.dim() - 2  # the head dimension: 1 for (B, Hq, Tq), 0 for (Hq, total_q)
    sink = sinks.view(*([1] * head), -1, 1) * LOG2E                        # base 2, broadcast over rows
    p_sink = torch.exp2(sink - lse)                                        # (B, Hq, Tq) or (Hq, total_q)
    return -(p_sink * delta).sum(dim=[d for d in range(lse.dim()) if d != head])  # (Hq,)


def _run_backward(q, k, v, o, res, lse, do, dlse, batch, left, right, scale, mods):
    do = last_dim_contiguous(do)
    delta = torch.empty_like(lse)
    has_res = res is not None and res.numel() > 0
    # delta is per row: a packed batch is one sequence of all its rows here
    rows = Batch(1, batch.Hq, batch.Hkv, q.shape[0], 0, batch.cu_q, batch.cu_k) if batch.packed else batch
    d = meta(q)
    softcap, stride_sb = mods.scalars()
    with on_device(q):
        wrap_triton(_flash_bwd_delta)[(rows.B * rows.Hq * triton.cdiv(rows.Tq, DELTA_BLOCK_M),)](
            o, res if has_res else o, do, delta if dlse is None else dlse.contiguous(), delta, *rows.strides(o, do),
            rows.Hq, rows.Tq, HAS_RES=has_res, HAS_DLSE=dlse is not None, BLOCK_M=DELTA_BLOCK_M, **d,
        )
        dk, dv = dkdv(q, k, v, do, lse, delta, (left, right), scale, batch, mods)
        dq = torch.empty_like(q)
        grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
        wrap_triton(_dq_kernel)[grid](
            q, k, v, do, dq, lse, delta, *batch.sequences(q), *batch.strides(q, k, v, do, dq),
            *batch.row_strides(lse), batch.Hq, *batch.sizes(left, right), scale, scale * LOG2E,
            softcap, mods.pointers(lse)[1], stride_sb, *mods.dropout(), **batch.keys(left, right),
            **mods.flags(sinks=False, dropout=True),
            VARLEN=batch.packed, LEFT_BOUNDED=left >= 0, **d, **_blocks("dq"),
        )
    dsinks = q.new_empty(0, dtype=torch.float32) if mods.sinks is None else sink_gradient(mods.sinks, lse, delta)
    return dq, dk, dv, dsinks


def _gradient_outputs(q, k, v, *args):
    """The shapes of a backward op's (dq, dk, dv, dsinks): dsinks (Hq,) fp32, or empty without
    sinks. Every backward op ends with (..., sinks, alibi_slopes, dropout_p, seed)."""
    sinks = args[-4]
    return (*gradient_outputs(q, k, v), torch.empty(0 if sinks is None else sinks.shape[0], device=q.device,
                                                    dtype=torch.float32))


@kernel_op("flash_forward", fake=lambda q, k, v, *args: _outputs(q, args[-1], False))
def _forward(q: Tensor, k: Tensor, v: Tensor, left: int, right: int, scale: float, softcap: float,
             sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float, seed: int,
             residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    mods = Mods(softcap, sinks, alibi_slopes, dropout_p, seed)
    return _run_forward(q, k, v, _dense(q, k), left, right, scale, mods, residual)


@kernel_op("flash_backward", fake=_gradient_outputs)
def _backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, res: Optional[Tensor], lse: Tensor, do: Tensor,
              dlse: Optional[Tensor], left: int, right: int, scale: float, softcap: float, sinks: Optional[Tensor],
              alibi_slopes: Optional[Tensor], dropout_p: float, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return _run_backward(q, k, v, o, res, lse, do, dlse, _dense(q, k), left, right, scale,
                         Mods(softcap, sinks, alibi_slopes, dropout_p, seed))


@kernel_op("flash_varlen_forward", fake=lambda q, *args: _outputs(q, args[-1], True))
def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, left: int, right: int, scale: float, softcap: float,
                    sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float, seed: int,
                    residual: bool) -> tuple[Tensor, Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run_forward(q, k, v, batch, left, right, scale, Mods(softcap, sinks, alibi_slopes, dropout_p, seed),
                        residual)


@kernel_op("flash_varlen_backward", fake=_gradient_outputs)
def _varlen_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, res: Optional[Tensor], lse: Tensor, do: Tensor,
                     dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, left: int, right: int, scale: float, softcap: float,
                     sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float,
                     seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    return _run_backward(q, k, v, o, res, lse, do, dlse, batch, left, right, scale,
                         Mods(softcap, sinks, alibi_slopes, dropout_p, seed))


# ----------------------------------------------------------------------------- autograd


def _save(ctx, inputs, output):
    # inputs: q, k, v, (packed: cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k), left, right,
    # scale, softcap, sinks, alibi_slopes, dropout_p, seed, residual
    q, k, v, *rest, softcap, sinks, slopes, dropout_p, seed, _ = inputs
    o, lse, res = output
    ctx.save_for_backward(q, k, v, o, res, lse, sinks, slopes, *[x for x in rest if isinstance(x, Tensor)])
    ctx.rest = [x for x in rest if not isinstance(x, Tensor)]
    ctx.softcap, ctx.dropout = softcap, (dropout_p, seed)
    ctx.mark_non_differentiable(res)


def _gradients(ctx, do, dlse, dres):
    # dlse: the log-sum-exp's gradient (zeros or None when the caller never used it)
    q, k, v, o, res, lse, sinks, slopes, *cu_seqlens = ctx.saved_tensors
    if do is None:
        do = torch.zeros_like(o)
    backward = _varlen_backward if cu_seqlens else _backward
    dq, dk, dv, dsinks = backward(q, k, v, o, res if res.numel() else None, lse, do, dlse, *cu_seqlens, *ctx.rest,
                                  ctx.softcap, sinks, slopes, *ctx.dropout)
    skipped = [None] * (len(cu_seqlens) + len(ctx.rest))
    return dq, dk, dv, *skipped, None, (dsinks if sinks is not None else None), None, None, None, None


_forward.register_autograd(_gradients, setup_context=_save)
_varlen_forward.register_autograd(_gradients, setup_context=_save)


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, scale=None, return_lse=False, window=None, softcap=None, sinks=None,
                    alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    """Causal (by default) scaled dot-product attention, tiled: any sequence length, memory
    linear in T.

    q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0; the semantics of
    `reference.attention` (bottom-right causal alignment, zeros for rows that see no key).
    `window` (left, right): query i sees only keys i - left <= j - (Tk - Tq) <= i + right, -1
    for an unbounded side (FlashAttention's window_size); causal means right = 0. Key blocks
    outside the window are skipped, so a fixed window costs time linear in T.
    With `return_lse`, also returns each row's log-sum-exp (natural log, fp32, (B, Hq, Tq)).
    What models add (`reference.attention`): `softcap` (Gemma 2: scores become
    softcap * tanh(s / softcap)), `sinks` (Hq,) (GPT-OSS: a logit per head in every row's
    denominator; differentiable) and `alibi_slopes` (Hq,) or (B, Hq) (ALiBi: -slope * |distance
    from the diagonal key|); the log-sum-exp includes the sink.
    `dropout_p`: each attention weight is dropped with this probability after the softmax and the
    kept ones scaled by 1 / (1 - p), forward and backward (the backward regenerates the same
    decisions); the seed is drawn from torch's generator, or `dropout_seed`, and
    `kernels.dropout_mask` gives the weights a seed keeps. The log-sum-exp is the undropped one.
    """
    q, k, v, scale = check_inputs(*autocast_inputs(q, k, v), scale)
    left, right = window_bounds(window, causal)
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=q.shape[0])
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    o, lse2, _ = _forward(q, k, v, left, right, scale, softcap, sinks, slopes, dropout_p, seed,
                          needs_residual(q, k, v))
    return (o, lse2 * LN2) if return_lse else o


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           scale=None, return_lse=False, window=None, check_seqlens=True, softcap=None, sinks=None,
                           alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
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
    softcap, sinks, alibi_slopes, dropout_p, dropout_seed as in `flash_attention`; (B, Hq) slopes
    are per sequence.
    """
    q, k, v = autocast_inputs(q, k, v)
    q, k, v, cu_seqlens_q, cu_seqlens_k, scale = check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                                     max_seqlen_q, max_seqlen_k, scale,
                                                                     check_seqlens)
    left, right = window_bounds(window, causal)
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=cu_seqlens_q.shape[0] - 1)
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    o, lse2, _ = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q), int(max_seqlen_k),
                                 left, right, scale, softcap, sinks, slopes, dropout_p, seed,
                                 needs_residual(q, k, v))
    return (o, lse2 * LN2) if return_lse else o
