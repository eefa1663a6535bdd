"""Value heads of another width than the query and key heads (Dv != Dqk: DeepSeek's latent
attention has 192 and 128 in training and prefill) on flash, dense and packed, forward and
backward, and through attention(); every other entry point refuses them by name."""

import pytest
import torch

from attention_kernels import attention, flash_attention, flash_attention_varlen, fused_attention, reference
from attention_kernels.testing.cases import DEVICE
from attention_kernels.testing.rule import hold_to_rule, seed_of


def qkv(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, seed):
    g = torch.Generator(DEVICE).manual_seed(seed)
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE).to(dtype).requires_grad_()
    return rand(B, Hq, Tq, D), rand(B, Hkv, Tk, D), rand(B, Hkv, Tk, Dv), rand(B, Hq, Tq, Dv).detach()


CASES = [  # (B, Hq, Hkv, Tq, Tk, D, Dv, window)
    (1, 2, 1, 70, 70, 192, 128, None),      # MLA's training shape, grouped heads, 70 misses the blocks
    (2, 2, 2, 33, 50, 64, 128, (9, 0)),     # v wider than q, Tq != Tk, a window
    (1, 3, 1, 1, 17, 80, 48, None),         # one query; both padded to a power of two
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=str)
def test_flash_with_another_value_head_dim(poison, case, dtype):
    B, Hq, Hkv, Tq, Tk, D, Dv, window = case
    q, k, v, do = qkv(B, Hq, Hkv, Tq, Tk, D, Dv, dtype, seed_of("value dims", case, dtype))
    o, lse = flash_attention(q, k, v, window=window, return_lse=True)
    assert o.shape == (B, Hq, Tq, Dv)
    w = window or (-1, -1)
    hold_to_rule(o, lse, (q, k, v), do, lambda q, k, v, upcast=True: reference.attention(q, k, v, True, None, upcast, w),
                 lambda q, k: reference.logsumexp(q, k, True, None, w))


def test_varlen_with_another_value_head_dim(poison):
    lengths = [5, 40, 1]
    cu = torch.tensor([0, 5, 45, 46], dtype=torch.int32, device=DEVICE)
    g = torch.Generator(DEVICE).manual_seed(seed_of("varlen value dims"))
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE).requires_grad_()
    q, k, v = rand(46, 4, 96), rand(46, 2, 96), rand(46, 2, 32)
    do = torch.randn(46, 4, 32, generator=g, device=DEVICE)
    o = flash_attention_varlen(q, k, v, cu, cu, 40, 40)
    o.backward(do)
    for a, z in zip(cu.tolist(), cu.tolist()[1:]):
        one = lambda x: x[a:z].detach().double().transpose(0, 1)[None].requires_grad_()   # (1, H, T, D)
        qb, kb, vb = one(q), one(k), one(v)
        ref = reference.attention(qb, kb, vb)
        ref.backward(do[a:z].double().transpose(0, 1)[None])
        torch.testing.assert_close(o[a:z].double(), ref[0].transpose(0, 1), atol=2e-6, rtol=0)
        for got, want in ((q.grad, qb.grad), (k.grad, kb.grad), (v.grad, vb.grad)):
            torch.testing.assert_close(got[a:z].double(), want[0].transpose(0, 1), atol=1e-5, rtol=0)
    assert len(lengths) == 3


@pytest.mark.parametrize("impl", ["auto", "flash", "reference"])
def test_attention_runs_flash_for_them(impl):
    q, k, v, do = qkv(1, 2, 2, 20, 20, 32, 16, torch.float32, seed_of("attention value dims", impl))
    o = attention(q, k, v, impl=impl)   # auto would pick fused for these short rows
    torch.testing.assert_close(o.double(), reference.attention(*(x.double() for x in (q, k, v))), atol=2e-6, rtol=0)


def test_the_others_refuse_them_by_name():
    q, k, v, do = qkv(1, 2, 2, 20, 20, 32, 16, torch.float32, seed_of("refused value dims"))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        fused_attention(q, k, v)
    with pytest.raises(ValueError, match="fused_attention takes no v of another head dim"):
        attention(q, k, v, impl="fused")
    with pytest.raises(ValueError, match="v's head dim Dv=300 is not supported"):
        flash_attention(q, k, torch.randn(1, 2, 20, 300, device=DEVICE))
    with pytest.raises(ValueError, match=r"k and v must have the same shape \(B, Hkv, Tk\)"):
        flash_attention(q, k, v[:, :, :10])


@pytest.mark.parametrize("is_causal, Tq", [(True, 24), (False, 24), (False, 3)], ids=["causal", "full", "decoding"])
def test_the_sdpa_drop_in_runs_them_on_the_kernels(is_causal, Tq):
    import torch.nn.functional as F
    from attention_kernels.kernels.sdpa import SdpaCalls, _sdpa
    q, k, v, do = qkv(2, 4, 2, Tq, 24, 48, 32, torch.float32, seed_of("sdpa value dims", is_causal, Tq))
    calls = SdpaCalls()
    with torch.no_grad():
        got = _sdpa(q, k, v, None, 0.0, is_causal, None, True, "auto", calls)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=is_causal, enable_gqa=True)
    assert calls.kernel == 1 and not calls.fallback and calls.decode == 0, calls
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
