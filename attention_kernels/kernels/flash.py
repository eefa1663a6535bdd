"""
Flash attention: keys and values in tiles, an online softmax, any sequence length.

The kernels live in `kernels/flash_fwd.py` (the forward, and the block geometry of masks and
windows) and `kernels/flash_bwd.py` (delta, dq, dk/dv); their docstrings give the algorithm.
This file launches them (one launcher a kernel, every argument by name: the layout's from
`Batch`, the window's and what models add from `common.Variant`), registers them as torch ops
with autograd, and holds the public functions.

The mask is a window around each query's diagonal key (bottom-right alignment): query i sees key
j when i - left <= j - (Tk - Tq) <= i + right; causal is (unbounded, 0), full attention unbounded
on both sides, a sliding window anything narrower. Key blocks no row sees are skipped, so a fixed
window costs time linear in T. The Tq x Tk scores never touch GPU memory: extra memory is the
(B, H, Tq) log-sum-exp. A user's `attn_mask` (dense batches only; docs/masks.md) is read within
those blocks, and a float mask that wants a gradient gets one through a (B, Hq, Tq, Tk) fp32
buffer that the dq kernel fills.

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

import functools
import inspect
import math
import os
from typing import NamedTuple, Optional

import torch
import triton
from torch import Tensor

from . import tuning
from .checks import (INTERPRET, autocast_inputs, check_attn_mask, check_flag, check_inputs, check_mods,
                     check_varlen_inputs, last_dim_contiguous, window_bounds)
from .dropout import check_dropout
from .common import (LOG2E, Variant, gradient_outputs, kernel_op, meta, on_device, register_autograd, stride_args,
                     value_meta, window_args, wrap_triton)
from .flash_bwd import _flash_bwd_delta, _flash_bwd_dkdv, _flash_bwd_dq
from .flash_fwd import _flash_fwd
from . import blockmap, mods
from .mods import functions

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
    # With a block map, only tiles that fit in the map's blocks (`kernels/blockmap.py`).
    def prune(configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        chosen = tuning.choose(kernel, args)
        if args.get("HAS_BLOCK_MAP"):
            fits = lambda c: c[0] <= args["MAP_M"] and c[1] <= args["MAP_N"]
            wide = max(args["BLOCK_D"], args.get("BLOCK_DV", 0))  # as `tuning.choose` sizes the class
            chosen = [c for c in chosen if fits(c)] or [c for c in tuning.candidates(
                kernel, args["Q"].element_size(), wide, args["q_bucket"], args["k_bucket"]) if fits(c)]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in chosen]
    return prune


def _tuned(kernel, fn):
    every = sorted({c for table in tuning.CANDIDATES[kernel].values() for c in table})
    configs = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in every]
    key = ["HEAD_DIM", "HEAD_DIM_V", "GROUP", "q_bucket", "k_bucket", "window_key", "VARLEN", "LEFT_BOUNDED", "TMA",
           "HAS_ATTN_MASK", "HAS_MASK_MOD", "HAS_SCORE_MOD", "HAS_BLOCK_MAP", "MAP_M", "MAP_N"]  # + dtypes
    return triton.autotune(configs, key=[name for name in key if name in fn.arg_names],
                           prune_configs_by={"early_config_prune": _prune(kernel)})(fn)


if INTERPRET:  # autotuning is far too slow there: one fixed set of blocks
    _fwd_kernel, _dq_kernel, _dkdv_kernel = _flash_fwd, _flash_bwd_dq, _flash_bwd_dkdv
else:
    _fwd_kernel, _dq_kernel, _dkdv_kernel = (_tuned("fwd", _flash_fwd), _tuned("dq", _flash_bwd_dq),
                                             _tuned("dkdv", _flash_bwd_dkdv))


def _blocks(kernel, variant=None):
    """Keyword arguments that fix the blocks under the interpreter (none on a GPU: tuned), no
    larger than a block map's blocks."""
    if not INTERPRET:
        return {}
    block_m, block_n = INTERPRETER_BLOCKS[kernel]
    if variant is not None and variant.block_map is not None:
        block_m, block_n = min(block_m, variant.block_map[4]), min(block_n, variant.block_map[5])
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
    cu_seqlens[b]:cu_seqlens[b + 1], Tq and Tk then the longest (they size the grid). Its methods
    give the flash kernels' arguments by name."""
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

    def strides(self, **tensors):
        """stride_<name>b, h, t of each tensor named; packed tensors have no batch stride, each
        program offsets to its sequence's first row. The head dim has unit stride (the checks
        make it so: `checks.last_dim_contiguous`), so the kernels take none for it."""
        if not self.packed:
            return stride_args("bht", **{name: t.stride()[:3] for name, t in tensors.items()})
        return stride_args("bht", **{name: (0, t.stride(1), t.stride(0)) for name, t in tensors.items()})

    def row_strides(self, lse):
        """(batch, head) strides of the fp32 per-row tensors, LSE and delta: (B, Hq, Tq), or
        (Hq, total_q) packed, where a program adds its sequence's first row."""
        if self.packed:
            return dict(stride_lb=0, stride_lh=lse.stride(0))
        return dict(stride_lb=lse.stride(0), stride_lh=lse.stride(1))

    def sequences(self, q):
        """CU_Q, CU_K: the offsets, or q as an unread placeholder when not packed."""
        return dict(CU_Q=self.cu_q, CU_K=self.cu_k) if self.packed else dict(CU_Q=q, CU_K=q)

    def sizes(self, variant):
        """Tq, Tk and the window (`common.window_args`), as every flash kernel takes them."""
        return dict(Tq=self.Tq, Tk=self.Tk, **window_args(variant.left, variant.right, self.Tq, self.Tk))

    def mask_args(self, variant, placeholder, kernel="fwd"):
        """The user's attn_mask broadcast to this batch's scores (`common.Variant.mask_args`), its
        mask and score functions, and its block map as `kernel` reads it."""
        return dict(**variant.mask_args(placeholder, self.B, self.Hq, self.Tq, self.Tk),
                    **variant.function_args(backward=kernel != "fwd"),
                    **variant.map_args(kernel, placeholder, self.B, self.Hq, self.Tq, self.Tk))

    def keys(self, variant):
        """The autotuner's key arguments, and the query heads per k/v head (a constexpr)."""
        return dict(q_bucket=tuning.t_bucket(self.Tq), k_bucket=tuning.t_bucket(self.Tk),
                    window_key=tuning.window_key(variant.left, variant.right, self.Tk), GROUP=self.Hq // self.Hkv)


def _dense(q, k):
    B, Hq, Tq, D = q.shape
    return Batch(B, Hq, k.shape[1], Tq, k.shape[2])


def _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    return Batch(cu_seqlens_q.shape[0] - 1, q.shape[1], k.shape[1], max_seqlen_q, max_seqlen_k, cu_seqlens_q, cu_seqlens_k)


def _outputs(q, v, residual, packed):
    """The forward's (out, base-2 lse, residual): out like q with v's head dim; lse (B, Hq, Tq),
    or (Hq, total_q) packed, fp32; the residual like out when asked for, else empty. Also the
    ops' fake outputs."""
    lse_shape = (q.shape[1], q.shape[0]) if packed else q.shape[:3]
    o = q.new_empty(*q.shape[:-1], v.shape[-1])
    return (o, torch.empty(lse_shape, device=q.device, dtype=torch.float32),
            torch.empty_like(o) if residual else q.new_empty(0))


def needs_residual(q, k, v, attn_mask=None):
    """Whether the forward also stores O's rounding residual: for 16-bit outputs that a backward
    will differentiate (fp32's O is exact to its own rounding), a float mask's gradient too."""
    return q.dtype != torch.float32 and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (q, k, v, attn_mask))


def _run_forward(q, k, v, batch, scale, variant, residual):
    o, lse, res = _outputs(q, v, residual, batch.packed)
    tma = use_tma(q, k, v, o)
    if tma and not INTERPRET:
        triton.set_allocator(_tma_scratch)
    grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
    with on_device(q):
        wrap_triton(_fwd_kernel)[grid](
            Q=q, K=k, V=v, O=o, RES=res if residual else o, LSE=lse, **batch.sequences(q),
            **batch.strides(q=q, k=k, v=v, o=o), **batch.row_strides(lse), Hq=batch.Hq, **batch.sizes(variant),
            qk_scale=scale * LOG2E, **variant.score_args(lse), **variant.sink_args(lse), **variant.dropout_args(),
            **variant.dropout_position_args(),
            **batch.mask_args(variant, lse), **batch.keys(variant), TMA=tma, RESIDUAL=residual, VARLEN=batch.packed,
            LEFT_BOUNDED=variant.left >= 0, **meta(q), **value_meta(v), **_blocks("fwd", variant),
        )
    return o, lse, res


def _delta(q, o, res, do, lse, dlse, batch):
    """delta = rowsum(dO * O) - dLSE per query row, like lse (`kernels/flash_bwd.py`)."""
    delta = torch.empty_like(lse)
    # delta is per row: a packed batch is one sequence of all its rows here
    rows = Batch(1, batch.Hq, batch.Hkv, q.shape[0], 0, batch.cu_q, batch.cu_k) if batch.packed else batch
    wrap_triton(_flash_bwd_delta)[(rows.B * rows.Hq * triton.cdiv(rows.Tq, DELTA_BLOCK_M),)](
        O=o, RES=o if res is None else res, DO=do, DLSE=delta if dlse is None else dlse.contiguous(), DELTA=delta,
        **rows.strides(o=o, do=do), Hq=rows.Hq, Tq=rows.Tq, HAS_RES=res is not None, HAS_DLSE=dlse is not None,
        BLOCK_M=DELTA_BLOCK_M, **meta(o),  # O and dO: v's head dim
    )
    return delta


def dkdv(q, k, v, do, lse, delta, scale, variant, batch=None):
    """dK and dV from the saved base-2 log-sum-exp and delta (fused uses it too)."""
    batch = batch or _dense(q, k)
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    grid = lambda meta: (batch.B * batch.Hkv * triton.cdiv(batch.Tk, meta["BLOCK_N"]),)
    wrap_triton(_dkdv_kernel)[grid](
        Q=q, K=k, V=v, DO=do, DK=dk, DV=dv, LSE=lse, DELTA=delta, **batch.sequences(q),
        **batch.strides(q=q, k=k, v=v, do=do, dk=dk, dv=dv), **batch.row_strides(lse), Hq=batch.Hq, Hkv=batch.Hkv,
        **batch.sizes(variant), scale=scale, qk_scale=scale * LOG2E, **variant.score_args(lse),
        **variant.dropout_args(), **variant.dropout_position_args(), **batch.mask_args(variant, lse, "dkdv"),
        **batch.keys(variant), VARLEN=batch.packed,
        **meta(q), **value_meta(v), **_blocks("dkdv", variant),
    )
    return dk, dv


def _dq(q, k, v, do, lse, delta, scale, variant, batch, dmask=None):
    """dQ; and with dmask, a (B, Hq, Tq, Tk) fp32 buffer of zeros, the mask's gradient dS written
    into it wherever a block is visited."""
    dq = torch.empty_like(q)
    grid = lambda meta: (batch.B * batch.Hq * triton.cdiv(batch.Tq, meta["BLOCK_M"]),)
    wrap_triton(_dq_kernel)[grid](
        Q=q, K=k, V=v, DO=do, DQ=dq, LSE=lse, DELTA=delta, **batch.sequences(q),
        DMASK=lse if dmask is None else dmask, MASK_GRAD=dmask is not None,
        **batch.strides(q=q, k=k, v=v, do=do, dq=dq), **batch.row_strides(lse), Hq=batch.Hq, **batch.sizes(variant),
        scale=scale, qk_scale=scale * LOG2E, **variant.score_args(lse), **variant.dropout_args(),
        **variant.dropout_position_args(), **batch.mask_args(variant, lse, "dq"), **batch.keys(variant), VARLEN=batch.packed,
        LEFT_BOUNDED=variant.left >= 0, **meta(q), **value_meta(v), **_blocks("dq", variant),
    )
    return dq


def sink_gradient(sinks, lse, delta):
    """d loss / d sink_h = sum over rows of P_sink (dLSE - rowsum(dO * O)) = -sum P_sink * delta,
    with P_sink = exp(sink - LSE), the weight the sink took, and delta as the backward's delta
    kernel leaves it (dLSE subtracted). lse, delta: base-2 LSE and delta, (B, Hq, Tq) or packed
    (Hq, total_q); a torch reduction: deterministic, no atomics."""
    head = lse.dim() - 2  # the head dimension: 1 for (B, Hq, Tq), 0 for (Hq, total_q)
    sink = sinks.view(*([1] * head), -1, 1) * LOG2E                        # base 2, broadcast over rows
    p_sink = torch.exp2(sink - lse)                                        # (B, Hq, Tq) or (Hq, total_q)
    return -(p_sink * delta).sum(dim=[d for d in range(lse.dim()) if d != head])  # (Hq,)


def _run_backward(q, k, v, o, res, lse, do, dlse, batch, scale, variant, mask_grad=False):
    """(dq, dk, dv, dsinks), and with mask_grad the float attn_mask's gradient fifth: dS, summed
    over the dimensions the mask was broadcast along, in the mask's dtype."""
    do = last_dim_contiguous(do)
    if variant.mods and functions(variant.mods)[1] is not None and functions(variant.mods)[2] is None:
        raise RuntimeError("score_mod has no derivative: a backward through it needs one, "
                           "ScoreMod(fn, grad=<a @triton.jit function of the same arguments giving d fn / d score>)")
    mask, dmask = variant.attn_mask, None
    if mask_grad:  # zeros: the dq kernel writes only the blocks it visits
        dmask = torch.zeros(batch.B, batch.Hq, batch.Tq, batch.Tk, device=q.device, dtype=torch.float32)
    with on_device(q):
        delta = _delta(q, o, res if res is not None and res.numel() > 0 else None, do, lse, dlse, batch)
        dk, dv = dkdv(q, k, v, do, lse, delta, scale, variant, batch)
        dq = _dq(q, k, v, do, lse, delta, scale, variant, batch, dmask)
    sinks = variant.sinks
    dsinks = q.new_empty(0, dtype=torch.float32) if sinks is None else sink_gradient(sinks, lse, delta)
    if not mask_grad:
        return dq, dk, dv, dsinks
    return dq, dk, dv, dsinks, dmask.sum_to_size(mask.shape).to(mask.dtype)  # the mask's shape: (Tq, Tk), ...


# The ops: their schemas (what torch.compile and opcheck see) take the variant's fields one by one,
# by the names `Variant` gives them; the bodies gather them back into one. The dense ops also take
# the attn_mask, last and optional (callers that pass none, the ring's, are unchanged); the
# backward returns the mask's gradient as a fifth tensor only when asked (mask_grad), so its
# output is a list: four tensors, or five.


CAPTURED = mods.MAX_CAPTURED  # tensors a mask or score function may capture: the ops take them in as many slots


def _user_params(block_map):
    """The ops' parameters for mask and score functions (`mods`, their key, and the captured
    tensors in slots score_arg0.., mask_arg0..) and, on the dense ops, the block map: appended
    to an op's signature (`takes_user_args`), since an op's schema has no optional list of
    tensors that both torch.library.custom_op and triton_op accept."""
    P = inspect.Parameter
    opt = lambda name: P(name, P.POSITIONAL_OR_KEYWORD, default=None, annotation=Optional[Tensor])
    num = lambda name: P(name, P.POSITIONAL_OR_KEYWORD, default=0, annotation=int)
    params = [num("mods")] + [opt(f"{kind}_arg{i}") for kind in ("score", "mask") for i in range(CAPTURED)]
    params += [num("dropout_q0"), num("dropout_k0"), num("dropout_h0")]  # a ring piece's dropout positions
    if block_map:
        params += [opt("kv_counts"), opt("kv_index"), opt("q_counts"), opt("q_index"), num("map_block_m"),
                   num("map_block_n")]
    return params


def takes_user_args(block_map=True):
    """Give an op's body, whose last parameter is **user, the parameters of `_user_params` (the
    dispatcher passes them by position); the body gets them as the dict `user`."""
    def add(fn):
        params = list(inspect.signature(fn).parameters.values())[:-1]
        sig = inspect.Signature(params + _user_params(block_map), return_annotation=inspect.signature(fn).return_annotation)
        own = [p.name for p in params]

        @functools.wraps(fn)
        def body(*args, **kwargs):
            bound = sig.bind(*args, **kwargs)
            bound.apply_defaults()
            named = dict(bound.arguments)
            return fn(**{name: named.pop(name) for name in own}, **named)
        body.__signature__ = sig
        return body
    return add


def _user(user):
    """The ops' `_user_params` (a dict by name) as `Variant` fields."""
    captured = lambda kind: tuple(t for t in (user.get(f"{kind}_arg{i}") for i in range(CAPTURED)) if t is not None)
    kv_counts = user.get("kv_counts")
    block_map = None if kv_counts is None else (kv_counts, user["kv_index"], user["q_counts"], user["q_index"],
                                                user["map_block_m"], user["map_block_n"])
    return dict(mods=user.get("mods", 0), score_mod_args=captured("score"), mask_mod_args=captured("mask"),
                block_map=block_map,
                dropout_offsets=tuple(user.get(f"dropout_{x}0", 0) for x in "qkh"))


def user_op_args(variant, block_map=True):
    """The inverse of `_user`: a variant's functions, captured tensors and map as the ops take them."""
    out = dict(mods=variant.mods, **dict(zip(("dropout_q0", "dropout_k0", "dropout_h0"), variant.dropout_offsets)))
    for kind, args in (("score", variant.score_mod_args), ("mask", variant.mask_mod_args)):
        out.update({f"{kind}_arg{i}": t for i, t in enumerate(args)})
    if block_map and variant.block_map is not None:
        out.update(zip(("kv_counts", "kv_index", "q_counts", "q_index", "map_block_m", "map_block_n"),
                       variant.block_map))
    return out


@kernel_op("flash_forward", fake=lambda q, v, residual, **_: _outputs(q, v, residual, packed=False))
@takes_user_args()
def _forward(q: Tensor, k: Tensor, v: Tensor, left: int, right: int, scale: float, softcap: float,
             sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float, seed: int,
             residual: bool, attn_mask: Optional[Tensor] = None, **user) -> tuple[Tensor, Tensor, Tensor]:
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, seed=seed, attn_mask=attn_mask, **_user(user))
    return _run_forward(q, k, v, _dense(q, k), scale, variant, residual)


@kernel_op("flash_backward", fake=lambda **kwargs: list(gradient_outputs(**kwargs)))
@takes_user_args()
def _backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, res: Optional[Tensor], lse: Tensor, do: Tensor,
              dlse: Optional[Tensor], left: int, right: int, scale: float, softcap: float, sinks: Optional[Tensor],
              alibi_slopes: Optional[Tensor], dropout_p: float, seed: int, attn_mask: Optional[Tensor] = None,
              mask_grad: bool = False, **user) -> list[Tensor]:
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, seed=seed, attn_mask=attn_mask, **_user(user))
    return list(_run_backward(q, k, v, o, res, lse, do, dlse, _dense(q, k), scale, variant, mask_grad))


@kernel_op("flash_varlen_forward", fake=lambda q, v, residual, **_: _outputs(q, v, residual, packed=True))
@takes_user_args(block_map=False)
def _varlen_forward(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                    max_seqlen_q: int, max_seqlen_k: int, left: int, right: int, scale: float, softcap: float,
                    sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float, seed: int,
                    residual: bool, **user) -> tuple[Tensor, Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, seed=seed, **_user(user))
    return _run_forward(q, k, v, batch, scale, variant, residual)


@kernel_op("flash_varlen_backward", fake=gradient_outputs)
@takes_user_args(block_map=False)
def _varlen_backward(q: Tensor, k: Tensor, v: Tensor, o: Tensor, res: Optional[Tensor], lse: Tensor, do: Tensor,
                     dlse: Optional[Tensor], cu_seqlens_q: Tensor, cu_seqlens_k: Tensor, max_seqlen_q: int,
                     max_seqlen_k: int, left: int, right: int, scale: float, softcap: float,
                     sinks: Optional[Tensor], alibi_slopes: Optional[Tensor], dropout_p: float,
                     seed: int, **user) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    batch = _packed(q, k, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                      dropout_p=dropout_p, seed=seed, **_user(user))
    return _run_backward(q, k, v, o, res, lse, do, dlse, batch, scale, variant)


register_autograd(_forward, _backward, outputs=("o", "lse", "res"))
register_autograd(_varlen_forward, _varlen_backward, outputs=("o", "lse", "res"))


# ----------------------------------------------------------------------------- public


def flash_attention(q, k, v, causal=True, scale=None, return_lse=False, window=None, softcap=None, sinks=None,
                    alibi_slopes=None, dropout_p=0.0, dropout_seed=None, attn_mask=None, mask_mod=None, score_mod=None,
                    block_map=None):
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
    `attn_mask` (torch SDPA's): bool (True attends) or float16, bfloat16, float32 (added to the
    scores after softcap and ALiBi), broadcastable to (B, Hq, Tq, Tk), within causal and the window;
    read in place through stride 0 where broadcast. A float mask that requires grad gets its
    gradient, through a (B, Hq, Tq, Tk) fp32 buffer (docs/masks.md).
    `mask_mod`, `score_mod`: mask and score functions in Triton, with the tensors they capture
    (`kernels.mods`: a `MaskMod`, a `ScoreMod` with its derivative for a backward, or a bare
    `@triton.jit` function). `block_map`: which key blocks each query block visits
    (`kernels.block_map`, made from this call's attn_mask or mask_mod, causal, window and
    lengths), so that blocks the mask hides are skipped; with an attn_mask and no map, one is made
    (on the device, kept for the last few masks by identity), with a mask function and no map,
    every block causal and the window visit evaluates it.
    """
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    q, k, v, scale = check_inputs(q, k, v, scale, value_dim=True)
    check_flag(return_lse, "return_lse")
    left, right = window_bounds(window, causal)
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=q.shape[0])
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    attn_mask = check_attn_mask(attn_mask, q, k)
    mask_mod, score_mod = mods.check_mods(mask_mod, score_mod, q)
    block_map = blockmap.check_block_map(block_map, q, k, left, right, attn_mask, mask_mod)
    if block_map is None and attn_mask is not None:
        block_map = blockmap.mask_block_map(attn_mask, q.shape[2], k.shape[2], left, right)
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=slopes, dropout_p=dropout_p,
                      seed=seed, attn_mask=attn_mask, **_functions(mask_mod, score_mod),
                      block_map=None if block_map is None else block_map.kernel_tensors())
    o, lse2, _ = _forward(q, k, v, scale=scale, residual=needs_residual(q, k, v, attn_mask), attn_mask=attn_mask,
                          **variant.op_args(), **user_op_args(variant))
    return (o, lse2 * LN2) if return_lse else o


def _functions(mask_mod, score_mod):
    """Checked mask and score functions as `Variant` fields."""
    return dict(mods=mods.key_of(mask_mod, score_mod), score_mod_args=score_mod.args if score_mod else (),
                mask_mod_args=mask_mod.args if mask_mod else ())


def flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=True,
                           scale=None, return_lse=False, window=None, check_seqlens=True, softcap=None, sinks=None,
                           alibi_slopes=None, dropout_p=0.0, dropout_seed=None, mask_mod=None, score_mod=None):
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
    softcap, sinks, alibi_slopes, dropout_p, dropout_seed, mask_mod and score_mod as in
    `flash_attention`; (B, Hq) slopes are per sequence; a mask or score function's b is the
    sequence and its q_idx, kv_idx positions within it.
    """
    q, k, v = autocast_inputs(q, k, v)
    q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale = check_varlen_inputs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, check_flag(check_seqlens, "check_seqlens"),
        value_dim=True)
    check_flag(return_lse, "return_lse")
    left, right = window_bounds(window, causal)
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=cu_seqlens_q.shape[0] - 1)
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    mask_mod, score_mod = mods.check_mods(mask_mod, score_mod, q)
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=slopes, dropout_p=dropout_p,
                      seed=seed, **_functions(mask_mod, score_mod))
    o, lse2, _ = _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                 scale=scale, residual=needs_residual(q, k, v), **variant.op_args(),
                                 **user_op_args(variant, block_map=False))
    return (o, lse2 * LN2) if return_lse else o
