"""What models add to plain attention: Gemma 2's logit soft-cap, GPT-OSS's attention sinks and
ALiBi's linear bias, in the reference (checked against formulas written out independently) and
in every kernel, forward and backward (the sinks' gradient too), alone, together, with windows,
grouped heads, Tq != Tk, packed batches and decoding, under the project's rule."""

import math

import pytest
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from attention_kernels import (attention, decode_attention, flash_attention, flash_attention_varlen, fused_attention,
                               reference)
from attention_kernels.kernels import common
from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR, Shape
from attention_kernels.testing.rule import assert_close, make_packed, make_qkv, seed_of

MODS = {  # name: (softcap, sinks?, alibi?)
    "softcap": (2.0, False, False),
    "sinks": (None, True, False),
    "alibi": (None, False, True),
    "all": (5.0, True, True),
}
SHAPES = [Shape(2, 4, 2, 37, 53, 32), Shape(1, 4, 4, 64, 40, 80), Shape(1, 2, 1, 1, 33, 16)]


def mod_inputs(name, Hq, B, dtype, seed, sink_scale=1.0):
    """(softcap, sinks leaf (Hq,) fp32 or None, slopes (B, Hq) or (Hq,) or None) for MODS[name]."""
    softcap, with_sinks, with_alibi = MODS[name]
    g = torch.Generator(DEVICE).manual_seed(seed)
    sinks = (sink_scale * torch.randn(Hq, generator=g, device=DEVICE)).requires_grad_() if with_sinks else None
    slopes = None
    if with_alibi:  # per sequence in the batch: the standard slopes, halved for sequence 1 on
        slopes = reference.alibi_slopes(Hq).to(DEVICE)[None].repeat(B, 1)
        slopes[1:] *= 0.5
    return softcap, sinks, slopes


def hold_mods_to_rule(kernel_out, inputs, sinks, do, dlse, spec, spec_lse):
    """The rule (attention_kernels/testing/rule.py) for out, lse and the gradients of q, k, v and
    the sinks; for 16-bit inputs with the rounding-alone yardstick (the specification in fp32,
    rounded) beside the low-precision one, as hold_to_rule has it."""
    o, lse = kernel_out
    q = inputs[0]
    floor = FLOOR[q.dtype]
    leaves = list(inputs) + ([sinks] if sinks is not None else [])
    leaves64 = [x.detach().double().requires_grad_() for x in leaves]
    split = lambda xs: (xs[:3], xs[3] if sinks is not None else None)
    truth = spec(*split(leaves64))

    def yardstick(upcast):
        xs = [x.detach().clone().requires_grad_() for x in leaves]
        out = spec(*split(xs), upcast=upcast)
        torch.autograd.backward([out, spec_lse(*split(xs))], [do, dlse])
        return out, [x.grad for x in xs]

    low, low_grads = yardstick(upcast=False)
    rounded, rounded_grads = yardstick(upcast=True) if q.dtype.itemsize < 4 else (low, low_grads)
    assert_close("out", o, truth, low, FACTOR, floor, rounded)
    lse_truth = spec_lse(*split(leaves64))
    assert_close("lse", lse, lse_truth, spec_lse(*split([x.detach() for x in leaves])), FACTOR, FLOOR[torch.float32])
    torch.autograd.backward([o, lse], [do, dlse])
    torch.autograd.backward([truth, lse_truth], [do.double(), dlse.double()])
    for name, x, x64, xl, xr in zip(("dq", "dk", "dv", "dsinks"), leaves, leaves64, low_grads, rounded_grads):
        assert x.grad is not None, f"no gradient reached {name}"
        # the sinks are fp32 whatever q's dtype: units of fp32 would not measure a 16-bit computation
        assert_close(name, x.grad, x64.grad, xl, GRAD_FACTOR, floor, xr if x.dtype == q.dtype else None)


def check(kernel, shape, dtype, causal, name, window=None, scale=None, seed=0, sink_scale=1.0, gain=1.0, softcap=None):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of(kernel.__name__, shape, dtype, causal, name, window, seed))
    if gain != 1.0:
        with torch.no_grad():
            q.mul_(gain), k.mul_(gain)
    cap, sinks, slopes = mod_inputs(name, shape.Hq, shape.B, dtype, seed, sink_scale)
    softcap = cap if softcap is None else softcap
    mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=slopes)
    w = {} if window is None else {"window": window}
    out = kernel(q, k, v, causal=causal, scale=scale, return_lse=True, **w, **mods)
    dlse = torch.randn(out[1].shape, generator=torch.Generator(DEVICE).manual_seed(seed + 1), device=DEVICE)
    spec = lambda qkv, s, upcast=True: reference.attention(*qkv, causal, scale, upcast, window or (-1, -1),
                                                           softcap, s, slopes)
    spec_lse = lambda qkv, s: reference.logsumexp(qkv[0], qkv[1], causal, scale, window or (-1, -1), softcap, s,
                                                  slopes)
    hold_mods_to_rule(out, (q, k, v), sinks, do, dlse, spec, spec_lse)


# ----------------------------------------------------------------------------- the reference


def test_reference_softcap_is_the_formula():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 9, 9, 16), torch.float64, seed=1)
    s = (q @ k.transpose(-1, -2)) / 4.0                                              # scale 1/sqrt(16)
    w = torch.softmax((3.0 * torch.tanh(s / 3.0)).masked_fill(~torch.ones(9, 9).tril().bool(), -math.inf), -1)
    torch.testing.assert_close(reference.attention(q, k, v, softcap=3.0), w @ v)


def test_reference_alibi_is_sdpa_with_the_bias_as_a_mask():
    q, k, v, _ = make_qkv(Shape(2, 4, 4, 7, 11, 16), torch.float64, seed=2)
    slopes = reference.alibi_slopes(4).double()
    i, j = torch.arange(7)[:, None], torch.arange(11)[None, :]
    bias = -slopes[:, None, None] * (j - (i + 4)).abs()                             # diagonal key of row i: i + Tk - Tq
    visible = j <= i + 4
    mask = bias.masked_fill(~visible, -math.inf)                                    # (H, Tq, Tk)
    torch.testing.assert_close(reference.attention(q, k, v, alibi_slopes=slopes),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=mask))
    assert torch.equal(reference.alibi_slopes(8), 2.0 ** -torch.arange(1, 9, dtype=torch.float32))


def test_reference_sinks_are_a_key_with_a_zero_value():
    # a sink is a key whose score is the sink logit and whose value is 0
    q, k, v, _ = make_qkv(Shape(1, 3, 3, 5, 5, 8), torch.float64, seed=3)
    sinks = torch.randn(3, dtype=torch.float64)
    s = (q @ k.transpose(-1, -2)) / math.sqrt(8)
    s = s.masked_fill(~torch.ones(5, 5).tril().bool(), -math.inf)
    s = torch.cat([s, sinks[None, :, None, None].expand(1, 3, 5, 1)], -1)           # (1, 3, 5, 6)
    w = torch.softmax(s, -1)
    out = w[..., :5] @ v
    torch.testing.assert_close(reference.attention(q, k, v, sinks=sinks), out)
    torch.testing.assert_close(reference.logsumexp(q, k, sinks=sinks), torch.logsumexp(s, -1))
    assert (reference.softmax(reference.masked_scores(q, k), sinks).sum(-1) < 1).all()  # weights sum below 1


# ----------------------------------------------------------------------------- the kernels


# each modification on each shape, the dtypes and masks taken in turn (the interpreter is slow)
CASES = [(name, shape, dtype, causal) for i, (name, shape) in enumerate((n, s) for n in MODS for s in SHAPES)
         for dtype, causal in [((torch.float32, torch.float16, torch.bfloat16)[i % 3], i % 2 == 0)]]


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
@pytest.mark.parametrize("name, shape, dtype, causal", CASES,
                         ids=[f"{n}-{s}-{str(d)[6:]}-{'causal' if c else 'full'}" for n, s, d, c in CASES])
def test_kernels_match_the_reference(poison, kernel, name, shape, dtype, causal):
    check(kernel, shape, dtype, causal, name)


@pytest.mark.parametrize("name", list(MODS))
@pytest.mark.parametrize("window", [(8, 0), (0, 0)], ids=str)
def test_with_windows(poison, name, window):
    check(flash_attention, Shape(1, 4, 2, 61, 70, 32), torch.float32, True, name, window=window)


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
@pytest.mark.parametrize("softcap", [1.0, 5.0])
def test_a_softcap_that_binds_and_scores_near_1e4(poison, kernel, softcap):
    # inputs scaled by 50: scores near 1e4, which the cap brings to within +-softcap; the capped
    # softmax is smooth, so even its gradients meet the rule there
    q, k, v, do = make_qkv(Shape(1, 2, 2, 64, 64, 64), torch.float32, seed=seed_of("softcap 1e4", kernel.__name__))
    with torch.no_grad():
        q.mul_(50), k.mul_(50)
    o, lse = kernel(q, k, v, return_lse=True, softcap=softcap)
    assert torch.isfinite(o).all() and (lse.abs() < 64 * softcap).all()
    spec = lambda qkv, s, upcast=True: reference.attention(*qkv, True, None, upcast, softcap=softcap)
    spec_lse = lambda qkv, s: reference.logsumexp(qkv[0], qkv[1], True, softcap=softcap)
    hold_mods_to_rule((o, lse), (q, k, v), None, do, torch.zeros_like(lse), spec, spec_lse)


@triton.jit
def _tanh_of(X, Y, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, common.tanh(tl.load(X + offs, mask=offs < N)), mask=offs < N)


def test_the_kernels_tanh_is_accurate_over_the_whole_range():
    # every score s / cap the soft-cap can meet, 1e-38 to 1e4 and their negatives, against float64
    x = torch.cat([torch.logspace(-38, 4, 4001), torch.linspace(-3, 3, 2001)]).to(DEVICE)
    x = torch.cat([x, -x]).float()
    y = torch.empty_like(x)
    _tanh_of[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    truth = torch.tanh(x.double())
    ulps = ((y.double() - truth).abs() / torch.finfo(torch.float32).eps / truth.abs().clamp_min(1e-38)).max().item()
    assert ulps <= 8, f"tanh is {ulps:.3g} float32 epsilons off (relative)"


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
@pytest.mark.parametrize("softcap", [1e3, 1e8, 1e30])
def test_a_softcap_too_large_to_bind_is_plain_attention(poison, kernel, softcap):
    # s / cap is tiny: tanh must keep its digits, or the cap multiplies its error back into every
    # score (fp32 failed the rule from a cap of 1e3; at 1e8 every weight came out uniform)
    check(kernel, Shape(1, 2, 1, 33, 40, 32), torch.float32, True, "softcap", softcap=softcap)


def test_a_softcap_past_float32_is_refused():
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, 4, 16), torch.float32, seed=0)
    with pytest.raises(ValueError, match="softcap must be at most .*got 3e\\+38"):
        flash_attention(q, k, v, softcap=3e38)


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
@pytest.mark.parametrize("sink_scale", [50.0, -50.0], ids=["huge", "very-negative"])
def test_sinks_very_large_and_very_negative(poison, kernel, sink_scale):
    check(kernel, Shape(1, 2, 2, 33, 33, 32), torch.float32, True, "sinks", sink_scale=sink_scale)


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
def test_rows_that_see_no_key_give_zeros_and_the_sink(poison, kernel):
    # Tq > Tk, causal: the first 20 rows see no key; with a sink their weights are all 0
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 30, 10, 16), torch.float32, seed=4)
    sinks = torch.tensor([0.5, -2.0], device=DEVICE)
    o, lse = kernel(q, k, v, return_lse=True, sinks=sinks)
    assert torch.equal(o[:, :, :20], torch.zeros_like(o[:, :, :20]))
    assert torch.allclose(lse[0, :, :20], sinks[:, None].expand(2, 20))        # log(exp(sink)) = sink


@pytest.mark.parametrize("name", list(MODS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_batches(poison, name, dtype):
    lengths_q, lengths_k = (5, 0, 1, 33), (9, 3, 1, 40)
    q, k, v, do, cu_q, cu_k = make_packed(lengths_q, lengths_k, 4, 2, 32, dtype, seed_of("varlen mods", name, dtype))
    softcap, sinks, slopes = mod_inputs(name, 4, len(lengths_q), dtype, 5)
    out = flash_attention_varlen(q, k, v, cu_q, cu_k, 33, 40, return_lse=True, softcap=softcap, sinks=sinks,
                                 alibi_slopes=slopes)
    dlse = torch.randn(out[1].shape, generator=torch.Generator(DEVICE).manual_seed(6), device=DEVICE)
    spec = lambda qkv, s, upcast=True: reference.varlen_attention(*qkv, cu_q, cu_k, True, None, upcast,
                                                                  softcap=softcap, sinks=s, alibi_slopes=slopes)
    spec_lse = lambda qkv, s: reference.varlen_logsumexp(qkv[0], qkv[1], cu_q, cu_k, True, softcap=softcap,
                                                         sinks=s, alibi_slopes=slopes)
    hold_mods_to_rule(out, (q, k, v), sinks, do, dlse, spec, spec_lse)


@pytest.mark.parametrize("name", list(MODS))
@pytest.mark.parametrize("splits", [1, 3])
def test_decoding(poison, name, splits):
    B, Hq, Hkv, Tq, Tmax, D = 3, 8, 2, 2, 100, 32
    g = torch.Generator(DEVICE).manual_seed(seed_of("decode mods", name, splits))
    q = torch.randn(B, Hq, Tq, D, generator=g, device=DEVICE)
    k_cache, v_cache = (torch.randn(B, Hkv, Tmax, D, generator=g, device=DEVICE) for _ in range(2))
    lengths = torch.tensor([100, 37, 2], dtype=torch.int32, device=DEVICE)
    softcap, sinks, slopes = mod_inputs(name, Hq, B, torch.float32, 7)
    sinks = sinks.detach() if sinks is not None else None
    with torch.no_grad():
        o = decode_attention(q, k_cache, v_cache, lengths, num_splits=splits, softcap=softcap, sinks=sinks,
                             alibi_slopes=slopes)
    m64 = dict(softcap=softcap, sinks=None if sinks is None else sinks.double(),
               alibi_slopes=None if slopes is None else slopes.double())
    truth = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), lengths, **m64)
    low = reference.decode_attention(q, k_cache, v_cache, lengths, **{**m64, **dict(
        sinks=sinks, alibi_slopes=slopes)})
    assert_close("out", o, truth, low, FACTOR, FLOOR[torch.float32])


def test_attention_passes_them_to_every_impl():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 16, 16, 16), torch.float32, seed=8)
    mods = dict(softcap=4.0, sinks=torch.randn(2, device=DEVICE), alibi_slopes=reference.alibi_slopes(2).to(DEVICE))
    ref = attention(q, k, v, impl="reference", **mods)
    for impl in ("auto", "flash", "fused"):
        torch.testing.assert_close(attention(q, k, v, impl=impl, **mods), ref, atol=1e-5, rtol=1e-5)


def test_compiles_without_graph_breaks_and_learns_the_sinks():
    """torch.compile(fullgraph=True) through the custom ops with all three: the same outputs and
    gradients, sinks included, as eager."""
    q, k, v, _ = make_qkv(Shape(1, 4, 2, 19, 19, 16), torch.float32, seed=10)
    slopes = reference.alibi_slopes(4).to(DEVICE)
    fn = lambda q, k, v, s: flash_attention(q, k, v, softcap=3.0, sinks=s, alibi_slopes=slopes)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grads = []
    for f in (compiled, fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        sinks = torch.linspace(-1.0, 1.0, 4, device=DEVICE).requires_grad_()
        out = f(*leaves, sinks)
        out.square().sum().backward()
        grads.append([out] + [x.grad for x in leaves] + [sinks.grad])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize("mods, error, words", [
    (dict(softcap=0.0), ValueError, r"softcap must be finite and > 0 \(logits become softcap \* tanh\(s / softcap\)\), got 0.0"),
    (dict(softcap=-1), ValueError, "softcap must be finite and > 0"),
    (dict(softcap=math.inf), ValueError, "softcap must be finite and > 0"),
    (dict(softcap="30"), TypeError, "softcap must be a real number or None, got str"),
    (dict(sinks=[0.0, 1.0]), TypeError, "sinks must be a torch.Tensor or None, got list"),
    (dict(sinks=torch.zeros(3)), ValueError, r"sinks must have shape \(2,\) \(Hq = 2 query heads\), got \(3,\)"),
    (dict(sinks=torch.zeros(2, dtype=torch.int64)), TypeError, "sinks has dtype int64; supported"),
    (dict(sinks=torch.zeros(2, device="meta")), ValueError, "sinks must be on q's device"),
    (dict(alibi_slopes=torch.zeros(1, 2, 1)), ValueError, r"alibi_slopes must have shape \(2,\) or \(1, 2\)"),
    (dict(alibi_slopes=torch.zeros(2, requires_grad=True)), ValueError, "alibi_slopes are constants to the kernels"),
], ids=["softcap 0", "softcap negative", "softcap inf", "softcap str", "sinks list", "sinks shape", "sinks int",
        "sinks device", "slopes shape", "slopes grad"])
@pytest.mark.parametrize("kernel", [flash_attention, fused_attention, attention], ids=lambda k: k.__name__)
def test_bad_values_are_refused_clearly(kernel, mods, error, words):
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 8, 8, 16), torch.float32, seed=9)
    mods = {name: (t.to(DEVICE) if isinstance(t, torch.Tensor) and t.device.type != "meta" else t)
            for name, t in mods.items()}
    with pytest.raises(error, match=words):
        kernel(q, k, v, **mods)


# ----------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(MODS))
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_long_sequences_gpu(poison, name, dtype):
    # ALiBi over thousands of keys: distances up to 3000 (with slopes down to 2^-8 and 2^-4 here)
    check(flash_attention, Shape(2, 8, 2, 3000, 3000, 128), dtype, True, name)
    check(flash_attention, Shape(1, 16, 4, 1000, 4097, 64), dtype, False, name)
