"""The reference is the spec: check it against torch's own SDPA in float64 wherever their
semantics coincide, and the parts SDPA does not have (empty rows, log-sum-exp, ALiBi, soft-cap,
sinks, dropout's scaling) against formulas written out here, never through the reference's own
helpers: a bug made in the reference and a kernel alike would otherwise pass."""

import math

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import reference
from attention_kernels.testing.cases import CPU_SHAPES, Shape
from attention_kernels.testing.rule import make_qkv, seed_of


def sdpa(q, k, v, causal):
    """torch SDPA where it means what we mean: top-left is_causal equals our bottom-right
    alignment only when Tq == Tk, so otherwise pass the bottom-right mask, written out here."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = written_out_mask(Tq, Tk, -1, 0) if causal and Tq != Tk else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and Tq == Tk,
                                          enable_gqa=q.shape[1] != k.shape[1])


def nonempty_rows(shape, causal):
    """Rows that see at least one key (SDPA gives nan for the others; we give zeros)."""
    return slice(max(0, shape.Tq - shape.Tk) if causal else 0, None)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_matches_torch_sdpa_in_float64(shape, causal):
    q, k, v, do = make_qkv(shape, torch.float64, seed=seed_of(shape, causal))
    ref_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    rows = nonempty_rows(shape, causal)

    ours = reference.attention(*ref_leaves, causal=causal)
    theirs = sdpa(q, k, v, causal)
    torch.testing.assert_close(ours[:, :, rows], theirs[:, :, rows], rtol=1e-12, atol=1e-12)

    ours[:, :, rows].backward(do[:, :, rows])
    theirs[:, :, rows].backward(do[:, :, rows])
    for name, a, b in zip("qkv", ref_leaves, (q, k, v)):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-10, msg=lambda m: f"d{name}: {m}")


def test_rows_that_see_no_key_are_zero_with_finite_gradients():
    shape = Shape(1, 2, 2, 9, 4, 16)  # Tq - Tk = 5 causal rows see nothing
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("empty"))
    out = reference.attention(q, k, v)
    lse = reference.logsumexp(q, k)
    assert torch.equal(out[:, :, :5], torch.zeros_like(out[:, :, :5]))
    assert (out[:, :, 5:] != 0).all()
    assert torch.isneginf(lse[:, :, :5]).all() and torch.isfinite(lse[:, :, 5:]).all()
    out.backward(do)
    assert all(torch.isfinite(x.grad).all() for x in (q, k, v))


def test_causal_alignment_is_bottom_right():
    # one new query after a prefix sees every key; and query i of Tq sees keys up to i + Tk - Tq
    q, k, v, _ = make_qkv(Shape(2, 2, 2, 1, 13, 16), torch.float64, seed=seed_of("decode"))
    torch.testing.assert_close(reference.attention(q, k, v, causal=True), reference.attention(q, k, v, causal=False))
    visible = reference.causal_mask(3, 5)
    assert visible.tolist() == [[True, True, True, False, False],
                                [True, True, True, True, False],
                                [True, True, True, True, True]]


def test_grouped_heads_equal_repeated_heads():
    q, k, v, _ = make_qkv(Shape(2, 8, 2, 11, 11, 16), torch.float64, seed=seed_of("gqa"))
    repeated = [x.repeat_interleave(4, dim=1) for x in (k, v)]
    torch.testing.assert_close(reference.attention(q, k, v), reference.attention(q, *repeated))


def test_softmax_rows_sum_to_one_and_lse_normalises_them():
    q, k, _, _ = make_qkv(Shape(1, 2, 2, 7, 12, 32), torch.float64, seed=seed_of("lse"))
    s = reference.masked_scores(q, k, causal=True)
    w = reference.softmax(s)
    torch.testing.assert_close(w.sum(-1), torch.ones_like(w.sum(-1)))
    lse = reference.logsumexp(q, k, causal=True)
    torch.testing.assert_close(torch.exp(s - lse[..., None]), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_is_computed_in_float32(dtype):
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 9, 9, 16), dtype, seed=seed_of("dtype", dtype))
    out = reference.attention(q, k, v)
    assert out.dtype == dtype and reference.logsumexp(q, k).dtype == torch.float32
    upcast = reference.attention(q.float(), k.float(), v.float()).to(dtype)
    assert torch.equal(out, upcast)
    assert reference.attention(q, k, v, upcast=False).dtype == dtype


# ----------------------------------------------------------------------------- windows, packed batches, decoding
# Each against torch SDPA in float64 with a boolean mask written out element by element here,
# independently of the reference's own mask code.


def written_out_mask(Tq, Tk, left, right):
    """visible[i, j] for i - left <= j - (Tk - Tq) <= i + right, one element at a time."""
    visible = torch.zeros(Tq, Tk, dtype=torch.bool)
    for i in range(Tq):
        for j in range(Tk):
            d = j - (i + Tk - Tq)
            visible[i, j] = (left < 0 or d >= -left) and (right < 0 or d <= right)
    return visible


def sdpa_masked(q, k, v, visible):
    """SDPA with an explicit mask; rows that see nothing are zeros (SDPA gives nan there)."""
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where(visible.any(-1)[..., None], o, 0.0)


@pytest.mark.parametrize("Tq, Tk, left, right", [(7, 7, 2, 0), (5, 9, 0, 0), (9, 5, 3, 1), (6, 6, -1, 2),
                                                 (6, 6, 100, 100), (4, 6, -1, 0)])
def test_window_mask_is_the_written_out_rule(Tq, Tk, left, right):
    assert torch.equal(reference.window_mask(Tq, Tk, left, right), written_out_mask(Tq, Tk, left, right))
    q, k, v, _ = make_qkv(Shape(2, 4, 2, Tq, Tk, 8), torch.float64, seed=seed_of("window", Tq, Tk, left, right))
    torch.testing.assert_close(reference.attention(q, k, v, causal=False, window=(left, right)),
                               sdpa_masked(q, k, v, written_out_mask(Tq, Tk, left, right)))


def test_causal_is_a_window_with_right_0():
    assert torch.equal(reference.window_mask(5, 8, -1, 0), reference.causal_mask(5, 8))
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 5, 8, 8), torch.float64, seed=seed_of("causal window"))
    torch.testing.assert_close(reference.attention(q, k, v, causal=True, window=(3, -1)),
                               reference.attention(q, k, v, causal=False, window=(3, 0)))


def test_varlen_is_one_attention_with_a_block_diagonal_mask():
    # All packed tokens in one SDPA call, a key visible only within its own sequence
    lengths_q, lengths_k, window = (3, 0, 1, 6), (4, 2, 0, 6), (2, 0)
    q = torch.randn(sum(lengths_q), 4, 8, dtype=torch.float64)
    k, v = (torch.randn(sum(lengths_k), 2, 8, dtype=torch.float64) for _ in range(2))
    visible = torch.zeros(sum(lengths_q), sum(lengths_k), dtype=torch.bool)
    q0 = k0 = 0
    for Tq, Tk in zip(lengths_q, lengths_k):
        visible[q0:q0 + Tq, k0:k0 + Tk] = written_out_mask(Tq, Tk, *window)
        q0, k0 = q0 + Tq, k0 + Tk
    cu = lambda lengths: torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
    batch = lambda x: x.transpose(0, 1)[None]  # (1, H, total, D)
    expected = sdpa_masked(batch(q), batch(k), batch(v), visible)[0].transpose(0, 1)
    torch.testing.assert_close(reference.varlen_attention(q, k, v, cu(lengths_q), cu(lengths_k), window=window),
                               expected)
    # the log-sum-exp, laid out (Hq, total_q) as the varlen kernel stores it: -inf for rows with no key
    s = written_out_scores(batch(q), batch(k)).masked_fill(~visible, float("-inf"))     # (1, Hq, total_q, total_k)
    torch.testing.assert_close(reference.varlen_logsumexp(q, k, cu(lengths_q), cu(lengths_k), window=window),
                               torch.logsumexp(s, -1)[0])


def test_decode_is_attention_to_the_valid_cache():
    # New token t of sequence b sits at position L_b - Tq + t and sees cache positions up to it
    B, Tq, Tmax, lengths = 3, 2, 9, (9, 4, 1)
    q = torch.randn(B, 4, Tq, 8, dtype=torch.float64)
    k_cache, v_cache = (torch.randn(B, 2, Tmax, 8, dtype=torch.float64) for _ in range(2))
    visible = torch.zeros(B, 1, Tq, Tmax, dtype=torch.bool)
    for b, L in enumerate(lengths):
        for t in range(Tq):
            visible[b, 0, t, :max(0, L - Tq + t + 1)] = True
    torch.testing.assert_close(reference.decode_attention(q, k_cache, v_cache, torch.tensor(lengths)),
                               sdpa_masked(q, k_cache, v_cache, visible))


# ----------------------------------------------------------------------------- what SDPA does not have
# Written out here one element or one head at a time, against the conventions the reference names:
# FlashAttention's (bottom-right alignment, symmetric ALiBi, soft-cap before the bias), GPT-OSS's
# sinks, torch's dropout.


def written_out_scores(q, k, scale=None):
    """q k^T * scale per query head, head h reading k/v head h // (Hq / Hkv); scale 1/sqrt(D) by default."""
    Hq, Hkv, D = q.shape[1], k.shape[1], q.shape[-1]
    scale = 1 / math.sqrt(D) if scale is None else scale
    return torch.stack([q[:, h] @ k[:, h // (Hq // Hkv)].transpose(-1, -2) * scale for h in range(Hq)], 1)


def written_out_values(v, Hq):
    return torch.stack([v[:, h // (Hq // v.shape[1])] for h in range(Hq)], 1)           # (B, Hq, Tk, D)


def written_out_alibi(slopes, Tq, Tk):
    """FlashAttention's ALiBi bias, -slope * |i + Tk - Tq - j|, element by element: keys ahead of
    query i's diagonal key are penalised as much as keys behind it. slopes (Hq,) or (B, Hq)."""
    slopes = slopes if slopes.dim() == 2 else slopes[None]
    bias = torch.zeros(slopes.shape[0], slopes.shape[1], Tq, Tk, dtype=torch.float64)
    for b in range(slopes.shape[0]):
        for h in range(slopes.shape[1]):
            for i in range(Tq):
                for j in range(Tk):
                    bias[b, h, i, j] = -slopes[b, h].item() * abs(i + Tk - Tq - j)
    return bias


def softmax_rows(s):
    """torch.softmax, with the rows that see no key all zero (torch gives nan there)."""
    return torch.softmax(s, -1).nan_to_num(0.0)


ALIBI_CASES = [  # (Tq, Tk, causal, window): keys ahead of the query are visible in all but the causal one
    (6, 6, False, (-1, -1)),
    (5, 9, False, (-1, -1)),     # Tq < Tk: the diagonal key of query i is i + 4
    (9, 5, False, (-1, -1)),     # Tq > Tk: the first queries' diagonals lie before key 0
    (7, 10, False, (2, 3)),      # a window on both sides
    (10, 7, False, (1, 0)),
    (8, 8, False, (-1, 2)),
    (5, 9, True, (3, 7)),        # causal: right = 0 whatever right says
]


@pytest.mark.parametrize("Tq, Tk, causal, window", ALIBI_CASES, ids=str)
@pytest.mark.parametrize("per_batch", [False, True], ids=["slopes-Hq", "slopes-B-Hq"])
def test_alibi_penalises_keys_ahead_as_keys_behind(Tq, Tk, causal, window, per_batch):
    q, k, v, _ = make_qkv(Shape(2, 4, 2, Tq, Tk, 8), torch.float64, seed=seed_of("alibi", Tq, Tk, causal, window))
    g = torch.Generator().manual_seed(seed_of("slopes", per_batch))
    slopes = torch.rand(*((2, 4) if per_batch else (4,)), generator=g, dtype=torch.float64) + 0.25
    visible = written_out_mask(Tq, Tk, window[0], 0 if causal else window[1])
    s = (written_out_scores(q, k) + written_out_alibi(slopes, Tq, Tk)).masked_fill(~visible, -math.inf)
    want = softmax_rows(s) @ written_out_values(v, 4)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal, window=window, alibi_slopes=slopes), want)
    torch.testing.assert_close(reference.logsumexp(q, k, causal=causal, window=window, alibi_slopes=slopes),
                               torch.logsumexp(s, -1))


def test_softcap_comes_before_the_alibi_bias():
    # Gemma 2's cap on the scaled scores, then ALiBi's bias (FlashAttention's order), no causal mask
    q, k, v, _ = make_qkv(Shape(1, 2, 1, 5, 8, 8), torch.float64, seed=seed_of("softcap alibi"))
    slopes = torch.tensor([0.5, 0.125], dtype=torch.float64)
    s = 2.0 * torch.tanh(written_out_scores(q, k, 0.7) / 2.0) + written_out_alibi(slopes, 5, 8)
    torch.testing.assert_close(reference.attention(q, k, v, causal=False, scale=0.7, softcap=2.0, alibi_slopes=slopes),
                               torch.softmax(s, -1) @ written_out_values(v, 2))


@pytest.mark.parametrize("num_heads", [1, 3, 6, 8, 12])
def test_alibi_slopes_are_the_papers(num_heads):
    """get_slopes from the ALiBi paper's code (ofirpress/attention_with_linear_biases), written out."""
    def power_of_2(n):
        start = 2 ** (-2 ** -(math.log2(n) - 3))
        return [start * start ** i for i in range(n)]

    def get_slopes(n):
        if math.log2(n).is_integer():
            return power_of_2(n)
        closest = 2 ** math.floor(math.log2(n))
        return power_of_2(closest) + get_slopes(2 * closest)[0::2][:n - closest]

    torch.testing.assert_close(reference.alibi_slopes(num_heads), torch.tensor(get_slopes(num_heads)),
                               rtol=1e-7, atol=0)


@pytest.mark.parametrize("Tq, Tk, causal", [(9, 5, True), (4, 7, False), (6, 6, True)], ids=str)
def test_lse_is_the_written_out_log_sum_exp(Tq, Tk, causal):
    # natural log, over the keys each row sees; -inf for a row that sees none (Tq > Tk, causal)
    q, k, _, _ = make_qkv(Shape(2, 4, 2, Tq, Tk, 8), torch.float64, seed=seed_of("lse written", Tq, Tk))
    s = written_out_scores(q, k, 0.4).masked_fill(~written_out_mask(Tq, Tk, -1, 0 if causal else -1), -math.inf)
    lse = reference.logsumexp(q, k, causal=causal, scale=0.4)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(torch.logsumexp(s, -1)))
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    assert torch.isneginf(lse).any() == (causal and Tq > Tk)


@pytest.mark.parametrize("shape, causal, scale", [(Shape(2, 6, 2, 7, 12, 8), True, 0.3),
                                                  (Shape(1, 4, 1, 12, 5, 16), False, 2.5)], ids=str)
def test_scale_and_grouped_heads_are_sdpas(shape, causal, scale):
    # scale= as SDPA's, the default 1/sqrt(D) as SDPA's default, q head h on k/v head h // (Hq / Hkv)
    q, k, v, _ = make_qkv(shape, torch.float64, seed=seed_of("scale", shape))
    mask = written_out_mask(shape.Tq, shape.Tk, -1, 0 if causal else -1)
    for s in (scale, None):
        theirs = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=s, enable_gqa=True)
        torch.testing.assert_close(reference.attention(q, k, v, causal=causal, scale=s), theirs)
    repeated = [x.repeat_interleave(shape.Hq // shape.Hkv, dim=1) for x in (k, v)]     # torch's own GQA layout
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal),
                               F.scaled_dot_product_attention(q, *repeated, attn_mask=mask))


def test_causal_with_a_window_ignores_right():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 6, 9, 8), torch.float64, seed=seed_of("causal right"))
    torch.testing.assert_close(reference.attention(q, k, v, causal=True, window=(2, 4)),
                               sdpa_masked(q, k, v, written_out_mask(6, 9, 2, 0)))


@pytest.mark.parametrize("Tq, Tk, causal", [(8, 5, True), (4, 6, False)], ids=str)
def test_sinks_are_a_key_without_a_value(Tq, Tk, causal):
    # the sink logit joins every row's softmax and takes weight but gives nothing; rows that see no
    # key put all their weight on it (output 0, log-sum-exp the sink)
    q, k, v, _ = make_qkv(Shape(2, 3, 3, Tq, Tk, 8), torch.float64, seed=seed_of("sinks", Tq, Tk))
    sinks = torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64)
    s = written_out_scores(q, k).masked_fill(~written_out_mask(Tq, Tk, -1, 0 if causal else -1), -math.inf)
    s = torch.cat([s, sinks[None, :, None, None].expand(2, 3, Tq, 1)], -1)                # (B, Hq, Tq, Tk + 1)
    torch.testing.assert_close(reference.attention(q, k, v, causal=causal, sinks=sinks),
                               torch.softmax(s, -1)[..., :Tk] @ v)
    lse = reference.logsumexp(q, k, causal=causal, sinks=sinks)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1))
    if causal:  # the first Tq - Tk rows see no key
        torch.testing.assert_close(lse[:, :, :Tq - Tk], sinks[None, :, None].expand(2, 3, Tq - Tk))


def test_dropout_scales_kept_weights_as_torch_does():
    # a kept weight times 1 / (1 - p), a dropped one 0 (torch.nn.functional.dropout), after the softmax
    p = 0.25
    q, k, v, _ = make_qkv(Shape(2, 4, 2, 6, 9, 8), torch.float64, seed=seed_of("reference dropout"))
    keep = torch.rand(2, 4, 6, 9, generator=torch.Generator().manual_seed(4)) >= p
    w = softmax_rows(written_out_scores(q, k).masked_fill(~written_out_mask(6, 9, -1, 0), -math.inf))
    assert set(F.dropout(torch.ones(999, dtype=torch.float64), p).unique().tolist()) == {0.0, 1 / (1 - p)}
    torch.testing.assert_close(reference.attention(q, k, v, dropout_p=p, dropout_mask=keep),
                               torch.where(keep, w / (1 - p), 0.0) @ written_out_values(v, 4))
