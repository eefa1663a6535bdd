"""fused_attention against the reference: forward, log-sum-exp and gradients."""

import pytest
import torch

import reference
from cases import CPU_SHAPES, DTYPES, GPU_SHAPES, LAYOUTS, Shape
from kernels import fused_attention
from kernels.fused import max_seqlen
from rule import check_against_reference, make_qkv, seed_of


@pytest.mark.parametrize("layout", LAYOUTS[:2])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_matches_reference(poison, shape, dtype, causal, layout):
    q, k, v, do = make_qkv(shape, dtype, layout, seed_of(shape, dtype, causal, layout))
    check_against_reference(fused_attention, q, k, v, do, causal)


@pytest.mark.parametrize("shape", [Shape(2, 4, 2, 97, 97, 80), Shape(1, 2, 1, 17, 40, 32)], ids=str)
def test_head_dim_not_unit_stride(poison, shape):
    q, k, v, do = make_qkv(shape, torch.float16, "d-strided", seed_of(shape, "d-strided"))
    check_against_reference(fused_attention, q, k, v, do, causal=True)


def test_custom_scale(poison):
    shape = Shape(1, 2, 2, 33, 33, 64)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("scale"))
    check_against_reference(fused_attention, q, k, v, do, causal=True, scale=0.3)


def test_at_the_row_limit(poison):
    shape = Shape(1, 1, 1, 16, max_seqlen(128, torch.float32), 128)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("limit"))
    check_against_reference(fused_attention, q, k, v, do, causal=True)


def test_beyond_the_row_limit_names_flash():
    limit = max_seqlen(64, torch.float16)
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, limit + 1, 64), torch.float16)
    with pytest.raises(ValueError, match=rf"(?s)at most {limit} keys.*Tk={limit + 1}.*flash_attention"):
        fused_attention(q, k, v)


def test_backward_is_deterministic():
    q, k, v, do = make_qkv(Shape(2, 8, 2, 97, 97, 64), torch.float16, seed=seed_of("determinism"))
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        fused_attention(q, k, v).backward(do)
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_upstream_gradient_with_zero_strides():
    # loss.sum() hands backward an expanded (stride 0) gradient
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 17, 17, 32), torch.float32, seed=seed_of("sum"))
    fused_attention(q, k, v).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    reference.attention(*ref).sum().backward()
    for x, r in zip((q, k, v), ref):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(poison, shape, dtype, causal):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of(shape, dtype, causal))
    if shape.Tk > max_seqlen(shape.D, dtype):
        with pytest.raises(ValueError, match="flash_attention"):
            fused_attention(q, k, v, causal=causal)
        return
    check_against_reference(fused_attention, q, k, v, do, causal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_near_1e4_stay_finite(poison, dtype):
    # q . k / sqrt(D) reaches ~1e4: exp must be taken after subtracting the row max
    shape = Shape(1, 2, 2, 64, 64, 64)
    q, k, v, do = make_qkv(shape, dtype, seed=seed_of("large", dtype))
    with torch.no_grad():
        q.mul_(50), k.mul_(50)
    check_against_reference(fused_attention, q, k, v, do, causal=True)
