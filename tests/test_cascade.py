"""Shared prefixes: merge_attention_states against the reference merge and against attention over
the union of two key sets, and cascade_attention (a prefix attended once for the batch, each
sequence's suffix in a paged cache) against attention over each sequence's concatenated keys."""

import math

import pytest
import torch

from attention_kernels import reference
from attention_kernels.kernels import flash_attention
from attention_kernels.kernels.cascade import cascade_attention, merge_attention_states
from attention_kernels.reference.naive import dequantize, merge_states, quantize
from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.testing.checks import I32, fp8_cache, offsets, paged_inputs, torch_fp8_casts
from attention_kernels.testing.rule import hold_to_rule, make_qkv, seed_of

INF = math.inf


def test_merging_two_key_sets_is_attention_over_their_union():
    # float64, the reference on each part: the merge is exact math, not a tolerance
    q, k, v, _ = make_qkv(Shape(2, 4, 2, 7, 45, 24), torch.float64, seed=seed_of("union"))
    part = lambda a, z: (reference.attention(q, k[:, :, a:z], v[:, :, a:z], causal=False),
                         reference.logsumexp(q, k[:, :, a:z], causal=False))
    o, lse = merge_attention_states(*part(0, 19), *part(19, 45))
    torch.testing.assert_close(o, reference.attention(q, k, v, causal=False), rtol=0, atol=1e-12)
    torch.testing.assert_close(lse, reference.logsumexp(q, k, causal=False), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merged_flash_halves_hold_to_the_rule(poison, dtype):
    # flash_attention over two key ranges, merged, against the reference over all keys
    q, k, v, _ = make_qkv(Shape(1, 6, 2, 33, 97, 40), dtype, "bthd", seed_of("halves", dtype))
    q, k, v = q.detach(), k.detach(), v.detach()
    halves = [flash_attention(q, k[:, :, a:z], v[:, :, a:z], causal=False, return_lse=True) for a, z in ((0, 50), (50, 97))]
    o, lse = merge_attention_states(*halves[0], *halves[1])
    assert o.dtype == lse.dtype == torch.float32
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, False, None, upcast)
    hold_to_rule(o.to(dtype), lse, (q, k, v), None, spec, lambda q, k: reference.logsumexp(q, k, False))


def test_rows_without_keys_weigh_nothing():
    # per row: both sides seen, only a, only b, neither; against the reference merge in float64
    g = torch.Generator(DEVICE).manual_seed(1)
    o_a, o_b = (torch.randn(4, 3, generator=g, device=DEVICE) for _ in range(2))  # (rows, D)
    lse_a = torch.tensor([0.5, 80.0, -INF, -INF], device=DEVICE)
    lse_b = torch.tensor([-1.0, -INF, 90.0, -INF], device=DEVICE)
    o, lse = merge_attention_states(o_a, lse_a, o_b, lse_b)
    want, want_lse = merge_states(o_a.double(), lse_a.double(), o_b.double(), lse_b.double())
    torch.testing.assert_close(o.double(), want, rtol=0, atol=1e-6)
    torch.testing.assert_close(lse.double(), want_lse, rtol=0, atol=1e-5)
    assert torch.equal(o[1], o_a[1]) and torch.equal(o[2], o_b[2]) and torch.equal(o[3], torch.zeros(3))
    assert lse[3] == -INF and lse[1] == 80.0 and lse[2] == 90.0


def concatenated(k_prefix, cache, table, lengths):
    """Each sequence's keys (or values): the prefix then its suffix, packed (sum (P + L_b), Hkv, D)."""
    suffix = reference.gather_pages(cache, table, lengths)                   # (sum L, Hkv, D)
    ends = [0, *torch.tensor(lengths.tolist()).cumsum(0).tolist()]
    return torch.cat([torch.cat([k_prefix.to(suffix.dtype), suffix[a:z]]) for a, z in zip(ends, ends[1:])])


# (new tokens per sequence, suffix keys per sequence after any append, P, Hq, Hkv, D, page size,
# append): decoding and a prefill chunk, an empty suffix before the append, odd sizes, GQA and MQA
CASCADE_CASES = [
    ((1, 4, 1), (9, 4, 33), 53, 6, 2, 24, 4, True),
    ((2, 1), (2, 70), 130, 4, 1, 40, 16, False),
    ((1, 3), (5, 3), 0, 4, 2, 16, 2, False),                               # no prefix: the suffix alone
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASCADE_CASES, ids=str)
def test_cascade_is_attention_over_the_concatenation(poison, case, dtype):
    new, lengths, P, Hq, Hkv, D, page_size, append = case
    seed = seed_of("cascade", case, dtype)
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, Hq, Hkv, D, page_size, dtype, seed,
                                                           share=not append)  # a shared page is not appended to
    g = torch.Generator(DEVICE).manual_seed(seed)
    k_prefix, v_prefix = (torch.randn(Hkv, P, D, generator=g, device=DEVICE, dtype=dtype).transpose(0, 1)
                          for _ in range(2))                                 # (P, Hkv, D), not contiguous
    kw = {}
    if append:  # the new tokens' keys arrive with the call
        kw = dict(k_new=torch.randn(sum(new), Hkv, D, generator=g, device=DEVICE, dtype=dtype),
                  v_new=torch.randn(sum(new), Hkv, D, generator=g, device=DEVICE, dtype=dtype))
        seqlens = seqlens - torch.tensor(new, **I32)
    o, lse = cascade_attention(q, k_prefix, v_prefix, k_cache, v_cache, table, seqlens, cu, max(new), return_lse=True,
                               num_splits=3, **kw)
    after = seqlens + torch.tensor(new, **I32) if append else seqlens
    k, v = concatenated(k_prefix, k_cache, table, after), concatenated(v_prefix, v_cache, table, after)
    cu_k = offsets([P + L for L in after.tolist()])
    spec = lambda q, k, v, upcast=True: reference.varlen_attention(q, k, v, cu, cu_k, True, None, upcast)
    hold_to_rule(o, lse, (q, k, v), None, spec, lambda q, k: reference.varlen_logsumexp(q, k, cu, cu_k))


def test_cascade_with_an_fp8_prefix_and_pool(poison):
    new, lengths, P, Hq, Hkv, D = (1, 2), (12, 30), 41, 4, 2, 32
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, Hq, Hkv, D, 8, torch.bfloat16,
                                                           seed_of("cascade fp8"))
    g = torch.Generator(DEVICE).manual_seed(3)
    k_prefix, v_prefix = (torch.randn(P, Hkv, D, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
    k8, v8, k_scale, v_scale = fp8_cache(k_cache, v_cache, torch.float8_e4m3fn, True, heads_dim=2)
    kp8, vp8 = (quantize(x, s, torch.float8_e4m3fn, 1) for x, s in ((k_prefix, k_scale), (v_prefix, v_scale)))
    with torch_fp8_casts():
        o, lse = cascade_attention(q, kp8, vp8, k8, v8, table, seqlens, cu, max(new), return_lse=True,
                                   k_scale=k_scale, v_scale=v_scale)
    k, v = (concatenated(dequantize(prefix, s, 1), dequantize(pool, s, 2), table, seqlens)   # float64, exact
            for prefix, pool, s in ((kp8, k8, k_scale), (vp8, v8, v_scale)))
    cu_k = offsets([P + L for L in lengths])
    spec = lambda q, k, v, upcast=True: reference.varlen_attention(q, k, v, cu, cu_k, True, None, upcast)
    hold_to_rule(o, lse, (q, k, v), None, spec, lambda q, k: reference.varlen_logsumexp(q, k, cu, cu_k))


def states(**change):
    o, lse = torch.zeros(3, 2, 8, device=DEVICE), torch.zeros(3, 2, device=DEVICE)
    args = dict(o_a=o, lse_a=lse, o_b=o.clone(), lse_b=lse.clone())
    return lambda: merge_attention_states(**{**args, **change})


@pytest.mark.parametrize("change, error, message", [
    (dict(o_b=torch.zeros(3, 2, 9)), ValueError, "o_a and o_b must have one shape \\(..., D\\)"),
    (dict(lse_a=torch.zeros(2, 3)), ValueError, "lse_a must have shape o.shape\\[:-1\\] = \\(3, 2\\).*transpose"),
    (dict(lse_b=torch.zeros(3, 2, dtype=torch.int32)), TypeError, "lse_b must be a float tensor"),
    (dict(o_a=[[0.0]]), TypeError, "o_a must be a torch.Tensor, got list"),
    (dict(lse_b=torch.zeros(3, 2, device="meta")), ValueError, "lse_b must be on o_a's device"),
])
def test_bad_states_are_refused(change, error, message):
    with pytest.raises(error, match=message):
        states(**change)()


def prefix_call(**change):
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs((1, 2), (5, 6), 4, 2, 16, 4, torch.float32, 0, share=False)
    args = dict(q=q, k_prefix=torch.zeros(7, 2, 16, device=DEVICE), v_prefix=torch.zeros(7, 2, 16, device=DEVICE),
                k_cache=k_cache, v_cache=v_cache, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu,
                max_seqlen_q=2)
    return lambda: cascade_attention(**{**args, **change})


@pytest.mark.parametrize("change, error, message", [
    (dict(k_prefix=torch.zeros(7, 1, 16)), ValueError, "k_prefix and v_prefix must have one shape"),
    (dict(k_prefix=torch.zeros(7, 1, 16), v_prefix=torch.zeros(7, 1, 16)), ValueError,
     "k_prefix must be \\(P, Hkv, D\\) = \\(P, 2, 16\\) in the pool's dtype float32"),
    (dict(v_prefix=torch.zeros(1, 7, 2, 16)), ValueError, "v_prefix must have 3 dimensions \\(P, Hkv, D\\)"),
    (dict(k_prefix=torch.zeros(7, 2, 16, dtype=torch.float16), v_prefix=torch.zeros(7, 2, 16, dtype=torch.float16)),
     ValueError, "k_prefix must be .*float32.*got \\(7, 2, 16\\) float16"),
    (dict(k_prefix=None), TypeError, "k_prefix must be a torch.Tensor"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be an int from 1"),
])
def test_bad_cascade_inputs_are_refused(change, error, message):
    change = {name: x.to(DEVICE) if isinstance(x, torch.Tensor) else x for name, x in change.items()}
    with pytest.raises(error, match=message):
        prefix_call(**change)()
