"""The correctness rule, in one place: make inputs, run a kernel and the reference, compare.
The tests, the GPU command (`attention_kernels.benchmarks.gpu_check`) and anyone testing a kernel
of their own use it.

Truth is `reference.attention` in float64 on the same rounded inputs. The same reference computed
in the input's own precision (upcast=False) measures what that precision costs by itself; a
kernel passes when its max error is at most FACTOR times that (GRAD_FACTOR for gradients) plus
a small floor, relative to the tensor's largest value.

Where that yardstick is itself far from the truth (bf16 scores in the hundreds: a softmax taken
in bf16 is O(1) wrong) it would allow errors as large as the output. So, given the rounding-alone
yardstick too (the reference computed in fp32 and rounded to the dtype: what a kernel that
accumulates in fp32 on the same rounded inputs can reach), the yardstick's error counts for at
most CAP units of the dtype at the tensor's scale, eps(dtype) * max(1, max |truth|), or for
rounding alone's error where that is larger; a yardstick that overflows counts for rounding
alone's. `measure` says which yardstick a comparison used, and a failure's message names it.
"""

import contextlib
import math
import zlib
from typing import NamedTuple, Optional

import torch

from attention_kernels import reference
from attention_kernels.testing.cases import CAP, DEVICE, FACTOR, FLOOR, GRAD_FACTOR


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


class Margins(NamedTuple):
    """One comparison's numbers. err: max |got - truth|; base: the error the tolerance counts for
    the yardstick; tol = factor * base + floor * max(1, max |truth|); yardstick: which one base
    is ("low": the low-precision reference's error; "cap": CAP units, the low-precision reference
    being farther off; "rounded": rounding alone's error, the low-precision reference being farther
    off than that or overflowing); low_err and rounded_err (None without a rounded yardstick): both
    yardsticks' errors; unit: eps(dtype) * max(1, max |truth|)."""
    err: float
    base: float
    tol: float
    yardstick: str
    low_err: float
    rounded_err: Optional[float]
    unit: float

    def describe(self, factor, floor_tol, dtype):
        """The tolerance spelt out: which yardstick, and why."""
        units = lambda x: f"{x / self.unit:.3g} units" if math.isfinite(x) else "non-finite"
        off = ("is not finite (it overflows)" if not math.isfinite(self.low_err) else
               f"is {units(self.low_err)} off, too far from the truth to measure by")
        if self.yardstick == "low":
            what = f"the low-precision reference's {self.base:.3g}"
        elif self.yardstick == "cap":
            what = (f"{CAP:g} units of {dtype} at the tensor's scale ({CAP:g} x eps x max(1, max |truth|) = "
                    f"{self.base:.3g}: the low-precision reference {off}; rounding alone's error is "
                    f"{units(self.rounded_err)})")
        else:
            what = (f"rounding alone's error {self.base:.3g} (the reference in fp32, rounded to {dtype}: the "
                    f"low-precision reference {off})")
        return f"{factor} x {what} + floor {floor_tol:.3g}"


def _max_abs(x, fin):
    return torch.where(fin, x, 0).abs().max().item()


def measure(got, truth, low, factor, floor, rounded=None):
    """The numbers the rule compares (a `Margins`), over the finite elements of the truth. `rounded`:
    the rounding-alone yardstick (the specification computed in fp32 and rounded to the dtype); given,
    the low-precision yardstick's error counts for at most max(CAP units, rounding alone's error),
    and for rounding alone's if it overflows. None: the low-precision yardstick's error as it is."""
    dtype = got.dtype
    got, truth, low = got.detach().double(), truth.detach().double(), low.detach().double()
    fin = ~torch.isinf(truth)
    if not fin.any():
        return Margins(0.0, 0.0, floor, "low", 0.0, None if rounded is None else 0.0, 0.0)
    err = _max_abs(got - truth, fin)
    low_err = _max_abs(low - truth, fin)
    scale = max(1.0, _max_abs(truth, fin))
    eps = torch.finfo(dtype).eps if dtype.is_floating_point else 0.0
    unit = eps * scale
    rounded_err, base, which = None, low_err, "low"
    if rounded is not None:
        rounded_err = _max_abs(rounded.detach().double() - truth, fin)
        cap = CAP * unit
        if not math.isfinite(low_err):
            base, which = rounded_err, "rounded"
        elif low_err > max(cap, rounded_err):
            base, which = (rounded_err, "rounded") if rounded_err > cap else (cap, "cap")
    return Margins(err, base, factor * base + floor * scale, which, low_err, rounded_err, unit)


def margins(got, truth, low, factor, floor, rounded=None):
    """(max |got - truth|, the error the tolerance counts for the yardstick, the tolerance) over the
    finite elements of the truth: the numbers the rule compares (`measure` has them all)."""
    m = measure(got, truth, low, factor, floor, rounded)
    return m.err, m.base, m.tol


_RECORDS = []  # the lists `recorded()` is filling, innermost last


def assert_close(name, got, truth, low, factor, floor, rounded=None):
    """max |got - truth| <= factor * yardstick error + floor * max(1, max |truth|); -inf must match
    -inf exactly; NaN fails. The yardstick error: max |low - truth|, at most max(CAP units,
    max |rounded - truth|) when `rounded` is given (see `measure`). Within `recorded()`, a failure
    is recorded rather than raised."""
    assert got.shape == truth.shape, f"{name}: shape {tuple(got.shape)}, expected {tuple(truth.shape)}"
    m = measure(got, truth, low, factor, floor, rounded)
    message = _failure(name, got, truth, factor, floor, m)
    if _RECORDS:
        _RECORDS[-1].append(dict(quantity=name, err=m.err, ref_err=m.base, tol=m.tol, yardstick=m.yardstick,
                                 low_err=m.low_err, rounded_err=m.rounded_err, unit=m.unit, message=message))
    elif message:
        raise AssertionError(message)


def _failure(name, got, truth, factor, floor, m):
    """The failure's message, or "" when got holds to the rule."""
    dtype = str(got.dtype).removeprefix("torch.")
    got, truth = got.detach().double(), truth.detach().double()
    inf = torch.isinf(truth)
    if not torch.equal(torch.isinf(got) & (got < 0), inf & (truth < 0)):
        where = (torch.isinf(got) != inf).nonzero()[:3].tolist()
        return f"{name}: -inf in different places than the truth, first at {where}"
    err = torch.where(inf, 0, got - truth).abs()
    bad = ~(err <= m.tol)  # nan fails too
    if not bad.any():
        return ""
    first = tuple(bad.nonzero()[0].tolist())
    return (f"{name}: max error {err.max().item():.3g} > tolerance {m.tol:.3g} (= "
            f"{m.describe(factor, m.tol - factor * m.base, dtype)}); {bad.sum().item()} of {bad.numel()} "
            f"elements exceed it, first at {first}: got {got[first].item():.6g}, truth {truth[first].item():.6g}")


@contextlib.contextmanager
def recorded():
    """Within: every comparison of the rule (assert_close, hence check_against_reference and
    hold_to_rule) appends a dict (quantity, err, ref_err (the yardstick error counted), tol,
    yardstick, low_err, rounded_err, unit, message ("" when it held)) to the list it yields, and
    raises nothing: one run reports every quantity, not only the first failure."""
    found = []
    _RECORDS.append(found)
    try:
        yield found
    finally:
        _RECORDS.remove(found)


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
    that returns none. For 16-bit inputs the specification is also computed in fp32 and rounded
    to the dtype (rounding alone): where the low-precision yardstick is more than CAP units off
    (scores in the hundreds in bf16) or overflows (scores or caps beyond fp16's range), the
    tolerance counts at most that (see `measure`)."""
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
        return out, [x.grad for x in leaves] if do is not None else [None] * len(inputs)

    low, low_grads = yardstick(upcast=False)
    # fp32 (and float64) inputs: the upcast specification is the same computation
    rounded, rounded_grads = yardstick(upcast=True) if q.dtype.itemsize < 4 else (low, low_grads)
    assert_close("out", o, truth, low, FACTOR, floor, rounded)
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
    for name, x, x64, low_grad, rounded_grad in zip(names, inputs, leaves64, low_grads, rounded_grads):
        assert x.grad.dtype == x.dtype
        # an input of another dtype than q's (fp32 sinks beside bf16 q) is computed in q's
        # precision but would be measured in units of its own: its low-precision yardstick stands
        assert_close(name, x.grad, x64.grad, low_grad, GRAD_FACTOR, floor, rounded_grad if x.dtype == q.dtype else None)


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
