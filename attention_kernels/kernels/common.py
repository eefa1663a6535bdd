"""
What the fused and flash kernel files share: small `@triton.jit` helpers and launch helpers.
"""

import contextlib

import torch
import triton
import triton.language as tl

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
    # tanh from exp2 (the interpreter has no libdevice): 1 - 2 / (1 + exp(2x)), which goes to
    # +-1 at either end without a branch (exp2 gives inf, or 0); near 0 its absolute error is one
    # ulp of 1, which the soft-cap multiplies back by the cap
    return 1.0 - 2.0 / (1.0 + tl.math.exp2(2.8853900817779268 * x))  # 2 * log2(e)


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


def window_args(left, right, Tq, Tk):
    """A window (left, right), -1 for an unbounded side, as the kernels take it: each side at most
    Tq + Tk, wider than any query-key distance, so an unbounded side is one comparison like any
    other, and the kernels' int32 sums of positions and bounds cannot overflow."""
    unbounded = Tq + Tk
    return (min(left, unbounded) if left >= 0 else unbounded), (min(right, unbounded) if right >= 0 else unbounded)


def on_device(t):
    """Triton launches on the current CUDA device and stream: make them t's (a tensor on a
    second GPU would otherwise run on the first one's)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def strides(*tensors):
    return [s for t in tensors for s in t.stride()]


# ----------------------------------------------------------------------------- custom ops


def wrap_triton(kernel):
    """How a custom op's body launches a kernel: through `torch.library.wrap_triton` on a GPU,
    so that torch.compile sees the kernel inside the op; under the interpreter, the kernel
    itself. Call it on a module-level name, `wrap_triton(_flash_fwd)[grid](...)`: torch finds
    an op's kernels (for its compile cache key) by reading such calls in the op's source."""
    return kernel if INTERPRET else torch.library.wrap_triton(kernel)


def forward_outputs(q, *args):
    """The empty (out, lse) a forward op fills: out like q, lse (B, Hq, Tq) fp32. Also the ops'
    fake implementation under the interpreter: the same shapes, strides and dtypes."""
    B, Hq, Tq, D = q.shape
    return torch.empty_like(q), torch.empty((B, Hq, Tq), device=q.device, dtype=torch.float32)


def gradient_outputs(q, k, v, *args):
    """The shapes of a backward op's (dq, dk, dv), for its fake implementation."""
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def kernel_op(name, fake):
    """Register the decorated launcher as the torch op `attention_kernels::<name>`.

    On a GPU it is a `triton_op`: torch.compile traces through it into the Triton kernels, and
    the launcher itself, run on fake tensors, gives the output shapes. Under the interpreter it
    is an opaque `custom_op` with `fake` for the shapes, since the interpreter would run the
    kernel on torch.compile's fake tensors, which hold no data (torch.compile still compiles
    around it without a graph break). Either way the op has no aliasing or mutation, so
    `torch.library.opcheck` holds it to the full custom-op contract.
    """
    def register(fn):
        qualname = f"attention_kernels::{name}"
        if not INTERPRET:
            return torch.library.triton_op(qualname, fn, mutates_args=())
        op = torch.library.custom_op(qualname, fn, mutates_args=())
        op.register_fake(fake)
        return op
    return register
