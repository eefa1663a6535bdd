"""
Serving: attention over a paged KV cache, prefill chunks and decoding in one call.

Inference engines (vLLM, SGLang, TensorRT-LLM) keep every sequence's keys and values in
fixed-size pages of one pool, named per sequence by a block table, so that a sequence grows
without copying and sequences can share a prompt's pages:

    k_cache, v_cache   (num_pages, page_size, Hkv, D): the pool (FlashAttention's and vLLM's layout)
    block_table        int32 (B, max_pages): sequence b's position j is slot j % page_size of page
                       block_table[b, j // page_size]
    cache_seqlens      int32 (B,): how many positions of sequence b are in its pages

Each call brings every sequence's new tokens packed one after another, as in
`flash_attention_varlen`: q (total_q, Hq, D), sequence b's rows cu_seqlens_q[b]:cu_seqlens_q[b+1],
one for a sequence that is decoding, many for a chunk of a prompt (chunked prefill), both in one
batch. New token t of q_len sits at position L - q_len + t of its sequence (L its keys, these
tokens' own included) and sees the keys before it and itself: `reference.paged_attention`.

With k_new, v_new (total_q, Hkv, D) the same call first writes the new tokens' keys and values
into their pages, at positions cache_seqlens[b]... (`_append_kv`, one small launch before the
attention), and attends to cache_seqlens[b] + q_len keys: no separate scatter. Without them the
caller has written them and cache_seqlens counts them (FlashAttention's flash_attn_with_kvcache
has the same two meanings). Either way cache_seqlens itself is not changed: the lengths after an
append are cache_seqlens + q_len, which `PagedKVCache` keeps.

The kernel is decode's split-KV kernel (`kernels/decode.py`) reading the cache through the block
table: one program per (block of new tokens of one sequence, k/v head, split), the query heads of
a group sharing each K/V load. Its grid depends on total_q, B, max_seqlen_q and num_splits only,
never on the values of the offsets or lengths (a block finds its sequence by bisecting
cu_seqlens_q), so with `check=False` (no host read) a call can be captured in a CUDA graph and
replayed for any offsets and lengths that fit the same shapes, as long as no sequence brings
more new tokens than the max_seqlen_q it was captured with (it sizes the append's grid: capture
with the most a replay will bring, total_q at worst).

Speculative decoding's draft trees and bidirectional ranges (`tree_mask`, `bidirectional`) are
decode's serving masks: the tree padded per sequence, (B, max_seqlen_q, max_seqlen_q), so that its
shape is known without reading cu_seqlens_q and a graph replays it; ranges in each sequence's
positions.

fp8 pools (float8_e4m3fn or float8_e5m2, with vLLM's `k_scale`, `v_scale`: per tensor or per k/v
head, the pool holding round(x / scale)) are read as in `kernels.decode`; the append quantizes
k_new and v_new (q's dtype) on the way in, saturating at the format's largest finite value.

`PagedKVCache` is a page pool with a free list and block tables in plain Python, for the demo
(`python -m attention_kernels.benchmarks.tinygpt --paged`) and the tests: not a serving engine.
"""

from typing import Optional

import torch
import triton
from torch import Tensor

from .checks import (SUPPORTED_DTYPES, _dtype_name, _is_int, as_int, check_causal, check_flag, check_int32,
                     check_mods, window_bounds)
from .decode import (FP8_MAX, _append_kv, check_cache_inputs, check_kv_scales, check_num_splits, check_serving_masks,
                     kv_scale_args, refuse_gradients, split_kv)
from .common import Variant, kernel_op, on_device, pow2, stride_args, wrap_triton

APPEND_BLOCK = 16  # new tokens per program of the append kernel


def check_table_values(cu_seqlens_q, cache_seqlens, block_table, total_q, max_seqlen_q, page_size, num_pages, appends,
                       new="k_new", pool="k_cache"):
    """The one host read of a paged call (`paged_attention`, `mla_decode`): the offsets, that every
    length (with the new tokens appended, when `appends`) fits the table, that every page a
    sequence reads or writes is in the pool, and that no page written is another sequence's too.
    `new` and `pool` name the appended tokens and the pool in the messages."""
    cu, lengths, table = cu_seqlens_q.tolist(), cache_seqlens.tolist(), block_table.tolist()  # the one host read
    if cu[0] != 0 or cu[-1] != total_q or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_q must start at 0, never decrease and end at total_q = {total_q}, got "
                         f"{cu[:8]}{' ...' if len(cu) > 8 else ''}")
    counts = [b - a for a, b in zip(cu, cu[1:])]  # each sequence's new tokens
    if max(counts) > max_seqlen_q:
        raise ValueError(f"max_seqlen_q must be >= the most new tokens of one sequence, {max(counts)}, got {max_seqlen_q}")
    capacity = block_table.shape[1] * page_size
    after = [L + n for L, n in zip(lengths, counts)] if appends else lengths
    bad = [(b, L) for b, L in enumerate(after) if not 0 <= L <= capacity or lengths[b] < 0]
    if bad:
        what = f"cache_seqlens + the new tokens ({new} is appended)" if appends else "cache_seqlens"
        raise ValueError(f"{what} must lie in [0, {capacity}] (block_table's {block_table.shape[1]} pages of "
                         f"{page_size}), got " + ", ".join(f"{L} for sequence {b}" for b, L in bad[:4]))
    owners = {}  # page -> the sequences whose positions it holds, once per table entry
    for b, L in enumerate(after):
        for i, page in enumerate(table[b][:triton.cdiv(L, page_size)]):
            if not 0 <= page < num_pages:
                raise ValueError(f"block_table[{b}, {i}] = {page} names no page: the pool holds {num_pages} "
                                 f"({pool}.shape[0]), and sequence {b}'s {L} positions use its first "
                                 f"{triton.cdiv(L, page_size)} entries")
            owners.setdefault(page, []).append(b)
    if appends:
        for b, (L, n) in enumerate(zip(lengths, counts)):
            for i in range(L // page_size, triton.cdiv(L + n, page_size)) if n else ():
                if len(owners[table[b][i]]) > 1:
                    raise ValueError(f"{new} would be written into page {table[b][i]} (block_table[{b}, {i}]), which "
                                     f"the table names {len(owners[table[b][i]])} times (sequences "
                                     f"{sorted(set(owners[table[b][i]]))}): copy a shared page before appending to "
                                     "it (copy-on-write; PagedKVCache does), and name a page once per sequence")


def check_paged_inputs(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new,
                       scale, read_values):
    """Validate a paged call; return q, max_seqlen_q as an int, scale. With read_values, one host read of cu_seqlens_q,
    cache_seqlens and block_table checks the offsets, that every length fits the table, that every
    page a sequence reads or writes is in the pool, and that no page written is another
    sequence's too (a shared page must be copied before it is appended to)."""
    for name, t, dims, layout in (("q", q, 3, "(total_q, Hq, D), the new tokens packed"),
                                  ("k_cache", k_cache, 4, "(num_pages, page_size, Hkv, D)"),
                                  ("v_cache", v_cache, 4, "(num_pages, page_size, Hkv, D)")):
        if isinstance(t, torch.Tensor) and t.dim() != dims:
            raise ValueError(f"{name} must have {dims} dimensions {layout}, got shape {tuple(t.shape)}")
    if isinstance(k_cache, torch.Tensor) and isinstance(v_cache, torch.Tensor) and k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache and v_cache must have the same shape (num_pages, page_size, Hkv, D), got "
                         f"k_cache {tuple(k_cache.shape)}, v_cache {tuple(v_cache.shape)}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if isinstance(t, torch.Tensor) and 0 in t.shape:
            raise ValueError(f"{name} has an empty dimension, shape {tuple(t.shape)}: every dimension must be >= 1")
    # dtypes, devices, heads, head dim and scale: the shared check, on (1, H, T, D) views
    view = lambda t: t.transpose(0, 1)[None] if isinstance(t, torch.Tensor) and t.dim() == 3 else t
    first_page = lambda t: t[:1].transpose(1, 2) if isinstance(t, torch.Tensor) else t
    _, _, _, scale = check_cache_inputs(view(q), first_page(k_cache), first_page(v_cache), scale)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:  # the pool is written in place: a contiguous copy would take the appends
            raise ValueError(f"{name} must have unit stride along D (the cache is read and written in place), "
                             f"got strides {t.stride()}")
    total_q, Hq, D = q.shape
    num_pages, page_size, Hkv, _ = k_cache.shape
    if (k_new is None) != (v_new is None):
        raise ValueError("k_new and v_new come together (the new tokens' keys and values), got only "
                         + ("k_new" if v_new is None else "v_new"))
    if k_new is not None:
        fp8 = k_cache.dtype in FP8_MAX  # the append quantizes q's dtype into the pool's
        dtype, what = (q.dtype, f"q's dtype {_dtype_name(q.dtype)} (the append quantizes it into the fp8 pool)") \
            if fp8 else (k_cache.dtype, f"the cache's dtype {_dtype_name(k_cache.dtype)}")
        for name, t in (("k_new", k_new), ("v_new", v_new)):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
            if tuple(t.shape) != (total_q, Hkv, D):
                raise ValueError(f"{name} must have shape (total_q, Hkv, D) = {(total_q, Hkv, D)}, one row per new "
                                 f"token of q, got {tuple(t.shape)}")
            if t.dtype != dtype or t.device != k_cache.device:
                raise ValueError(f"{name} must have {what} and the cache's device {k_cache.device}, got "
                                 f"{_dtype_name(t.dtype)} on {t.device}")
    check_int32("cu_seqlens_q", cu_seqlens_q, (None,), q.device, "B + 1 offsets of the new tokens")
    B = cu_seqlens_q.shape[0] - 1
    if B < 1:
        raise ValueError(f"cu_seqlens_q must hold B + 1 >= 2 offsets, got shape {tuple(cu_seqlens_q.shape)}")
    check_int32("block_table", block_table, (B, None), q.device, "sequence b's pages, B = len(cu_seqlens_q) - 1")
    check_int32("cache_seqlens", cache_seqlens, (B,), q.device, "each sequence's keys in the cache")
    if block_table.shape[1] < 1:
        raise ValueError(f"block_table must name at least one page per sequence, got shape {tuple(block_table.shape)}")
    max_seqlen_q = as_int(max_seqlen_q, "max_seqlen_q")
    if not 1 <= max_seqlen_q <= total_q:
        raise ValueError(f"max_seqlen_q must be an int from 1 to total_q = {total_q} (the most new tokens of one "
                         f"sequence, which sizes the append's grid), got {max_seqlen_q!r}")
    if not check_flag(read_values, "check"):
        return q, max_seqlen_q, scale

    check_table_values(cu_seqlens_q, cache_seqlens, block_table, total_q, max_seqlen_q, page_size, num_pages,
                       appends=k_new is not None)
    return q, max_seqlen_q, scale


def paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new=None,
                    v_new=None, scale=None, window=None, num_splits=None, softcap=None, sinks=None,
                    alibi_slopes=None, return_lse=False, check=True, causal=True, tree_mask=None, bidirectional=None,
                    k_scale=None, v_scale=None):
    """New tokens of B sequences (prefill chunks and decoding mixed) against a paged KV cache.

    q (total_q, Hq, D): each sequence's new tokens packed, sequence b's rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1] (int32 (B + 1,) offsets; max_seqlen_q the most of one
    sequence). k_cache, v_cache (num_pages, page_size, Hkv, D), any page size, unit stride along
    D; block_table int32 (B, max_pages); cache_seqlens int32 (B,). Without k_new: sequence b's keys
    are its first cache_seqlens[b] positions, its new tokens' own the last q_len of them. With
    k_new, v_new (total_q, Hkv, D): they are first written at positions cache_seqlens[b]... of
    b's pages (which block_table must already name), then attended to with the rest:
    cache_seqlens[b] + q_len keys. cache_seqlens is not changed.

    Equal to `reference.paged_attention`. Returns out (total_q, Hq, D), and with return_lse also
    the log-sum-exp (Hq, total_q) fp32, natural log (-inf for a row that saw no key, whose out
    is 0). causal, window ((left, 0) when causal), softcap, sinks and alibi_slopes ((Hq,) or
    (B, Hq)) as in `decode_attention`; num_splits as there (None: by the grid's size). fp16, bf16, fp32 (q and
    the cache in one dtype), or an fp8 pool beside any of them. No backward.

    fp8 pools as in `decode_attention`: k_cache, v_cache float8_e4m3fn (or float8_e5m2) holding
    round(x / scale), `k_scale`, `v_scale` a float or an fp32 tensor of one value or (Hkv,) (None:
    1.0). k_new, v_new then come in q's dtype and are written as round(x / scale) to nearest even,
    saturated to the format's largest finite value (448, 57344), as vLLM's cache write does.

    Serving masks as in `decode_attention` (`docs/serving.md`): `tree_mask` bool (B, max_seqlen_q,
    max_seqlen_q), or (max_seqlen_q, max_seqlen_q) for every sequence, padded: sequence b's new
    tokens i, j at [b, i, j], i, j < q_len (the rest is not read); FlashInfer's flat packed
    layout (sum of q_len^2) is refused, since its length depends on the offsets' values.
    `bidirectional` (B, R, 2) or (B, 2) [start, end) ranges of sequence b's positions, the new
    tokens at L - q_len... (L its keys, k_new's included).

    `check=True` reads cu_seqlens_q, cache_seqlens and block_table on the host once (see
    `check_paged_inputs`): a sync per call. `check=False` skips that read (shapes, dtypes and
    devices are still checked), for CUDA graphs; the kernels then clamp offsets into q's rows,
    lengths to the table's capacity and page ids into the pool, never touching memory outside
    them, but a bad table, offset or length is the caller's bug, not an error (rows of q that no
    offset covers, a padded graph batch's, come back unwritten).

    Not cast under autocast (as `decode_attention` is): the pool is written in place, so q,
    k_new and v_new must already have its dtype.
    """
    q, max_seqlen_q, scale = check_paged_inputs(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q,
                                                max_seqlen_q, k_new, v_new, scale, check)
    check_flag(return_lse, "return_lse")
    left, right = window_bounds(window, causal=check_causal(causal))
    check_num_splits(num_splits)
    B = cu_seqlens_q.shape[0] - 1
    softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=B)
    tree_mask, bidirectional = check_serving_masks(tree_mask, bidirectional, B, max_seqlen_q, q.device, "max_seqlen_q")
    k_scale, v_scale = check_kv_scales(k_scale, v_scale, k_cache, k_cache.shape[2])
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=slopes)
    refuse_gradients("paged_attention", q, k_cache, v_cache, k_new, v_new, sinks)
    q = q if q.stride(-1) == 1 else q.contiguous()
    o, lse = _run_paged(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new,
                        scale, num_splits, variant, tree_mask, bidirectional, k_scale, v_scale)
    return (o, lse) if return_lse else o


def _run_paged(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new, v_new, scale,
               num_splits, variant, tree_mask=None, bidirectional=None, k_scale=None, v_scale=None):
    """The append (with k_new) and the split and merge kernels on checked inputs, through the torch
    ops `attention_kernels::paged_append` (which writes the pool in place) and `attention_kernels::paged`;
    returns (out, lse)."""
    block_table, cache_seqlens, cu_seqlens_q = (t.contiguous() for t in (block_table, cache_seqlens, cu_seqlens_q))
    seqlens = cache_seqlens
    if k_new is not None:
        torch.ops.attention_kernels.paged_append(k_new, v_new, k_cache, v_cache, block_table, cache_seqlens,
                                                 cu_seqlens_q, max_seqlen_q, k_scale=k_scale, v_scale=v_scale)
        seqlens = cache_seqlens + (cu_seqlens_q[1:] - cu_seqlens_q[:-1])  # on the device: no host read
    return torch.ops.attention_kernels.paged(q, k_cache, v_cache, block_table, seqlens, cu_seqlens_q, max_seqlen_q,
                                             scale=scale, num_splits=num_splits, left=variant.left,
                                             right=variant.right, softcap=variant.softcap, sinks=variant.sinks,
                                             alibi_slopes=variant.alibi_slopes, tree_mask=tree_mask,
                                             bidirectional=bidirectional, k_scale=k_scale, v_scale=v_scale)


@kernel_op("paged_append", fake=lambda **_: None, mutates=("k_cache", "v_cache"))
def _append_op(k_new: Tensor, v_new: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor,
               cache_seqlens: Tensor, cu_seqlens_q: Tensor, max_seqlen_q: int, k_scale: Optional[Tensor] = None,
               v_scale: Optional[Tensor] = None) -> None:
    """Write each sequence's new keys and values into its pages after its cache_seqlens[b] (contiguous
    index tensors, checked), into an fp8 pool quantized."""
    B = cu_seqlens_q.shape[0] - 1
    num_pages, page_size, Hkv, D = k_cache.shape
    with on_device(k_new):
        wrap_triton(_append_kv)[(B, triton.cdiv(max_seqlen_q, APPEND_BLOCK), Hkv)](
            K_NEW=k_new, V_NEW=v_new, K=k_cache, V=v_cache, SEQLENS=cache_seqlens, CU_Q=cu_seqlens_q,
            PAGES=block_table, **kv_scale_args(cache_seqlens, k_scale, v_scale),
            **stride_args("thd", n=k_new.stride(), w=v_new.stride()),
            **stride_args("bhtd", k=_cache_strides(k_cache), v=_cache_strides(v_cache)),
            stride_pb=block_table.stride(0), Tmax=block_table.shape[1] * page_size, num_pages=num_pages,
            total_q=k_new.shape[0], HEAD_DIM=D, BLOCK_D=pow2(D), BLOCK_T=APPEND_BLOCK, PAGE_SIZE=page_size,
            FP8_MAX=FP8_MAX.get(k_cache.dtype, 0.0),
        )


def _paged_outputs(q, **unused):
    """The op's (out, lse): out like q, lse (Hq, total_q) fp32; also its fake implementation."""
    return torch.empty_like(q), torch.empty((q.shape[1], q.shape[0]), device=q.device, dtype=torch.float32)


@kernel_op("paged", fake=_paged_outputs)
def _paged_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, block_table: Tensor, seqlens: Tensor,
              cu_seqlens_q: Tensor, max_seqlen_q: int, scale: float, num_splits: Optional[int], left: int, right: int,
              softcap: float, sinks: Optional[Tensor], alibi_slopes: Optional[Tensor],
              tree_mask: Optional[Tensor] = None, bidirectional: Optional[Tensor] = None,
              k_scale: Optional[Tensor] = None, v_scale: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """The split and merge kernels over each sequence's seqlens[b] keys in its pages (checked,
    contiguous index tensors): (out, lse)."""
    B = cu_seqlens_q.shape[0] - 1
    num_pages, page_size, Hkv, D = k_cache.shape
    variant = Variant(left=left, right=right, softcap=softcap, sinks=sinks, alibi_slopes=alibi_slopes)
    o, lse = _paged_outputs(q)
    packed = lambda t: (0, t.stride(1), t.stride(0), t.stride(2))  # (b, h, t, d): every row is "sequence 0"
    split_kv(q, k_cache, v_cache, seqlens, scale, num_splits, variant, o, lse, B=B, Tq=max_seqlen_q, Hkv=Hkv,
             Tmax=block_table.shape[1] * page_size, q_strides=packed(q), k_strides=_cache_strides(k_cache),
             v_strides=_cache_strides(v_cache), o_strides=packed(o), cu_q=cu_seqlens_q, pages=block_table,
             page_size=page_size, tree_mask=tree_mask, bidirectional=bidirectional, k_scale=k_scale, v_scale=v_scale)
    return o, lse


def _cache_strides(cache):
    """(page, head, slot, d): the kernels' (b, h, t, d) order."""
    return cache.stride(0), cache.stride(2), cache.stride(1), cache.stride(3)


# ----------------------------------------------------------------------------- a page pool for the demo and tests


class PagedKVCache:
    """A pool of KV pages for `layers` layers, with a free list, reference counts and a block table
    per sequence slot: what a serving engine's block manager does, in plain Python, for the demo
    and the tests.

        cache = PagedKVCache(layers, num_pages, page_size, Hkv, D, max_seqs, max_pages, dtype, device)
        cache.reserve(seq, n)        pages for n more positions of sequence slot `seq`
        cache.fork(src, dst)         dst shares src's pages (a common prompt); reserve copies one before
                                     either appends to it
        cache.attend(layer, q, k_new, v_new, seqs, cu_seqlens_q, max_seqlen_q)   paged_attention
        cache.advance(seqs, counts)  after every layer has appended: the lengths grow
        cache.free(seq)

    The pages of all layers share one numbering (a sequence's page i is page block_table[seq, i]
    in every layer's pool), as in vLLM. Lengths are kept on the host too (`lengths`), so that
    nothing is read back from the GPU to schedule. An fp8 dtype makes fp8 pools, read and written
    with `k_scale`, `v_scale` (as `paged_attention` takes them; one for every layer).
    """

    def __init__(self, layers, num_pages, page_size, Hkv, D, max_seqs, max_pages, dtype=torch.float32, device="cpu",
                 k_scale=None, v_scale=None):
        if dtype not in SUPPORTED_DTYPES + tuple(FP8_MAX):
            raise TypeError(f"dtype must be one of {', '.join(map(_dtype_name, SUPPORTED_DTYPES + tuple(FP8_MAX)))}, "
                            f"got {dtype}")
        for name, value in (("layers", layers), ("num_pages", num_pages), ("page_size", page_size), ("Hkv", Hkv),
                            ("D", D), ("max_seqs", max_seqs), ("max_pages", max_pages)):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        shape = (num_pages, page_size, Hkv, D)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.page_size, self.max_pages = page_size, max_pages
        self.k_scale, self.v_scale = check_kv_scales(k_scale, v_scale, self.k[0], Hkv)
        self.free_pages = list(range(num_pages - 1, -1, -1))  # pop() hands out page 0 first
        self.refs = [0] * num_pages
        self.pages = [[] for _ in range(max_seqs)]             # sequence slot -> its pages, in order
        self.lengths = [0] * max_seqs                          # positions filled, on the host
        self.block_table = torch.zeros((max_seqs, max_pages), dtype=torch.int32, device=device)
        self.seqlens = torch.zeros(max_seqs, dtype=torch.int32, device=device)

    def _take(self):
        if not self.free_pages:
            raise RuntimeError(f"the KV pool is out of pages (all {len(self.refs)} in use): free a sequence")
        page = self.free_pages.pop()
        self.refs[page] = 1
        return page

    def _slot(self, seq):
        if not _is_int(seq) or not 0 <= seq < len(self.pages):
            raise ValueError(f"seq must be a sequence slot from 0 to {len(self.pages) - 1}, got {seq!r}")
        return int(seq)

    def _set_pages(self, seq, pages):
        self.pages[seq] = pages
        if pages:
            self.block_table[seq, :len(pages)] = torch.tensor(pages, dtype=torch.int32)

    def reserve(self, seq, n):
        """Make room for n more positions of sequence `seq`: new pages from the free list, and
        every page the n positions land in copied first if another sequence shares it
        (copy-on-write). All or nothing: when the pool is short, nothing changes."""
        seq = self._slot(seq)
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be an int >= 0 (positions to make room for), got {n!r}")
        L, pages = self.lengths[seq], list(self.pages[seq])
        need = triton.cdiv(L + n, self.page_size)
        if need > self.max_pages:
            raise ValueError(f"sequence {seq} would hold {L + n} positions, more than its {self.max_pages} pages of "
                             f"{self.page_size}")
        written = range(L // self.page_size, min(need, len(pages))) if n else range(0)
        shared = [i for i in written if self.refs[pages[i]] > 1]
        if len(shared) + need - len(pages) > len(self.free_pages):
            raise RuntimeError(f"the KV pool is out of pages ({len(self.free_pages)} free of {len(self.refs)}, "
                               f"{len(shared) + need - len(pages)} needed): free a sequence")
        for i in shared:  # copy-on-write
            copy = self._take()
            for pool in self.k + self.v:
                pool[copy] = pool[pages[i]]
            self.refs[pages[i]] -= 1
            pages[i] = copy
        pages += [self._take() for _ in range(need - len(pages))]
        self._set_pages(seq, pages)

    def fork(self, src, dst):
        """Sequence `dst` starts as a copy of `src`: it shares src's pages (a prompt's prefix,
        without copying) until either appends to a shared one."""
        if src == dst:
            raise ValueError(f"fork needs two sequence slots, got src = dst = {src}")
        self.free(dst)
        for page in self.pages[src]:
            self.refs[page] += 1
        self._set_pages(dst, list(self.pages[src]))
        self.lengths[dst] = self.lengths[src]
        self.seqlens[dst] = self.lengths[src]

    def free(self, seq):
        """Give back sequence `seq`'s pages (those no other sequence shares) and empty the slot."""
        for page in self.pages[seq]:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                self.free_pages.append(page)
        self.pages[seq], self.lengths[seq] = [], 0
        self.seqlens[seq] = 0

    def attend(self, layer, q, k_new, v_new, seqs, cu_seqlens_q, max_seqlen_q, **kwargs):
        """`paged_attention` of the new tokens of sequence slots `seqs` (a list, in q's order)
        in layer `layer`, appending k_new and v_new; reserve() first."""
        index = torch.tensor(seqs, device=self.seqlens.device)
        return paged_attention(q, self.k[layer], self.v[layer], self.block_table[index], self.seqlens[index],
                               cu_seqlens_q, max_seqlen_q, k_new, v_new, k_scale=self.k_scale, v_scale=self.v_scale,
                               **kwargs)

    def advance(self, seqs, counts):
        """Sequences `seqs` hold counts[i] more positions (every layer has appended them), within
        the positions reserve() made room for. All or nothing: a bad entry changes no length."""
        seqs, counts = list(seqs), list(counts)
        if len(seqs) != len(counts):
            raise ValueError(f"seqs and counts must have the same length, got {len(seqs)} and {len(counts)}")
        if any(not _is_int(n) or n < 0 for n in counts):
            raise ValueError(f"counts must be ints >= 0, got {counts}")
        for seq, n in zip(map(self._slot, seqs), counts):
            room = len(self.pages[seq]) * self.page_size
            if self.lengths[seq] + n > room:
                raise ValueError(f"sequence {seq} would hold {self.lengths[seq] + n} positions, but only {room} are "
                                 "reserved: reserve() before advancing")
        for seq, n in zip(seqs, counts):
            self.lengths[seq] += n
        index = torch.tensor(seqs, device=self.seqlens.device)
        self.seqlens[index] += torch.tensor(counts, dtype=torch.int32, device=self.seqlens.device)
