"""
The kernels as a Hugging Face transformers attention implementation.

    from .hf import register_transformers
    name = register_transformers()                  # "attention_kernels"; register_transformers(impl="flash") ...
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)  # or set_attn_implementation

`register_transformers` registers two functions under one name: `kernel_attention_forward` in
transformers' `AttentionInterface` and `kernel_mask` in its `AttentionMaskInterface`. The mask
function decides, once per forward, whether the kernels can reproduce the model's mask exactly;
the attention function runs the kernels when they can and transformers' own SDPA attention when
they cannot. A mask is never dropped.

On the kernels (one call per layer):
    - a plain causal mask whose queries end where the keys end (no cache, or a DynamicCache:
      prefill, chunked prefill, decoding), where the kernels' bottom-right alignment is exact;
    - the same with padding, left or right (a 2D mask whose valid keys are one run per row): the
      valid query rows and keys are packed, run through `flash_attention_varlen` in one call, and
      scattered back with zeros in the padded query rows, as FlashAttention-2's unpad/pad gives.
      The fused kernel has no packed form, so impl="fused" runs flash here too; impl="reference"
      runs `reference.varlen_attention` on the same packed tensors. The packing (holes check,
      gather indices, cu_seqlens) costs one host sync, once per forward: every layer gets the one
      mask tensor `kernel_mask` made, and the first layer keeps its packing for the others (the
      offsets are built right by construction, so the varlen call skips its own host check).
    - no mask and is_causal=False (e.g. an encoder without padding);
    - a sliding window at least as long as the keys (it masks nothing).
On transformers' `sdpa_attention_forward`, counted in `CALLS` with the reason:
    - every other mask, which `kernel_mask` builds with transformers' `sdpa_mask`: a shorter
      sliding window, chunked, packed sequences, or/and overlays, a StaticCache (tensor offsets,
      keys past the queries), a mask the model asks to have materialised (allow_is_causal_skip=False,
      e.g. Falcon adds ALiBi onto it), a custom 4D mask from the user, a padding mask with holes;
    - dropout > 0, a position bias, and inputs the kernels do not take (a dtype other than fp16,
      bf16 and fp32, head dim > 256, CPU tensors without Triton's interpreter).
SDPA always gets the mask spelled out in 4D: it reads no mask as top-left causal, where the
kernels and transformers' masks align bottom-right. Attention sinks (`s_aux`, `sinks`) and
`softcap` raise: neither the kernels nor SDPA have them. Importing this module does not import
transformers; `register_transformers` does.
"""

import functools
from collections import Counter
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .checks import input_problem
from .dispatch import IMPLS, attention
from .flash import flash_attention_varlen

# How many attention calls ran on the kernels ("kernels") and how many went to SDPA and why
# ("sdpa: <reason>"), in this process. Tests read it to prove which path ran.
CALLS = Counter()

# transformers switches on these substrings of an implementation's name (flash-attention code
# paths, the SDPA dispatch check, flex, paged attention, a kernel repo on the Hub).
_RESERVED_IN_NAMES = ("flash", "sdpa", "flex_attention", "paged", "/", ":")

# The padding mask `kernel_mask` returned last, and its packing once a layer has made it (or None):
# transformers hands that one tensor to every layer of a forward, so the later layers reuse it.
_last_padding = (None, None)


def register_transformers(name="attention_kernels", impl="auto"):
    """Register the kernels with transformers under `name` and return `name`; then
    `attn_implementation=name` (in `from_pretrained`, `from_config` or `set_attn_implementation`)
    runs them. impl: "auto", "fused", "flash" or "reference", as in `kernels.attention`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not isinstance(name, str) or name == "eager" or any(s in name for s in _RESERVED_IN_NAMES):
        raise ValueError(f"name must be a string without {', '.join(map(repr, _RESERVED_IN_NAMES))} and not 'eager' "
                         f"(transformers gives those names their own code paths); got {name!r}")
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface  # transformers 5
    except ImportError as e:
        raise ImportError(f"register_transformers needs Hugging Face transformers 5 or newer ({e}); install it "
                          "with the project's extra: pip install -e '.[hf]'") from e

    AttentionInterface.register(name, functools.partial(kernel_attention_forward, impl=impl))
    AttentionMaskInterface.register(name, kernel_mask)
    return name


# ----------------------------------------------------------------------------- the mask


def kernel_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, allow_is_causal_skip=True, **kwargs):
    """The mask transformers hands to `kernel_attention_forward`, with the signature of its
    `sdpa_mask`. None (plain causal, no padding) or the (B, kv_length) bool padding mask where the
    kernels reproduce the mask exactly; otherwise `sdpa_mask`'s 4D bool mask."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    mask_function = mask_function or causal_mask_function
    # The kernels align causal masks bottom-right: exact when the queries end where the keys end.
    # A StaticCache gives tensor offsets, and its keys run past the queries.
    aligned = (isinstance(q_offset, int) and isinstance(kv_offset, int)
               and q_offset + q_length == kv_offset + kv_length)
    if (mask_function is causal_mask_function and allow_is_causal_skip and aligned
            and (attention_mask is None or attention_mask.shape[-1] == kv_offset + kv_length)):
        if attention_mask is None:
            return None
        padding = attention_mask[:, kv_offset:].bool()  # (B, kv_length)
        if padding.all():
            return None
        global _last_padding
        _last_padding = (padding, None)
        return padding

    # sdpa_mask returns None to mean "SDPA's is_causal", which aligns top-left; the kernels would
    # read None as bottom-right. The two agree only for one query or as many queries as keys.
    if q_length != 1 and q_length != kv_length:
        allow_is_causal_skip = False
        kwargs["allow_is_bidirectional_skip"] = False
    return sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)


# ----------------------------------------------------------------------------- the attention


def kernel_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, impl="auto",
                             **kwargs):
    """transformers' attention-function signature: query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D)
    (not repeated for grouped-query attention), attention_mask None, the (B, Tk) bool padding mask
    or a 4D mask; returns ((B, Tq, Hq, D) contiguous, None)."""
    for kwarg in ("softcap", "s_aux", "sinks"):
        if kwargs.get(kwarg) is not None:
            raise ValueError(f"{kwarg!r} is not supported by the attention kernels, nor by SDPA; "
                             "use attn_implementation='eager' for this model")
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    B, Tq, Tk = query.shape[0], query.shape[-2], key.shape[-2]
    window = kwargs.get("sliding_window")
    if window is not None and Tk <= window:
        window = None  # every key is inside the window: it masks nothing

    valid = attention_mask if attention_mask is not None and attention_mask.ndim == 2 else None
    if valid is not None and (valid.dtype != torch.bool or valid.shape != (B, Tk)):
        raise ValueError(f"a 2D attention mask must be the (B, Tk) = {(B, Tk)} bool padding mask that kernel_mask "
                         f"gives, got {tuple(valid.shape)} {valid.dtype}")
    reason = _why_not_kernels(query, key, value, attention_mask, dropout, scaling, window, kwargs)
    if reason is None and valid is not None:
        packing = _packing(valid, Tq)
        if packing.holes:
            reason = "padding mask with holes"

    if reason is not None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        CALLS[f"sdpa: {reason}"] += 1
        if attention_mask is None or valid is not None:
            # SDPA reads no mask as top-left causal and knows no 2D padding mask nor window: spell out
            # the mask meant.
            attention_mask = _dense_mask(valid, Tq, Tk, causal, window, query.device)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)

    CALLS["kernels"] += 1
    if valid is not None:
        return _attention_packed(query, key, value, packing, causal, scaling, impl), None
    out = attention(query, key, value, causal=causal, scale=scaling, impl=impl)  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None                     # (B, Tq, Hq, D)


def _why_not_kernels(query, key, value, attention_mask, dropout, scaling, window, kwargs):
    """Why this call must go to SDPA, or None when the kernels can run it exactly."""
    if attention_mask is not None and attention_mask.ndim != 2:
        return f"{attention_mask.ndim}D {str(attention_mask.dtype).replace('torch.', '')} mask"
    if window is not None:
        return "sliding window"
    if dropout > 0:
        return "dropout"
    if kwargs.get("position_bias") is not None:
        return "position bias"
    return input_problem(query, key, value, scaling)  # the kernels' own input check


def _dense_mask(valid, Tq, Tk, causal, window, device):
    """The (B or 1, 1, Tq, Tk) bool mask, True where query i may see key j, in transformers'
    semantics: query i sits at key position i + Tk - Tq (bottom-right); a causal window of W keeps
    keys with j > i + Tk - Tq - W, a bidirectional one keys at most W away."""
    keys = torch.arange(Tk, device=device)                          # (Tk,)
    rows = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)     # (Tq, 1)
    allowed = keys <= rows if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if window is not None:
        allowed = allowed & ((keys > rows - window) if causal else ((keys - rows).abs() <= window))
    allowed = allowed[None, None]                                   # (1, 1, Tq, Tk)
    return allowed if valid is None else allowed & valid[:, None, None, :]  # (B, 1, Tq, Tk)


# ----------------------------------------------------------------------------- padded batches


class Packing(NamedTuple):
    """A padded batch as packed sequences (FlashAttention-2's unpad): sequence b is row b's valid
    keys, and its query rows that sit on them (query i sits at key position i + Tk - Tq)."""
    Tq: int
    holes: bool              # some row's valid keys are not one run: bottom-right alignment breaks
    q_rows: tuple            # (b, i) of each valid query row, two (total_q,) int64 tensors
    k_rows: tuple            # (b, j) of each valid key, two (total_k,) int64 tensors
    cu_seqlens_q: Tensor     # (B + 1,) int32
    cu_seqlens_k: Tensor     # (B + 1,) int32
    max_seqlen_q: int
    max_seqlen_k: int


def _pack(valid, Tq):
    """The packing of the (B, Tk) bool padding mask `valid` for Tq queries, with one host sync."""
    Tk = valid.shape[1]
    keys = torch.arange(Tk, device=valid.device)                     # (Tk,)
    start = valid.int().argmax(-1)                                   # (B,) first valid key, 0 if none
    len_k = valid.sum(-1)                                            # (B,)
    run = (keys >= start[:, None]) & (keys < (start + len_k)[:, None])  # (B, Tk) one run from start
    at = torch.arange(Tq, device=valid.device) + (Tk - Tq)           # (Tq,) each query's key position
    valid_q = valid[:, at.clamp(min=0)] & (at >= 0)                  # (B, Tq)
    len_q = valid_q.sum(-1)                                          # (B,)
    # -- the one host sync: what decides the path, and the sizes the packed tensors and the grid need
    holes, total_q, total_k, max_q, max_k = torch.stack(
        [(run != valid).any().long(), len_q.sum(), len_k.sum(), len_q.max(), len_k.max()]).tolist()
    cu = lambda lengths: F.pad(lengths.cumsum(0), (1, 0)).int()      # (B + 1,)
    rows = lambda mask, n: torch.nonzero_static(mask, size=n).unbind(1)  # sizes known: no sync
    return Packing(Tq, bool(holes), rows(valid_q, total_q), rows(valid, total_k), cu(len_q), cu(len_k), max_q, max_k)


def _packing(valid, Tq):
    """`_pack(valid, Tq)`, made once per forward for the mask `kernel_mask` returned last."""
    global _last_padding
    mask, packing = _last_padding
    if valid is not mask:  # a mask from elsewhere (a direct call): nothing to share it with
        return _pack(valid, Tq)
    if packing is None or packing.Tq != Tq:
        packing = _pack(valid, Tq)
        _last_padding = (mask, packing)
    return packing


def _attention_packed(q, k, v, packing, causal, scale, impl):
    """Padded batches in one call: gather the valid query rows and keys into packed tensors, run
    the varlen kernel, scatter back. Each sequence's queries end where its keys end, so the
    kernel's bottom-right alignment is exact; the padded query rows are zeros, as FlashAttention-2's
    unpad/pad gives. Indexing and index_put out of place keep autograd flowing to q, k and v."""
    B, Hq, Tq, D = q.shape
    out = q.new_zeros(B, Tq, Hq, D)                                  # (B, Tq, Hq, D)
    if packing.q_rows[0].numel() == 0:  # every query row is padding (the kernels take no empty tensor)
        return out
    q = q.transpose(1, 2)[packing.q_rows]                            # (total_q, Hq, D)
    k, v = (x.transpose(1, 2)[packing.k_rows] for x in (k, v))       # (total_k, Hkv, D)
    cu_q, cu_k = packing.cu_seqlens_q, packing.cu_seqlens_k
    if impl == "reference":
        o = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, scale=scale)
    else:  # the fused kernel has no packed form: flash for "auto", "flash" and "fused"
        o = flash_attention_varlen(q, k, v, cu_q, cu_k, packing.max_seqlen_q, packing.max_seqlen_k,
                                   causal=causal, scale=scale, check_seqlens=False)  # built right by _pack
    return out.index_put(packing.q_rows, o)                          # (B, Tq, Hq, D)
