"""The reference is the spec: check it against torch's own SDPA in float64 wherever their
semantics coincide, and check the parts SDPA does not have (empty rows, log-sum-exp)."""

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import reference
from attention_kernels.testing.cases import CPU_SHAPES, Shape
from attention_kernels.testing.rule import make_qkv, seed_of


def sdpa(q, k, v, causal):
    """torch SDPA where it means what we mean: top-left is_causal equals our bottom-right
    alignment only when Tq == Tk, so otherwise pass our mask explicitly."""
    Tq, Tk = q.shape[2], k.shape[2]
    mask = reference.causal_mask(Tq, Tk) if causal and Tq != Tk else None
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
