"""
The one input check every kernel's launcher calls, and where the kernels may run.

Kernels run on CUDA tensors, or on CPU tensors under Triton's interpreter, which must be
switched on (TRITON_INTERPRET=1) before `attention_kernels.kernels` is imported: `triton.jit` reads it when
each kernel is defined.
"""

import collections
import math
import os
import numbers

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_takes_numpy_2_4():
    """Triton's interpreter before 3.7 turns a loop bound (a one-element array) into an int with
    int(array), which numpy 2.4 refuses: every kernel with a loop fails with "only 0-dimensional
    arrays can be converted to Python scalars" (triton-lang/triton#9171, fixed upstream by
    #9172). Triton 3.6 is what the project's GPU runs, so make its interpreter convert the array's
    one element instead, as the fix does; newer interpreters are left alone."""
    import triton
    from triton.runtime import interpreter
    patch_tensor = getattr(interpreter, "_patch_lang_tensor", None)
    version = tuple(int(x) for x in triton.__version__.split(".")[:2])
    if version >= (3, 7) or patch_tensor is None or getattr(patch_tensor, "numpy_2_4", False):
        return

    def patched(tensor, scope):
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.numpy_2_4 = True
    interpreter._patch_lang_tensor = patched


if INTERPRET:
    _interpreter_takes_numpy_2_4()

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256
# The kernels' logits are fp32, s * scale * log2(e): a scale of 1e38 overflows them for any |s| > 2
# and gives NaN (inf - inf). Up to 1e6 they stay finite for scores up to 2e32; and a softmax at
# scale 1e6 is already an argmax (scores 1e-4 apart differ by e^100 in weight).
MAX_SCALE = 1e6


def _dtype_name(dtype):
    return str(dtype).replace("torch.", "")


def last_dim_contiguous(t):
    """Kernels take any strides but need unit stride along D (vector loads); copy otherwise."""
    return t if t.stride(-1) == 1 else t.contiguous()


def check_device(t, name):
    if t.is_cuda:
        return
    if t.device.type == "cpu" and INTERPRET:
        return
    if t.device.type == "cpu":
        raise ValueError(
            f"{name} is a CPU tensor, but the Triton kernels run on a CUDA GPU. To run them on the CPU "
            "(slowly) use Triton's interpreter: set TRITON_INTERPRET=1 in the environment before "
            "attention_kernels.kernels is imported."
        )
    raise ValueError(f"{name} is on device {t.device}; the kernels accept CUDA tensors (or CPU tensors "
                     "under TRITON_INTERPRET=1)")


def as_device(device, name):
    """A device argument (a torch.device, a name such as "cuda:0", or a CUDA index) as the
    torch.device the kernels will run on, refused by name where they cannot."""
    try:
        d = torch.device(device)
    except (TypeError, RuntimeError, ValueError):
        raise ValueError(f"{name} must be a torch.device, a device name such as 'cuda' or a CUDA index, "
                         f"got {device!r}") from None
    if d.type == "cuda" and (not torch.cuda.is_available() or (d.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"{name} is {d}, but this machine has {torch.cuda.device_count()} CUDA device(s)")
    check_device(torch.empty(0, device=d), name)
    return d


def check_inputs(q, k, v, scale, kernels=True, names=("q", "k", "v"), value_dim=False):
    """Validate q (B, Hq, Tq, D), k and v (B, Hkv, Tk, D) and the scale; return them ready for a
    kernel: last dimension contiguous (other strides are passed to the kernel, so a (B, T, H, D)
    tensor transposed to (B, H, T, D) is not copied) and the scale as a float. `kernels=False`
    checks for the reference instead, which also takes float64 and runs on any device. `names`:
    what the caller calls q, k and v, for the messages. `value_dim`: v's head dim may differ from
    q's and k's (Dv, up to 256: DeepSeek's latent attention has 192 and 128); the caller's kernels
    take it (flash's do)."""
    nq, nk, nv = names
    dtypes = SUPPORTED_DTYPES if kernels else SUPPORTED_DTYPES + (torch.float64,)
    for name, t in ((nq, q), (nk, k), (nv, v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have 4 dimensions (B, H, T, D), got shape {tuple(t.shape)}")
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)}; supported: "
                            + ", ".join(_dtype_name(d) for d in dtypes))
        if 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension, shape {tuple(t.shape)}; B, H, T and D must be >= 1")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{nq}, {nk} and {nv} must share one dtype, got {nq} {_dtype_name(q.dtype)}, "
                        f"{nk} {_dtype_name(k.dtype)}, {nv} {_dtype_name(v.dtype)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{nq}, {nk} and {nv} must be on one device, got {nq} on {q.device}, {nk} on {k.device}, "
                         f"{nv} on {v.device}")
    if kernels:
        check_device(q, nq)

    (B, Hq, Tq, D), (Bk, Hkv, Tk, Dk) = q.shape, k.shape
    if k.shape[:-1] != v.shape[:-1] or (k.shape[-1] != v.shape[-1] and not value_dim):
        same = "(B, Hkv, Tk), their head dims may differ" if value_dim else "(B, Hkv, Tk, D)"
        raise ValueError(f"{nk} and {nv} must have the same shape {same}, got {nk} {tuple(k.shape)}, "
                         f"{nv} {tuple(v.shape)}")
    if Bk != B:
        raise ValueError(f"{nq} and {nk} must have the same batch size, got {nq} B={B}, {nk} B={Bk}")
    if Dk != D:
        raise ValueError(f"{nq} and {nk} must have the same head dim, got {nq} D={D}, {nk} D={Dk}")
    if Hq % Hkv != 0:
        raise ValueError(f"{nq}'s head count must be a multiple of {nk}'s (grouped-query attention), "
                         f"got Hq={Hq}, Hkv={Hkv}")
    if kernels and D > MAX_HEAD_DIM:
        raise ValueError(f"head dim D={D} is not supported; accepted: 1 to {MAX_HEAD_DIM}")
    if kernels and v.shape[-1] > MAX_HEAD_DIM:
        raise ValueError(f"{nv}'s head dim Dv={v.shape[-1]} is not supported; accepted: 1 to {MAX_HEAD_DIM}")

    if scale is None:
        scale = 1.0 / math.sqrt(D)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and 0 < scale <= MAX_SCALE):
        raise ValueError(f"scale must be > 0 and at most {MAX_SCALE:g} (larger ones overflow the kernels' fp32 "
                         f"logits, scale * log2(e) * q.k, to inf and NaN), got {scale}")
    if not kernels:
        return q, k, v, float(scale)
    return last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v), float(scale)


def check_varlen_inputs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, scale, read_values=True,
                        value_dim=False):
    """Validate a packed batch: q (total_q, Hq, D), k and v (total_k, Hkv, D) as `check_inputs`
    does, and cu_seqlens_q, cu_seqlens_k (int32 (B + 1,) offsets: 0 first, non-decreasing, ending
    at total_q, total_k) with max_seqlen_q, max_seqlen_k (at least the longest length). The
    offsets are read on the host. Returns q, k, v, cu_seqlens_q, cu_seqlens_k, scale ready for
    the kernels. `read_values=False` checks everything but the offsets' values (no host read)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if isinstance(t, torch.Tensor) and t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (total_tokens, H, D), the packed layout, "
                             f"got shape {tuple(t.shape)}")
    if isinstance(k, torch.Tensor) and isinstance(v, torch.Tensor) and (
            k.shape[:-1] != v.shape[:-1] or (k.shape[-1] != v.shape[-1] and not value_dim)):
        same = "(total_k, Hkv), their head dims may differ" if value_dim else "(total_k, Hkv, D)"
        raise ValueError(f"k and v must have the same shape {same}, got k {tuple(k.shape)}, v {tuple(v.shape)}")
    for name, t in (("q", q), ("k", k)):
        if isinstance(t, torch.Tensor) and t.shape[0] == 0:
            raise ValueError(f"{name} holds no tokens, shape {tuple(t.shape)}: a packed batch needs total_{name} >= 1 "
                             "(sequences of length 0 are fine, but not all of them)")
    as_batch = lambda t: t.transpose(0, 1)[None] if isinstance(t, torch.Tensor) else t  # (1, H, total, D)
    q, k, v, scale = check_inputs(as_batch(q), as_batch(k), as_batch(v), scale, value_dim=value_dim)
    q, k, v = (t[0].transpose(0, 1) for t in (q, k, v))                           # (total, H, D)

    pairs = (("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q), ("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k))
    for name, cu, _, _ in pairs:
        if not isinstance(cu, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor of int32 offsets, got {type(cu).__name__}")
        if cu.dtype != torch.int32 or cu.dim() != 1 or cu.numel() < 2:
            raise ValueError(f"{name} must be a 1-D int32 tensor of B + 1 >= 2 offsets, got "
                             f"{_dtype_name(cu.dtype)} of shape {tuple(cu.shape)}")
        if cu.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {cu.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must hold the same number of sequences, got "
                         f"{cu_seqlens_q.numel() - 1} and {cu_seqlens_k.numel() - 1}")
    pairs = tuple((name, cu, total, as_int(longest, name.replace("cu_seqlens", "max_seqlen")))
                  for name, cu, total, longest in pairs)
    for name, _, total, longest in pairs:  # the grid is sized by max_seqlen: no longer than all the rows
        max_name = name.replace("cu_seqlens", "max_seqlen")
        if not 0 <= longest <= total:
            raise ValueError(f"{max_name} must be an int from 0 to the packed length {total} (the longest "
                             f"sequence's length, which sizes the grid), got {longest!r}")
    offsets = torch.stack([cu_seqlens_q, cu_seqlens_k]).tolist() if read_values else []  # the one host read
    for (name, _, total, longest), values in zip(pairs, offsets):
        if values[0] != 0 or values[-1] != total or any(b < a for a, b in zip(values, values[1:])):
            raise ValueError(f"{name} must start at 0, never decrease and end at the packed length {total}, "
                             f"got {values[:8]}{' ...' if len(values) > 8 else ''}")
        lengths = [b - a for a, b in zip(values, values[1:])]
        max_name = name.replace("cu_seqlens", "max_seqlen")
        if longest < max(lengths):
            raise ValueError(f"{max_name} must be an int >= the longest sequence, {max(lengths)}, got {longest!r}")
    return q, k, v, cu_seqlens_q.contiguous(), cu_seqlens_k.contiguous(), pairs[0][3], pairs[1][3], scale


def check_int32(name, t, shape, device, what=None, want=None):
    """An index tensor (offsets, lengths, a block table): int32, of `shape` (None: any size in
    that dimension), on q's device. `what` says what it holds; `want` replaces the shape as shown."""
    note = f" ({what})" if what else ""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of int32{note}, got {type(t).__name__}")
    if t.dtype != torch.int32 or t.dim() != len(shape) or any(s is not None and n != s for n, s in zip(t.shape, shape)):
        want = want or "(" + ", ".join("any" if s is None else str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name} must be an int32 tensor of shape {want}{note}, got {_dtype_name(t.dtype)} "
                         f"of shape {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} must be on q's device {device}, got {t.device}")


MAX_SOFTCAP = torch.finfo(torch.float32).max / math.log2(math.e) / 2  # softcap * log2(e) in fp32, with room


def _is_int(x):
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_mods(q, softcap=None, sinks=None, alibi_slopes=None, batch=None, kernels=True):
    """Check what models add to plain attention and return it as the kernels take it:
    (softcap as a float, 0.0 for none; sinks (Hq,) fp32 or None; alibi_slopes (Hq,) or (B, Hq)
    fp32 or None). q is (..., Hq, ...) with its heads at dim -3 ((B, Hq, T, D)) or 1 for a packed
    (total, Hq, D) batch; `batch` the number of sequences (B). `kernels=False` checks for the
    reference, which also takes float64 and keeps the tensors as given (softcap None for none)."""
    Hq = q.shape[1]
    if softcap is None:
        cap = 0.0
    elif isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"softcap must be a real number or None, got {type(softcap).__name__}")
    elif not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be finite and > 0 (logits become softcap * tanh(s / softcap)), got {softcap}")
    elif softcap > MAX_SOFTCAP:
        raise ValueError(f"softcap must be at most {MAX_SOFTCAP:.4g}, got {softcap:.4g}: the kernels hold "
                         "softcap * log2(e) in float32 (a cap that large changes no float32 score anyway)")
    else:
        cap = float(softcap)

    def tensor(name, t, shapes):
        if t is None:
            return None
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
        dtypes = SUPPORTED_DTYPES if kernels else SUPPORTED_DTYPES + (torch.float64,)
        if t.dtype not in dtypes:
            raise TypeError(f"{name} has dtype {_dtype_name(t.dtype)}; supported: "
                            + ", ".join(_dtype_name(d) for d in dtypes) + " (the kernels use it in fp32)")
        if tuple(t.shape) not in shapes:
            raise ValueError(f"{name} must have shape " + " or ".join(str(s) for s in shapes)
                             + f" (Hq = {Hq} query heads), got {tuple(t.shape)}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on q's device {q.device}, got {t.device}")
        return t.float().contiguous() if kernels else t

    sinks = tensor("sinks", sinks, [(Hq,)])
    if sinks is not None and kernels:  # a sink of +inf takes all the weight (outputs 0), as 1e30 does; the
        sinks = sinks.clamp(max=1e30)  # kernels scale logits by log2(e), which would take a larger one past fp32
    slopes = tensor("alibi_slopes", alibi_slopes, [(Hq,)] + ([(batch, Hq)] if batch is not None else []))
    if slopes is not None and slopes.requires_grad and torch.is_grad_enabled():
        raise ValueError("alibi_slopes are constants to the kernels (no gradient reaches them): pass "
                         "alibi_slopes.detach(), or compute attention with learned slopes another way")
    return (cap if kernels or cap else None), sinks, slopes


def check_attn_mask(attn_mask, q, k, kernels=True):
    """Check a user's attention mask (torch SDPA's attn_mask) against q (B, Hq, Tq, D) and
    k (B, Hkv, Tk, D) and return it as given (None stays None): a tensor, bool (True attends) or
    float16, bfloat16, float32 (added to the scores), on q's device, broadcastable to the scores
    (B, Hq, Tq, Tk) by torch's rules (aligned from the right; size 1 or the full size). Its values
    are not read (that would be a host sync): +inf or NaN entries give NaN, as in torch's SDPA.
    `kernels=False` checks for the reference, which also takes float64."""
    if attn_mask is None:
        return None
    dtypes = (torch.bool,) + (SUPPORTED_DTYPES if kernels else SUPPORTED_DTYPES + (torch.float64,))
    accepted = "bool (True attends) or " + ", ".join(_dtype_name(d) for d in dtypes[1:]) + " (added to the scores)"
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a torch.Tensor, {accepted}, or None; got {type(attn_mask).__name__}")
    if attn_mask.dtype not in dtypes:
        raise TypeError(f"attn_mask has dtype {_dtype_name(attn_mask.dtype)}; accepted: {accepted}")
    if attn_mask.device != q.device:
        raise ValueError(f"attn_mask must be on q's device {q.device}, got {attn_mask.device}")
    scores = (q.shape[0], q.shape[1], q.shape[2], k.shape[2])                 # (B, Hq, Tq, Tk)
    shape = tuple(attn_mask.shape)
    if len(shape) > 4 or any(m not in (1, n) for m, n in zip(reversed(shape), reversed(scores))):
        raise ValueError(f"attn_mask of shape {shape} does not broadcast to the scores' shape (B, Hq, Tq, Tk) = "
                         f"{scores}: it needs at most 4 dimensions, aligned from the right, each 1 or the full size "
                         "(such as (Tq, Tk), (B, 1, Tq, Tk) or (1, Hq, 1, Tk))")
    return attn_mask


HIDES = -2.4e38  # a float mask entry at or below this is -inf in the kernels' base-2 logits (x * log2(e))


_HIDING = collections.OrderedDict()  # the masks lately read: (id, version) -> (mask, answer)


def hides_a_row_with_finite_values(attn_mask):
    """Whether a float mask has a row that sees only finite entries at or below HIDES (transformers'
    finfo.min): torch's SDPA and eager attention average such a row's values, where the kernels,
    reading those entries as -inf, give zeros. One host read per mask tensor: a model hands every
    layer the same one, so the answer is kept for the last few masks by identity and version (an
    in-place change to the mask is read again)."""
    if attn_mask.dtype == torch.bool:
        return False
    key = (id(attn_mask), attn_mask._version)
    hit = _HIDING.get(key)
    if hit is not None and hit[0] is attn_mask:
        return hit[1]
    hidden = attn_mask <= HIDES                                                # (..., Tq, Tk)
    answer = bool((hidden.all(-1) & ~torch.isneginf(attn_mask).all(-1)).any())
    _HIDING[key] = (attn_mask, answer)
    while len(_HIDING) > 8:
        _HIDING.popitem(last=False)
    return answer


def check_flag(value, name):
    """A flag that must be a bool: "no", 1 or a tensor are refused rather than read as truthy."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__name__})")
    return value


def check_causal(causal, name="causal"):
    return check_flag(causal, name)


def as_int(value, name, what="an int"):
    """An integer argument as a Python int, converted once: a Python or numpy integer, or a 0-d
    integer tensor (read on the host). Bools, floats and other tensors are refused by name."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point() \
            and not value.is_complex() and value.dtype != torch.bool:
        return int(value.item())
    if not _is_int(value):
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    return int(value)


def window_bounds(window, causal):
    """Check a sliding window (left, right) and return it as two ints, -1 for an unbounded side:
    query i sees key j when i - left <= j - (Tk - Tq) <= i + right. None is (-1, -1), no window;
    causal means right = 0, so with causal=True right must be 0 or -1 and becomes 0."""
    check_causal(causal)
    if window is None:
        left, right = -1, -1
    elif isinstance(window, (tuple, list)) and len(window) == 2 and all(_is_int(w) and w >= -1 for w in window):
        left, right = int(window[0]), int(window[1])
    else:
        raise ValueError(f"window must be None or (left, right), two ints >= -1 (-1: unbounded), got {window!r}")
    if causal:
        if right > 0:
            raise ValueError(f"window={window!r} has right={right} > 0, but causal attention means right = 0 "
                             "(a window that looks ahead needs causal=False)")
        right = 0
    return left, right


def autocast_inputs(*tensors):
    """Inputs as torch's SDPA sees them under autocast: inside `torch.autocast(device_type, dtype)`
    enabled for their device, floating tensors other than float64 are cast to that dtype (SDPA
    is one of autocast's lower-precision ops), so the kernels return what SDPA returns."""
    device_type = tensors[0].device.type if isinstance(tensors[0], torch.Tensor) else None
    if device_type not in ("cuda", "cpu") or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in tensors)


def input_problem(q, k, v, scale=None, value_dim=False):
    """What `check_inputs` refuses in these inputs, as its message, or None: for callers that fall
    back to another implementation instead of raising (the SDPA drop-in, transformers)."""
    try:
        check_inputs(q, k, v, scale, value_dim=value_dim)
    except (TypeError, ValueError) as e:
        return str(e)
    return None
