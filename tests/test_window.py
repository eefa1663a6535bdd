"""Sliding-window attention on the flash kernel: window=(left, right) against the reference, at
any block sizes, with its errors; ALiBi over keys ahead of the query (full attention and windows)
against its bias written out; and a fixed window's cost growing linearly in T."""

import time

import pytest
import torch

from attention_kernels.testing.cases import WINDOW_CASES, Shape
from attention_kernels.kernels import flash, flash_attention, fused_attention
from attention_kernels.kernels.checks import INTERPRET
from attention_kernels.testing.rule import check_against_reference, make_qkv, seed_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape, causal, window", WINDOW_CASES, ids=str)
def test_window_matches_reference(poison, shape, causal, window, dtype):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of("window", shape, causal, window, dtype))
    check_against_reference(flash_attention, q, k, v, do, causal, window=window)


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the blocks are autotuned, not set")
@pytest.mark.parametrize("causal, window", [(True, (20, 0)), (False, (9, 30))], ids=str)
@pytest.mark.parametrize("blocks", [((16, 16), (16, 16)), ((16, 64), (64, 16)), ((64, 16), (16, 64))], ids=str)
def test_window_at_any_block_sizes(poison, monkeypatch, blocks, causal, window):
    # Blocks skipped before and after the window, masked at both of its edges, whole inside it
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "fwd", blocks[0])
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "dq", blocks[0])
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "dkdv", blocks[1])
    shape = Shape(1, 2, 1, 150, 173, 32)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("window blocks", blocks, window))
    check_against_reference(flash_attention, q, k, v, do, causal, window=window)


@pytest.mark.parametrize("causal, window", [(True, (2**31 - 1, 0)), (False, (-1, 2**31 - 1)), (False, (2**40, 3))],
                         ids=str)
def test_huge_window_bounds_are_unbounded(poison, causal, window):
    # INT32_MAX is a common spelling of "no bound": the kernels' int32 block arithmetic must not wrap
    q, k, v, do = make_qkv(Shape(1, 2, 1, 40, 45, 16), torch.float32, seed=seed_of("huge window", window))
    check_against_reference(flash_attention, q, k, v, do, causal, window=window)


@pytest.mark.parametrize("kernel, Tq, Tk, window", [(flash_attention, 13, 21, (3, 5)), (flash_attention, 21, 13, (-1, -1)),
                                                     (fused_attention, 21, 13, None)],
                         ids=lambda x: x.__name__ if callable(x) else str(x))
def test_alibi_without_a_causal_mask_penalises_keys_ahead(poison, kernel, Tq, Tk, window):
    """ALiBi with keys ahead of the query visible: FlashAttention's bias -slope * |i + Tk - Tq - j|,
    written out here (not the reference's), forward and backward, grouped heads, Tq != Tk."""
    q, k, v, do = make_qkv(Shape(2, 4, 2, Tq, Tk, 16), torch.float32, seed=seed_of("alibi ahead", Tq, Tk, window))
    slopes = torch.tensor([[0.5, 0.25, 0.125, 1.0], [0.3, 0.7, 0.05, 0.2]], device=q.device)   # (B, Hq)
    w = {} if window is None else {"window": window}
    o = kernel(q, k, v, causal=False, alibi_slopes=slopes, **w)
    left, right = window or (-1, -1)
    i, j = torch.arange(Tq, device=q.device)[:, None], torch.arange(Tk, device=q.device)[None, :]
    past = j - (i + Tk - Tq)                                                             # key j past query i's diagonal
    visible = ((past >= -left) if left >= 0 else True) & ((past <= right) if right >= 0 else True)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    kv = [h // 2 for h in range(4)]                                                      # q head h on k/v head h // 2
    s = torch.stack([q64[:, h] @ k64[:, kv[h]].transpose(-1, -2) / 4.0 for h in range(4)], 1)  # (B, Hq, Tq, Tk)
    bias = -slopes.double()[:, :, None, None] * past.abs()                               # keys ahead penalised too
    p = torch.softmax((s + bias).masked_fill(~torch.as_tensor(visible, device=q.device), float("-inf")), -1)
    truth = torch.stack([p[:, h] @ v64[:, kv[h]] for h in range(4)], 1)                  # (B, Hq, Tq, D)
    torch.testing.assert_close(o.double(), truth, rtol=1e-5, atol=1e-5)
    o.backward(do)
    truth.backward(do.double())
    for name, x, x64 in zip(("dq", "dk", "dv"), (q, k, v), (q64, k64, v64)):
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-4, atol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("window, causal, message", [
    ((4, 2), True, "causal attention means right = 0"),
    ((-2, 0), True, "two ints >= -1"),
    ((4,), True, "(left, right)"),
    ((1.5, 0), True, "two ints"),
    ((True, 0), True, "two ints"),
    ("4,0", False, "(left, right)"),
])
def test_bad_windows_are_refused(window, causal, message):
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, 4, 16), torch.float32)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        flash_attention(q, k, v, causal, window=window)


@pytest.mark.skipif(not INTERPRET, reason="timed under the interpreter, where time counts the work done; "
                    "on a GPU, `python -m attention_kernels.benchmarks.inference --part window` measures it")
def test_windowed_cost_is_linear_in_T():
    # A window of 32 keys: 4x the length, about 4x the time (key blocks outside the window are
    # skipped). Were they only masked, the causal triangle would make it about 10x here.
    def seconds(T):
        q = torch.randn(1, 1, T, 16)
        best = float("inf")
        for _ in range(2):
            start = time.perf_counter()
            flash_attention(q, q, q, window=(32, 0))
            best = min(best, time.perf_counter() - start)
        return best

    seconds(512)  # warm-up
    ratio = seconds(2048) / seconds(512)
    assert ratio < 6, f"4x the length took {ratio:.1f}x the time with a fixed window (linear: 4x)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape, causal, window", [
    (Shape(2, 8, 2, 4096, 4096, 128), True, (1023, 0)),
    (Shape(1, 4, 4, 3000, 5000, 64), False, (255, 255)),
    (Shape(1, 4, 1, 2049, 2049, 96), True, (0, 0)),
], ids=str)
def test_window_long_gpu(poison, shape, causal, window, dtype):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of("window gpu", shape, window, dtype))
    check_against_reference(flash_attention, q, k, v, do, causal, window=window)
