"""
The kernels as a Hugging Face transformers attention implementation.

    from kernels.hf import register_transformers
    name = register_transformers()                  # "attention_kernels"; register_transformers(impl="flash") ...
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)  # or set_attn_implementation

`register_transformers` registers two functions under one name: `kernel_attention_forward` in
transformers' `AttentionInterface` and `kernel_mask` in its `AttentionMaskInterface`. The mask
function decides, once per forward, whether the kernels can reproduce the model's mask exactly;
the attention function runs the kernels when they can and transformers' own SDPA attention when
they cannot. A mask is never dropped.

On the kernels (one call, or one call per sequence of a padded batch):
    - a plain causal mask whose queries end where the keys end (no cache, or a DynamicCache:
      prefill, chunked prefill, decoding), where the kernels' bottom-right alignment is exact;
    - the same with padding, left or right (a 2D mask whose valid keys are one run per row);
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

import torch
import torch.nn.functional as F

from kernels.checks import input_problem
from kernels.dispatch import IMPLS, attention

# How many attention calls ran on the kernels ("kernels") and how many went to SDPA and why
# ("sdpa: <reason>"), in this process. Tests read it to prove which path ran.
CALLS = Counter()

# transformers switches on these substrings of an implementation's name (flash-attention code
# paths, the SDPA dispatch check, flex, paged attention, a kernel repo on the Hub).
_RESERVED_IN_NAMES = ("flash", "sdpa", "flex_attention", "paged", "/", ":")


def register_transformers(name="attention_kernels", impl="auto"):
    """Register the kernels with transformers under `name` and return `name`; then
    `attn_implementation=name` (in `from_pretrained`, `from_config` or `set_attn_implementation`)
    runs them. impl: "auto", "fused", "flash" or "reference", as in `kernels.attention`."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not isinstance(name, str) or name == "eager" or any(s in name for s in _RESERVED_IN_NAMES):
        raise ValueError(f"name must be a string without {', '.join(map(repr, _RESERVED_IN_NAMES))} and not 'eager' "
                         f"(transformers gives those names their own code paths); got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

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
        return None if padding.all() else padding

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
        start = valid.int().argmax(-1)                                # (B,) first valid key, 0 if none
        end = start + valid.sum(-1)                                   # (B,)
        keys = torch.arange(Tk, device=valid.device)
        if not torch.equal((keys >= start[:, None]) & (keys < end[:, None]), valid):
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
    if valid is None:
        out = attention(query, key, value, causal=causal, scale=scaling, impl=impl)  # (B, Hq, Tq, D)
    else:
        out = _attention_per_sequence(query, key, value, start.tolist(), end.tolist(), causal, scaling, impl)
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


def _attention_per_sequence(q, k, v, starts, ends, causal, scale, impl):
    """Padded batches: sequence b's valid keys are [starts[b], ends[b]). Run the kernel on those
    keys and the queries at the same positions, where bottom-right alignment is exact; the other
    query rows are zeros, as FlashAttention-2's unpad/pad gives.

    This loops over the batch, one kernel call per sequence; issue 7's varlen kernel (one launch
    over packed sequences) replaces it. The output is built by padding and concatenating pieces,
    never by writing into a tensor, so autograd flows through it."""
    Hq, Tq, D = q.shape[1:]
    shift = k.shape[-2] - Tq                # query i sits at key position i + shift
    pieces = []
    for b, (s, e) in enumerate(zip(starts, ends)):
        i0 = min(max(s - shift, 0), Tq)     # the queries inside the run: [i0, i1)
        i1 = min(max(e - shift, i0), Tq)
        if i1 == i0:
            pieces.append(q.new_zeros(1, Hq, Tq, D))
            continue
        o = attention(q[b:b + 1, :, i0:i1], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                      causal=causal, scale=scale, impl=impl)  # (1, Hq, i1 - i0, D)
        pieces.append(F.pad(o, (0, 0, i0, Tq - i1)))          # (1, Hq, Tq, D)
    return torch.cat(pieces)                                  # (B, Hq, Tq, D)
