"""Serving over a paged KV cache: `reference.paged_attention` against torch's SDPA, paged_attention
against the reference (shuffled and shared pages, every page size, prefill chunks and decoding in
one batch, appends), its serving masks (draft trees, bidirectional ranges), its input checks, and
PagedKVCache's pages through a generation."""

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import reference
from attention_kernels.kernels import PagedKVCache, decode_attention, paged_attention
from attention_kernels.testing.checks import (I32, UNUSED, check_paged, check_paged_fp8, draft_trees, fp8_scales,
                                              hold_paged, offsets, paged_inputs, random_ranges, torch_fp8_casts)
from attention_kernels.reference.naive import FP8_MAX, quantize
from attention_kernels.testing.cases import DEVICE, PAGED_CASES
from attention_kernels.testing.rule import hold_to_rule, seed_of

def written_out_gather(cache, table, lengths):
    """Sequence b's first lengths[b] keys (or values), one position at a time: position j lives at
    slot j % page_size of page table[b, j // page_size]. A list of (L_b, Hkv, D)."""
    page_size = cache.shape[1]
    return [torch.stack([cache[int(table[b, j // page_size]), j % page_size] for j in range(L)])
            if L else cache.new_zeros(0, *cache.shape[2:]) for b, L in enumerate(lengths)]


def sdpa_bottom_right(q, k, v):
    """New tokens q (Tq, Hq, D) against their sequence's keys (Tk, Hkv, D), query t at position
    Tk - Tq + t seeing keys up to it; a query that sees no key gives zeros."""
    Tq, Tk = q.shape[0], k.shape[0]
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(Tk - Tq)  # (Tq, Tk)
    one = lambda x: x.transpose(0, 1)[None]                                         # (1, H, T, D)
    o = F.scaled_dot_product_attention(one(q), one(k), one(v), attn_mask=visible, enable_gqa=True)[0]
    return torch.where(visible.any(-1)[None, :, None], o, 0.0).transpose(0, 1)      # (Tq, Hq, D)


def test_reference_is_sdpa_on_the_gathered_cache():
    # Each sequence's new tokens against its keys gathered from the pages (written out here, not
    # reference.gather_pages), bottom-right causal; a shared first page, a shuffled pool
    new, lengths = (1, 4, 3, 2), (9, 4, 12, 0)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, 4, 2, 16, 4, torch.float64, seed_of("sdpa"))
    assert table[1, 0] == table[0, 0]  # the shared page
    out = reference.paged_attention(q, k_cache, v_cache, table, seqlens, cu)
    ks, vs = (written_out_gather(c, table, lengths) for c in (k_cache, v_cache))
    for c, gathered in ((k_cache, ks), (v_cache, vs)):
        assert torch.equal(reference.gather_pages(c, table, seqlens), torch.cat(gathered))
    for b, (q0, q1) in enumerate(zip(cu.tolist(), cu[1:].tolist())):
        torch.testing.assert_close(out[q0:q1], sdpa_bottom_right(q[q0:q1], ks[b], vs[b]), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PAGED_CASES, ids=str)
def test_paged_matches_reference(poison, case, dtype):
    check_paged(case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_paged_with_softcap_sinks_and_alibi(poison, dtype):
    new, lengths = (1, 6, 2), (20, 6, 45)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, 4, 2, 32, 8, dtype, seed_of("mods", dtype))
    g = torch.Generator(DEVICE).manual_seed(1)
    mods = dict(softcap=5.0, sinks=torch.randn(4, generator=g, device=DEVICE),
                alibi_slopes=torch.rand(3, 4, generator=g, device=DEVICE))
    o, lse = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 6, num_splits=2, return_lse=True, **mods)
    hold_paged(o, lse, q, k_cache, v_cache, table, seqlens, cu, **mods)


@pytest.mark.parametrize("window", [None, (3, 2), (-1, 4), (5, 0)], ids=str)
def test_paged_without_a_causal_mask(poison, window):
    # each new token sees every valid key of its sequence (within the window, on both sides of
    # its bottom-right position): cross-attention to a cache, or new tokens that see each other
    new, lengths = (1, 6, 3, 0), (20, 6, 45, 4)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, 4, 2, 16, 8, torch.float32,
                                                           seed_of("full", window))
    o, lse = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 6, num_splits=2, window=window,
                             return_lse=True, causal=False)
    hold_paged(o, lse, q, k_cache, v_cache, table, seqlens, cu, window, causal=False)
    if window is None:  # and not the causal answer: the first of sequence 1's 6 new tokens sees all 6 keys
        causal = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 6, num_splits=2)
        assert not torch.allclose(o[1], causal[1]) and torch.allclose(o[6], causal[6])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_append_writes_the_pages_then_attends(poison, dtype):
    # k_new, v_new land at positions cache_seqlens[b]... of each sequence's pages (across a page
    # boundary, into an empty sequence, none for a sequence without new tokens), then count as keys
    new, before, page_size = (1, 6, 0, 9), (7, 0, 5, 8), 4
    after = tuple(L + n for L, n in zip(before, new))
    q, k_cache, v_cache, table, _, cu = paged_inputs(new, after, 4, 2, 16, page_size, dtype, seed_of("append", dtype),
                                                     share=False)
    g = torch.Generator(DEVICE).manual_seed(2)
    k_new, v_new = (torch.randn(sum(new), 2, 16, generator=g, device=DEVICE, dtype=dtype) for _ in range(2))
    want_k, want_v = k_cache.clone(), v_cache.clone()
    for b, (L, n) in enumerate(zip(before, new)):  # the scatter the call replaces
        for t in range(n):
            page, slot = table[b, (L + t) // page_size], (L + t) % page_size
            want_k[page, slot], want_v[page, slot] = k_new[cu[b] + t], v_new[cu[b] + t]
    seqlens = torch.tensor(before, **I32)
    o, lse = paged_attention(q, k_cache, v_cache, table, seqlens, cu, max(new), k_new, v_new, return_lse=True)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v), "the pages differ from the scatter"
    assert seqlens.tolist() == list(before), "cache_seqlens was changed"
    hold_paged(o, lse, q, k_cache, v_cache, table, torch.tensor(after, **I32), cu)


@pytest.mark.parametrize("case, dtype, fmt, per_head", [
    (PAGED_CASES[0], torch.bfloat16, torch.float8_e4m3fn, True),    # decoding and prefill chunks, a shared page
    (PAGED_CASES[2], torch.float16, torch.float8_e5m2, False),      # pages of one key, a window
    (PAGED_CASES[5], torch.bfloat16, torch.float8_e4m3fn, False),   # tiles within a page
], ids=str)
def test_paged_with_an_fp8_pool(poison, case, dtype, fmt, per_head):
    check_paged_fp8(case, dtype, fmt, per_head)


@pytest.mark.parametrize("fmt", list(FP8_MAX), ids=str)
def test_append_quantizes_into_an_fp8_pool(poison, fmt):
    # k_new, v_new (bf16) land as round(x / scale), saturated at the format's largest finite value
    # (the scales leave 1/4 of the values' range past it), bit for bit as torch quantizes them
    new, before, page_size, Hkv = (1, 6, 0, 9), (7, 0, 5, 8), 4, 2
    after = tuple(L + n for L, n in zip(before, new))
    q, k_cache, v_cache, table, _, cu = paged_inputs(new, after, 4, Hkv, 16, page_size, torch.bfloat16,
                                                     seed_of("append fp8", fmt), share=False)
    g = torch.Generator(DEVICE).manual_seed(5)
    k_new, v_new = (torch.randn(sum(new), Hkv, 16, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    k_scale, v_scale = fp8_scales(k_new, fmt, True, 1, headroom=0.75), fp8_scales(v_new, fmt, False, 1, headroom=0.75)
    k8, v8 = quantize(k_cache, k_scale, fmt, 2), quantize(v_cache, v_scale, fmt, 2)
    want_k, want_v = k8.clone(), v8.clone()
    stored_k, stored_v = quantize(k_new, k_scale, fmt, 1), quantize(v_new, v_scale, fmt, 1)  # (total_q, Hkv, D)
    assert (stored_k.float().abs() == FP8_MAX[fmt]).any(), "no value saturates: the scales test nothing"
    for b, (L, n) in enumerate(zip(before, new)):  # the scatter the call replaces
        for t in range(n):
            page, slot = table[b, (L + t) // page_size], (L + t) % page_size
            want_k[page, slot], want_v[page, slot] = stored_k[cu[b] + t], stored_v[cu[b] + t]
    seqlens = torch.tensor(before, **I32)
    with torch_fp8_casts():
        o, lse = paged_attention(q, k8, v8, table, seqlens, cu, max(new), k_new, v_new, return_lse=True,
                                 k_scale=k_scale, v_scale=v_scale)
    bits = lambda x: x.view(torch.uint8)
    assert torch.equal(bits(k8), bits(want_k)) and torch.equal(bits(v8), bits(want_v)), "the pages differ"
    hold_paged(o, lse, q, k8, v8, table, torch.tensor(after, **I32), cu, k_scale=k_scale, v_scale=v_scale)


def test_the_pool_generates_in_fp8(poison):
    # PagedKVCache with fp8 pools: a prompt appended and attended, then one decoding step
    cache = PagedKVCache(1, 6, 4, 2, 16, max_seqs=1, max_pages=4, dtype=torch.float8_e4m3fn, device=DEVICE,
                         k_scale=torch.tensor([0.01, 0.02], device=DEVICE), v_scale=0.01)
    g = torch.Generator(DEVICE).manual_seed(7)
    randn = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=torch.bfloat16)
    for n in (6, 1):
        cache.reserve(0, n)
        q, k_new, v_new = randn(n, 4, 16), randn(n, 2, 16), randn(n, 2, 16)
        with torch_fp8_casts():
            o = cache.attend(0, q, k_new, v_new, seqs=[0], cu_seqlens_q=offsets([n]), max_seqlen_q=n)
        cache.advance([0], [n])
        hold_paged(o, None, q, cache.k[0], cache.v[0], cache.block_table[:1], cache.seqlens[:1], offsets([n]),
                   k_scale=cache.k_scale, v_scale=cache.v_scale)


def test_one_page_per_sequence_is_decode_attention(poison):
    # A dense cache is a pool of B pages of Tmax: the same kernel, the same numbers
    B, Hq, Hkv, Tq, Tmax, D = 3, 4, 2, 2, 37, 16
    g = torch.Generator(DEVICE).manual_seed(seed_of("dense"))
    q = torch.randn(B, Hq, Tq, D, generator=g, device=DEVICE)
    k, v = (torch.randn(B, Hkv, Tmax, D, generator=g, device=DEVICE) for _ in range(2))
    seqlens = torch.tensor([37, 2, 20], **I32)
    dense = decode_attention(q, k, v, seqlens, num_splits=2)
    pool = lambda c: c.transpose(1, 2)                                      # (B pages, Tmax, Hkv, D), a view
    out = paged_attention(q.transpose(1, 2).reshape(B * Tq, Hq, D), pool(k), pool(v), torch.arange(B, **I32)[:, None],
                          seqlens, offsets([Tq] * B), Tq, num_splits=2)
    torch.testing.assert_close(out.view(B, Tq, Hq, D).transpose(1, 2), dense, rtol=0, atol=0)


def test_unchecked_calls_read_nothing_on_the_host_and_stay_inside_the_pool(poison, monkeypatch):
    new, lengths = (1, 3), (9, 20)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, 2, 1, 16, 4, torch.float32, seed_of("unchecked"))
    checked = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 3)
    for name in ("tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("read on the host"))
    torch.testing.assert_close(paged_attention(q, k_cache, v_cache, table, seqlens, cu, 3, check=False), checked,
                               rtol=0, atol=0)
    # a length past the table's capacity and a page id past the pool: clamped, finite, no crash
    bad_table = table.clone()
    bad_table[0, 0] = 10 ** 6
    out = paged_attention(q, k_cache, v_cache, bad_table, torch.tensor([9, 10 ** 6], **I32), cu, 3, check=False)
    assert torch.isfinite(out).all()


# Serving masks over a paged cache: (new tokens per sequence, keys per sequence after them, Hq, Hkv,
# D, page size, num_splits, window, causal, masks). Ragged new tokens (none for one sequence),
# trees padded to (B, max_seqlen_q, max_seqlen_q) with random bits around each sequence's corner;
# pages of 4 and 16 (keys found through the table one by one) and 64 (whole key tiles in a page).
PAGED_MASK_CASES = [
    ((1, 5, 0, 3, 7), (9, 40, 3, 3, 70), 8, 2, 24, 4, 3, None, True, "tree"),      # grouped heads, D = 24
    ((6, 1, 2), (100, 33, 64), 16, 1, 32, 64, 2, (10, 0), True, "tree, ranges"),  # 4 tokens a row block
    ((4, 3), (20, 50), 2, 2, 16, 16, None, (3, -1), False, "ranges"),           # not causal
]


@pytest.mark.parametrize("append", [False, True], ids=["written", "appended"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", PAGED_MASK_CASES, ids=str)
def test_paged_with_serving_masks(poison, case, dtype, append):
    new, lengths, Hq, Hkv, D, page_size, num_splits, window, causal, masks = case
    seed = seed_of("paged masks", case, dtype, append)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, Hq, Hkv, D, page_size, dtype, seed,
                                                           share=not append)
    g = torch.Generator(DEVICE).manual_seed(seed)
    kw = {}
    if "tree" in masks:
        kw["tree_mask"] = draft_trees(new, g)                                      # (B, max(new), max(new))
    if "ranges" in masks:  # random ranges, and one from 13 keys before each sequence's new tokens to its last but one
        around = torch.tensor([[max(L - n - 13, 0), L - 1] for n, L in zip(new, lengths)], **I32)[:, None]
        kw["bidirectional"] = torch.cat([random_ranges(lengths, 3, g), around], dim=1)  # (B, 4, 2)
    extra = {}
    if append:  # the new tokens' keys go in first, into the positions the pool holds garbage at
        k_new, v_new = (torch.randn(sum(new), Hkv, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(2))
        extra = dict(k_new=k_new, v_new=v_new)
        seqlens = seqlens - torch.tensor(new, **I32)
    o, lse = paged_attention(q, k_cache, v_cache, table, seqlens, cu, max(new), num_splits=num_splits, window=window,
                             causal=causal, return_lse=True, **extra, **kw)
    hold_paged(o, lse, q, k_cache, v_cache, table, torch.tensor(lengths, **I32), cu, window, causal, **kw)


def test_unchecked_masks_read_nothing_on_the_host_and_compile_whole(poison, monkeypatch):
    # check=False with masks: no host read, a whole graph under torch.compile, and a sequence with
    # more new tokens than max_seqlen_q (a caller's bug) reads nothing outside the tree
    new, lengths = (1, 3), (9, 20)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, 2, 1, 16, 4, torch.float32, seed_of("op"))
    g = torch.Generator(DEVICE).manual_seed(2)
    masks = dict(tree_mask=draft_trees(new, g), bidirectional=torch.tensor([[0, 0], [12, 19]], **I32))
    serve = lambda q, tree_mask, bidirectional: paged_attention(q, k_cache, v_cache, table, seqlens, cu, 3, check=False,
                                                                tree_mask=tree_mask, bidirectional=bidirectional)
    checked = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 3, **masks)
    torch.testing.assert_close(torch.compile(serve, fullgraph=True, backend="aot_eager")(q, **masks), checked,
                               rtol=0, atol=0)
    args = (q, k_cache, v_cache, table, seqlens, cu, 3, 0.25, None, -1, 0, 0.0, None, None, *masks.values())
    assert set(torch.library.opcheck(torch.ops.attention_kernels.paged.default, args).values()) == {"SUCCESS"}
    for name in ("tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("read on the host"))
    torch.testing.assert_close(serve(q, **masks), checked, rtol=0, atol=0)
    short = paged_attention(q, k_cache, v_cache, table, seqlens, cu, 2, check=False,
                            tree_mask=masks["tree_mask"][:, :2, :2])
    assert torch.isfinite(short).all()


def test_unchecked_offsets_write_nothing_outside_the_outputs(monkeypatch):
    # check=False with offsets past total_q: the kernels clamp them into q's rows. The fp32
    # buffers the launcher allocates (the splits' partial results) are handed out as the front
    # of larger ones whose tails are a sentinel, which must survive.
    q, k_cache, v_cache, table, seqlens, _ = paged_inputs((1, 1), (5, 6), 2, 1, 16, 4, torch.float32, 0, share=False)
    empty, tails = torch.empty, []

    def fenced(*shape, **kw):
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if kw.get("dtype") != torch.float32:
            return empty(*shape, **kw)
        n = torch.Size(shape).numel()
        buffer = empty(n + 4096, dtype=torch.float32, device=kw.get("device", DEVICE)).fill_(1234.5)
        tails.append((buffer, n))
        return buffer[:n].view(shape)
    monkeypatch.setattr(torch, "empty", fenced)
    garbage = torch.tensor([0, 1, 3], **I32)                                  # ends past total_q = 2
    new = torch.zeros(2, 1, 16, device=DEVICE)
    pool = k_cache.clone()
    paged_attention(q, k_cache, v_cache, table, seqlens, garbage, 2, new, new, num_splits=2, check=False)
    assert tails and all(bool((b[n:] == 1234.5).all()) for b, n in tails), "written past a buffer's end"
    untouched = torch.ones(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    untouched[table[0, 1], 1] = untouched[table[1, 1], 2] = False               # the two slots appended to
    assert torch.equal(k_cache[untouched], pool[untouched])


def test_the_pool_copies_every_shared_page_it_writes():
    # a fork shares pages reserved past the length too (room for a draft of tokens, say); an
    # append that crosses into them copies each, and neither sequence sees the other's keys
    cache = PagedKVCache(1, 8, 2, 1, 16, max_seqs=2, max_pages=4, device=DEVICE)
    cache.reserve(0, 5)                                                    # 3 pages for 5 positions
    cache.advance([0], [1])                                                # 1 of them filled
    cache.fork(0, 1)
    cache.reserve(1, 4)                                                    # positions 1..4: pages 0, 1, 2
    assert cache.pages[1][:3] != cache.pages[0][:3] and not set(cache.pages[1][:3]) & set(cache.pages[0])
    assert [cache.refs[p] for p in cache.pages[0]] == [1, 1, 1]
    with pytest.raises(ValueError, match="fork needs two sequence slots, got src = dst = 1"):
        cache.fork(1, 1)


def test_a_pool_short_of_pages_changes_nothing():
    cache = PagedKVCache(1, 4, 2, 1, 16, max_seqs=2, max_pages=4, device=DEVICE)
    cache.reserve(0, 3)
    cache.advance([0], [3])
    cache.fork(0, 1)                                                       # shares pages 0 and 1
    before = (list(map(list, cache.pages)), list(cache.refs), list(cache.free_pages), cache.block_table.clone())
    with pytest.raises(RuntimeError, match=r"out of pages \(2 free of 4, 3 needed\)"):
        cache.reserve(1, 4)                                                # a copy of page 1 and 2 new pages
    assert (list(map(list, cache.pages)), list(cache.refs), list(cache.free_pages)) == before[:3]
    assert torch.equal(cache.block_table, before[3])


def base_call(**change):
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs((1, 3), (9, 20), 4, 2, 16, 4, torch.float32, 0, share=False)
    args = dict(q=q, k_cache=k_cache, v_cache=v_cache, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu,
                max_seqlen_q=3)
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return lambda: paged_attention(**args)


@pytest.mark.parametrize("change, error, message", [
    (dict(q=lambda a: a["q"][None]), ValueError, "q must have 3 dimensions \\(total_q, Hq, D\\)"),
    (dict(k_cache=lambda a: a["k_cache"][:, :, :1]), ValueError, "k_cache and v_cache must have the same shape"),
    (dict(q=lambda a: a["q"].half()), TypeError, "q, k_cache and v_cache must share one dtype"),
    (dict(q=lambda a: a["q"][:, :3]), ValueError, "multiple of k_cache's"),
    (dict(k_cache=lambda a: a["k_cache"].transpose(2, 3).contiguous().transpose(2, 3)), ValueError,
     "k_cache must have unit stride along D"),                                   # (.., D, Hkv) storage
    (dict(block_table=lambda a: a["block_table"].long()), ValueError, "block_table must be an int32 tensor"),
    (dict(block_table=lambda a: a["block_table"][:1]), ValueError, "block_table must be an int32 tensor of shape \\(2, any\\)"),
    (dict(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError, "cache_seqlens must be an int32 tensor of shape \\(2,\\)"),
    (dict(cu_seqlens_q=[0, 1, 4]), TypeError, "cu_seqlens_q must be a torch.Tensor"),
    (dict(cu_seqlens_q=torch.tensor([0, 0, 4], **I32)), ValueError, "max_seqlen_q must be >= the most new tokens"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 3], **I32)), ValueError, "end at total_q = 4"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be an int from 1 to total_q = 4"),
    (dict(cache_seqlens=torch.tensor([9, 25], **I32)), ValueError, "\\[0, 24\\] \\(block_table's 6 pages of 4\\), got 25 for"),
    (dict(cache_seqlens=torch.tensor([-1, 20], **I32)), ValueError, "-1 for sequence 0"),
    (dict(block_table=lambda a: a["block_table"].index_fill(1, torch.tensor([0], device=DEVICE), 99)),
     ValueError, "block_table\\[0, 0\\] = 99 names no page: the pool holds"),
    (dict(k_new=lambda a: torch.zeros(4, 2, 16, device=DEVICE)), ValueError, "k_new and v_new come together"),
    (dict(k_new=lambda a: torch.zeros(4, 2, 16, device=DEVICE), v_new=lambda a: torch.zeros(4, 2, 16, device=DEVICE),
          cache_seqlens=torch.tensor([9, 22], **I32)),
     ValueError, "cache_seqlens \\+ the new tokens .* must lie in \\[0, 24\\] .*, got 25 for sequence 1"),
    (dict(k_new=lambda a: torch.zeros(3, 2, 16, device=DEVICE), v_new=lambda a: torch.zeros(3, 2, 16, device=DEVICE)),
     ValueError, "k_new must have shape \\(total_q, Hkv, D\\) = \\(4, 2, 16\\)"),
    (dict(window=(3, 2)), ValueError, "causal attention means right = 0"),
    (dict(num_splits=0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(tree_mask=torch.ones(10, dtype=torch.bool, device=DEVICE)), ValueError,  # FlashInfer's: 1 + 9 entries
     "tree_mask must be a bool tensor of shape \\(B, max_seqlen_q, max_seqlen_q\\) = \\(2, 3, 3\\) or "
     "\\(max_seqlen_q, max_seqlen_q\\) = \\(3, 3\\).*a flat packed mask.*is not taken\\); got bool of shape \\(10,\\)"),
    (dict(tree_mask=torch.ones(2, 3, 3, dtype=torch.int32, device=DEVICE)), ValueError,
     "tree_mask must .*got int32 of shape \\(2, 3, 3\\)"),
    (dict(bidirectional=torch.zeros(1, 2, dtype=torch.int32, device=DEVICE)), ValueError,
     "bidirectional must be .* B = 2.*got int32 of shape \\(1, 2\\)"),
    (dict(v_scale=2.0), ValueError, "k_scale and v_scale are for fp8 caches .*got a float32 cache"),
    (dict(k_cache=lambda a: a["k_cache"].to(torch.float8_e4m3fn), v_cache=lambda a: a["v_cache"].to(
        torch.float8_e4m3fn), k_scale=torch.ones(3, device=DEVICE)), ValueError,
     "k_scale must be .*\\(Hkv,\\) = \\(2,\\).*got float32 of shape \\(3,\\)"),
    (dict(k_cache=lambda a: a["k_cache"].to(torch.float8_e4m3fn)), TypeError, "k_cache and v_cache must share one dtype"),
    (dict(k_cache=lambda a: a["k_cache"].to(torch.float8_e4m3fn), v_cache=lambda a: a["v_cache"].to(
        torch.float8_e4m3fn), k_new=lambda a: torch.zeros(4, 2, 16, device=DEVICE, dtype=torch.float8_e4m3fn),
          v_new=lambda a: torch.zeros(4, 2, 16, device=DEVICE, dtype=torch.float8_e4m3fn)), ValueError,
     "k_new must have q's dtype float32 \\(the append quantizes it into the fp8 pool\\)"),
])
def test_bad_paged_inputs_are_refused(change, error, message):
    with pytest.raises(error, match=message):
        base_call(**change)()


def test_sequences_without_new_tokens_may_share_their_last_page(poison):
    # A fork's shared partial page is no obstacle to a call in which neither sequence sharing it
    # appends: only the appending sequence's slot is written, and its token attends as it should
    q, k_cache, v_cache, table, _, _ = paged_inputs((1, 1), (6, 6), 2, 1, 16, 4, torch.float32, 0, share=False)
    table[1, 1] = table[0, 1]   # a fork's shared partial page; neither appends to it in this call
    cu = torch.tensor([0, 0, 0, 1], **I32)                                # only sequence 2 appends
    spare = sorted(set(range(k_cache.shape[0])) - set(table[:, :2].flatten().tolist()))
    table = torch.cat([table, torch.tensor([[spare[0], UNUSED, UNUSED]], **I32)])
    g = torch.Generator(DEVICE).manual_seed(5)
    k_new, v_new = (torch.randn(1, 1, 16, generator=g, device=DEVICE) for _ in range(2))
    seqlens = torch.tensor([5, 5, 2], **I32)
    pool_k, pool_v = k_cache.clone(), v_cache.clone()
    out = paged_attention(q[:1], k_cache, v_cache, table, seqlens, cu, 1, k_new, v_new)
    assert seqlens.tolist() == [5, 5, 2], "cache_seqlens was changed"
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE)
    written[spare[0], 2] = True                                           # sequence 2's position 2
    for cache, pool, x in ((k_cache, pool_k, k_new), (v_cache, pool_v, v_new)):
        assert torch.equal(cache[written], x), "the new token is not at its slot"
        assert torch.equal(cache[~written], pool[~written]), "a slot other than the appended one changed"
    # sequence 2's one new token sees its 3 keys: the 2 in its page before it and its own
    ks, vs = (written_out_gather(c, table, [5, 5, 3]) for c in (k_cache, v_cache))
    assert torch.equal(ks[0][4], pool_k[table[0, 1], 0]) and torch.equal(ks[1][4], ks[0][4])  # the shared page
    torch.testing.assert_close(out, sdpa_bottom_right(q[:1].double(), ks[2].double(), vs[2].double()).float(),
                               rtol=1e-5, atol=1e-5)


def test_a_page_named_twice_in_one_table_row_is_not_appended_to():
    q, k_cache, v_cache, table, _, cu = paged_inputs((1, 1), (6, 6), 2, 1, 16, 4, torch.float32, 0, share=False)
    table[0, 1] = table[0, 0]   # positions 0..3 and 4..7 of sequence 0 in one page
    new = torch.zeros(2, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"which the table names 2 times \(sequences \[0\]\)"):
        paged_attention(q, k_cache, v_cache, table, torch.tensor([5, 5], **I32), cu, 1, new, new)


def test_appending_into_a_shared_page_is_refused():
    q, k_cache, v_cache, table, _, cu = paged_inputs((1, 1), (6, 6), 2, 1, 16, 4, torch.float32, 0, share=False)
    table[1, 1] = table[0, 1]  # both sequences' second page, where their next keys would go
    new = torch.zeros(2, 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="names 2 times \\(sequences \\[0, 1\\]\\): copy a shared page"):
        paged_attention(q, k_cache, v_cache, table, torch.tensor([5, 5], **I32), cu, 1, new, new)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_generation_through_the_pool(poison, dtype):
    # Three sequences through PagedKVCache: a prompt prefilled in chunks while another decodes, a
    # third forked from the first (sharing its full pages, copying the page it appends to). Every
    # step is held to the rule against the reference on each sequence's keys kept densely.
    Hq, Hkv, D, page_size = 4, 2, 16, 4
    g = torch.Generator(DEVICE).manual_seed(seed_of("generation", dtype))
    cache = PagedKVCache(1, 12, page_size, Hkv, D, max_seqs=3, max_pages=5, dtype=dtype, device=DEVICE)
    dense = {s: (torch.empty(0, Hkv, D, device=DEVICE, dtype=dtype),) * 2 for s in range(3)}
    steps = [({0: 6, 1: 1}, None), ({0: 3, 1: 1}, None), ({0: 1, 1: 1}, (0, 2)), ({0: 1, 2: 3, 1: 1}, None),
             ({2: 1, 0: 1}, None)]
    for counts, fork in steps:
        if fork:
            cache.fork(*fork)
            dense[fork[1]] = dense[fork[0]]
        seqs, n = list(counts), list(counts.values())
        for s, c in counts.items():
            cache.reserve(s, c)
        q, k_new, v_new = (torch.randn(sum(n), H, D, generator=g, device=DEVICE, dtype=dtype) for H in (Hq, Hkv, Hkv))
        cu = offsets(n)
        o, lse = cache.attend(0, q, k_new, v_new, seqs, cu, max(n), return_lse=True)
        cache.advance(seqs, n)
        for i, s in enumerate(seqs):  # the dense copy: what the sequence's pages must hold
            rows = slice(cu[i].item(), cu[i + 1].item())
            dense[s] = (torch.cat([dense[s][0], k_new[rows]]), torch.cat([dense[s][1], v_new[rows]]))
        k, v = (torch.cat([dense[s][j] for s in seqs]) for j in (0, 1))
        lengths = [cache.lengths[s] for s in seqs]
        assert cache.seqlens[seqs].tolist() == lengths
        cu_k = offsets(lengths)
        spec = lambda q, k, v, upcast=True: reference.varlen_attention(q, k, v, cu, cu_k, True, upcast=upcast)
        hold_to_rule(o, lse, (q, k, v), None, spec, lambda q, k: reference.varlen_logsumexp(q, k, cu, cu_k))
    assert cache.pages[0][:2] == cache.pages[2][:2] and cache.pages[0][2] != cache.pages[2][2], \
        "the fork should share the two full pages and copy the third"
    cache.free(0), cache.free(1)
    assert sorted(cache.free_pages) == sorted(set(range(12)) - set(cache.pages[2]))
    assert [cache.refs[p] for p in cache.pages[2]] == [1] * len(cache.pages[2])


def test_the_pool_refuses_what_it_cannot_hold():
    cache = PagedKVCache(1, 3, 4, 1, 16, max_seqs=2, max_pages=2, device=DEVICE)
    with pytest.raises(ValueError, match="more than its 2 pages of 4"):
        cache.reserve(0, 9)
    cache.reserve(0, 8)
    with pytest.raises(RuntimeError, match="out of pages"):
        cache.reserve(1, 5)
    with pytest.raises(ValueError, match="page_size must be an int >= 1"):
        PagedKVCache(1, 3, 0, 1, 16, 2, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    ((1,) * 32, tuple(range(100, 32100, 1000)), 32, 8, 128, 16, None, None),
    ((1, 1, 2048, 4), (16384, 9000, 2048, 4097), 16, 2, 64, 256, None, None),
    ((16, 1), (8192, 5000), 8, 8, 128, 64, None, (2047, 0)),
], ids=str)
def test_paged_long_gpu(poison, case, dtype):
    test_paged_matches_reference(poison, case, dtype)
