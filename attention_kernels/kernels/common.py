"""
What the fused and flash kernel files share: small `@triton.jit` helpers and launch helpers.
"""

import contextlib
import inspect
from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .checks import INTERPRET

LOG2E = 1.4426950408889634  # 1/ln(2): exp(x) = exp2(x * LOG2E); kernels spell constants out, as
                            # globals other than constexpr cannot be read inside @triton.jit

# ----------------------------------------------------------------------------- jit helpers


@triton.jit
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # Under the interpreter (UPCAST) every dot runs in float64 and is rounded to fp32 once:
    # - it multiplies bf16 operands as raw bits otherwise (triton-lang/triton#11584);
    # - numpy's BLAS sums Q K^T and its transpose K Q^T (the backward's) in different orders, so
    #   the same fp32 score could differ between forward and backward by far more than on a GPU,
    #   whose fp32 dot is one FMA chain along D either way, and the backward's P = exp2(S - LSE)
    #   would carry that difference wherever scores are large.
    if UPCAST:
        return tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def dot_acc(acc, a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # acc + a @ b with the matrix unit accumulating into acc in place (no second accumulator
    # live beside it: at D = 128 the backward's dK and dV are 128 registers a thread already)
    if UPCAST:
        return acc + tl.dot(a.to(tl.float64), b.to(tl.float64)).to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def tanh(x):
    # tanh to a few fp32 ulps over the whole range (the interpreter has no libdevice). The formula
    # 1 - 2 / (1 + exp(2x)) is off by an ulp of 1 near 0, not an ulp of x, and the soft-cap
    # multiplies that back by the cap (a cap of 1e3 moved fp32 logits by 1e-4; 1e8 flattened
    # them). Instead: x * P(x^2) / Q(x^2), a rational fit to tanh(x) / x on [0, 9] (least squares
    # reweighted toward the largest relative error; within 3.4 fp32 ulps of float64, at every
    # magnitude down to the smallest normal), and x clamped to +-9, where tanh is 1 in fp32. One
    # chain of FMAs and a division: no exp2, no branch, and no more registers than before.
    x = tl.minimum(tl.maximum(x, -9.0), 9.0)
    x2 = x * x
    p = 2.002459136007939e-11
    p = p * x2 - 1.3544092958284182e-08
    p = p * x2 + 9.542917723592836e-06
    p = p * x2 + 0.002952385228127241
    p = p * x2 + 0.12949088215827942
    p = p * x2 + 1.0
    q = 0.0002323897206224501
    q = q * x2 + 0.023894021287560463
    q = q * x2 + 0.4628240466117859
    q = q * x2 + 1.0
    return x * p / q


@triton.jit
def score_mods(s, rows, cols, softcap, slope, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr):
    # What models add to plain softmax attention, on a tile of base-2 logits s, in the reference's
    # order (`reference.masked_scores`), before the mask. Every kernel applies them here.
    #  - Gemma 2's soft-cap: cap * tanh(s / cap); in base 2 with softcap = cap * log2(e)
    #  - ALiBi: -slope * |key - the query's diagonal key|, slope * log2(e) given (a scalar, or one
    #    per row as [ROWS, 1]); rows and cols are the tile's positions on that line: a query's
    #    diagonal key and a key's position, either way round (the bias is symmetric)
    # Returns the logits, and for the backward's chain rule tanh(s / cap) (s itself without a cap).
    t = s
    if SOFTCAP:
        t = tanh(s / softcap)
        s = softcap * t
    if ALIBI:
        s = s - slope * tl.abs(cols[None, :] - rows[:, None]).to(tl.float32)
    return s, t


@triton.jit
def attn_mask_scores(s, mask_base, rows, cols, n_rows, n_cols, stride_row, stride_col, BOOL_MASK: tl.constexpr):
    # The user's attn_mask on a tile of base-2 logits s, after `score_mods` and before the window's
    # `mask_scores` (the reference's order): bool False hides a key (-inf); a float is added, in
    # base 2 (times log2(e)), -inf hiding a key too. rows and cols are the tile's positions along
    # the mask's strides stride_row and stride_col: queries and keys, or keys and queries (the
    # dk/dv kernel's tile is transposed); entries past n_rows or n_cols hide, as the window hides
    # keys past Tk. A float below -FLT_MAX / log2(e), -2.4e38 (torch.finfo(float32 or
    # bfloat16).min), becomes -inf in base 2 and hides its key too: a row of nothing else sees no
    # key (zeros), where the reference averages its values (docs/masks.md says why not held finite).
    inside = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    ptrs = mask_base + rows.to(tl.int64)[:, None] * stride_row + cols.to(tl.int64)[None, :] * stride_col
    if BOOL_MASK:  # stored as bytes (the launcher views torch's bool as uint8)
        return tl.where(tl.load(ptrs, mask=inside, other=0) != 0, s, float("-inf"))
    bias = tl.load(ptrs, mask=inside, other=float("-inf")).to(tl.float32)
    return s + bias * 1.4426950408889634                                       # base 2


@triton.jit
def score_function(s, b, h, q_idx, kv_idx, SCORE_MOD: tl.constexpr, score_mod_args):
    # The user's score_mod (`kernels.mods`) on a tile of base-2 logits s: it takes and returns
    # natural units (q.k * scale), so ln(2) in and log2(e) out. q_idx, kv_idx: positions within
    # the sequence, clamped into it, shaped to broadcast ([M, 1] and [1, N], or transposed).
    return SCORE_MOD(s * 0.6931471805599453, b, h, q_idx, kv_idx, *score_mod_args) * 1.4426950408889634


@triton.jit
def score_function_grad(s, b, h, q_idx, kv_idx, SCORE_GRAD: tl.constexpr, score_mod_args):
    # d score_mod / d score at the same base-2 logits s (the ratio of natural units is 1)
    return SCORE_GRAD(s * 0.6931471805599453, b, h, q_idx, kv_idx, *score_mod_args)


@triton.jit
def mask_function(s, b, h, q_idx, kv_idx, MASK_MOD: tl.constexpr, mask_mod_args):
    # The user's mask_mod (`kernels.mods`): -inf where it says False; after attn_mask, before the window
    return tl.where(MASK_MOD(b, h, q_idx, kv_idx, *mask_mod_args), s, float("-inf"))


@triton.jit
def dropout_keep(seed, bh, q_idx, k_idx, p_drop):
    # Whether the attention weight of query q_idx and key k_idx (positions in their sequence;
    # tensors that broadcast to the tile) in head bh = b * Hq + h survives dropout p_drop: Philox
    # 4x32 keyed by the call's seed on the counter (key, query, head, 0). Every weight has its own
    # draw, the same in the forward and in both backward kernels whatever their tiles, and
    # `kernels.dropout_mask` writes the same draws out for tests and the explain trace.
    zero = (q_idx * 0 + k_idx * 0).to(tl.uint32)                       # the tile's shape
    r, _, _, _ = tl.philox(seed, k_idx.to(tl.uint32) + zero, q_idx.to(tl.uint32) + zero,
                           zero + bh.to(tl.uint32), zero)
    return tl.uint_to_uniform_float(r) >= p_drop


@triton.jit
def head_and_query_block(num_m_blocks, Hq, GROUP):
    # One flat grid axis (no 65 535 limit on B * H); the query blocks of one head are adjacent so
    # they share K and V in L2, and the longest causal rows start first.
    pid = tl.program_id(0)
    bh = pid // num_m_blocks
    b = (bh // Hq).to(tl.int64)
    h = (bh % Hq).to(tl.int64)
    return b, h, h // GROUP, num_m_blocks - 1 - pid % num_m_blocks


@triton.jit
def mask_scores(s, offs_m, offs_n, Tq, Tk, left, right):
    # -inf where query offs_m may not see key offs_n: past Tk, or outside the window around the
    # query's diagonal key i + Tk - Tq (bottom-right alignment); an unbounded side is passed as a
    # bound wider than any distance (see `window_args`)
    past = offs_n[None, :] - (offs_m[:, None] + (Tk - Tq))  # how far each key lies past the diagonal
    visible = (offs_n < Tk)[None, :] & (past >= -left) & (past <= right)
    return tl.where(visible, s, float("-inf"))


# ----------------------------------------------------------------------------- launch helpers


def pow2(n, least=16):
    """n rounded up to a power of two, at least `least` (tl.dot needs 16 along every side)."""
    return max(least, triton.next_power_of_2(n))


def precision(dtype):
    """(input_precision, upcast) for tl.dot: IEEE fp32 for fp32 inputs (16-bit inputs multiply
    exactly on the tensor cores either way); under the interpreter, float64 (see `dot`)."""
    return ("ieee" if dtype == torch.float32 else "tf32"), INTERPRET


def meta(q):
    """The constexprs every kernel takes from q: head dim, its padded block, and tl.dot's
    precision (see `precision`)."""
    dot_precision, upcast = precision(q.dtype)
    D = int(q.shape[-1])  # constexprs: under torch.compile's dynamic shapes this specialises D
    return dict(HEAD_DIM=D, BLOCK_D=pow2(D), PRECISION=dot_precision, UPCAST=upcast)


def value_meta(v):
    """The constexprs of v's head dim, which may differ from q's and k's (flash's kernels): Dv and
    its padded block."""
    Dv = int(v.shape[-1])
    return dict(HEAD_DIM_V=Dv, BLOCK_DV=pow2(Dv))


def window_args(left, right, Tq, Tk):
    """A window (left, right), -1 for an unbounded side, as the kernels take it: each side at most
    Tq + Tk, wider than any query-key distance, so an unbounded side is one comparison like any
    other, and the kernels' int32 sums of positions and bounds cannot overflow."""
    unbounded = Tq + Tk
    return dict(left=min(left, unbounded) if left >= 0 else unbounded,
                right=min(right, unbounded) if right >= 0 else unbounded)


def on_device(t):
    """Triton launches on the current CUDA device and stream: make them t's (a tensor on a
    second GPU would otherwise run on the first one's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def stride_args(dims, **strides):
    """The kernels' stride arguments by name: stride_<tensor><dim> for each tensor named, its
    strides given in the order of `dims` ("bhtd": batch, head, row, d)."""
    out = {}
    for name, values in strides.items():
        if len(values) != len(dims):
            raise ValueError(f"{name}: {len(values)} strides for the {len(dims)} dimensions {dims!r}")
        out.update({f"stride_{name}{d}": s for d, s in zip(dims, values)})
    return out


def strides(**tensors):
    """stride_<name>b, h, t, d of (B, H, T, D) tensors given by name: strides(q=q, o=o)."""
    return stride_args("bhtd", **{name: t.stride() for name, t in tensors.items()})


_KEYS = {}      # (mask fn, score fn, score grad fn) -> the ops' int key
_FUNCTIONS = [(None, None, None)]


def function_key(mask_mod, score_mod):
    """The int by which the torch ops name a call's Triton functions (an op's schema cannot hold
    a function); 0 for none. Keys live as long as the process, as the functions do."""
    fns = (mask_mod.fn if mask_mod else None, score_mod.fn if score_mod else None,
           score_mod.grad if score_mod else None)
    if fns == (None, None, None):
        return 0
    if fns not in _KEYS:
        _KEYS[fns] = len(_FUNCTIONS)
        _FUNCTIONS.append(fns)
    return _KEYS[fns]


def functions(key):
    """(mask fn, score fn, score grad fn) of an ops' key."""
    return _FUNCTIONS[key]


class Variant(NamedTuple):
    """What a call adds to plain attention, as one value from the public functions through the
    ops and launchers to the kernels' arguments (`score_args`, `sink_args`, `dropout_args`):

        left, right     the window around each query's diagonal key, -1 for an unbounded side
                        (`checks.window_bounds`): (-1, 0) causal, (-1, -1) full
        softcap         the soft-cap (0: none), and sinks (Hq,) and alibi_slopes (Hq,) or (B, Hq),
        sinks,          fp32 or None (`checks.check_mods`)
        alibi_slopes
        dropout_p, seed attention-weight dropout and the call's Philox seed (`dropout.check_dropout`)
        attn_mask       the user's mask, bool or float, broadcastable to (B, Hq, Tq, Tk), or None
                        (`checks.check_attn_mask`); the dense flash and fused kernels (`mask_args`)
        mods,           the user's mask and score functions by their key (`mods.key_of`, 0: none)
        score_mod_args, and the tensors each captured; the flash kernels (`function_args`)
        mask_mod_args
        block_map       (kv_counts, kv_index, q_counts, q_index, block_m, block_n) of a
                        `blockmap.BlockMap`, or None; the dense flash kernels (`map_args`)
        dropout_offsets (query, key, head) added to the positions and head that key dropout's
                        draws, so that a piece of a longer call (a ring's) drops what the whole
                        call drops; the flash kernels (`dropout_position_args`)

    The field names are the torch ops' argument names (`op_args`; attn_mask is the dense flash
    ops' alone, passed beside it). A NamedTuple, not a dataclass: torch.compile traces the public
    functions that build one without a graph break."""
    left: int = -1
    right: int = -1
    softcap: float = 0.0
    sinks: Optional[Tensor] = None
    alibi_slopes: Optional[Tensor] = None
    dropout_p: float = 0.0
    seed: int = 0
    attn_mask: Optional[Tensor] = None
    mods: int = 0
    score_mod_args: tuple = ()
    mask_mod_args: tuple = ()
    block_map: Optional[tuple] = None
    dropout_offsets: tuple = (0, 0, 0)

    @property
    def causal(self):
        """For the fused kernels, which take causal or full attention only."""
        return self.right == 0

    def op_args(self):
        """The fields by name, as the flash ops take them."""
        return dict(left=self.left, right=self.right, **self.mod_args())

    def mod_args(self):
        """What models add and dropout by name, as the fused ops take them (`causal` for the window)."""
        return dict(softcap=self.softcap, sinks=self.sinks, alibi_slopes=self.alibi_slopes, dropout_p=self.dropout_p,
                    seed=self.seed)

    def score_args(self, placeholder):
        """The arguments of `score_mods` in every kernel: the soft-cap in base 2, the slopes (or an
        unread placeholder tensor) and their batch stride, 0 when one slope serves every sequence."""
        slopes = self.alibi_slopes
        return dict(SLOPES=placeholder if slopes is None else slopes, softcap=self.softcap * LOG2E,
                    stride_sb=0 if slopes is None or slopes.dim() == 1 else slopes.stride(0),
                    HAS_SOFTCAP=self.softcap > 0, HAS_ALIBI=slopes is not None)

    def sink_args(self, placeholder):
        """The sinks of the kernels that finish a row's softmax (or an unread placeholder tensor)."""
        return dict(SINKS=placeholder if self.sinks is None else self.sinks, HAS_SINKS=self.sinks is not None)

    def mask_args(self, placeholder, B, Hq, Tq, Tk):
        """The user's attn_mask as the flash kernels take it (`attn_mask_scores`): broadcast to the
        scores (B, Hq, Tq, Tk) through stride 0 (`expand`, no copy), its four strides, and whether
        it is bool (viewed as uint8, the same bytes) or float (fp16, bf16 or fp32, read as fp32).
        Without one, an unread placeholder tensor."""
        mask = self.attn_mask
        if mask is None:
            return dict(ATTN_MASK=placeholder, **stride_args("bhmn", mask=(0, 0, 0, 0)), HAS_ATTN_MASK=False,
                        BOOL_MASK=False)
        full = mask.expand(B, Hq, Tq, Tk)                  # (B, Hq, Tq, Tk), stride 0 where broadcast
        is_bool = mask.dtype == torch.bool
        return dict(ATTN_MASK=full.view(torch.uint8) if is_bool else full, **stride_args("bhmn", mask=full.stride()),
                    HAS_ATTN_MASK=True, BOOL_MASK=is_bool)

    def function_args(self, backward=False):
        """The user's mask and score functions as the flash kernels take them (constexpr
        functions, None when absent), their captured tensors as tuples; the backward's kernels
        also take the score function's derivative."""
        mask_fn, score_fn, grad_fn = functions(self.mods)
        args = dict(MASK_MOD=mask_fn, SCORE_MOD=score_fn, HAS_MASK_MOD=mask_fn is not None,
                    HAS_SCORE_MOD=score_fn is not None, score_mod_args=tuple(self.score_mod_args),
                    mask_mod_args=tuple(self.mask_mod_args))
        if backward:
            args["SCORE_GRAD"] = grad_fn
        return args

    def map_args(self, kernel, placeholder, B, Hq, Tq, Tk):
        """The block map as the flash kernel `kernel` ("fwd", "dq": per query block; "dkdv": per
        key block) takes it, broadcast to (B, Hq) through stride 0; without one, unread
        placeholders. See `kernels/blockmap.py`."""
        names = ("KV_COUNTS", "KV_INDEX", "kc", "ki", "m") if kernel != "dkdv" else ("Q_COUNTS", "Q_INDEX", "qc", "qi", "n")
        if self.block_map is None:
            return {names[0]: placeholder, names[1]: placeholder, **stride_args("bh" + names[4], **{
                names[2]: (0, 0, 0), names[3]: (0, 0, 0)}), "HAS_BLOCK_MAP": False, "MAP_M": 16, "MAP_N": 16}
        kv_counts, kv_index, q_counts, q_index, bm, bn = self.block_map
        nM, nN = kv_index.shape[2], kv_index.shape[3]
        counts, index = ((kv_counts.expand(B, Hq, nM, 2), kv_index.expand(B, Hq, nM, nN)) if kernel != "dkdv"
                         else (q_counts.expand(B, Hq, nN, 2), q_index.expand(B, Hq, nN, nM)))
        return {names[0]: counts, names[1]: index, **stride_args("bh" + names[4], **{
            names[2]: counts.stride()[:3], names[3]: index.stride()[:3]}), "HAS_BLOCK_MAP": True, "MAP_M": bm,
            "MAP_N": bn}

    def dropout_position_args(self):
        """The flash kernels' dropout offsets (`dropout_offsets`)."""
        q0, k0, h0 = self.dropout_offsets
        return dict(drop_q0=q0, drop_k0=k0, drop_h0=h0)

    def dropout_args(self):
        """The Philox seed, the probability and the kept weights' scale, 1 / (1 - p)."""
        return dict(seed=self.seed, p_drop=self.dropout_p, keep_scale=1.0 / (1.0 - self.dropout_p),
                    HAS_DROPOUT=self.dropout_p > 0)


# ----------------------------------------------------------------------------- custom ops


def wrap_triton(kernel):
    """How a custom op's body launches a kernel: through `torch.library.wrap_triton` on a GPU,
    so that torch.compile sees the kernel inside the op; under the interpreter, the kernel
    itself. Call it on a module-level name, `wrap_triton(_flash_fwd)[grid](...)`: torch finds
    an op's kernels (for its compile cache key) by reading such calls in the op's source."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def forward_outputs(q, **unused):
    """The empty (out, lse) a forward op fills: out like q, lse (B, Hq, Tq) fp32. Also the ops'
    fake implementation under the interpreter: the same shapes, strides and dtypes."""
    B, Hq, Tq, D = q.shape
    return torch.empty_like(q), torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)


def gradient_outputs(q, k, v, sinks=None, attn_mask=None, mask_grad=False, **unused):
    """The shapes of a backward op's (dq, dk, dv, dsinks), and the mask's gradient after them when
    asked for (mask_grad), for its fake implementation: dsinks (Hq,) fp32, or empty without
    sinks; the mask's gradient of the mask's shape and dtype."""
    grads = (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v),
             torch.empty(0 if sinks is None else sinks.shape[0], device=q.device, dtype=torch.float32))
    return grads + (attn_mask.new_empty(attn_mask.shape),) if mask_grad else grads


def kernel_op(name, fake, mutates=()):
    """Register the decorated launcher as the torch op `attention_kernels::<name>`.

    On a GPU it is a `triton_op`: torch.compile traces through it into the Triton kernels, and
    the launcher itself, run on fake tensors, gives the output shapes. Under the interpreter it
    is an opaque `custom_op` with `fake` for the shapes, since the interpreter would run the
    kernel on torch.compile's fake tensors, which hold no data (torch.compile still compiles
    around it without a graph break). Either way the op has no aliasing, and mutates only the
    arguments named in `mutates` (the paged append writes its pool in place), so
    `torch.library.opcheck` holds it to the full custom-op contract.

    `fake` takes the op's arguments by name. The op's `arg_names` are its parameters in schema
    order, as its autograd (`register_autograd`) gets them.
    """
    def register(fn):
        qualname = f"attention_kernels::{name}"
        names = tuple(inspect.signature(fn).parameters)
        if not INTERPRET:
            op = torch.library.triton_op(qualname, fn, mutates_args=mutates)
        else:
            op = torch.library.custom_op(qualname, fn, mutates_args=mutates)
            op.register_fake(lambda *args, **kwargs: fake(**dict(zip(names, args)), **kwargs))
        op.arg_names = names
        return op
    return register


def register_autograd(forward, backward, outputs):
    """Differentiate the op `forward` through the op `backward`, every value by name. The backward
    takes the forward's inputs and outputs (named `outputs`) that share its parameters' names,
    and do and dlse, the gradients of the first two outputs (dlse: zeros, or None when the caller
    never used the log-sum-exp); it returns (dq, dk, dv, dsinks), for the forward's inputs of
    those names, dsinks only where sinks were given. A backward with a `mask_grad` parameter is
    told whether the forward's attn_mask wants a gradient, and then returns it fifth. An empty
    "res" (no rounding residual) reaches the backward as None."""
    def setup_context(ctx, inputs, output):
        named = {**dict(zip(forward.arg_names, inputs)), **dict(zip(outputs, output))}
        kept = {name: x for name, x in named.items() if name in backward.arg_names}
        ctx.tensor_names = [name for name, x in kept.items() if x is None or isinstance(x, Tensor)]
        ctx.save_for_backward(*(kept[name] for name in ctx.tensor_names))
        ctx.constants = {name: x for name, x in kept.items() if name not in ctx.tensor_names}
        if "mask_grad" in backward.arg_names:  # its gradient is B * Hq * Tq * Tk fp32: only when wanted
            mask = named.get("attn_mask")
            ctx.constants["mask_grad"] = isinstance(mask, Tensor) and mask.requires_grad
        if "res" in named:  # O's rounding residual: read by the backward, never differentiated
            ctx.mark_non_differentiable(named["res"])

    def gradients(ctx, do, dlse, *unused):
        named = {**dict(zip(ctx.tensor_names, ctx.saved_tensors)), **ctx.constants}
        named["do"] = torch.zeros_like(named["o"]) if do is None else do
        named["dlse"] = dlse
        if "res" in named and not named["res"].numel():
            named["res"] = None
        dq, dk, dv, dsinks, *dmask = backward(**named)
        grads = dict(q=dq, k=dk, v=dv, sinks=None if named["sinks"] is None else dsinks,
                     attn_mask=dmask[0] if dmask else None)
        return tuple(grads.get(name) for name in forward.arg_names)

    forward.register_autograd(gradients, setup_context=setup_context)
