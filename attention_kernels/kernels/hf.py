"""
The kernels as a Hugging Face transformers attention implementation.

    from .hf import register_transformers
    name = register_transformers()                  # "attention_kernels"; register_transformers(impl="flash") ...
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation=name)  # or set_attn_implementation

`register_transformers` registers two functions under one name: `kernel_attention_forward` in
transformers' `AttentionInterface` and `kernel_mask` in its `AttentionMaskInterface`. The mask
function decides, once per forward and per mask type, whether the kernels reproduce the model's
mask exactly; the attention function runs the kernels when they do and the model's own attention
otherwise (transformers' SDPA, or the model's eager attention where it softcaps or has sinks,
which SDPA lacks). A mask is never dropped, and a model is never run with a mask it did not ask for.

Which models: those whose attention goes through transformers' attention interface. A model class
that computes attention itself and only reads the mask (BLOOM, XGLM, MPT, GPT-Neo, ...:
`_supports_attention_backend` False and no attention-interface call in its module) is refused when
the implementation is set, with its class and the reason: it would read the kernels' mask as its
own and compute something else.

On the kernels (one call per layer), each with what the model adds (Gemma 2's `softcap`, GPT-OSS's
sinks `s_aux`, attention dropout while training):
    - a causal mask, plain or with a sliding window (Mistral, Qwen2, Gemma 2/3's sliding layers,
      GPT-OSS, Cohere 2: `window=(W - 1, 0)`), whose queries end where the keys end: no cache, a
      DynamicCache (prefill, chunked prefill, decoding);
    - a StaticCache (`generate(cache_implementation="static")`): its keys run past the queries,
      so the mask reads the query offset once per forward (one host sync) and the layers run on
      the keys up to the last query;
    - any of these with padding, left or right (a 2D mask whose valid keys are one run per row):
      the valid query rows and keys are packed, run through `flash_attention_varlen` in one call,
      and scattered back with zeros in the padded query rows, as FlashAttention-2's unpad/pad
      gives. The fused kernel has no packed form, so impl="fused" runs flash here too;
      impl="reference" runs `reference.varlen_attention`. The packing (holes check, gather
      indices, cu_seqlens) costs one host sync, once per forward: the layers of a mask share it;
    - packed documents (padding-free training: documents one after another in a row, each seeing
      only itself): transformers' own mask for position_ids that restart, which it makes where
      there is no padding mask and no cache and the model hands it position_ids
      (`find_packed_sequence_indices`, its host read), or FlashAttention-2's keywords
      `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k`
      (`DataCollatorWithFlattening(return_flash_attn_kwargs=True)`), read as FlashAttention-2
      reads them: without a padding mask, and before position_ids. Every token goes to
      `flash_attention_varlen` in one call, without a gather; one host read per forward (how many
      documents and the longest, or the keywords' offsets, checked). This module reads no
      position_ids itself: where transformers makes no packed mask (with a cache, as in
      generate, or in a model whose mask code is not handed position_ids, as GPT-OSS's) eager
      attention lets the documents see one another, and so do the kernels, unless the keywords
      are given;
    - multi-head latent attention (v's head dim not q's and k's: DeepSeek V2/V3, ...): zeros
      make the head dims equal, as in transformers' FlashAttention path;
    - no mask and is_causal=False (e.g. an encoder without padding).
Under impl="auto" (the default), a decode step runs the split-KV decode kernel (`decode_attention`;
counted in `CALLS` as DECODE beside "kernels"): a few new tokens after a cache (`sdpa.decodes`:
Tq <= 16 < Tk), unpadded, without dropout or a gradient wanted:
    - a DynamicCache: the cache is the layer's keys, every sequence Tk long (an int);
    - a StaticCache: its keys run to max_cache_len, past the tokens written so far. transformers
      hands the mask function the query offset as a tensor (the cache's own length counter, on
      the device); with no padding mask, the mask function returns each sequence's length,
      offset + Tq, as a (B,) int32 tensor on the device in place of a mask (a 1D "mask" is ours:
      no model makes one), and the layers pass it to the decode kernel with check_seqlens=False.
      Nothing is read on the host, so the step compiles whole (torch.compile(fullgraph=True))
      and replays in a CUDA graph. With a 2D padding mask the path below reads the offset and
      whether the mask pads, once per forward, as before; unpadded, it too decodes.
The mask function hands the attention function a (B, Tk) bool tensor of the valid keys and
remembers, by identity, what it stands for (causal or not, the window, where the keys end, whether
it pads): the model's layers pass it through untouched. It never hands over None for a mask the
kernels run (a layer reads None by its own is_causal, which BigBird-Pegasus's decoder sets False
under a causal mask); None reaches the attention function only from models that make no mask, and
then the layer's is_causal decides, as in SDPA.

On the kernels with the mask spelled out in 4D as their attn_mask (counted in `CALLS` as
"kernels, the mask in 4D: <reason>" too): a chunked or overlaid mask (Llama 4's chunks, Gemma 3's
images), a mask the model materialises (allow_is_causal_skip=False), a static cache's sliding
layer, a user's 4D mask (Doge adds onto its own), a padding mask with holes (`_mask_for_kernels`),
with the kernel `impl` names.

Elsewhere, counted in `CALLS` under the reason (a mask's reason first, then the inputs' in
brackets) and logged once per reason (logger "attention_kernels.kernels.hf"): a float 4D mask with
a row that sees only finite entries at or below -2.4e38 (finfo.min: SDPA averages that row, the
kernels would give zeros), dropout under impl="reference", a position bias, inputs the kernels do
not take (a dtype other than fp16, bf16 and fp32, head dim > 256, CPU tensors without Triton's
interpreter). SDPA always
gets the mask spelled out in 4D: it reads no mask as top-left causal, where the kernels and
transformers' masks align bottom-right. Importing this module does not import transformers;
`register_transformers` does.
"""

import functools
import inspect
import logging
import sys
from collections import Counter, OrderedDict
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import reference
from .checks import check_attn_mask, hides_a_row_with_finite_values, input_problem
from .decode import decode_attention
from .dispatch import IMPLS, attention
from .flash import flash_attention, flash_attention_varlen
from .sdpa import decodes, wants_grad

log = logging.getLogger(__name__)

# How many attention calls ran on the kernels ("kernels") and how many went elsewhere and why
# ("sdpa: <reason>", "eager: <reason>"), in this process; of those on the kernels, how many ran
# the decode kernel (DECODE) or the mask in 4D. Tests read it to prove which path ran. Calls traced
# by torch.compile are not counted (`_count`).
CALLS = Counter()
DECODE = "kernels, decode_attention"


def _count(*keys):
    """CALLS[key] += 1 for each key, except while torch.compile traces: a count there would be a
    guard on the counter's value, and the graph would recompile at every call."""
    if not torch.compiler.is_compiling():
        for key in keys:
            CALLS[key] += 1


_said = set()  # the fallback reasons already logged

# transformers switches on these substrings of an implementation's name (flash-attention code
# paths, the SDPA dispatch check, flex, paged attention, a kernel repo on the Hub).
_RESERVED_IN_NAMES = ("flash", "sdpa", "flex_attention", "paged", "/", ":")
_NAMES = {}  # the names registered in this process: their impl


def register_transformers(name="attention_kernels", impl="auto"):
    """Register the kernels with transformers under `name` and return `name`; then
    `attn_implementation=name` (in `from_pretrained`, `from_config` or `set_attn_implementation`)
    runs them. impl: "auto", "fused", "flash" or "reference", as in `kernels.attention`. A model
    class the kernels cannot serve (see `model_problem`) is refused when the name is set on it."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, IMPLS))}; got {impl!r}")
    if not isinstance(name, str) or name == "eager" or any(s in name for s in _RESERVED_IN_NAMES):
        raise ValueError(f"name must be a string without {', '.join(map(repr, _RESERVED_IN_NAMES))} and not 'eager' "
                         f"(transformers gives those names their own code paths); got {name!r}")
    try:
        from transformers import AttentionInterface, PreTrainedModel
        from transformers.masking_utils import AttentionMaskInterface  # transformers 5
    except ImportError as e:
        raise ImportError(f"register_transformers needs Hugging Face transformers 5 or newer ({e}); install it "
                          "with the project's extra: pip install -e '.[hf]'") from e

    AttentionInterface.register(name, functools.partial(kernel_attention_forward, impl=impl))
    AttentionMaskInterface.register(name, kernel_mask)
    _NAMES[name] = impl
    _guard(PreTrainedModel)
    return name


def model_problem(model_class):
    """Why `model_class` cannot run on the kernels, or None. A model must send its attention
    through transformers' attention interface: one that computes attention itself (and says so,
    `_supports_attention_backend = False`, with no call of the interface in its module) would read
    the kernels' mask (None or a padding mask) as its own 4D mask and compute something else."""
    if model_class.is_backend_compatible() or "ALL_ATTENTION_FUNCTIONS" in _source(model_class):
        return None
    return ("computes its attention itself instead of calling transformers' attention interface "
            "(_supports_attention_backend is False), so it would read the kernels' mask as its own")


@functools.lru_cache(maxsize=None)
def _source(model_class):
    """The source of the module that defines `model_class` ("" where there is none to read)."""
    module = sys.modules.get(model_class.__module__)
    try:
        return inspect.getsource(module) if module is not None else ""
    except (OSError, TypeError):
        return ""


# id() of the configs of models built with our names whose module materialises masks itself (adds
# onto them: allow_is_causal_skip=False in its source). transformers also passes
# allow_is_causal_skip=False for one query against a compileable (static) cache, a case the kernels
# run; this set tells the two apart. A reused id only costs a fallback.
_MATERIALISING = set()


def _guard(PreTrainedModel):
    """Make transformers refuse our names on a model class `model_problem` refuses, when the
    implementation is set (construction, from_pretrained, set_attn_implementation), instead of a
    wrong answer or a KeyError deep in the model. transformers has no hook there: this wraps the
    method all those paths call to check a requested name."""
    check = getattr(PreTrainedModel, "get_correct_attn_implementation", None)
    if check is None or getattr(check, "_attention_kernels", False):
        return  # already guarded, or a transformers without the method (tests/test_hf_models.py would say)

    @functools.wraps(check)
    def guarded(self, requested_attention, *args, **kwargs):
        if isinstance(requested_attention, str) and requested_attention in _NAMES:
            problem = model_problem(type(self))
            if problem is not None:
                raise ValueError(f"{type(self).__name__} cannot use attn_implementation={requested_attention!r}: it "
                                 f"{problem}. Use attn_implementation='sdpa' or 'eager' for this model.")
            if "allow_is_causal_skip=False" in _source(type(self)):
                _MATERIALISING.add(id(self.config))
        return check(self, requested_attention, *args, **kwargs)

    guarded._attention_kernels = True
    PreTrainedModel.get_correct_attn_implementation = guarded


# ----------------------------------------------------------------------------- the mask


class Spec(NamedTuple):
    """What a (B, Tk) bool mask from `kernel_mask` stands for: attention, causal or not, over the
    keys [0, end) of the layer's Tk, those the mask marks valid, with a sliding window of `left`
    keys before the diagonal one (None: unbounded); with `docs`, a (B, Tk) document index of each
    token (packed sequences), only within each document."""
    causal: bool
    left: int | None
    end: int
    padded: bool
    docs: Tensor | None = None


# The masks `kernel_mask` made lately, by identity: (mask, Spec or a fallback reason, packing). A
# model builds one or two per forward (full and sliding layers); every layer gets the same tensor.
_MASKS = OrderedDict()
_KEEP = 8


def _remember(mask, what):
    _MASKS[id(mask)] = [mask, what, None]
    while len(_MASKS) > _KEEP:
        _MASKS.popitem(last=False)
    return mask


def _recall(mask):
    entry = _MASKS.get(id(mask))
    return entry if entry is not None and entry[0] is mask else None


def _and_parts(mask_function):
    """The mask functions that transformers' `and_masks` combined into `mask_function`, or None."""
    if getattr(mask_function, "__name__", "") != "and_mask":
        return None
    return inspect.getclosurevars(mask_function).nonlocals.get("mask_functions")


def _pattern(mask_function):
    """("causal", None), ("sliding", W) or ("bidirectional", None) when `mask_function` is
    transformers' causal, sliding-window causal or bidirectional mask function, else None
    (chunked, overlays, ...).
    Recognised by the functions themselves, not by their output: and_masks(sliding_window_overlay(W),
    causal_mask_function) is what transformers builds for a sliding layer."""
    from transformers.masking_utils import bidirectional_mask_function, causal_mask_function, sliding_window_overlay

    if mask_function is causal_mask_function:
        return "causal", None
    if mask_function is bidirectional_mask_function:
        return "bidirectional", None
    parts = _and_parts(mask_function)
    if parts is not None and len(parts) == 2 and parts[1] is causal_mask_function \
            and getattr(parts[0], "__code__", None) is sliding_window_overlay(1).__code__:
        window = inspect.getclosurevars(parts[0]).nonlocals.get("sliding_window")
        if isinstance(window, int) and window > 0:
            return "sliding", window
    return None


def _unpacked(mask_function):
    """(the mask function within each document, the (B, T) document index) when `mask_function`
    is transformers' mask for packed sequences, else (mask_function, None). transformers builds it
    from position_ids that restart, with no padding mask and no cache (`find_packed_sequence_indices`,
    its own host read): and_masks(remap_positions_for_packed_sequence(f, position_ids),
    packed_sequence_mask_function(docs)). A new document starts wherever the position does not
    rise by one, so within a document f on positions is f on token indices."""
    from transformers.masking_utils import packed_sequence_mask_function, remap_positions_for_packed_sequence

    parts = _and_parts(mask_function)
    if parts is not None and len(parts) == 2 \
            and getattr(parts[0], "__code__", None) is remap_positions_for_packed_sequence(None, None).__code__ \
            and getattr(parts[1], "__code__", None) is packed_sequence_mask_function(None).__code__:
        docs = inspect.getclosurevars(parts[1]).nonlocals.get("packed_sequence_mask")
        if isinstance(docs, Tensor) and docs.ndim == 2:
            return inspect.getclosurevars(parts[0]).nonlocals.get("mask_function"), docs
    return mask_function, None


def kernel_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                attention_mask=None, allow_is_causal_skip=True, **kwargs):
    """The mask transformers hands to `kernel_attention_forward`, with the signature of its
    `sdpa_mask`: where the kernels reproduce the mask exactly, a (B, kv_length) bool mask of the
    valid keys that `_MASKS` remembers the meaning of (causal or not, window, where the keys end,
    padded or not); otherwise `sdpa_mask`'s 4D bool mask, remembered with the reason. Never None
    for a mask the kernels run: a layer reads None by its own is_causal, which some models set
    False while their mask is causal (BigBird-Pegasus's decoder)."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask

    if attention_mask is not None and attention_mask.ndim == 1:
        return attention_mask  # a static decode step's lengths (ours): generate makes the masks before the model
    entry = None if attention_mask is None else _recall(attention_mask)
    if entry is not None and isinstance(entry[1], Spec) and attention_mask.shape == (batch_size, kv_length):
        return attention_mask  # ours already: generate makes the masks first and hands them to the model as its own
    mask_function = mask_function or causal_mask_function
    static = isinstance(q_offset, Tensor)  # a StaticCache: the keys run past the queries
    config = kwargs.get("config")
    if static and attention_mask is None and mask_function is causal_mask_function and kv_offset == 0 \
            and _NAMES.get(getattr(config, "_attn_implementation", None)) == "auto" and decodes(q_length, kv_length) \
            and (allow_is_causal_skip or q_length == 1) and id(config) not in _MATERIALISING:
        # a static cache's decode step: each sequence's length, on the device. q_offset is the
        # cache's own counter, which the first layer's update advances in place: the sum is taken now.
        return (q_offset.reshape(1) + q_length).to(torch.int32).expand(batch_size).contiguous()  # (B,)
    inner, docs = _unpacked(mask_function)
    if docs is not None and not (attention_mask is None and not static and q_offset == kv_offset == 0
                                 and q_length == kv_length and docs.shape == (batch_size, kv_length)):
        inner, docs = mask_function, None  # not as transformers makes packed sequences: spelled out
    pattern = _pattern(inner)
    reason = None
    if pattern is None:
        reason = "a mask pattern the kernels lack (chunked or an overlay)"
    elif (id(kwargs.get("config")) in _MATERIALISING if docs is not None else  # packing turns the skips off itself
          not kwargs.get("allow_is_bidirectional_skip", True) if pattern[0] == "bidirectional" else
          not allow_is_causal_skip and (q_length != 1 or id(kwargs.get("config")) in _MATERIALISING)):
        reason = "the model materialises its mask (allow_is_causal_skip=False)"
    elif isinstance(kv_offset, Tensor):
        reason = "a sliding layer of a static cache"
    elif attention_mask is not None and attention_mask.ndim != 2:
        reason = f"a {attention_mask.ndim}D mask from the caller"
    else:
        padding = None if attention_mask is None else attention_mask.bool()
        if padding is not None and padding.shape[-1] < kv_offset + kv_length:  # as transformers' sdpa_mask reads it
            padding = F.pad(padding, (0, kv_offset + kv_length - padding.shape[-1]))
        # -- one host sync per mask: where the queries end (a static cache's offset is a tensor)
        # and whether there is padding at all
        probe = [q_offset.reshape(()).long() if static else torch.tensor(q_offset)]
        if padding is not None:  # only the keys up to the last query count: generate may pad past them
            cols = torch.arange(padding.shape[-1], device=padding.device)
            seen = (cols >= kv_offset) & (cols < probe[0].to(padding.device) + q_length)
            probe.append((~padding & seen).any().long())
        values = torch.stack([p.to(probe[0].device) for p in probe]).tolist()
        end = values[0] + q_length - kv_offset  # the layer's keys [0, end) hold every position up to the last query
        padded = len(values) > 1 and bool(values[1])
        if not q_length <= end <= kv_length:
            reason = "queries that do not end on the keys"
        else:
            valid = torch.zeros(batch_size, kv_length, dtype=torch.bool, device=kwargs.get("device", "cpu")
                                if padding is None else padding.device)
            valid[:, :end] = True if padding is None else padding[:, kv_offset:kv_offset + end]
            left = pattern[1] - 1 if pattern[0] == "sliding" else None  # keys j > i - W: W - 1 before i
            return _remember(valid, Spec(pattern[0] != "bidirectional", left, end, padded, docs))

    # sdpa_mask returns None to mean "SDPA's is_causal", which aligns top-left; the kernels would
    # read None as bottom-right. The two agree only for one query or as many queries as keys.
    if q_length != 1 and q_length != kv_length or static:
        allow_is_causal_skip = False
        kwargs["allow_is_bidirectional_skip"] = False
    mask = sdpa_mask(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                     allow_is_causal_skip=allow_is_causal_skip, **kwargs)
    return mask if mask is None else _remember(mask, reason)


# ----------------------------------------------------------------------------- the attention


def kernel_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0, impl="auto",
                             **kwargs):
    """transformers' attention-function signature: query (B, Hq, Tq, D), key and value (B, Hkv, Tk, D)
    (not repeated for grouped-query attention), attention_mask None, a (B, Tk) bool mask from
    `kernel_mask` or a 4D mask; returns ((B, Tq, Hq, D) contiguous, None). Takes Gemma 2's
    `softcap` and GPT-OSS's `s_aux` (or `sinks`) as the kernels' softcap and sinks, and
    FlashAttention-2's `cu_seq_lens_q`, `cu_seq_lens_k`, `max_length_q`, `max_length_k` (documents
    packed into one row, `DataCollatorWithFlattening(return_flash_attn_kwargs=True)`) where the
    mask has no padding, as FlashAttention-2 reads them."""
    Dqk, Dv = query.shape[-1], value.shape[-1]
    if Dv != Dqk and key.shape[-1] == Dqk:
        # multi-head latent attention (DeepSeek V2/V3, MiniCPM3, ...): v's head dim is not q's and
        # k's, the kernels take one. Zeros on the narrower side change no score and add output
        # columns of zeros, cut off here: transformers' FlashAttention path does the same.
        D = max(Dqk, Dv)
        query, key, value = (F.pad(x, (0, D - x.shape[-1])) for x in (query, key, value))  # (B, H, T, D)
        out, weights = kernel_attention_forward(module, query, key, value, attention_mask,
                                                Dqk ** -0.5 if scaling is None else scaling, dropout, impl, **kwargs)
        return out[..., :Dv].contiguous(), weights                                    # (B, Tq, Hq, Dv)
    is_causal = kwargs.get("is_causal")
    causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    B, Tq, Tk = query.shape[0], query.shape[-2], key.shape[-2]
    softcap = kwargs.get("softcap")
    sinks = kwargs.get("s_aux") if kwargs.get("s_aux") is not None else kwargs.get("sinks")
    mods = dict(softcap=softcap, sinks=None if sinks is None else sinks.float())
    if attention_mask is not None and attention_mask.ndim == 1:
        return _static_decode_step(module, query, key, value, attention_mask, scaling, dropout, impl, mods, kwargs)
    if dropout > 0:  # training with attention dropout: the kernels drop the weights themselves
        mods["dropout_p"] = dropout

    entry = None if attention_mask is None else _recall(attention_mask)
    spec, valid, reason, packing = Spec(causal, None, Tk, False), None, None, None
    if attention_mask is not None and attention_mask.ndim == 2:
        if attention_mask.dtype != torch.bool or attention_mask.shape != (B, Tk):
            raise ValueError(f"a 2D attention mask must be the (B, Tk) = {(B, Tk)} bool mask that kernel_mask "
                             f"gives, got {tuple(attention_mask.shape)} {attention_mask.dtype}")
        if entry is not None:
            spec, valid = entry[1], attention_mask
        else:  # not ours (a direct call): a padding mask, with the window the layer names, as FlashAttention-2 reads it
            window = kwargs.get("sliding_window")
            left = None if window is None or window >= Tk else window - 1
            spec, valid = Spec(causal, left, Tk, True), attention_mask
    elif attention_mask is not None:
        reason = entry[1] if entry is not None else f"a {attention_mask.ndim}D mask from the caller"
    mask_reason = reason  # the mask's pattern, not the inputs: flash may still run it as a 4D attn_mask
    reason = reason or _why_not_kernels(query, key, value, dropout, scaling, impl, kwargs)
    causal = spec.causal  # the mask's own word, where kernel_mask made it
    given = [kwargs.get(name) for name in _SEQ_LENS]
    if all(x is not None for x in given) and mask_reason is None and not spec.padded and spec.end == Tk:
        # documents as FlashAttention-2 reads its keywords: where there is no padding, before position_ids
        packing = _given_packing(entry, given, B, Tq, Tk, query.device)
        if reason is not None:  # the fallback spells the documents out
            spec = spec._replace(docs=_documents(packing.cu_seqlens_q, Tq))
    elif reason is None and spec.docs is not None:
        packing = _document_packing(entry, spec.docs)

    if reason is None and spec.end < Tk:  # a static cache: the keys past the last query are unused
        key, value, valid = key[:, :, :spec.end], value[:, :, :spec.end], valid[:, :spec.end]
        Tk = spec.end
    window = None if spec.left is None or spec.left >= Tk else (spec.left, 0 if causal else spec.left)
    if reason is None and spec.padded:
        packing = _packing(entry, valid, Tq)
        if packing.holes:
            reason = mask_reason = "a padding mask with holes"

    if reason is not None and reason == mask_reason:
        dense = attention_mask if attention_mask is not None and attention_mask.ndim == 4 else \
            _dense_mask(valid, Tq, Tk, causal, spec.left, query.device)
        dense, why = _mask_for_kernels(dense, query, key)
        why = why or _why_not_kernels(query, key, value, dropout, scaling, impl, kwargs)
        if why is None:
            _count("kernels", f"kernels, the mask in 4D: {reason}")
            out = attention(query, key, value, causal=False, scale=scaling, impl=impl, attn_mask=dense, **mods)
            return out.transpose(1, 2).contiguous(), None                             # (B, Tq, Hq, D)
        reason = f"{reason} ({why})"

    if reason is not None:
        return _fallback(module, query, key, value, attention_mask, valid, spec, causal, reason, dropout, scaling,
                         kwargs)
    _count("kernels")
    if packing is not None:
        return _attention_packed(query, key, value, packing, causal, scaling, impl, window, mods), None
    if impl == "auto" and decodes(Tq, Tk) and dropout == 0 and not wants_grad(query, key, value, mods["sinks"]):
        _count(DECODE)  # a DynamicCache's decode step (or a static one's, its keys cut): keys [0, Tk) each
        out = decode_attention(query, key, value, Tk, scale=scaling, window=window, causal=causal,
                               check_seqlens=False, **mods)                            # (B, Hq, Tq, D)
    elif window is not None:
        if impl == "reference":
            out = reference.attention(query, key, value, causal, scaling, window=window, **mods)
        else:  # only flash has windows
            out = flash_attention(query, key, value, causal=causal, scale=scaling, window=window, **mods)
    else:
        out = attention(query, key, value, causal=causal, scale=scaling, impl=impl, **mods)  # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None                                        # (B, Tq, Hq, D)


def _static_decode_step(module, query, key, value, lengths, scaling, dropout, impl, mods, kwargs):
    """A StaticCache's decode step, `lengths` (B,) int32 on the device from `kernel_mask`: the
    decode kernel on the whole cache (B, Hkv, max_cache_len, D), each sequence's first lengths[b]
    keys valid, the new tokens the last Tq of them; nothing read on the host. Where it cannot run
    (a gradient wanted, dropout) flash takes the causal mask spelled out in 4D from the lengths, on
    the device too; where the kernels cannot (their input check, a position bias), the model's own
    attention takes that mask."""
    B, Tq, Tk = query.shape[0], query.shape[-2], key.shape[-2]
    if lengths.shape != (B,) or lengths.dtype != torch.int32:
        raise ValueError(f"a 1D attention mask must be the (B,) = ({B},) int32 lengths that kernel_mask gives for a "
                         f"static cache's decode step, got {tuple(lengths.shape)} {lengths.dtype}")
    reason = _why_not_kernels(query, key, value, dropout, scaling, impl, kwargs)
    if reason is None and dropout == 0 and not wants_grad(query, key, value, mods["sinks"]):
        _count("kernels", DECODE)
        out = decode_attention(query, key, value, lengths, scale=scaling, check_seqlens=False, **mods)
        return out.transpose(1, 2).contiguous(), None                                    # (B, Tq, Hq, D)
    keys = torch.arange(Tk, device=query.device)                                          # (Tk,)
    rows = lengths[:, None].long() - Tq + torch.arange(Tq, device=query.device)           # (B, Tq) positions
    dense = (keys <= rows[..., None])[:, None]                                            # (B, 1, Tq, Tk)
    if reason is None:
        why = "a static cache's decode step with dropout or a gradient"
        _count("kernels", f"kernels, the mask in 4D: {why}")
        out = attention(query, key, value, causal=False, scale=scaling, impl=impl, attn_mask=dense,
                        dropout_p=dropout, **mods)
        return out.transpose(1, 2).contiguous(), None                                    # (B, Tq, Hq, D)
    return _fallback(module, query, key, value, dense, None, Spec(True, None, Tk, False), True, reason, dropout,
                     scaling, kwargs)


def _mask_for_kernels(mask, query, key):
    """A 4D mask as the kernels' attn_mask, and None; or None and why not. A float entry at or
    below -2.4e38 (transformers' finfo.min) hides its key in the kernels, as in SDPA, except in a
    row that sees no other key, where SDPA averages the values and the kernels give zeros: such a
    mask goes to SDPA (`hides_a_row_with_finite_values`: one host read per mask tensor, and every
    layer of a forward gets the same one)."""
    try:
        check_attn_mask(mask, query, key)
    except (TypeError, ValueError) as e:
        return None, str(e).split(";")[0]
    if hides_a_row_with_finite_values(mask):
        return None, "a row hidden by finite values, which SDPA averages"
    return mask, None


def _why_not_kernels(query, key, value, dropout, scaling, impl, kwargs):
    """Why this call must go elsewhere, or None when the kernels can run it exactly."""
    if dropout > 0 and impl == "reference":
        return "dropout with impl='reference'"
    if kwargs.get("position_bias") is not None:
        return "a position bias"
    return input_problem(query, key, value, scaling)  # the kernels' own input check


def _fallback(module, query, key, value, attention_mask, valid, spec, causal, reason, dropout, scaling, kwargs):
    """The model's own attention where the kernels cannot run a call: transformers' SDPA, or, for a
    soft-cap or sinks (SDPA has neither), the eager attention of the model's own module. Both get
    the mask spelled out in 4D: SDPA reads no mask as top-left causal and knows neither 2D padding
    masks nor windows."""
    eager = kwargs.get("softcap") is not None or kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None
    path = "eager" if eager else "sdpa"
    _count(f"{path}: {reason}")
    if (path, reason) not in _said:
        _said.add((path, reason))
        log.warning("attention_kernels: %s runs transformers' %s attention instead of the kernels: %s (logged once "
                    "per reason; kernels.hf.CALLS counts every call)", type(module).__name__, path.upper(), reason)
    Tq, Tk = query.shape[-2], key.shape[-2]
    if attention_mask is None or attention_mask.ndim == 2:  # queries end at spec.end (a static cache: before Tk)
        attention_mask = F.pad(_dense_mask(None if valid is None else valid[:, :spec.end], Tq, spec.end, causal, spec.left,
                                           query.device, spec.docs), (0, Tk - spec.end))  # (B or 1, 1, Tq, Tk)
    if eager:
        model_module = sys.modules.get(type(module).__module__)
        eager_forward = getattr(model_module, "eager_attention_forward", None)
        if eager_forward is None:
            raise ValueError(f"{type(module).__name__} passes softcap or sinks, which SDPA lacks, and the kernels cannot "
                             f"run this call ({reason}); its module has no eager_attention_forward to fall back on: "
                             "use attn_implementation='eager'")
        if attention_mask.dtype == torch.bool:  # eager attention adds its mask to the scores
            attention_mask = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device).masked_fill(
                ~attention_mask, torch.finfo(query.dtype).min)
        return eager_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def _dense_mask(valid, Tq, Tk, causal, left, device, docs=None):
    """The (B or 1, 1, Tq, Tk) bool mask, True where query i may see key j, in transformers'
    semantics: query i sits at key position i + Tk - Tq (bottom-right); a window keeps the `left`
    keys before it (and, not causal, the `left` after); with docs ((B or 1, Tk), Tq = Tk), only
    keys of the query's own document."""
    keys = torch.arange(Tk, device=device)                          # (Tk,)
    rows = torch.arange(Tq, device=device)[:, None] + (Tk - Tq)     # (Tq, 1)
    allowed = keys <= rows if causal else torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if left is not None:
        allowed = allowed & ((keys >= rows - left) if causal else ((keys - rows).abs() <= left))
    allowed = allowed[None, None]                                   # (1, 1, Tq, Tk)
    if docs is not None:
        allowed = allowed & (docs[:, None, :, None] == docs[:, None, None, :])  # (B, 1, Tq, Tk)
    return allowed if valid is None else allowed & valid[:, None, None, :Tk]  # (B, 1, Tq, Tk)


# ----------------------------------------------------------------------------- padded batches and packed documents


class Packing(NamedTuple):
    """A padded batch as packed sequences (FlashAttention-2's unpad): sequence b is row b's valid
    keys, and its query rows that sit on them (query i sits at key position i + Tk - Tq). Or
    documents packed into the rows (padding-free training): every token, in order, the documents
    one after another (q_rows and k_rows None)."""
    Tq: int
    holes: bool              # some row's valid keys are not one run: bottom-right alignment breaks
    q_rows: tuple | None     # (b, i) of each valid query row, two (total_q,) int64 tensors
    k_rows: tuple | None     # (b, j) of each valid key, two (total_k,) int64 tensors
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


def _packing(entry, valid, Tq):
    """`_pack(valid, Tq)`, made once per mask from `kernel_mask` (once per forward: every layer
    gets the same mask) and kept beside it in `_MASKS`."""
    if entry is None:  # a mask from elsewhere (a direct call): nothing to share it with
        return _pack(valid, Tq)
    if entry[2] is None or entry[2].Tq != Tq:
        entry[2] = _pack(valid, Tq)
    return entry[2]


def _attention_packed(q, k, v, packing, causal, scale, impl, window, mods):
    """Padded batches in one call: gather the valid query rows and keys into packed tensors, run
    the varlen kernel, scatter back. Each sequence's queries end where its keys end, so the
    kernel's bottom-right alignment (and a window's, counted from it) is exact; the padded query
    rows are zeros, as FlashAttention-2's unpad/pad gives. Indexing and index_put out of place keep
    autograd flowing to q, k and v (and the sinks). Packed documents take every token: the rows
    one after another, no gather and no scatter."""
    B, Hq, Tq, D = q.shape
    if packing.q_rows is None:
        q = q.transpose(1, 2).reshape(B * Tq, Hq, D)                 # (total_q, Hq, D)
        k, v = (x.transpose(1, 2).reshape(-1, x.shape[1], D) for x in (k, v))  # (total_k, Hkv, D)
    else:
        out = q.new_zeros(B, Tq, Hq, D)                              # (B, Tq, Hq, D)
        if packing.q_rows[0].numel() == 0:  # every query row is padding (the kernels take no empty tensor)
            return out
        q = q.transpose(1, 2)[packing.q_rows]                        # (total_q, Hq, D)
        k, v = (x.transpose(1, 2)[packing.k_rows] for x in (k, v))   # (total_k, Hkv, D)
    cu_q, cu_k = packing.cu_seqlens_q, packing.cu_seqlens_k
    if impl == "reference":
        o = reference.varlen_attention(q, k, v, cu_q, cu_k, causal=causal, scale=scale,
                                       window=window or (-1, -1), **mods)
    else:  # the fused kernel has no packed form: flash for "auto", "flash" and "fused"
        o = flash_attention_varlen(q, k, v, cu_q, cu_k, packing.max_seqlen_q, packing.max_seqlen_k,
                                   causal=causal, scale=scale, window=window, check_seqlens=False,  # built right
                                   **mods)
    if packing.q_rows is None:
        return o.to(q.dtype).reshape(B, Tq, Hq, D)                   # (B, Tq, Hq, D)
    return out.index_put(packing.q_rows, o.to(out.dtype))            # (B, Tq, Hq, D)


# FlashAttention-2's keywords for packed documents (transformers' FlashAttentionKwargs)
_SEQ_LENS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


def _pack_documents(docs):
    """The packing of a (B, T) document index (transformers' packed_sequence_mask: a document
    ends where the index changes, and at the end of a row), with one host read."""
    B, T = docs.shape
    flat = docs.reshape(-1)                                          # (B T,)
    tokens = torch.arange(B * T, device=docs.device)                 # (B T,)
    starts = tokens % T == 0                                         # (B T,) a document's first token
    starts[1:] |= flat[1:] != flat[:-1]
    first = torch.cummax(torch.where(starts, tokens, 0), 0).values   # (B T,) its document's first token
    # -- the one host read: how many documents (the offsets' size) and the longest (the grid's)
    n, longest = torch.stack([starts.sum(), (tokens - first).max() + 1]).tolist()
    cu = torch.cat([torch.nonzero_static(starts, size=n).flatten(), tokens.new_full((1,), B * T)]).int()  # (n + 1,)
    return Packing(T, False, None, None, cu, cu, longest, longest)


def _document_packing(entry, docs):
    """`_pack_documents(docs)`, made once per mask (every layer gets the same) and kept beside it."""
    if entry[2] is None:
        entry[2] = _pack_documents(docs)
    return entry[2]


def _given_packing(entry, given, B, Tq, Tk, device):
    """FlashAttention-2's cu_seq_lens_q, cu_seq_lens_k, max_length_q, max_length_k as a Packing,
    checked once per mask (one host read; every layer gets the same tensors). The longest
    document comes from that read: max_length_q and max_length_k are not read."""
    cu_q, cu_k = given[:2]
    if entry is not None and entry[2] is not None and entry[2].cu_seqlens_q is cu_q and entry[2].cu_seqlens_k is cu_k:
        return entry[2]
    if B != 1 or Tq != Tk:
        raise ValueError(f"{', '.join(_SEQ_LENS)} describe documents packed into one row, with no cache (B = 1, as "
                         f"many queries as keys); got B = {B}, {Tq} queries, {Tk} keys")
    for name, cu in zip(_SEQ_LENS, (cu_q, cu_k)):
        if not isinstance(cu, Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or cu.device != device:
            raise ValueError(f"{name} must be a 1-D int32 tensor on {device}, got "
                             f"{cu.dtype if isinstance(cu, Tensor) else type(cu).__name__} "
                             f"{tuple(cu.shape) if isinstance(cu, Tensor) else cu!r}")
    offsets = torch.cat([cu_q, cu_k]).tolist()                       # the one host read
    q_offsets, k_offsets = offsets[:cu_q.numel()], offsets[cu_q.numel():]
    lengths = [b - a for a, b in zip(q_offsets, q_offsets[1:])]
    if q_offsets != k_offsets or q_offsets[0] != 0 or q_offsets[-1] != Tq or not lengths or min(lengths) < 0:
        raise ValueError(f"cu_seq_lens_q and cu_seq_lens_k must be the same offsets of the documents in the row of "
                         f"{Tq} tokens: 0 first, never decreasing, {Tq} last; got {q_offsets[:8]} and {k_offsets[:8]}")
    packing = Packing(Tq, False, None, None, cu_q, cu_k, max(lengths), max(lengths))
    if entry is not None:
        entry[2] = packing
    return packing


def _documents(cu_seqlens, T):
    """The (1, T) document index of each token of a row that `cu_seqlens` splits (no host read)."""
    tokens = torch.arange(T, dtype=cu_seqlens.dtype, device=cu_seqlens.device)  # (T,)
    return (torch.searchsorted(cu_seqlens, tokens, right=True) - 1)[None]       # (1, T)
