"""The correctness rule, in one place: make inputs, run a kernel and the reference, compare.
The tests, the GPU command (`attention_kernels.benchmarks.gpu_check`) and anyone testing a kernel
of their own use it.

Truth is `reference.attention` in float64 on the same rounded inputs. The same reference computed
in the input's own precision (upcast=False) measures what that precision costs by itself; a
kernel passes when its max error is at most FACTOR times that (GRAD_FACTOR for gradients) plus
a small floor, relative to the tensor's largest value.
"""

import contextlib
import zlib

import torch

from attention_kernels import reference
from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR


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


def margins(got, truth, low, factor, floor):
    """(max |got - truth|, max |low - truth|, the tolerance) over the finite elements of the truth:
    the numbers the rule compares."""
    got, truth, low = got.detach().double(), truth.detach().double(), low.detach().double()
    fin = ~torch.isinf(truth)
    if not fin.any():
        return 0.0, 0.0, floor
    err = torch.where(fin, got - truth, 0).abs().max().item()
    base = torch.where(fin, low - truth, 0).abs().max().item()
    scale = max(1.0, torch.where(fin, truth, 0).abs().max().item())
    return err, base, factor * base + floor * scale


def assert_close(name, got, truth, low, factor, floor):
    """max |got - truth| <= factor * max |low - truth| + floor * max(1, max |truth|);
    -inf must match -inf exactly; NaN fails."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    got, truth = got.detach().double(), truth.detach().double()
    inf = torch.isinf(truth)
    if not torch.equal(torch.isinf(got) & (got < 0), inf & (truth < 0)):
        where = (torch.isinf(got) != inf).nonzero()[:3].tolist()
        raise AssertionError(f"{name}: -inf in different places than the truth, first at {where}")
    _, base, tol = margins(got, truth, low, factor, floor)
    err = torch.where(inf, 0, got - truth).abs()
    bad = ~(err <= tol)  # nan fails too
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        scale_floor = tol - factor * base
        raise AssertionError(
            f"{name}: max error {err.max().item():.3g} > tolerance {tol:.3g} (= {factor} x the "
            f"low-precision reference's {base:.3g} + floor {scale_floor:.3g}); {bad.sum().item()} of "
            f"{bad.numel()} elements exceed it, first at {first}: got {got[first].item():.6g}, "
            f"truth {truth[first].item():.6g}"
        )


@contextlib.contextmanager
def poisoned():
    """Within: every float tensor that torch.empty and torch.empty_like hand out is full of NaN,
    so an output element a kernel forgets to write fails the comparison instead of passing by luck."""
    empty, empty_like = torch.empty, torch.empty_like
    filled = lambda t: t.fill_(float("nan")) if t.is_floating_point() else t
    torch.empty = lambda *a, **kw: filled(empty(*a, **kw))
    torch.empty_like = lambda *a, **kw: filled(empty_like(*a, **kw))
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


def check_against_reference(kernel, q, k, v, do, causal=True, scale=None, backward=True, window=None, dlse=None):
    """Run `kernel(q, k, v, causal=, scale=, return_lse=True)` (and `window=` when given) forward
    (and backward with upstream gradient `do`, and `dlse` for the log-sum-exp when given) and
    hold its output, log-sum-exp and gradients to the rule, against `reference.attention`."""
    w = {} if window is None else {"window": window}
    o, lse = kernel(q, k, v, causal=causal, scale=scale, return_lse=True, **w)
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, causal, scale, upcast, **w)
    spec_lse = lambda q, k: reference.logsumexp(q, k, causal, scale, **w)
    hold_to_rule(o, lse, (q, k, v), do if backward else None, spec, spec_lse, dlse)


def hold_to_rule(o, lse, inputs, do, spec, spec_lse=None, dlse=None):
    """Compare a kernel's output o and log-sum-exp lse, computed from `inputs` (q, k, v), with
    the specification `spec(q, k, v, upcast=)` and `spec_lse(q, k)` run in float64 (the truth) and
    in the inputs' own precision (the yardstick); with `do`, also the gradients of q, k and v,
    after o.backward(do), or with `dlse` too, after the backward of o * do + lse * dlse (a caller
    that uses the log-sum-exp, to merge attention over chunks, say). lse None: an entry point
    that returns none. Where the yardstick itself overflows its dtype (scores or caps beyond
    fp16's range), the yardstick is the specification computed in fp32 and rounded: rounding alone."""
    q = inputs[0]
    floor = FLOOR[q.dtype]
    assert o.dtype == q.dtype and (lse is None or lse.dtype == torch.float32)

    leaves64 = [x.detach().double().requires_grad_() for x in inputs]
    truth = spec(*leaves64)
    lse_truth = spec_lse(*leaves64[:2]) if lse is not None else None

    def yardstick(upcast):
        leaves = [x.detach().clone().requires_grad_() for x in inputs]
        out = spec(*leaves, upcast=upcast)
        if do is not None and dlse is None:
            out.backward(do)
        elif do is not None:
            torch.autograd.backward([out, spec_lse(*leaves[:2])], [do, dlse])
        return out, [x.grad for x in leaves] if do is not None else []

    low, low_grads = yardstick(upcast=False)
    if not torch.isfinite(low).all() or not all(torch.isfinite(g).all() for g in low_grads):
        low, low_grads = yardstick(upcast=True)
    assert_close("out", o, truth, low, FACTOR, floor)
    if lse is not None:
        lse_fp32 = spec_lse(*(x.detach() for x in inputs[:2]))
        assert_close("lse", lse, lse_truth, lse_fp32, FACTOR, FLOOR[torch.float32])

    if do is None:
        return
    if dlse is None:
        o.backward(do)
        truth.backward(do.double())
    else:
        torch.autograd.backward([o, lse], [do, dlse])
        torch.autograd.backward([truth, lse_truth], [do.double(), dlse.double()])
    names = ("dq", "dk", "dv") if len(inputs) == 3 else [f"d(input {i})" for i in range(len(inputs))]
    for name, x, x64, low_grad in zip(names, inputs, leaves64, low_grads):
        assert x.grad.dtype == x.dtype
        assert_close(name, x.grad, x64.grad, low_grad, GRAD_FACTOR, floor)


def make_packed(lengths_q, lengths_k, Hq, Hkv, D, dtype, seed=0, strided=False):
    """A packed batch: q (total_q, Hq, D), k and v (total_k, Hkv, D) leaf tensors, the upstream
    gradient, and int32 cu_seqlens for both. `strided`: rows are not adjacent in memory (the
    tensors are (H, total, D) storage transposed)."""
    g = torch.Generator(DEVICE).manual_seed(seed)

    def rand(total, H):
        x = torch.randn((H, total, D) if strided else (total, H, D), generator=g, device=DEVICE, dtype=dtype)
        return (x.transpose(0, 1) if strided else x).detach().requires_grad_()

    q, k, v = rand(sum(lengths_q), Hq), rand(sum(lengths_k), Hkv), rand(sum(lengths_k), Hkv)
    do = torch.randn(q.shape, generator=g, device=DEVICE, dtype=dtype)
    offsets = lambda lengths: torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    return q, k, v, do, offsets(lengths_q), offsets(lengths_k)
