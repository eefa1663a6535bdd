"""
torch's `scaled_dot_product_attention` on the kernels: the same signature and semantics, and a
context manager that makes unchanged model code use it.

    from . import patch_sdpa
    with patch_sdpa() as calls:      # F.scaled_dot_product_attention now runs the kernels
        loss = model(x).sum()
    print(calls)                     # "12 calls: 10 on the kernels, 2 fell back to torch (2 ...)"

What runs on the kernels: whatever passes their shared input check (`kernels.checks`): 4-D
(B, H, T, D) inputs of one float16 / bfloat16 / float32 dtype on a CUDA device (or the CPU under
the interpreter), head dim <= 256, any scale > 0; is_causal or not; grouped-query heads when
enable_gqa=True. torch's `is_causal` aligns the mask top-left
(query i sees keys 0..i) while the kernels' `causal` aligns it bottom-right; the two agree when
Tq == Tk, and otherwise the call is rewritten so the kernels compute torch's answer (see
`_on_kernels`). Everything else falls back to torch's own function, which also raises torch's
own errors: inputs the check refuses (counted by its message). dropout_p runs on the kernels,
which draw their own dropout (from a seed taken from torch's generator).

An `attn_mask` (bool, True attends, or a float mask of the query's dtype added to the scaled
scores; any shape that broadcasts to (B, H, Tq, Tk)) runs on the kernels, the float mask's
gradient included; a row the mask hides entirely returns zeros, as torch's own function does. A
float mask is read once on the host (once per mask tensor: a model's layers share one): one with
a row that sees only finite entries at or below -2.4e38 (finfo.min, which torch averages and the
kernels read as -inf) goes to torch. A mask with `is_causal=True` (which some torch versions
refuse and others combine with a top-left causal mask) and a float mask of another dtype than
the query's (which torch refuses) go to torch.

A decode step goes to the split-KV decode kernel (`kernels.decode`, flash-decoding) under
impl="auto": a few queries (Tq <= DECODE_MAX_QUERIES = 16) against more keys (Tk > Tq), with
is_causal=False, no attn_mask, no dropout and no gradient wanted (`decodes`). That is what
transformers' "sdpa" path sends for a decode step against a DynamicCache: Tq = 1 new token,
is_causal=False (torch's is_causal aligns top-left, so one query with is_causal=True would see key
0 alone) and no mask. For one query, is_causal=False and bottom-right causal are the same thing,
since it sits at the last key; for several it means what it says, each query sees every key, which
is the decode kernel's causal=False. The dense k, v (B, Hkv, Tk, D) are the cache, every sequence's
length Tk (an int: nothing read on the host). Why there: the decode kernel packs a k/v head's
query heads x the new tokens into one tile's rows (so each K/V tile is read once per k/v head,
not once per query head), and splits the keys across programs past 256 keys, where flash would
give a GPU only B x Hq programs of one row each. 16 tokens x 4 query heads fill its 64 rows; more
queries are a prefill, which flash's row blocks serve. A mask is not expressible as lengths
without reading it, and the decode kernel has no backward and no dropout: those stay on flash or
fused. `SdpaCalls.decode` counts these calls (they are among `kernel`'s).
"""

import collections
import contextlib
import warnings

import torch
import torch.nn.functional as F

from .checks import autocast_inputs, check_attn_mask, hides_a_row_with_finite_values, input_problem
from .decode import decode_attention
from .dispatch import IMPLS, attention
from .fused import max_seqlen

_torch_sdpa = F.scaled_dot_product_attention  # taken at import, before any patch

DECODE_MAX_QUERIES = 16  # a decode step's new tokens (or a draft's): a k/v head's group x these fill one tile


def decodes(Tq, Tk):
    """Whether Tq queries against Tk keys are a decode step, which the split-KV decode kernel
    serves: a few queries with more keys behind them (a cache)."""
    return Tq <= DECODE_MAX_QUERIES and Tk > Tq


def wants_grad(*tensors):
    """Whether autograd will want a gradient of any of these (the decode kernel has no backward)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class SdpaCalls:
    """What `scaled_dot_product_attention` did: calls on the kernels, and fallbacks by reason."""

    def __init__(self):
        self.kernel = 0
        self.decode = 0  # of `kernel`, those on the decode kernel
        self.fallback = collections.Counter()

    def __repr__(self):
        total = self.kernel + sum(self.fallback.values())
        why = ", ".join(f"{n} {reason}" for reason, n in self.fallback.most_common())
        decoding = f" ({self.decode} on the decode kernel)" if self.decode else ""
        return (f"{total} calls: {self.kernel} on the kernels{decoding}, {sum(self.fallback.values())} fell back to "
                f"torch" + (f" ({why})" if why else ""))


def _refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, impl):
    """Why the kernels cannot run this call, or None when they can."""
    if attn_mask is not None:
        if is_causal:  # torch's to decide: an error in some versions, a top-left causal mask too in others
            return "attn_mask with is_causal"
        if not isinstance(attn_mask, torch.Tensor) or (attn_mask.dtype != torch.bool
                                                       and attn_mask.dtype != query.dtype):
            return "attn_mask neither bool nor the query's dtype"  # torch's own error
    if not 0 <= dropout_p < 1:  # torch's own error
        return "dropout_p outside [0, 1)"
    # the kernels' own input check; v's head dim may differ from q's (as torch allows) where flash runs
    problem = input_problem(query, key, value, scale, value_dim=impl in ("auto", "flash"))
    if problem is not None:
        return problem
    Hq, Hkv, Tk, D = query.shape[1], key.shape[1], key.shape[2], query.shape[3]
    if Hq != Hkv and not enable_gqa:
        return "head counts differ without enable_gqa"
    if impl == "fused" and Tk > max_seqlen(D, query.dtype):
        return "Tk beyond fused's row limit"
    if attn_mask is not None:
        try:
            check_attn_mask(attn_mask, query, key)
        except (TypeError, ValueError) as e:  # a shape that does not broadcast: torch's own error
            return str(e).split(":")[0]
        if hides_a_row_with_finite_values(attn_mask):  # a host read, for float masks only
            return "attn_mask hides a row with finite values (torch averages it)"
    return None


def _on_kernels(query, key, value, is_causal, scale, impl, dropout_p=0.0, attn_mask=None):
    if attn_mask is not None:  # never with is_causal (that goes to torch)
        return attention(query, key, value, causal=False, scale=scale, impl=impl, dropout_p=dropout_p,
                         attn_mask=attn_mask)
    run = lambda q, k, v, causal: attention(q, k, v, causal=causal, scale=scale, impl=impl, dropout_p=dropout_p)
    Tq, Tk = query.shape[-2], key.shape[-2]
    if not is_causal or Tq == Tk:
        return run(query, key, value, is_causal)
    if Tq < Tk:  # top-left: row i sees keys 0..i, so keys from Tq on are seen by no row
        return run(query, key[:, :, :Tq], value[:, :, :Tq], True)
    # Tq > Tk: rows below Tk see keys 0..i (a square causal block); the rows after see every key
    head = run(query[:, :, :Tk], key, value, True)                                     # (B, H, Tk, D)
    tail = run(query[:, :, Tk:], key, value, False)                                    # (B, H, Tq - Tk, D)
    return torch.cat([head, tail], dim=2)                                              # (B, H, Tq, D)


def _as_4d(query, key, value, attn_mask):
    """torch's SDPA takes (..., L, E) inputs with any number of leading dimensions; the kernels
    take (B, H, T, D). 3-D inputs (N, L, E) become one head each, (N, 1, L, E); more than 4
    dimensions, (*batch, H, L, E), have their batch dimensions flattened, (prod(batch), H, L, E)
    (views, no copy), the mask broadcast over them the same way. Returns the 4-D inputs and the
    function that gives the output back its shape, or None where the leading dimensions of q, k
    and v differ (torch's to answer)."""
    dims = query.dim()
    if not all(isinstance(t, torch.Tensor) for t in (query, key, value)) or dims < 3 or dims == 4 or \
            key.dim() != dims or value.dim() != dims or not query.shape[:-3] == key.shape[:-3] == value.shape[:-3]:
        return None
    if dims == 3:
        lead, heads = query.shape[:1], (1, 1)
        as4 = lambda t: t.unsqueeze(1)                                            # (N, 1, T, E)
    else:
        lead, heads = query.shape[:-3], (query.shape[-3], key.shape[-3])
        as4 = lambda t: t.reshape(-1, *t.shape[-3:])                              # (prod(batch), H, T, E)
    if isinstance(attn_mask, torch.Tensor) and attn_mask.dim() > 2:
        if attn_mask.dim() > dims:
            return None
        full = (*lead, *((heads[0],) if dims > 3 else ()), query.shape[-2], key.shape[-2])
        attn_mask = attn_mask.expand(full) if dims > 3 else attn_mask.expand(full).unsqueeze(1)
        attn_mask = attn_mask if dims == 3 else attn_mask.reshape(-1, *attn_mask.shape[-3:])
    restore = lambda out: out.squeeze(1) if dims == 3 else out.reshape(*lead, *out.shape[1:])
    return as4(query), as4(key), as4(value), attn_mask, restore


def _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, impl, calls):
    if not isinstance(is_causal, bool):  # as torch's own function refuses it
        raise TypeError(f"scaled_dot_product_attention(): argument 'is_causal' must be bool, not "
                        f"{type(is_causal).__name__}")
    # torch's SDPA is an autocast op: the same dtypes out, a float mask cast with the inputs
    query, key, value, attn_mask = autocast_inputs(query, key, value, attn_mask)
    try:
        flat = _as_4d(query, key, value, attn_mask)
    except RuntimeError:  # a mask that does not broadcast: torch's own error, below
        flat = None
    if flat is not None:
        *inputs, restore = flat
        return restore(_sdpa(*inputs, dropout_p, is_causal, scale, enable_gqa, impl, calls))
    why = _refusal(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, impl)
    if why is not None:
        if calls is not None:
            calls.fallback[why] += 1
        return _torch_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                           scale=scale, enable_gqa=enable_gqa)
    decode = (impl == "auto" and not is_causal and attn_mask is None and dropout_p == 0
              and decodes(query.shape[-2], key.shape[-2]) and not wants_grad(query, key, value)
              and value.shape[-1] == query.shape[-1])  # the decode kernel takes one head dim
    if calls is not None:
        calls.kernel += 1
        calls.decode += decode
    if decode:  # the cache is the dense keys, every sequence Tk long; each query sees all of them
        return decode_attention(query, key, value, key.shape[-2], scale=scale, causal=False, check_seqlens=False)
    return _on_kernels(query, key, value, is_causal, scale, impl, dropout_p, attn_mask)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                                 enable_gqa=False):
    """`torch.nn.functional.scaled_dot_product_attention`, run on the kernels (chosen by shape,
    as `attention(impl="auto")`) where they support the call, and by torch otherwise.

    Semantics are torch's, including `is_causal`'s top-left alignment when Tq != Tk (which the
    kernels' own `causal` does not share) and the error for differing head counts without
    `enable_gqa`. See the module docstring for what falls back.
    """
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, "auto", None)


@contextlib.contextmanager
def patch_sdpa(impl="auto"):
    """Within the block, `torch.nn.functional.scaled_dot_product_attention` is this module's
    drop-in, running kernel `impl` ("auto", "fused", "flash" or "reference"). Yields an
    `SdpaCalls` record that counts the calls run on the kernels and those that fell back, by
    reason; print it afterwards. Code that looks the function up when called (`F.scaled_dot_
    product_attention(...)`, as nanoGPT and Hugging Face's "sdpa" do) is patched; a name bound
    before the block (`from torch.nn.functional import scaled_dot_product_attention`) is not.
    On leaving the block it warns when no call reached the function, or when calls fell back,
    with the reasons.
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    calls = SdpaCalls()

    def patched(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, impl, calls)

    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = patched
    try:
        yield calls
    finally:
        F.scaled_dot_product_attention = previous
    # -- say when the block did not do what it was for (not after an exception: that says enough)
    if calls.kernel == 0 and not calls.fallback:
        warnings.warn("patch_sdpa: no call reached F.scaled_dot_product_attention inside the block: this model "
                      "writes its attention another way (for nanoGPT's, minGPT's or the lecture's modules use "
                      "swap_attention(model))", stacklevel=3)
    elif calls.fallback:
        warnings.warn(f"patch_sdpa: {calls}", stacklevel=3)
