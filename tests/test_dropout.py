"""Attention dropout inside the flash and fused kernels: given the keep mask a call used (`dropout_mask`,
from its seed), the reference with that mask is the truth, forward and backward, under the
project's rule; the masks keep 1 - p of the weights, independently; a seed repeats a call and
torch.manual_seed repeats the seeds."""

import pytest
import torch

from attention_kernels import attention, dropout_mask, flash_attention, flash_attention_varlen, fused_attention, \
    reference
from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, Shape
from attention_kernels.testing.rule import assert_close, hold_to_rule, make_packed, make_qkv, seed_of

SHAPES = [  # grouped heads and Tq != Tk, a head dim of 80 without a causal mask, one query
    (Shape(2, 4, 2, 37, 53, 32), True, None),
    (Shape(1, 4, 4, 64, 40, 80), False, None),
    (Shape(1, 2, 1, 1, 33, 16), True, None),
    (Shape(1, 4, 2, 70, 70, 16), True, (9, 0)),  # a sliding window
]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# every shape on flash; fused has no windows, so it takes only the shapes without one
KERNEL_SHAPES = [(kernel, *case) for kernel in (flash_attention, fused_attention) for case in SHAPES
                 if kernel is flash_attention or case[2] is None]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kernel, shape, causal, window", KERNEL_SHAPES,
                         ids=lambda x: x.__name__ if callable(x) else str(x) if isinstance(x, Shape) else None)
def test_dropout_is_the_reference_with_its_mask(poison, kernel, shape, causal, window, dtype):
    p, seed = 0.3, seed_of("dropout seed", shape, causal)
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of("dropout", shape, causal, dtype))
    w = {} if window is None else {"window": window}
    o, lse = kernel(q, k, v, causal=causal, return_lse=True, dropout_p=p, dropout_seed=seed, **w)
    keep = dropout_mask(shape.B, shape.Hq, shape.Tq, shape.Tk, p, seed, DEVICE)         # (B, Hq, Tq, Tk)
    w = window or (-1, -1)
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, causal, None, upcast, w, dropout_p=p,
                                                            dropout_mask=keep)
    spec_lse = lambda q, k: reference.logsumexp(q, k, causal, None, w)  # the softmax's: dropout comes after
    hold_to_rule(o, lse, (q, k, v), do, spec, spec_lse)


# ----------------------------------------------------------------------------- truths of their own
# The tests above hold the kernels to the reference given the same mask: a wrong dropout scaling
# made in both would pass. These hold them to torch's convention, written out here, and to the
# property that convention exists for: dropout leaves the expected output unchanged.


def written_out_dropout_attention(q, k, v, keep, p, causal):
    """float64 softmax(q k^T / sqrt(D) + causal mask) * keep / (1 - p) @ v, one head at a time:
    query head h reads k/v head h // (Hq / Hkv); query i sees key j when j <= i + Tk - Tq;
    dropout as torch's F.dropout has it, a kept weight times 1 / (1 - p), a dropped one 0."""
    q, k, v = (x.double() for x in (q, k, v))
    Hq, Tq, D, Hkv, Tk = q.shape[1], q.shape[2], q.shape[3], k.shape[1], k.shape[2]
    hidden = torch.arange(Tk, device=q.device)[None, :] > torch.arange(Tq, device=q.device)[:, None] + (Tk - Tq)
    heads = []
    for h in range(Hq):
        kv = h // (Hq // Hkv)
        s = q[:, h] @ k[:, kv].transpose(-1, -2) / D ** 0.5                              # (B, Tq, Tk)
        if causal:
            s = s.masked_fill(hidden, float("-inf"))
        w = torch.softmax(s, -1).nan_to_num(0.0)                                         # rows with no key: 0
        heads.append(torch.where(keep[:, h], w / (1 - p), 0.0) @ v[:, kv])               # (B, Tq, D)
    return torch.stack(heads, 1)                                                         # (B, Hq, Tq, D)


def test_torch_dropout_convention():
    """What `written_out_dropout_attention` writes is torch's own F.dropout: kept elements times
    1 / (1 - p), dropped ones 0."""
    p = 0.3
    x = torch.nn.functional.dropout(torch.ones(4096, dtype=torch.float64), p, training=True)
    assert set(x.unique().tolist()) == {0.0, 1 / (1 - p)}


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
def test_dropout_is_the_written_out_formula(poison, kernel):
    """Forward and backward against the formula in float64 with the mask the call used: grouped
    heads, Tq != Tk (rows that see no key)."""
    shape, p, seed = Shape(2, 4, 2, 11, 7, 16), 0.4, 2024
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("written-out dropout"))
    o = kernel(q, k, v, causal=True, dropout_p=p, dropout_seed=seed)
    keep = dropout_mask(shape.B, shape.Hq, shape.Tq, shape.Tk, p, seed, DEVICE)
    assert 0 < keep.float().mean() < 1
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    truth = written_out_dropout_attention(*leaves, keep, p, True)
    torch.testing.assert_close(o.double(), truth, rtol=1e-5, atol=1e-5)
    o.backward(do)
    truth.backward(do.double())
    for name, x, x64 in zip(("dq", "dk", "dv"), (q, k, v), leaves):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kernel", [flash_attention, fused_attention], ids=lambda k: k.__name__)
def test_dropout_is_unbiased_over_seeds(kernel):
    """The mean over N independent draws of the output approaches the output without dropout.
    Element (i, d) of one draw is sum_j w_ij v_jd m_ij / (1 - p), m_ij ~ Bernoulli(1 - p)
    independent, so its variance is p / (1 - p) * sum_j w_ij^2 v_jd^2, and the mean's standard
    error is that over sqrt(N). Every element must lie within 5.5 standard errors (for 4 x 32
    elements a correct kernel fails with probability about 5e-6). Without the 1 / (1 - p) the
    mean is (1 - p) times the truth, off by sqrt(N p (1 - p)) |o| / sqrt(sum_j w_ij^2 v_jd^2)
    standard errors: 7.3 at least at N = 256, p = 0.3 (the ratio is >= 1 where the v_jd share a
    sign), more where the weights spread. p is not 1/2, where keeping with probability p instead
    of 1 - p would be unbiased too.
    The draws, cheaply: 4 queries, each repeated on 128 rows (no causal mask: every row draws its
    own decisions over the same 4 keys), under 2 seeds."""
    n_queries, rows, D, p, seeds = 4, 128, 32, 0.3, (11, 12)
    g = torch.Generator(DEVICE).manual_seed(seed_of("unbiased"))
    q0 = torch.randn(1, 1, n_queries, D, generator=g, device=DEVICE)
    k, v = (torch.randn(1, 1, 4, D, generator=g, device=DEVICE) for _ in range(2))
    plain = kernel(q0, k, v, causal=False).double()                                      # (1, 1, 4, D)
    q = q0.repeat_interleave(rows, dim=2)                                                # (1, 1, 4 * rows, D)
    draws = torch.cat([kernel(q, k, v, causal=False, dropout_p=p, dropout_seed=s).view(n_queries, rows, D)
                       for s in seeds], 1).double()                                      # (4, N, D)
    N = draws.shape[1]
    w = torch.softmax((q0 @ k.transpose(-1, -2)).double()[0, 0] / D ** 0.5, -1)          # (4, 4 keys)
    se = (p / (1 - p) * (w ** 2 @ v.double()[0, 0] ** 2) / N).sqrt()                     # (4, D)
    z = (draws.mean(1) - plain[0, 0]) / se
    assert z.abs().max() < 5.5, f"the mean over {N} draws is {z.abs().max():.1f} standard errors off"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_packed_batches_drop_per_sequence(poison, dtype):
    """Sequence b's decisions are the dense mask's [b, :, :len_q, :len_k]: positions in the sequence."""
    lengths_q, lengths_k = [5, 0, 14, 1], [9, 3, 11, 6]
    q, k, v, do, cu_q, cu_k = make_packed(lengths_q, lengths_k, 4, 2, 32, dtype, seed=seed_of("varlen dropout"))
    p, seed = 0.25, 99
    o = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), dropout_p=p, dropout_seed=seed)
    keep = dropout_mask(len(lengths_q), 4, max(lengths_q), max(lengths_k), p, seed, DEVICE)

    def spec(q, k, v, upcast=True):
        outs = []
        for b, (q0, q1, k0, k1) in enumerate(zip(cu_q.tolist(), cu_q[1:].tolist(), cu_k.tolist(), cu_k[1:].tolist())):
            one = lambda x, a, z: x[a:z].transpose(0, 1)[None]                           # (1, H, T, D)
            m = keep[b:b + 1, :, :q1 - q0, :k1 - k0]
            outs.append(reference.attention(one(q, q0, q1), one(k, k0, k1), one(v, k0, k1), True, None, upcast,
                                            dropout_p=p, dropout_mask=m)[0].transpose(0, 1))
        return torch.cat(outs)                                                          # (total_q, Hq, D)

    truth, low = spec(*(x.detach().double() for x in (q, k, v))), spec(q.detach(), k.detach(), v.detach(), False)
    assert_close("out", o, truth, low, FACTOR, FLOOR[dtype])
    o.backward(do)  # the backward regenerates the same decisions: checked against autograd of the spec
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    spec(*leaves).backward(do.double())
    low_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    spec(*low_leaves, upcast=False).backward(do)
    for name, x, x64, xl in zip(("dq", "dk", "dv"), (q, k, v), leaves, low_leaves):
        assert_close(name, x.grad, x64.grad, xl.grad, 3.0, FLOOR[dtype])


def test_the_masks_keep_one_minus_p_independently():
    keep = dropout_mask(4, 8, 128, 128, 0.3, 12345, DEVICE).float()                     # 524 288 draws
    assert abs(keep.mean().item() - 0.7) < 0.005                                         # 8 standard deviations
    for dim in (-1, -2):  # neighbours along keys and along queries are independent
        a, b = keep.narrow(dim, 0, 127), keep.narrow(dim, 1, 127)
        assert abs(((a - 0.7) * (b - 0.7)).mean().item()) < 0.005
    assert not torch.equal(keep[0, 0], keep[0, 1]) and not torch.equal(keep[0, 0], keep[1, 0])  # heads, batches
    other = dropout_mask(4, 8, 128, 128, 0.3, 12346, DEVICE).float()
    assert (keep != other).float().mean().item() > 0.4                                   # seeds: 2 p (1 - p) = 0.42


def test_a_seed_repeats_a_call_and_manual_seed_repeats_the_seeds():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 20, 20, 16), torch.float32, seed=seed_of("repeat"))
    same = [flash_attention(q, k, v, dropout_p=0.5, dropout_seed=7) for _ in range(2)]
    assert torch.equal(*same)
    torch.manual_seed(1)
    a, b = flash_attention(q, k, v, dropout_p=0.5), flash_attention(q, k, v, dropout_p=0.5)
    torch.manual_seed(1)
    assert torch.equal(a, flash_attention(q, k, v, dropout_p=0.5)) and not torch.equal(a, b)
    # no dropout is no dropout, whatever the seed
    assert torch.equal(flash_attention(q, k, v, dropout_p=0.0, dropout_seed=3), flash_attention(q, k, v))


def test_both_kernels_drop_the_same_weights_for_a_seed():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 16, 16, 16), torch.float32, seed=seed_of("dispatch dropout"))
    fused, flash = (attention(q, k, v, impl=impl, dropout_p=0.2, dropout_seed=5) for impl in ("fused", "flash"))
    torch.testing.assert_close(fused, flash, atol=1e-5, rtol=1e-5)
    assert torch.equal(attention(q, k, v, dropout_p=0.2, dropout_seed=5), fused)  # auto picks fused here
    ref = [attention(q, k, v, impl="reference", dropout_p=0.5, dropout_seed=s) for s in (1, 1, 2)]
    assert torch.equal(ref[0], ref[1]) and not torch.equal(ref[0], ref[2])


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\) \(the probability of dropping a weight\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, "dropout_p must be in"),
    (dict(dropout_p="0.1"), TypeError, "dropout_p must be a real number in \\[0, 1\\), got str"),
    (dict(dropout_p=True), TypeError, "dropout_p must be a real number"),
    (dict(dropout_p=0.1, dropout_seed=-1), ValueError, r"dropout_seed must be an int in \[0, 2\*\*63\) or None, got -1"),
    (dict(dropout_p=0.1, dropout_seed=1.5), ValueError, "dropout_seed must be an int"),
])
def test_bad_dropout_is_refused_clearly(kwargs, error, words):
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 8, 8, 16), torch.float32, seed=9)
    for fn in (flash_attention, fused_attention, attention):
        with pytest.raises(error, match=words):
            fn(q, k, v, **kwargs)
