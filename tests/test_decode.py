"""Decoding against a KV cache: decode_attention (split-KV with a log-sum-exp merge) against
`reference.decode_attention`, its num_splits rule, its serving masks (draft trees, bidirectional
ranges), and its input checks."""

import pytest
import torch

from attention_kernels import reference
from attention_kernels.testing.checks import (check_decode, check_decode_fp8, decode_inputs, draft_tree, draft_trees,
                                              hold_decode, random_ranges)
from attention_kernels.testing.cases import DECODE_CASES, DEVICE
from attention_kernels.kernels import decode, decode_attention
from attention_kernels.testing.rule import seed_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_matches_reference(poison, case, dtype):
    check_decode(case, dtype)


def test_every_split_count_agrees(poison):
    # 1 to 12 splits of 77 valid keys (several leave splits empty): the merge makes them agree
    q, k_cache, v_cache, seqlens = decode_inputs(2, 4, 2, 2, 90, 32, (77, 13), torch.float32, seed_of("splits"))
    truth = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), seqlens)
    for num_splits in range(1, 13):
        o = decode_attention(q, k_cache, v_cache, seqlens, num_splits=num_splits)
        err = (o.double() - truth).abs().max().item()
        assert err < 1e-5, f"num_splits={num_splits}: max error {err:.3g}"


def test_decode_equals_flash_on_the_valid_cache(poison):
    # One sequence, the whole cache valid: decoding is flash_attention on the same tensors
    from attention_kernels.kernels import flash_attention
    q, k_cache, v_cache, seqlens = decode_inputs(1, 4, 1, 3, 50, 16, (50,), torch.float32, seed_of("vs flash"))
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, seqlens, num_splits=3),
                               flash_attention(q, k_cache, v_cache), rtol=0, atol=2e-6)


@pytest.mark.parametrize("window", [None, (3, 2), (-1, 4), (6, 0)], ids=str)
def test_decode_without_a_causal_mask(poison, window):
    # each new token sees the whole valid cache (within the window, on both sides of its
    # position): against the window written out here, not the reference's own masks
    q, k_cache, v_cache, seqlens = decode_inputs(3, 4, 2, 5, 70, 16, (3, 70, 41), torch.float32,
                                                 seed_of("full", window))
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, num_splits=3, window=window, causal=False,
                              return_lse=True)
    left, right = window or (-1, -1)
    for b, L in enumerate(seqlens.tolist()):
        pos = torch.arange(L - 5, L)[:, None]                                   # each new token's position
        j = torch.arange(L)[None, :]
        seen = (j >= pos - left if left >= 0 else j >= 0) & (j <= pos + right if right >= 0 else j >= 0)
        k, v = (x[b].double().repeat_interleave(2, dim=0)[:, :L] for x in (k_cache, v_cache))  # (Hq, L, D)
        s = (q[b].double() @ k.transpose(-1, -2) / 4).masked_fill(~seen, float("-inf"))  # (Hq, 5, L), D = 16
        want = torch.nan_to_num(torch.softmax(s, -1)) @ v
        torch.testing.assert_close(o[b].double(), want, rtol=0, atol=2e-6)
        torch.testing.assert_close(lse[b].double(), torch.logsumexp(s, -1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("lengths", [41, [3, 70, 41], "int64"], ids=str)
def test_cache_lengths_of_any_kind(poison, lengths):
    q, k_cache, v_cache, seqlens = decode_inputs(3, 4, 2, 1, 70, 16, (3, 70, 41), torch.float32, seed_of("kinds"))
    want = [lengths] * 3 if isinstance(lengths, int) else [3, 70, 41]
    given = torch.tensor(want, device=DEVICE) if lengths == "int64" else lengths
    assert torch.equal(decode_attention(q, k_cache, v_cache, given),
                       decode_attention(q, k_cache, v_cache, torch.tensor(want, dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        decode_attention(q, k_cache, v_cache, torch.tensor([3, 2**40, 1], device=DEVICE))


def test_num_splits_rule():
    cpu = torch.device("cpu")  # the interpreter's stand-in: decode.INTERPRETER_SMS SMs
    sms = decode.INTERPRETER_SMS
    # one sequence, one k/v head, a long cache: a split per SM
    assert decode.default_num_splits(1, 1, 1, 1 << 16, cpu) == sms
    # as many programs as SMs without splitting: no split
    assert decode.default_num_splits(sms, 1, 1, 1 << 16, cpu) == 1
    # a short cache: no split shorter than MIN_SPLIT_KEYS
    assert decode.default_num_splits(1, 1, 1, decode.MIN_SPLIT_KEYS + 1, cpu) == 2
    assert decode.default_num_splits(1, 1, 1, 10, cpu) == 1


FP8_K = torch.zeros(2, 1, 8, 16).to(torch.float8_e4m3fn)  # bad_input's cache, in fp8
FP8_Q = torch.zeros(2, 2, 1, 16).to(torch.float8_e4m3fn)


def bad_input(**change):
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    args = {**dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens), **change}
    return lambda: decode_attention(**args)


@pytest.mark.parametrize("change, error, message", [
    (dict(cache_seqlens=torch.tensor([3.0, 8.0])), ValueError, "int32 tensor of shape \\(B,\\) = \\(2,\\), got float32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, "of shape \\(1,\\)"),
    (dict(cache_seqlens=[3, 8.5]), TypeError, "a list of 2 ints or one int; got list \\[3, 8.5\\]"),
    (dict(cache_seqlens=[3, 9]), ValueError, "\\[0, Tmax = 8\\].*9 for sequence 1"),
    (dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), ValueError, "\\[0, Tmax = 8\\].*9 for sequence 1"),
    (dict(cache_seqlens=torch.tensor([-1, 8], dtype=torch.int32)), ValueError, "-1 for sequence 0"),
    (dict(num_splits=0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(num_splits=2.0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(num_splits=70000), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(window=(4, 1)), ValueError, "causal attention means right = 0"),
    (dict(tree_mask=torch.ones(2, 1, 1)), ValueError, "tree_mask must be a bool tensor of shape \\(B, Tq, Tq\\) = "
     "\\(2, 1, 1\\) or \\(Tq, Tq\\) = \\(1, 1\\).*; got float32 of shape \\(2, 1, 1\\)"),
    (dict(tree_mask=torch.ones(2, 2, 2, dtype=torch.bool)), ValueError,
     "tree_mask must .*got bool of shape \\(2, 2, 2\\)"),
    (dict(tree_mask=[[True]]), TypeError, "tree_mask must be a bool tensor .*got list"),
    (dict(tree_mask=torch.ones(1, 1, dtype=torch.bool, device="meta")), ValueError, "tree_mask must be on q's device"),
    (dict(bidirectional=torch.tensor([[0.0, 1.0]] * 2)), ValueError,
     "bidirectional must be an int32 or int64 tensor of shape \\(B, R, 2\\) or \\(B, 2\\), B = 2.*got float32 of "
     "shape \\(2, 2\\)"),
    (dict(bidirectional=torch.zeros(3, 2, dtype=torch.int32)), ValueError,
     "bidirectional must .*got int32 of shape \\(3, 2\\)"),
    (dict(bidirectional=torch.zeros(2, 1, 3, dtype=torch.int32)), ValueError,
     "bidirectional must .*shape \\(2, 1, 3\\)"),
    (dict(bidirectional=(0, 4)), TypeError, "bidirectional must be an int32 .*got tuple"),
    (dict(k_scale=0.5), ValueError, "k_scale and v_scale are for fp8 caches .*got a float32 cache"),
    (dict(k_cache=FP8_K), TypeError, "k_cache and v_cache must share one dtype .*got k_cache float8_e4m3fn, "
     "v_cache float32"),
    (dict(k_cache=FP8_K, v_cache=FP8_K.to(torch.float8_e5m2)), TypeError, "k_cache and v_cache must share one dtype"),
    (dict(q=FP8_Q, k_cache=FP8_K, v_cache=FP8_K), TypeError, "q has dtype float8_e4m3fn"),
    (dict(k_cache=FP8_K, v_cache=FP8_K, k_scale=torch.ones(3)), ValueError,
     "k_scale must be a float, or a float32 tensor of shape \\(\\), \\(1,\\) or \\(Hkv,\\) = \\(1,\\) .*got float32 "
     "of shape \\(3,\\)"),
    (dict(k_cache=FP8_K, v_cache=FP8_K, v_scale=torch.ones(1, dtype=torch.float16)), ValueError,
     "v_scale must be .*got float16 of shape \\(1,\\)"),
    (dict(k_cache=FP8_K, v_cache=FP8_K, v_scale=-1.0), ValueError, "v_scale must be finite and > 0, got -1.0"),
    (dict(k_cache=FP8_K, v_cache=FP8_K, k_scale=[0.5]), TypeError, "k_scale must be .*or None; got list"),
])
def test_bad_decode_inputs_are_refused(change, error, message):
    change = {name: x.to(DEVICE) if isinstance(x, torch.Tensor) and x.device.type != "meta" else x
              for name, x in change.items()}
    with pytest.raises(error, match=message):
        bad_input(**change)()


# fp8 caches: (case, q's dtype, the format, per-k/v-head scales): an empty sequence, GQA with a
# window at D = 80, 16 new tokens against one k/v head at D = 96; both formats, all three q dtypes
FP8_DECODE_CASES = [
    (DECODE_CASES[0], torch.bfloat16, torch.float8_e4m3fn, True),
    (DECODE_CASES[1], torch.float16, torch.float8_e4m3fn, False),
    (DECODE_CASES[4], torch.bfloat16, torch.float8_e5m2, True),
    (DECODE_CASES[2], torch.float32, torch.float8_e5m2, False),
]


@pytest.mark.parametrize("case, dtype, fmt, per_head", FP8_DECODE_CASES, ids=str)
def test_decode_with_an_fp8_cache(poison, case, dtype, fmt, per_head):
    check_decode_fp8(case, dtype, fmt, per_head)


def test_an_fp8_cache_without_scales_is_read_at_scale_one(poison):
    # and its scales fold into the score's scale and the output: scaling the cache by 2 (exact in
    # fp8) while halving the scales changes nothing
    q, k_cache, v_cache, seqlens = decode_inputs(2, 4, 2, 2, 40, 32, (40, 17), torch.bfloat16, seed_of("fp8 1.0"))
    k8, v8 = (x.float().to(torch.float8_e4m3fn) for x in (k_cache, v_cache))
    o, lse = decode_attention(q, k8, v8, seqlens, return_lse=True)
    hold_decode(o, lse, q, k8, v8, seqlens)
    double = lambda x: (x.float() * 2).to(torch.float8_e4m3fn)
    assert torch.equal(decode_attention(q, double(k8), double(v8), seqlens, k_scale=0.5, v_scale=0.5), o)


def test_more_splits_than_key_blocks_are_clamped(poison, monkeypatch):
    # 8 keys are one key block: 60 splits would be 59 empty programs and a 64-wide merge
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    launched, wrap = [], decode.wrap_triton

    class Spy:  # records each launch's NUM_SPLITS, then launches
        def __init__(self, kernel):
            self.kernel = wrap(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["NUM_SPLITS"])
                return self.kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(decode, "wrap_triton", Spy)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, seqlens, num_splits=60),
                               decode_attention(q, k_cache, v_cache, seqlens, num_splits=1), rtol=0, atol=0)
    assert launched == [1] * 4  # split and merge, twice: 60 clamped to the one key block


def test_unchecked_lengths_stay_inside_the_cache(poison):
    # check_seqlens=False: no host read; a length past Tmax is clamped to Tmax, never read beyond
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    long = torch.tensor([3, 1000], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, long, check_seqlens=False),
                               decode_attention(q, k_cache, v_cache, seqlens), rtol=0, atol=0)


def test_decode_refuses_to_run_where_gradients_are_expected():
    q, k_cache, v_cache, seqlens = decode_inputs(1, 1, 1, 1, 4, 16, (4,), torch.float32, 0)
    with pytest.raises(RuntimeError, match="no backward"):
        decode_attention(q.requires_grad_(), k_cache, v_cache, seqlens)
    with torch.no_grad():
        decode_attention(q, k_cache, v_cache, seqlens)


# ----------------------------------------------------------------------------- serving masks

# Draft trees: (B, Hq, Hkv, Tq, Tmax, D, cache lengths (the new tokens' own included), num_splits,
# window, causal, tree): "each" a draft tree per sequence (B, Tq, Tq), "shared" one (Tq, Tq) for all,
# "any" random bits (B, Tq, Tq), tokens seeing later ones too, as FlashInfer's custom_mask may.
TREE_CASES = [
    (2, 4, 2, 1, 40, 16, (1, 40), 2, None, True, "each"),               # Tq = 1: the token sees itself
    (3, 8, 2, 5, 90, 80, (5, 90, 37), 3, None, True, "each"),           # grouped heads, D = 80, no cache before
    (2, 4, 4, 7, 70, 32, (70, 20), 2, (4, 0), True, "shared"),          # the window's left bound on tree rows
    (2, 2, 1, 6, 50, 16, (50, 9), None, (-1, 2), False, "each"),        # not causal: the cache ahead too
    (1, 8, 1, 9, 64, 16, (64,), 2, None, True, "any"),                   # any bits: later tokens in another row block
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", TREE_CASES, ids=str)
def test_decode_with_draft_trees(poison, case, dtype):
    *sizes, lengths, num_splits, window, causal, kind = case
    seed = seed_of("tree", case, dtype)
    q, k_cache, v_cache, seqlens = decode_inputs(*sizes, lengths, dtype, seed)
    g = torch.Generator(DEVICE).manual_seed(seed)
    B, Tq = sizes[0], sizes[3]
    tree = {"each": lambda: draft_trees([Tq] * B, g), "shared": lambda: draft_tree(Tq, g),
            "any": lambda: torch.rand(B, Tq, Tq, generator=g, device=DEVICE) < 0.5}[kind]()
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, num_splits=num_splits, window=window, causal=causal,
                              tree_mask=tree, return_lse=True)
    hold_decode(o, lse, q, k_cache, v_cache, seqlens, window, causal=causal, tree_mask=tree)


# Ranges that cross key blocks (32 under the interpreter) and overlap, over new tokens in two row
# blocks (16 query heads a k/v head: 4 tokens a block). Sequence 0's new tokens are
# positions 94..99, of which [90, 97) and [92, 99) hold 94..98 (each seeing later new tokens);
# [10, 40) holds none of them. Sequence 1's 39..44: [20, 42) reaches back past a window of 8 and a
# block boundary. Sequence 2 has no cache before its tokens 0..5: [2, 5) is a prefix-LM's prefix.
RANGES = [[[10, 40], [90, 97], [92, 99]], [[20, 42], [0, 0], [50, 60]], [[2, 5], [4, 3], [0, 0]]]


@pytest.mark.parametrize("masks, dtype", [("ranges", torch.float32), ("ranges, tree and window", torch.float32),
                                          ("ranges, tree and window", torch.bfloat16),
                                          ("one int64 range each, not causal", torch.bfloat16)], ids=str)
def test_decode_with_bidirectional_ranges(poison, masks, dtype):
    seed = seed_of("ranges", masks, dtype)
    q, k_cache, v_cache, seqlens = decode_inputs(3, 16, 1, 6, 100, 16, (100, 45, 6), dtype, seed)  # 2 row blocks
    g = torch.Generator(DEVICE).manual_seed(seed)
    ranges = torch.tensor(RANGES, dtype=torch.int32, device=DEVICE)               # (B, R, 2)
    kw = dict(bidirectional=ranges)
    if masks == "ranges, tree and window":
        kw.update(tree_mask=draft_trees([6] * 3, g), window=(8, 0))
        ranges = torch.cat([ranges, random_ranges([100, 45, 6], 2, g)], dim=1)      # and random ones, overlapping
        kw["bidirectional"] = ranges
    elif masks == "one int64 range each, not causal":
        kw.update(bidirectional=ranges[:, 0].long(), causal=False, window=(5, 0))   # (B, 2)
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, num_splits=3, return_lse=True, **kw)
    hold_decode(o, lse, q, k_cache, v_cache, seqlens, **kw)


def visible_written_out(Tq, L, causal, window, tree, ranges):
    """The serving masks' meaning for one sequence, one (query, key) pair at a time, as
    docs/serving.md says it: (Tq, L) bool."""
    left, right = window
    seen = torch.zeros(Tq, L, dtype=torch.bool)
    for i in range(Tq):
        p = L - Tq + i                                                            # new token i's position
        for j in range(L):
            rule = (left < 0 or j >= p - left) and (j <= p if causal else right < 0 or j <= p + right)
            if tree is not None and j >= L - Tq:                                  # a new token's key
                rule = bool(tree[i, j - (L - Tq)]) and (left < 0 or j >= p - left)
            together = any(s <= p < e and s <= j < e for s, e in ranges)
            seen[i, j] = rule or together
    return seen


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (True, (3, 0)), (False, (2, 1))], ids=str)
def test_the_reference_means_what_the_docs_say(causal, window):
    # reference.decode_attention's masks against the rule written out pair by pair: the same
    # output as reference.attention under that (Tq, L) mask
    g = torch.Generator().manual_seed(seed_of("spec", causal, window))
    Tq, Hq, D, lengths = 5, 2, 8, (12, 5, 3)
    q = torch.randn(3, Hq, Tq, D, generator=g, dtype=torch.float64)
    k, v = (torch.randn(3, 1, 12, D, generator=g, dtype=torch.float64) for _ in range(2))
    tree = torch.rand(3, Tq, Tq, generator=g) < 0.5                               # any bits, later tokens too
    ranges = [[(2, 9), (8, 11)], [(0, 3), (3, 3)], [(1, 2), (0, 0)]]
    got, lse = reference.decode_attention(q, k, v, torch.tensor(lengths), causal=causal, window=window, tree_mask=tree,
                                          bidirectional=torch.tensor(ranges), return_lse=True)
    for b, L in enumerate(lengths):
        seen = visible_written_out(Tq, L, causal, window, tree[b], ranges[b])
        want = reference.attention(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], False, attn_mask=seen)
        torch.testing.assert_close(got[b:b + 1], want, rtol=0, atol=1e-12)
        want_lse = reference.logsumexp(q[b:b + 1], k[b:b + 1, :, :L], False, attn_mask=seen)
        torch.testing.assert_close(lse[b:b + 1], want_lse, rtol=0, atol=1e-12)


def test_the_kernel_reads_the_masks(poison):
    # A tree that hides one key moves exactly the rows it hides it from; the causal tree and an
    # empty range change nothing; a row that sees no key (no cache, its tree row empty) is 0
    q, k_cache, v_cache, seqlens = decode_inputs(2, 4, 2, 4, 40, 16, (40, 4), torch.float32, seed_of("reads"))
    plain = decode_attention(q, k_cache, v_cache, seqlens, num_splits=2)
    causal_tree = torch.ones(4, 4, dtype=torch.bool, device=DEVICE).tril()
    tree = causal_tree.clone()
    tree[3, 1] = False                                                            # token 3 no longer sees token 1
    o = decode_attention(q, k_cache, v_cache, seqlens, num_splits=2, tree_mask=tree)
    moved = (o - plain).abs().amax(dim=(1, 3)) > 1e-3                             # (B, Tq)
    assert moved.tolist() == [[False, False, False, True]] * 2, moved
    empty = torch.zeros(2, 1, 2, dtype=torch.int32, device=DEVICE)
    for same in (dict(tree_mask=causal_tree), dict(bidirectional=empty)):
        torch.testing.assert_close(decode_attention(q, k_cache, v_cache, seqlens, num_splits=2, **same), plain,
                                   rtol=0, atol=1e-6)
    prefix = torch.tensor([[0, 0], [0, 4]], dtype=torch.int32, device=DEVICE)     # sequence 1: all four see each other
    o = decode_attention(q, k_cache, v_cache, seqlens, num_splits=2, bidirectional=prefix)
    torch.testing.assert_close(o[1], decode_attention(q, k_cache, v_cache, seqlens, causal=False)[1], rtol=0, atol=1e-6)
    tree[1] = False
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, tree_mask=tree, return_lse=True)
    assert torch.equal(o[1, :, 1], torch.zeros_like(o[1, :, 1])) and bool(torch.isneginf(lse[1, :, 1]).all())
    assert not torch.isnan(o).any() and (o[0, :, 1] != 0).all()                  # sequence 0's token 1 sees its cache


def test_unchecked_masks_read_nothing_on_the_host_and_compile_whole(poison, monkeypatch):
    q, k_cache, v_cache, seqlens = decode_inputs(2, 4, 2, 3, 40, 16, (40, 7), torch.float32, seed_of("masks op"))
    g = torch.Generator(DEVICE).manual_seed(1)
    masks = dict(tree_mask=draft_trees([3, 3], g), bidirectional=torch.tensor([[30, 39], [0, 5]], device=DEVICE))
    step = lambda q, k, v, lengths, tree_mask, bidirectional: decode_attention(
        q, k, v, lengths, check_seqlens=False, num_splits=2, tree_mask=tree_mask, bidirectional=bidirectional)
    checked = decode_attention(q, k_cache, v_cache, seqlens, num_splits=2, **masks)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k_cache, v_cache, seqlens, **masks)
    torch.testing.assert_close(compiled, checked, rtol=0, atol=0)
    args = (q, k_cache, v_cache, seqlens, 0.25, 2, -1, 0, 0.0, None, None, masks["tree_mask"],
            masks["bidirectional"].int())
    assert set(torch.library.opcheck(torch.ops.attention_kernels.decode.default, args).values()) == {"SUCCESS"}
    for name in ("tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("read on the host"))
    torch.testing.assert_close(step(q, k_cache, v_cache, seqlens, **masks), checked, rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    (4, 32, 8, 1, 16384, 128, (16384, 1, 9000, 4097), None, None),
    (2, 16, 2, 4, 8192, 64, (8192, 5000), None, (2047, 0)),
    (64, 8, 8, 1, 1024, 128, tuple(range(1, 1025, 16)), None, None),
], ids=str)
def test_decode_long_gpu(poison, case, dtype):
    test_decode_matches_reference(poison, case, dtype)
