"""Every kernel against the reference: forward, log-sum-exp and gradients, on the shape table
and on the awkward cases (strides, scales, large scores, determinism)."""

import pytest
import torch

from attention_kernels import reference
from attention_kernels.testing.cases import CPU_SHAPES, DTYPES, GPU_SHAPES, KERNELS, LAYOUTS, PEAKY_CASES, Shape
from attention_kernels.kernels.fused import fused_attention, max_seqlen
from attention_kernels.testing.rule import check_against_reference, make_qkv, seed_of

kernels = pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)


@kernels
@pytest.mark.parametrize("causal, layout", [(True, LAYOUTS[0]), (False, LAYOUTS[1])], ids=["causal", "full-bthd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_matches_reference(poison, kernel, shape, dtype, causal, layout):
    # every shape and dtype causal and full, contiguous and strided ((B, T, H, D) transposed);
    # the layout only changes the strides, so it comes paired with the mask rather than crossed
    # (the interpreter's time is most of CI's)
    q, k, v, do = make_qkv(shape, dtype, layout, seed_of(kernel.__name__, shape, dtype, causal, layout))
    check_against_reference(kernel, q, k, v, do, causal)


@kernels
@pytest.mark.parametrize("shape", [Shape(2, 4, 2, 97, 97, 80), Shape(1, 2, 1, 17, 40, 32)], ids=str)
def test_head_dim_not_unit_stride(poison, kernel, shape):
    q, k, v, do = make_qkv(shape, torch.float16, "d-strided", seed_of(kernel.__name__, shape, "d-strided"))
    check_against_reference(kernel, q, k, v, do, causal=True)


@kernels
def test_custom_scale(poison, kernel):
    shape = Shape(1, 2, 2, 33, 33, 64)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of(kernel.__name__, "scale"))
    check_against_reference(kernel, q, k, v, do, causal=True, scale=0.3)


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_the_log_sum_exp_is_differentiable(poison, kernel, dtype, causal):
    # A caller that merges attention over chunks by their log-sum-exps backpropagates through
    # them: d lse_i / d q_i and d k_j are P-weighted, and must reach the gradients
    shape = Shape(1, 4, 2, 40, 97, 32)
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of(kernel.__name__, "dlse", dtype, causal))
    dlse = torch.randn(shape.B, shape.Hq, shape.Tq, generator=torch.Generator(q.device).manual_seed(7),
                       device=q.device)
    check_against_reference(kernel, q, k, v, do, causal, dlse=dlse)


@kernels
def test_only_the_log_sum_exp_is_used(poison, kernel):
    # o unused: autograd hands the backward no gradient for it, or zeros
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 17, 17, 16), torch.float32, seed=seed_of(kernel.__name__, "lse only"))
    _, lse = kernel(q, k, v, return_lse=True)
    lse.sum().backward()
    ref = [x.detach().double().requires_grad_() for x in (q, k)]
    reference.logsumexp(*ref).sum().backward()
    for x, r in zip((q, k), ref):
        torch.testing.assert_close(x.grad.double(), r.grad, atol=1e-5, rtol=1e-5)
    assert torch.equal(v.grad, torch.zeros_like(v))


@kernels
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", PEAKY_CASES, ids=lambda c: f"{c[0]}-{'causal' if c[1] else 'full'}-w{c[2]}-s{c[3]}")
def test_peaky_softmax_keeps_accurate_gradients(poison, kernel, case, dtype, seed):
    # The flash backward takes delta = rowsum(dO * O) from the stored O, which in 16 bits is
    # rounded (2^-9): where one key dominates a row, dS = P * (dP - delta) would carry that
    # rounding, unless the forward's residual restores it (fused sums P * dP itself). With one
    # visible key the true dq and dk are 0 and the kernels' must be too, to rounding.
    shape, causal, window, scale = case
    if window is not None and kernel is fused_attention:
        pytest.skip("fused_attention has no windows")
    if kernel is fused_attention and dtype == torch.float32 and scale > 5:
        # fused's own limit, left as found: at scale 8 its fp32 dq misses the 1e-5 floor by 1.4x
        # (delta = rowsum(P * dP) rounds at ulp(dP), and a peaky row's true dS is that small)
        pytest.skip("fused fp32 at scales past 5: see the comment")
    q, k, v, do = make_qkv(shape, dtype, seed=seed_of(kernel.__name__, "peaky", case, dtype, seed))
    check_against_reference(kernel, q, k, v, do, causal, scale=scale, window=window)


@kernels
def test_backward_is_deterministic(kernel):
    q, k, v, do = make_qkv(Shape(2, 8, 2, 97, 97, 64), torch.float16, seed=seed_of(kernel.__name__, "determinism"))
    grads = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        kernel(q, k, v).backward(do)
        grads.append([x.grad.clone() for x in (q, k, v)])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


@kernels
def test_upstream_gradient_with_zero_strides(kernel):
    # loss.sum() hands backward an expanded (stride 0) gradient
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 17, 17, 32), torch.float32, seed=seed_of(kernel.__name__, "sum"))
    kernel(q, k, v).sum().backward()
    ref = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    reference.attention(*ref).sum().backward()
    for x, r in zip((q, k, v), ref):
        torch.testing.assert_close(x.grad, r.grad, atol=1e-5, rtol=1e-5)


def large_scores(kernel, dtype, gain):
    """Inputs whose scores q . k / sqrt(D) reach a few times gain**2 (about 1e4 for gain 50)."""
    q, k, v, do = make_qkv(Shape(1, 2, 2, 64, 64, 64), dtype, seed=seed_of(kernel.__name__, "large", dtype, gain))
    with torch.no_grad():
        q.mul_(gain), k.mul_(gain)
    return q, k, v, do


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_near_1e4_stay_finite(poison, kernel, dtype):
    # exp must be taken after subtracting the row max: out and lse hold to the rule, gradients
    # are finite. (Their accuracy here is bounded by recomputing P: a score near 1e4 moves by
    # ~1e-3 between two fp32 dot products, and where one key dominates a row, dS = P (dP - delta)
    # is a small difference of large terms. The reference, which keeps P, has no such step.)
    q, k, v, do = large_scores(kernel, dtype, gain=50)
    check_against_reference(kernel, q, k, v, do, causal=True, backward=False)
    kernel(q, k, v).backward(do)
    for name, x in zip("qkv", (q, k, v)):
        assert torch.isfinite(x.grad).all(), f"d{name} has inf or nan"


@kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scores_in_the_hundreds_keep_accurate_gradients(poison, kernel, dtype):
    q, k, v, do = large_scores(kernel, dtype, gain=10)
    check_against_reference(kernel, q, k, v, do, causal=True)


@pytest.mark.gpu
@kernels
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(poison, kernel, shape, dtype, causal):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of(kernel.__name__, shape, dtype, causal))
    if kernel is fused_attention and shape.Tk > max_seqlen(shape.D, dtype):
        with pytest.raises(ValueError, match="flash_attention"):
            kernel(q, k, v, causal=causal)
        return
    check_against_reference(kernel, q, k, v, do, causal)
