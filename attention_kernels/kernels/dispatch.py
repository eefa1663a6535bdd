"""
`attention`, the entry point most users call: it runs the kernel asked for, or picks one by shape.
"""

import torch

from .. import reference
from .checks import autocast_inputs, check_attn_mask, check_causal, check_inputs, check_mods
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


def attention(q, k, v, causal=True, scale=None, impl="auto", softcap=None, sinks=None, alibi_slopes=None,
              dropout_p=0.0, dropout_seed=None, attn_mask=None):
    """Causal (by default) scaled dot-product attention with the semantics of
    `reference.attention`: q (B, Hq, Tq, D); k, v (B, Hkv, Tk, D) with Hq % Hkv == 0.

    impl: "auto" picks "fused" or "flash" by shape (see `choose_impl`); "reference" runs the
    naive PyTorch reference (any device and dtype, memory quadratic in T); "fused" and "flash"
    force a kernel. softcap, sinks, alibi_slopes, dropout_p, dropout_seed as in
    `flash_attention` (fused and flash drop the same weights for a seed); "reference" drops
    weights with torch's own generator. `attn_mask` as in `flash_attention`, taken by every impl;
    "auto" chooses by shape as without one (docs/masks.md).
    """
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    check_causal(causal)
    dropout_p, seed = check_dropout(dropout_p, dropout_seed)
    q, k, v, attn_mask = autocast_inputs(q, k, v, attn_mask)
    if impl == "auto":
        q, k, v, scale = check_inputs(q, k, v, scale)  # the shapes must be sound before choosing by them
        impl = choose_impl(q.shape[-1], k.shape[-2], q.dtype)
    if impl == "reference":  # the same check, but float64 and any device are the reference's to take
        q, k, v, scale = check_inputs(q, k, v, scale, kernels=False)
        softcap, sinks, alibi_slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=q.shape[0], kernels=False)
        attn_mask = check_attn_mask(attn_mask, q, k, kernels=False)
        keep = None
        if dropout_p > 0:
            g = torch.Generator(q.device).manual_seed(seed)
            keep = torch.rand(*q.shape[:3], k.shape[2], generator=g, device=q.device) >= dropout_p  # (B, Hq, Tq, Tk)
        return reference.attention(q, k, v, causal=causal, scale=scale, softcap=softcap, sinks=sinks,
                                   alibi_slopes=alibi_slopes, dropout_p=dropout_p, dropout_mask=keep,
                                   attn_mask=attn_mask)
    kernel = fused_attention if impl == "fused" else flash_attention
    return kernel(q, k, v, causal=causal, scale=scale, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes,
                  dropout_p=dropout_p, dropout_seed=seed if dropout_p > 0 else None, attn_mask=attn_mask)
