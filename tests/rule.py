"""The correctness rule, in one place: make inputs, run a kernel and the reference, compare.

Truth is `reference.attention` in float64 on the same rounded inputs. The same reference computed
in the input's own precision (upcast=False) measures what that precision costs by itself; a
kernel passes when its max error is at most FACTOR times that (GRAD_FACTOR for gradients) plus
a small floor, relative to the tensor's largest value.
"""

import zlib

import torch

import reference
from cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR


def seed_of(*parts):
    """A stable seed from a test's parameters: every test draws its own fresh inputs."""
    return zlib.crc32(repr(parts).encode())


def randn(shape, dtype, layout="contiguous", generator=None):
    """A random (B, H, T, D) leaf tensor in one of the layouts in cases.LAYOUTS."""
    B, H, T, D = shape
    if layout == "contiguous":
        x = torch.randn(B, H, T, D, generator=generator, device=DEVICE, dtype=dtype)
    elif layout == "bthd":
        x = torch.randn(B, T, H, D, generator=generator, device=DEVICE, dtype=dtype).transpose(1, 2)
    elif layout == "d-strided":
        x = torch.randn(B, H, D, T, generator=generator, device=DEVICE, dtype=dtype).transpose(2, 3)
    else:
        raise ValueError(f"unknown layout {layout!r}")
    return x.detach().requires_grad_()


def make_qkv(shape, dtype, layout="contiguous", seed=0):
    g = torch.Generator(DEVICE).manual_seed(seed)
    q = randn((shape.B, shape.Hq, shape.Tq, shape.D), dtype, layout, g)
    k = randn((shape.B, shape.Hkv, shape.Tk, shape.D), dtype, layout, g)
    v = randn((shape.B, shape.Hkv, shape.Tk, shape.D), dtype, layout, g)
    do = torch.randn(q.shape, generator=g, device=DEVICE, dtype=dtype)
    return q, k, v, do


def assert_close(name, got, truth, low, factor, floor):
    """max |got - truth| <= factor * max |low - truth| + floor * max(1, max |truth|);
    -inf must match -inf exactly."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    got, truth, low = got.detach().double(), truth.detach().double(), low.detach().double()
    inf = torch.isinf(truth)
    if not torch.equal(torch.isinf(got) & (got < 0), inf & (truth < 0)):
        where = (torch.isinf(got) != inf).nonzero()[:3].tolist()
        raise AssertionError(f"{name}: -inf in different places than the truth, first at {where}")
    fin = ~inf
    err = torch.where(fin, got - truth, 0).abs()
    base = torch.where(fin, low - truth, 0).abs().max().item() if fin.any() else 0.0
    scale = max(1.0, torch.where(fin, truth, 0).abs().max().item()) if fin.any() else 1.0
    tol = factor * base + floor * scale
    bad = ~(err <= tol)  # nan fails too
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{name}: max error {err.max().item():.3g} > tolerance {tol:.3g} (= {factor} x the "
            f"low-precision reference's {base:.3g} + floor {floor * scale:.3g}); {bad.sum().item()} of "
            f"{bad.numel()} elements exceed it, first at {first}: got {got[first].item():.6g}, "
            f"truth {truth[first].item():.6g}"
        )


def check_against_reference(kernel, q, k, v, do, causal=True, scale=None, backward=True):
    """Run `kernel(q, k, v, causal=, scale=, return_lse=True)` forward (and backward with upstream
    gradient `do`) and hold its output, log-sum-exp and gradients to the rule."""
    floor = FLOOR[q.dtype]
    o, lse = kernel(q, k, v, causal=causal, scale=scale, return_lse=True)
    assert o.dtype == q.dtype and lse.dtype == torch.float32

    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves_low = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth = reference.attention(*leaves64, causal=causal, scale=scale)
    low = reference.attention(*leaves_low, causal=causal, scale=scale, upcast=False)
    if not torch.isfinite(low).all():  # scores beyond the dtype's range: yardstick is rounding alone
        low = reference.attention(*leaves_low, causal=causal, scale=scale)
    assert_close("out", o, truth, low, FACTOR, floor)

    lse_truth = reference.logsumexp(*leaves64[:2], causal=causal, scale=scale)
    lse_fp32 = reference.logsumexp(q.detach(), k.detach(), causal=causal, scale=scale)
    assert_close("lse", lse, lse_truth, lse_fp32, FACTOR, FLOOR[torch.float32])

    if not backward:
        return
    o.backward(do)
    truth.backward(do.double())
    low.backward(do)
    for name, x, x64, xl in zip(("dq", "dk", "dv"), (q, k, v), leaves64, leaves_low):
        assert x.grad.dtype == x.dtype
        assert_close(name, x.grad, x64.grad, xl.grad, GRAD_FACTOR, floor)
