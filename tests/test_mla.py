"""Multi-head latent attention decoding (`mla_decode`): the reference against a computation
written out here, the kernel against the reference (DeepSeek's 576 = 512 + 64 head, 128 heads,
smaller heads, ragged caches, pages of 1, 16 and 64, one to 16 new tokens, with and without
appending), FlashMLA's layouts and strided inputs, unchecked calls, and bad inputs."""

import math

import pytest
import torch

from attention_kernels.kernels.mla import mla_decode
from attention_kernels.reference import naive
from attention_kernels.testing.cases import DEVICE
from attention_kernels.testing.checks import I32, paged_inputs
from attention_kernels.testing.rule import hold_to_rule, seed_of

# (new tokens per sequence, keys per sequence after them, Hq, D, head_dim_v, page size, num_splits,
# append). Ragged caches, an empty cache before its first token, a sequence without new tokens,
# one with fewer keys than new tokens (written by the caller: its first row sees none); pages of
# 1 (each key through the table), 16 and 64 (whole key tiles in a page); DeepSeek's head (512 latent
# + 64 rotary), odd heads (48 + 24, 64 + 16) and none rotary; 128 heads of one token (two row blocks
# read the same tiles); 16 new tokens (a speculative draft); split counts that do not divide.
MLA_CASES = [
    ((1, 3, 1, 0), (40, 7, 1, 5), 16, 72, 48, 16, 3, True),
    ((1, 2), (100, 65), 16, 576, 512, 64, 2, True),
    ((1,), (70,), 128, 576, 512, 64, None, False),
    ((16, 2), (20, 33), 4, 80, 64, 1, 4, True),
    ((4, 1, 2), (9, 130, 1), 8, 40, 40, 16, 5, False),
]
DEEPSEEK_SCALE = 192 ** -0.5  # the softmax scale of DeepSeek's 192-wide q.k head, before absorption


def mla_inputs(new, lengths, Hq, D, page_size, dtype, seed, append):
    """q (total_q, Hq, D), a shuffled pool (num_pages, page_size, D) holding each sequence's
    `lengths` positions (its new tokens' own the last), its block table and offsets; with `append`,
    also kv_new (total_q, D) and the lengths before the new tokens (else the lengths themselves)."""
    q, pool, _, table, after, cu = paged_inputs(new, lengths, Hq, 1, D, page_size, dtype, seed, share=not append)
    g = torch.Generator(DEVICE).manual_seed(seed + 1)
    kv_new = torch.randn(sum(new), D, generator=g, device=DEVICE, dtype=dtype) if append else None
    before = after - torch.tensor(new, **I32) if append else after
    return q, pool[:, :, 0], table, before, cu, kv_new


def hold_mla(o, lse, q, kv_cache, table, lengths, cu, head_dim_v, scale=None):
    """mla_decode's output and log-sum-exp held to the rule against `reference.mla_decode`; lengths:
    the keys after any append."""
    spec = lambda q, kv, upcast=True: naive.mla_decode(q, kv, table, lengths, cu, head_dim_v, scale, upcast)
    spec_lse = lambda q, kv: naive.mla_decode(q, kv, table, lengths, cu, head_dim_v, scale, return_lse=True)[1]
    hold_to_rule(o, lse, (q, kv_cache), None, spec, spec_lse)


def test_reference_is_attention_over_the_gathered_latent_rows():
    # Written out: sequence b's latent rows gathered one position at a time, every head's scores
    # against them, the softmax over the keys up to each new token, and the values the rows' first
    # head_dim_v columns
    new, lengths, Hq, D, Dv, page_size = (2, 1, 3), (9, 4, 3), 3, 24, 16, 4
    q, kv_cache, table, seqlens, cu, _ = mla_inputs(new, lengths, Hq, D, page_size, torch.float64, seed_of("ref"), False)
    out, lse = naive.mla_decode(q, kv_cache, table, seqlens, cu, Dv, scale=0.3, return_lse=True)
    for b, (q0, L) in enumerate(zip(cu.tolist(), lengths)):
        rows = torch.stack([kv_cache[int(table[b, j // page_size]), j % page_size] for j in range(L)])  # (L, D)
        for t in range(new[b]):
            s = q[q0 + t] @ rows.T * 0.3                                            # (Hq, L)
            s[:, L - new[b] + t + 1:] = float("-inf")                               # keys after the token
            torch.testing.assert_close(out[q0 + t], torch.softmax(s, -1) @ rows[:, :Dv], rtol=0, atol=1e-12)
            torch.testing.assert_close(lse[:, q0 + t], torch.logsumexp(s, -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", MLA_CASES, ids=str)
def test_mla_matches_reference(poison, case, dtype):
    new, lengths, Hq, D, Dv, page_size, num_splits, append = case
    q, kv_cache, table, seqlens, cu, kv_new = mla_inputs(new, lengths, Hq, D, page_size, dtype,
                                                         seed_of("mla", case, dtype), append)
    want = kv_cache.clone()
    for b, (L, n) in enumerate(zip(seqlens.tolist(), new)) if append else ():  # the scatter the call replaces
        for t in range(n):
            want[table[b, (L + t) // page_size], (L + t) % page_size] = kv_new[cu[b] + t]
    before = seqlens.clone()
    o, lse = mla_decode(q, kv_cache, table, seqlens, cu, max(new), kv_new=kv_new, head_dim_v=Dv, num_splits=num_splits,
                        return_lse=True)
    assert torch.equal(kv_cache, want), "the pages differ from the scatter"
    assert torch.equal(seqlens, before), "cache_seqlens was changed"
    hold_mla(o, lse, q, kv_cache, table, torch.tensor(lengths, **I32), cu, Dv)


def test_flashmla_layouts_strided_inputs_and_the_scale(poison):
    # FlashMLA's (num_pages, page_size, 1, D) pool and (total_q, 1, D) new rows, q with its tokens
    # not adjacent in memory: the numbers of the plain call. The scale defaults to 1/sqrt(D).
    new, lengths, Hq, D, Dv = (1, 3), (30, 20), 4, 40, 32
    q, kv_cache, table, seqlens, cu, kv_new = mla_inputs(new, lengths, Hq, D, 8, torch.float32, seed_of("layouts"), True)
    kv_4d, kv_new_4d = kv_cache.clone()[:, :, None], kv_new[:, None]                    # (.., 1, D)
    q_strided = q.transpose(0, 1).contiguous().transpose(0, 1)                          # (total_q, Hq, D), (Hq, total_q, D) storage
    plain = mla_decode(q, kv_cache, table, seqlens, cu, 3, kv_new=kv_new, head_dim_v=Dv, scale=DEEPSEEK_SCALE)
    other = mla_decode(q_strided, kv_4d, table, seqlens, cu, 3, kv_new=kv_new_4d, head_dim_v=Dv, scale=DEEPSEEK_SCALE)
    assert torch.equal(kv_4d[:, :, 0], kv_cache), "the 4-D pool was not appended to as the 3-D one"
    torch.testing.assert_close(other, plain, rtol=0, atol=0)
    after = seqlens + torch.tensor(new, **I32)
    hold_mla(plain, None, q, kv_cache, table, after, cu, Dv, DEEPSEEK_SCALE)
    default = mla_decode(q, kv_cache, table, after, cu, 3, head_dim_v=Dv)
    torch.testing.assert_close(default, mla_decode(q, kv_cache, table, after, cu, 3, head_dim_v=Dv,
                                                   scale=1 / math.sqrt(D)), rtol=0, atol=0)
    assert not torch.allclose(default, plain)


def test_unchecked_calls_read_nothing_on_the_host_and_stay_inside_the_pool(poison, monkeypatch):
    q, kv_cache, table, seqlens, cu, _ = mla_inputs((1, 3), (9, 20), 4, 24, 4, torch.float32, seed_of("unchecked"), False)
    checked = mla_decode(q, kv_cache, table, seqlens, cu, 3, head_dim_v=16)
    for name in ("tolist", "item", "cpu"):
        monkeypatch.setattr(torch.Tensor, name, lambda self, *a, **k: pytest.fail("read on the host"))
    torch.testing.assert_close(mla_decode(q, kv_cache, table, seqlens, cu, 3, head_dim_v=16, check=False), checked,
                               rtol=0, atol=0)
    # a length past the table's capacity and a page id past the pool: clamped, finite, no crash
    bad_table = table.clone()
    bad_table[0, 0] = 10 ** 6
    out = mla_decode(q, kv_cache, bad_table, torch.tensor([9, 10 ** 6], **I32), cu, 3, head_dim_v=16, check=False)
    assert torch.isfinite(out).all()


def base_call(**change):
    q, kv_cache, table, seqlens, cu, _ = mla_inputs((1, 3), (9, 20), 4, 24, 4, torch.float32, 0, False)
    args = dict(q=q, kv_cache=kv_cache, block_table=table, cache_seqlens=seqlens, cu_seqlens_q=cu, max_seqlen_q=3,
                head_dim_v=16)
    for key, value in change.items():
        args[key] = value(args) if callable(value) else value
    return lambda: mla_decode(**args)


@pytest.mark.parametrize("change, error, message", [
    (dict(q=lambda a: a["q"][None]), ValueError, "q must have shape \\(total_q, Hq, D\\)"),
    (dict(q=lambda a: a["q"].double()), TypeError, "q has dtype float64; supported"),
    (dict(q=[1.0]), TypeError, "q must be a torch.Tensor"),
    (dict(kv_cache=lambda a: a["kv_cache"].half()), ValueError, "kv_cache must have q's dtype float32"),
    (dict(kv_cache=lambda a: a["kv_cache"][:, :, None].expand(-1, -1, 2, -1)), ValueError,
     "kv_cache must have shape \\(num_pages, page_size, D\\)"),                    # two heads: not MLA
    (dict(kv_cache=lambda a: a["kv_cache"][..., :20]), ValueError, "kv_cache must have shape .* D as q's"),
    (dict(kv_cache=lambda a: a["kv_cache"].transpose(1, 2).contiguous().transpose(1, 2)), ValueError,
     "kv_cache must have unit stride along D"),
    (dict(head_dim_v=25), ValueError, "head_dim_v must be an int from max\\(1, D - 128\\) to min\\(D, 512\\)"),
    (dict(head_dim_v=16.0), TypeError, "head_dim_v must be an int"),
    (dict(kv_new=lambda a: torch.zeros(3, 24, device=DEVICE)), ValueError, "kv_new must have shape \\(total_q, D\\) = "
     "\\(4, 24\\)"),
    (dict(kv_new=lambda a: torch.zeros(4, 24, device=DEVICE, dtype=torch.float16)), ValueError,
     "kv_new must have the cache's dtype float32"),
    (dict(kv_new=lambda a: torch.zeros(4, 24, device=DEVICE), cache_seqlens=torch.tensor([9, 22], **I32)), ValueError,
     "cache_seqlens \\+ the new tokens .* must lie in \\[0, 24\\] .*, got 25 for sequence 1"),
    (dict(block_table=lambda a: a["block_table"].long()), ValueError, "block_table must be an int32 tensor"),
    (dict(cache_seqlens=lambda a: a["cache_seqlens"][:1]), ValueError, "cache_seqlens must be an int32 tensor of "
     "shape \\(2,\\)"),
    (dict(cu_seqlens_q=torch.tensor([0, 2, 3], **I32)), ValueError, "cu_seqlens_q must .* end at total_q = 4"),
    (dict(max_seqlen_q=0), ValueError, "max_seqlen_q must be an int from 1 to total_q = 4"),
    (dict(cu_seqlens_q=torch.tensor([0, 0, 4], **I32)), ValueError, "max_seqlen_q must be >= the most new tokens"),
    (dict(cache_seqlens=torch.tensor([-1, 20], **I32)), ValueError, "-1 for sequence 0"),
    (dict(block_table=lambda a: a["block_table"].index_fill(1, torch.tensor([0], device=DEVICE), 99)),
     ValueError, "block_table\\[0, 0\\] = 99 names no page: the pool holds"),
    (dict(scale=0.0), ValueError, "scale must be > 0"),
    (dict(scale="0.1"), TypeError, "scale must be a real number"),
    (dict(num_splits=0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(return_lse=1), TypeError, "return_lse must be True or False"),
    (dict(check="no"), TypeError, "check must be True or False"),
    (dict(q=lambda a: a["q"].requires_grad_()), RuntimeError, "mla_decode has no backward"),
])
def test_bad_mla_inputs_are_refused(change, error, message):
    with pytest.raises(error, match=message):
        base_call(**change)()


def test_appending_into_a_shared_page_is_refused():
    q, kv_cache, table, _, cu, _ = mla_inputs((1, 3), (9, 20), 4, 24, 4, torch.float32, 0, False)
    table[1, 2] = table[0, 2]  # sequence 1 would append into sequence 0's third page
    with pytest.raises(ValueError, match="kv_new would be written into page .* which the table names 2 times"):
        mla_decode(q, kv_cache, table, torch.tensor([9, 9], **I32), cu, 3, kv_new=torch.zeros(4, 24, device=DEVICE),
                   head_dim_v=16)
