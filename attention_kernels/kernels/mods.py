"""
Mask and score functions: FlexAttention's `mask_mod` and `score_mod` as Triton functions that
the flash kernels call inside their tiles, eagerly (no torch.compile needed).

    @triton.jit
    def my_mask(b, h, q_idx, kv_idx, *args):          a bool tile: True where the query sees the key
    @triton.jit
    def my_score(score, b, h, q_idx, kv_idx, *args):  the new scores (natural units: q.k * scale)
    @triton.jit
    def my_score_grad(score, b, h, q_idx, kv_idx, *args):  d my_score / d score, for the backward

b and h are the program's batch and query head (scalars); q_idx and kv_idx are positions within
the sequence, as tiles that broadcast against each other ([M, 1] and [1, N], or transposed in the
dk/dv kernel); they are clamped into [0, Tq) and [0, Tk), so a function may load from a tensor of
that length without a bound check. `args` are the tensors the function captured (`MaskMod.args`,
`ScoreMod.args`), pointers inside the kernel: read them with `tl.load`. A number a function needs
is captured as a one-element tensor (the ready-made ones below do so), so that changing it
compiles nothing.

Order within a score (as `reference.masked_scores`): soft-cap, ALiBi, `score_mod`, `attn_mask`,
`mask_mod`, then causal and the window. The reference takes the same functions in PyTorch
(`torch_fn`, on index tensors that broadcast: (B, 1, 1, 1), (1, Hq, 1, 1), (1, 1, Tq, 1),
(1, 1, 1, Tk)); every ready-made one carries both.

The ready-made functions (each returns a `MaskMod` or `ScoreMod`):
    causal()                      q_idx >= kv_idx (top-left, as FlexAttention's; the built-in
                                  causal=True is bottom-right)
    sliding_window(left)          causal, at most `left` keys before the query
    documents(ids)                same document id: ids (T,) or (B, T) ints
    documents_from_cu_seqlens(cu_seqlens, T)   the same, from packed offsets
    prefix_lm(prefix_lengths)     the first prefix_lengths[b] keys seen by every query, causal after
    chunked(size)                 Llama 4's chunked local attention: same chunk of `size`
    alibi(slopes)                 score - slopes[h] * |q_idx - kv_idx|
    softcap(cap)                  cap * tanh(score / cap)
"""

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from .common import function_key as key_of, functions, tanh  # noqa: F401  (the ops' key, kept with Variant)


MAX_CAPTURED = 4  # tensors one function may capture (the torch ops take them in as many slots)


class MaskMod(NamedTuple):
    """A mask function and what it captured. `fn`: a `@triton.jit` function
    (b, h, q_idx, kv_idx, *args) -> bool; `args`: tensors on the inputs' device; `torch_fn`: the
    same mask in PyTorch, (b, h, q_idx, kv_idx) -> bool tensor, for the reference (optional)."""
    fn: object
    args: tuple = ()
    torch_fn: Optional[Callable] = None

    def reference(self):
        return self.torch_fn


class ScoreMod(NamedTuple):
    """A score function, its derivative and what they captured. `fn`: a `@triton.jit` function
    (score, b, h, q_idx, kv_idx, *args) -> score; `grad`: the same arguments -> d fn / d score
    (None: no backward through it); `args`: tensors; `torch_fn`: (score, b, h, q_idx, kv_idx) ->
    score in PyTorch, for the reference (optional)."""
    fn: object
    grad: object = None
    args: tuple = ()
    torch_fn: Optional[Callable] = None


def _device(device):
    return torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))


def _scalar(x, dtype, device):
    return torch.tensor([x], dtype=dtype, device=_device(device))


# ----------------------------------------------------------------------------- mask functions


@triton.jit
def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


@triton.jit
def _sliding_window(b, h, q_idx, kv_idx, LEFT):
    d = q_idx - kv_idx
    return (d >= 0) & (d <= tl.load(LEFT))


@triton.jit
def _documents(b, h, q_idx, kv_idx, IDS, ROW):
    ids = IDS + b * tl.load(ROW)
    return tl.load(ids + q_idx) == tl.load(ids + kv_idx)


@triton.jit
def _prefix_lm(b, h, q_idx, kv_idx, PREFIX):
    return (kv_idx < tl.load(PREFIX + b)) | (q_idx >= kv_idx)


@triton.jit
def _chunked(b, h, q_idx, kv_idx, SIZE):
    size = tl.load(SIZE)
    return q_idx // size == kv_idx // size


def causal():
    """q_idx >= kv_idx: causal attention aligned top-left (FlexAttention's `causal_mask`)."""
    return MaskMod(_causal, (), lambda b, h, q, k: q >= k)


def sliding_window(left, device=None):
    """Causal, and at most `left` keys before the query: 0 <= q_idx - kv_idx <= left."""
    return MaskMod(_sliding_window, (_scalar(int(left), torch.int32, device),),
                   lambda b, h, q, k: ((q - k) >= 0) & ((q - k) <= left))


def documents(ids):
    """Queries see only keys of their own document: ids (T,) for every sequence of the batch, or
    (B, T) one row a sequence; ints, on the inputs' device. With causal=True, causal within each
    document: a packed batch's masks (document masking)."""
    if not isinstance(ids, torch.Tensor) or ids.dim() not in (1, 2) or ids.dtype.is_floating_point:
        raise TypeError(f"ids must be an int tensor of shape (T,) or (B, T), got {getattr(ids, 'shape', ids)!r}")
    rows = ids.contiguous().view(-1, ids.shape[-1]).to(torch.int32)   # (B or 1, T)
    row = _scalar(rows.shape[1] if rows.shape[0] > 1 else 0, torch.int32, ids.device)

    def torch_fn(b, h, q, k):
        qd = rows[:, q.view(-1)].view(rows.shape[0], 1, -1, 1)                           # (B or 1, 1, Tq, 1)
        kd = rows[:, k.view(-1)].view(rows.shape[0], 1, 1, -1)                           # (B or 1, 1, 1, Tk)
        return qd == kd                                                                  # (B or 1, 1, Tq, Tk)
    return MaskMod(_documents, (rows.view(-1), row), torch_fn)


def documents_from_cu_seqlens(cu_seqlens, T=None):
    """`documents` from packed offsets, int (D + 1,) starting at 0: position t belongs to the
    document d with cu_seqlens[d] <= t < cu_seqlens[d + 1]; T defaults to cu_seqlens[-1] (a
    host read: give T to avoid it)."""
    T = int(cu_seqlens[-1]) if T is None else T
    t = torch.arange(T, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    return documents(torch.searchsorted(cu_seqlens[1:].contiguous(), t, right=True))


def prefix_lm(prefix_lengths, device=None):
    """Prefix-LM: every query sees the first prefix_lengths[b] keys of its sequence (the prompt,
    bidirectional), and the keys up to itself after them. An int for every sequence, or an int
    tensor (B,). Use with causal=False."""
    if isinstance(prefix_lengths, torch.Tensor):
        prefix = prefix_lengths.to(torch.int32).contiguous().view(-1)
    else:
        prefix = _scalar(int(prefix_lengths), torch.int32, device)
    per_seq = prefix.numel() > 1

    def torch_fn(b, h, q, k):
        p = prefix[b.view(-1) if per_seq else torch.zeros_like(b.view(-1))].view(-1, 1, 1, 1)  # (B, 1, 1, 1)
        return (k < p) | (q >= k)
    if not per_seq:  # one length for all: the kernel reads PREFIX + b, so repeat it to any batch
        return MaskMod(_prefix_lm_one, (prefix,), torch_fn)
    return MaskMod(_prefix_lm, (prefix,), torch_fn)


@triton.jit
def _prefix_lm_one(b, h, q_idx, kv_idx, PREFIX):
    return (kv_idx < tl.load(PREFIX)) | (q_idx >= kv_idx)


def chunked(size, device=None):
    """Llama 4's chunked local attention: queries see keys of their own chunk of `size`
    positions (q_idx // size == kv_idx // size). Use with causal=True."""
    return MaskMod(_chunked, (_scalar(int(size), torch.int32, device),),
                   lambda b, h, q, k: torch.div(q, size, rounding_mode="floor") == torch.div(k, size,
                                                                                            rounding_mode="floor"))


# ----------------------------------------------------------------------------- score functions


@triton.jit
def _alibi(score, b, h, q_idx, kv_idx, SLOPES):
    return score - tl.load(SLOPES + h) * tl.abs(q_idx - kv_idx).to(tl.float32)


@triton.jit
def _one(score, b, h, q_idx, kv_idx, SLOPES):
    return score * 0.0 + 1.0


@triton.jit
def _softcap(score, b, h, q_idx, kv_idx, CAP):
    cap = tl.load(CAP)
    return cap * tanh(score / cap)


@triton.jit
def _softcap_grad(score, b, h, q_idx, kv_idx, CAP):
    t = tanh(score / tl.load(CAP))
    return 1.0 - t * t


def alibi(slopes):
    """ALiBi as a score function: score - slopes[h] * |q_idx - kv_idx|, slopes (Hq,) fp32 (equal
    to the built-in alibi_slopes when Tq == Tk, whose distance is from the diagonal key)."""
    slopes = slopes.to(torch.float32).contiguous()
    return ScoreMod(_alibi, _one, (slopes,),
                    lambda s, b, h, q, k: s - slopes.to(s.dtype).view(1, -1, 1, 1) * (q - k).abs())


def softcap(cap, device=None):
    """Gemma 2's soft-cap as a score function: cap * tanh(score / cap), and its derivative."""
    return ScoreMod(_softcap, _softcap_grad, (_scalar(float(cap), torch.float32, device),),
                    lambda s, b, h, q, k: cap * torch.tanh(s / cap))


# ----------------------------------------------------------------------------- checks and the ops' key


def _jit_types():
    types = [triton.runtime.JITFunction]
    try:  # what @triton.jit makes under the interpreter
        from triton.runtime.interpreter import InterpretedFunction
        types.append(InterpretedFunction)
    except ImportError:
        pass
    return tuple(types)


def _is_jit(fn):
    return isinstance(fn, _jit_types())


def check_mods(mask_mod, score_mod, q):
    """mask_mod, score_mod as the public functions take them (a MaskMod or ScoreMod, or a bare
    `@triton.jit` function with nothing captured), checked against q: returns (MaskMod or None,
    ScoreMod or None)."""
    if mask_mod is not None:
        mask_mod = mask_mod if isinstance(mask_mod, MaskMod) else MaskMod(mask_mod)
        if not _is_jit(mask_mod.fn):
            raise TypeError(f"mask_mod must be a @triton.jit function (b, h, q_idx, kv_idx, *args) -> bool, or a "
                            f"MaskMod of one; got {type(mask_mod.fn).__name__}")
        _check_args("mask_mod", mask_mod.args, q)
    if score_mod is not None:
        score_mod = score_mod if isinstance(score_mod, ScoreMod) else ScoreMod(score_mod)
        if not _is_jit(score_mod.fn):
            raise TypeError(f"score_mod must be a @triton.jit function (score, b, h, q_idx, kv_idx, *args) -> score, "
                            f"or a ScoreMod of one; got {type(score_mod.fn).__name__}")
        if score_mod.grad is not None and not _is_jit(score_mod.grad):
            raise TypeError(f"score_mod's grad must be a @triton.jit function or None; got "
                            f"{type(score_mod.grad).__name__}")
        _check_args("score_mod", score_mod.args, q)
    return mask_mod, score_mod


def _check_args(name, args, q):
    if not isinstance(args, tuple):
        raise TypeError(f"{name}'s args must be a tuple of tensors, got {type(args).__name__}")
    if len(args) > MAX_CAPTURED:
        raise ValueError(f"{name} captured {len(args)} tensors; at most {MAX_CAPTURED} (the ops' slots): "
                         "stack tensors of one dtype into one")
    for i, a in enumerate(args):
        if not isinstance(a, torch.Tensor):
            raise TypeError(f"{name}'s args[{i}] must be a torch.Tensor (capture a number as a one-element tensor), "
                            f"got {type(a).__name__}")
        if a.device != q.device:
            raise ValueError(f"{name}'s args[{i}] must be on q's device {q.device}, got {a.device}")
        if a.requires_grad:
            raise ValueError(f"{name}'s args[{i}] requires grad: the kernels give no gradient to a captured tensor "
                             "(a learnable additive bias can be an attn_mask, which gets one); detach it")
