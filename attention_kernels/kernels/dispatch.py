"""
`attention`, the entry point most users call: it runs the kernel asked for, or picks one by shape.
"""

import torch

from .. import reference
from .checks import autocast_inputs, check_attn_mask, check_flag, check_inputs, check_mods, window_bounds
from . import mods
from .dropout import check_dropout
from .flash import flash_attention
from .fused import fused_attention, max_seqlen

IMPLS = ("auto", "reference", "fused", "flash")


def choose_impl(head_dim, Tk, dtype):
    """The kernel `impl="auto"` runs for this head dim, key length and dtype.

    Until it is measured on a GPU, the rule follows what fits on chip: the fused kernel keeps a
    whole row of keys in registers, and compiling it for an H100 (`python -m attention_kernels.benchmarks.onchip`)
    shows no register spills for 16-bit rows up to 256 keys at D <= 64, nor for fp32 rows up to
    128 keys at D <= 32. There "auto" runs fused (one pass, exact softmax); everywhere else it
    runs flash, which has no length limit.
    """
    if dtype.itemsize == 2:
        short = Tk <= 256 and head_dim <= 64
    else:
        short = Tk <= 128 and head_dim <= 32
    return "fused" if short and Tk <= max_seqlen(head_dim, dtype) else "flash"


def attention(q, k, v, causal=True, scale=None, impl="auto", return_lse=False, window=None, softcap=None, sinks=None,
              alibi_slopes=None, dropout_p=0.0, dropout_seed=None, attn_mask=None, mask_mod=None, score_mod=None,
              block_map=None):
    """Causal (by default) scaled dot-product attention with the semantics of
    `reference.attention`: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0.

    impl: "auto" picks "fused" or "flash" by shape (see `choose_impl`), and "flash" for a
    `window` that hides a key, which the fused kernel does not take; "reference" runs the naive
    PyTorch reference (any device and dtype, memory quadratic in T); "fused" and "flash" force a
    kernel ("fused" refuses such a window). Every other keyword is `flash_attention`'s, passed to
    the kernel chosen, which takes them all: return_lse, window, softcap, sinks, alibi_slopes,
    dropout_p, dropout_seed (fused and flash drop the same weights for a seed; "reference" drops
    weights with torch's own generator, seeded by it), attn_mask ("auto" chooses by shape as
    without one, docs/masks.md), and mask_mod, score_mod and block_map, which only flash takes
    ("auto" runs flash with any of them, "fused" refuses them; "reference" runs a function's
    PyTorch twin, `torch_fn`, and refuses one without it).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    check_flag(return_lse, "return_lse")
    left, right = window_bounds(window, causal)  # checks causal too
    windowed = (left, right) != (-1, 0 if causal else -1)  # some key hidden beyond what causal hides
    value_dim = isinstance(q, torch.Tensor) and isinstance(v, torch.Tensor) and v.shape[-1:] != q.shape[-1:]
    flash_only = mask_mod is not None or score_mod is not None or block_map is not None or value_dim
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    if impl == "auto":
        q, k, v, scale = check_inputs(q, k, v, scale, value_dim=True)  # the shapes must be sound before choosing
        impl = "flash" if windowed or flash_only else choose_impl(q.shape[-1], k.shape[-2], q.dtype)
    if impl == "fused" and windowed:
        raise ValueError(f"attention(impl='fused'): fused_attention takes no window, got window={window!r}; "
                         "use impl='flash' or 'auto'")
    if impl == "fused" and flash_only:
        named = [n for n, x in (("mask_mod", mask_mod), ("score_mod", score_mod), ("block_map", block_map),
                                ("v of another head dim than q's", value_dim or None)) if x is not None]
        raise ValueError(f"attention(impl='fused'): fused_attention takes no {', '.join(named)}; use impl='flash' or "
                         "'auto'")
    if impl == "reference":  # the same check, but float64 and any device are the reference's to take
        q, k, v, scale = check_inputs(q, k, v, scale, kernels=False, value_dim=True)
        softcap, sinks, alibi_slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=q.shape[0], kernels=False)
        attn_mask = check_attn_mask(attn_mask, q, k, kernels=False)
        keep = None
        if dropout_p > 0:
            g = torch.Generator(q.device).manual_seed(seed)
            keep = torch.rand(*q.shape[:3], k.shape[2], generator=g, device=q.device) >= dropout_p  # (B, Hq, Tq, Tk)
        spec = dict(causal=causal, scale=scale, window=(left, right), softcap=softcap, sinks=sinks,
                    alibi_slopes=alibi_slopes, attn_mask=attn_mask, **_torch_twins(mask_mod, score_mod, q))
        out = reference.attention(q, k, v, dropout_p=dropout_p, dropout_mask=keep, **spec)  # (B, Hq, Tq, D)
        return (out, reference.logsumexp(q, k, **spec)) if return_lse else out             # lse (B, Hq, Tq)
    kernel, kw = ((fused_attention, {}) if impl == "fused" else
                  (flash_attention, dict(window=window, mask_mod=mask_mod, score_mod=score_mod, block_map=block_map)))
    return kernel(q, k, v, causal=causal, scale=scale, return_lse=return_lse, softcap=softcap, sinks=sinks,
                  alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_seed=seed if dropout_p > 0 else None,
                  attn_mask=attn_mask, **kw)


def _torch_twins(mask_mod, score_mod, q):
    """The reference's PyTorch twins of a call's mask and score functions (`mods.MaskMod.torch_fn`)."""
    mask_mod, score_mod = mods.check_mods(mask_mod, score_mod, q)
    for name, f in (("mask_mod", mask_mod), ("score_mod", score_mod)):
        if f is not None and f.torch_fn is None:
            raise ValueError(f"attention(impl='reference') runs {name}'s PyTorch twin, and this {name} has none: give "
                             f"{'MaskMod' if name == 'mask_mod' else 'ScoreMod'}(..., torch_fn=...)")
    return dict(mask_mod=mask_mod.torch_fn if mask_mod else None, score_mod=score_mod.torch_fn if score_mod else None)
