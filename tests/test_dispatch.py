"""kernels.attention runs the implementation asked for, and "auto" follows its documented rule."""

import inspect

import pytest
import torch

from attention_kernels import kernels  # noqa: E402  (its submodules below, by attribute)
import attention_kernels.kernels.dispatch
from attention_kernels import reference
from attention_kernels.testing.cases import Shape
from attention_kernels.kernels import attention, choose_impl
from attention_kernels.kernels.fused import max_seqlen
from attention_kernels.testing.rule import make_qkv, seed_of


@pytest.fixture
def calls(monkeypatch):
    """Replace each implementation with a spy that records its name and runs the real one."""
    seen = []
    for name, attr, module in (("reference", "attention", kernels.dispatch.reference),
                               ("fused", "fused_attention", kernels.dispatch),
                               ("flash", "flash_attention", kernels.dispatch)):
        real = getattr(module, attr)

        def spy(*args, _name=name, _real=real, **kwargs):
            seen.append(_name)
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, attr, spy)
    return seen


@pytest.mark.parametrize("impl", ["reference", "fused", "flash"])
def test_impl_runs_what_it_names(calls, impl):
    q, k, v, _ = make_qkv(Shape(1, 4, 2, 40, 97, 32), torch.float32, seed=seed_of("impl", impl))
    out = attention(q, k, v, causal=True, scale=0.2, impl=impl)
    assert calls == [impl]
    torch.testing.assert_close(out, reference.attention(q, k, v, causal=True, scale=0.2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("D, Tk, dtype, expected", [
    (64, 256, torch.float16, "fused"), (64, 257, torch.bfloat16, "flash"), (80, 128, torch.float16, "flash"),
    (32, 128, torch.float32, "fused"), (32, 129, torch.float32, "flash"), (4, 8, torch.float32, "fused"),
])
def test_auto_rule(D, Tk, dtype, expected):
    assert choose_impl(D, Tk, dtype) == expected


@pytest.mark.parametrize("Tk", [17, 300])
def test_auto_runs_the_rule_s_choice(calls, Tk):
    q, k, v, do = make_qkv(Shape(1, 2, 2, 17, Tk, 64), torch.float16, seed=seed_of("auto", Tk))
    attention(q, k, v).backward(do)
    assert calls == [choose_impl(64, Tk, torch.float16)]


def test_auto_never_picks_fused_beyond_its_row_limit():
    for dtype in (torch.float16, torch.float32):
        for D in (1, 16, 32, 64, 96, 128, 256):
            for Tk in (1, 64, 128, 256, 512, 1024, 4096):
                if choose_impl(D, Tk, dtype) == "fused":
                    assert Tk <= max_seqlen(D, dtype)


def test_unknown_impl_is_refused():
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, 4, 16), torch.float32)
    with pytest.raises(ValueError, match="impl must be one of 'auto', 'reference', 'fused', 'flash'; got 'triton'"):
        attention(q, k, v, impl="triton")


def test_attention_takes_every_flash_keyword():
    flash = inspect.signature(kernels.flash_attention).parameters
    ours = inspect.signature(attention).parameters
    assert [name for name in flash if name not in ours] == []
    assert all(ours[name].default == flash[name].default for name in flash)


def test_every_keyword_reaches_the_kernel(monkeypatch):
    """Each of flash_attention's keywords, given to attention(), reaches the kernel it runs, unchanged."""
    seen = {}
    for attr in ("fused_attention", "flash_attention"):
        real = getattr(kernels.dispatch, attr)
        monkeypatch.setattr(kernels.dispatch, attr,
                            lambda *a, _real=real, _attr=attr, **kw: seen.update({_attr: kw}) or _real(*a, **kw))
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 9, 9, 16), torch.float32, seed=seed_of("keywords"))
    mods = dict(causal=False, scale=0.3, return_lse=True, softcap=2.0, sinks=torch.zeros(2),
                alibi_slopes=reference.alibi_slopes(2), dropout_p=0.25, dropout_seed=7, attn_mask=torch.randn(9, 9))
    attention(q, k, v, impl="fused", **mods)
    assert {name: seen["fused_attention"][name] for name in mods} == mods
    attention(q, k, v, impl="flash", window=(2, 1), **mods)
    assert {name: seen["flash_attention"][name] for name in mods} == mods
    assert seen["flash_attention"]["window"] == (2, 1)


@pytest.mark.parametrize("impl", ["auto", "flash", "reference"])
def test_a_window_runs_on_flash_or_the_reference(calls, impl):
    q, k, v, do = make_qkv(Shape(1, 4, 2, 17, 17, 32), torch.float16, seed=seed_of("window", impl))
    out, lse = attention(q, k, v, impl=impl, window=(4, 0), return_lse=True)
    assert calls == ["reference" if impl == "reference" else "flash"]  # auto: fused has no window
    want = reference.attention(q, k, v, window=(4, 0))
    torch.testing.assert_close(out, want, atol=2e-3, rtol=0)
    torch.testing.assert_close(lse, reference.logsumexp(q, k, window=(4, 0)), atol=1e-4, rtol=0)


def test_a_window_that_hides_nothing_leaves_auto_on_fused(calls):
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 9, 9, 16), torch.float16, seed=seed_of("no window"))
    attention(q, k, v, window=(-1, 0))
    attention(q, k, v, causal=False, window=(-1, -1))
    assert calls == ["fused", "fused"]


def test_fused_refuses_a_window():
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, 4, 16), torch.float32)
    with pytest.raises(ValueError, match=r"attention\(impl='fused'\): fused_attention takes no window, got "
                                         r"window=\(2, 0\); use impl='flash' or 'auto'"):
        attention(q, k, v, impl="fused", window=(2, 0))
