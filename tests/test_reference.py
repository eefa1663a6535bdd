"""The reference is the spec: check it against torch's own SDPA in float64 wherever their
semantics coincide, and check the parts SDPA does not have (empty rows, log-sum-exp)."""

import pytest
import torch
import torch.nn.functional as F

import reference
from cases import CPU_SHAPES, Shape
from rule import make_qkv, seed_of


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
