"""Decoding against a KV cache: decode_attention (split-KV with a log-sum-exp merge) against
`reference.decode_attention`, its num_splits rule, and its input checks."""

import pytest
import torch

from attention_kernels import reference
from attention_kernels.testing.checks import check_decode, decode_inputs
from attention_kernels.testing.cases import DECODE_CASES, DEVICE
from attention_kernels.kernels import decode, decode_attention
from attention_kernels.testing.rule import seed_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", DECODE_CASES, ids=str)
def test_decode_matches_reference(poison, case, dtype):
    check_decode(case, dtype)


def test_every_split_count_agrees(poison):
    # 1 to 12 splits of 77 valid keys (several leave splits empty): the merge makes them agree
    q, k_cache, v_cache, seqlens = decode_inputs(2, 4, 2, 2, 90, 32, (77, 13), torch.float32, seed_of("splits"))
    truth = reference.decode_attention(q.double(), k_cache.double(), v_cache.double(), seqlens)
    for num_splits in range(1, 13):
        o = decode_attention(q, k_cache, v_cache, seqlens, num_splits=num_splits)
        err = (o.double() - truth).abs().max().item()
        assert err < 1e-5, f"num_splits={num_splits}: max error {err:.3g}"


def test_decode_equals_flash_on_the_valid_cache(poison):
    # One sequence, the whole cache valid: decoding is flash_attention on the same tensors
    from attention_kernels.kernels import flash_attention
    q, k_cache, v_cache, seqlens = decode_inputs(1, 4, 1, 3, 50, 16, (50,), torch.float32, seed_of("vs flash"))
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, seqlens, num_splits=3),
                               flash_attention(q, k_cache, v_cache), rtol=0, atol=2e-6)


@pytest.mark.parametrize("window", [None, (3, 2), (-1, 4), (6, 0)], ids=str)
def test_decode_without_a_causal_mask(poison, window):
    # each new token sees the whole valid cache (within the window, on both sides of its
    # position): against the window written out here, not the reference's own masks
    q, k_cache, v_cache, seqlens = decode_inputs(3, 4, 2, 5, 70, 16, (3, 70, 41), torch.float32,
                                                 seed_of("full", window))
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, num_splits=3, window=window, causal=False,
                              return_lse=True)
    left, right = window or (-1, -1)
    for b, L in enumerate(seqlens.tolist()):
        pos = torch.arange(L - 5, L)[:, None]                                   # each new token's position
        j = torch.arange(L)[None, :]
        seen = (j >= pos - left if left >= 0 else j >= 0) & (j <= pos + right if right >= 0 else j >= 0)
        k, v = (x[b].double().repeat_interleave(2, dim=0)[:, :L] for x in (k_cache, v_cache))  # (Hq, L, D)
        s = (q[b].double() @ k.transpose(-1, -2) / 4).masked_fill(~seen, float("-inf"))  # (Hq, 5, L), D = 16
        want = torch.nan_to_num(torch.softmax(s, -1)) @ v
        torch.testing.assert_close(o[b].double(), want, rtol=0, atol=2e-6)
        torch.testing.assert_close(lse[b].double(), torch.logsumexp(s, -1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("lengths", [41, [3, 70, 41], "int64"], ids=str)
def test_cache_lengths_of_any_kind(poison, lengths):
    q, k_cache, v_cache, seqlens = decode_inputs(3, 4, 2, 1, 70, 16, (3, 70, 41), torch.float32, seed_of("kinds"))
    want = [lengths] * 3 if isinstance(lengths, int) else [3, 70, 41]
    given = torch.tensor(want, device=DEVICE) if lengths == "int64" else lengths
    assert torch.equal(decode_attention(q, k_cache, v_cache, given),
                       decode_attention(q, k_cache, v_cache, torch.tensor(want, dtype=torch.int32, device=DEVICE)))
    with pytest.raises(ValueError, match="cache_seqlens must lie in"):
        decode_attention(q, k_cache, v_cache, torch.tensor([3, 2**40, 1], device=DEVICE))


def test_num_splits_rule():
    cpu = torch.device("cpu")  # the interpreter's stand-in: decode.INTERPRETER_SMS SMs
    sms = decode.INTERPRETER_SMS
    # one sequence, one k/v head, a long cache: a split per SM
    assert decode.default_num_splits(1, 1, 1, 1 << 16, cpu) == sms
    # as many programs as SMs without splitting: no split
    assert decode.default_num_splits(sms, 1, 1, 1 << 16, cpu) == 1
    # a short cache: no split shorter than MIN_SPLIT_KEYS
    assert decode.default_num_splits(1, 1, 1, decode.MIN_SPLIT_KEYS + 1, cpu) == 2
    assert decode.default_num_splits(1, 1, 1, 10, cpu) == 1


def bad_input(**change):
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    args = {**dict(q=q, k_cache=k_cache, v_cache=v_cache, cache_seqlens=seqlens), **change}
    return lambda: decode_attention(**args)


@pytest.mark.parametrize("change, error, message", [
    (dict(cache_seqlens=torch.tensor([3.0, 8.0])), ValueError, "int32 tensor of shape \\(B,\\) = \\(2,\\), got float32"),
    (dict(cache_seqlens=torch.tensor([3], dtype=torch.int32)), ValueError, "of shape \\(1,\\)"),
    (dict(cache_seqlens=[3, 8.5]), TypeError, "a list of 2 ints or one int; got list \\[3, 8.5\\]"),
    (dict(cache_seqlens=[3, 9]), ValueError, "\\[0, Tmax = 8\\].*9 for sequence 1"),
    (dict(cache_seqlens=torch.tensor([3, 9], dtype=torch.int32)), ValueError, "\\[0, Tmax = 8\\].*9 for sequence 1"),
    (dict(cache_seqlens=torch.tensor([-1, 8], dtype=torch.int32)), ValueError, "-1 for sequence 0"),
    (dict(num_splits=0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(num_splits=2.0), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(num_splits=70000), ValueError, "num_splits must be None or an int from 1 to 64"),
    (dict(window=(4, 1)), ValueError, "causal attention means right = 0"),
])
def test_bad_decode_inputs_are_refused(change, error, message):
    if "cache_seqlens" in change and isinstance(change["cache_seqlens"], torch.Tensor):
        change["cache_seqlens"] = change["cache_seqlens"].to(DEVICE)
    with pytest.raises(error, match=message):
        bad_input(**change)()


def test_more_splits_than_key_blocks_are_clamped(poison, monkeypatch):
    # 8 keys are one key block: 60 splits would be 59 empty programs and a 64-wide merge
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    launched, wrap = [], decode.wrap_triton

    class Spy:  # records each launch's NUM_SPLITS, then launches
        def __init__(self, kernel):
            self.kernel = wrap(kernel)

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(kwargs["NUM_SPLITS"])
                return self.kernel[grid](*args, **kwargs)
            return launch
    monkeypatch.setattr(decode, "wrap_triton", Spy)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, seqlens, num_splits=60),
                               decode_attention(q, k_cache, v_cache, seqlens, num_splits=1), rtol=0, atol=0)
    assert launched == [1] * 4  # split and merge, twice: 60 clamped to the one key block


def test_unchecked_lengths_stay_inside_the_cache(poison):
    # check_seqlens=False: no host read; a length past Tmax is clamped to Tmax, never read beyond
    q, k_cache, v_cache, seqlens = decode_inputs(2, 2, 1, 1, 8, 16, (3, 8), torch.float32, 0)
    long = torch.tensor([3, 1000], dtype=torch.int32, device=DEVICE)
    torch.testing.assert_close(decode_attention(q, k_cache, v_cache, long, check_seqlens=False),
                               decode_attention(q, k_cache, v_cache, seqlens), rtol=0, atol=0)


def test_decode_refuses_to_run_where_gradients_are_expected():
    q, k_cache, v_cache, seqlens = decode_inputs(1, 1, 1, 1, 4, 16, (4,), torch.float32, 0)
    with pytest.raises(RuntimeError, match="no backward"):
        decode_attention(q.requires_grad_(), k_cache, v_cache, seqlens)
    with torch.no_grad():
        decode_attention(q, k_cache, v_cache, seqlens)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", [
    (4, 32, 8, 1, 16384, 128, (16384, 1, 9000, 4097), None, None),
    (2, 16, 2, 4, 8192, 64, (8192, 5000), None, (2047, 0)),
    (64, 8, 8, 1, 1024, 128, tuple(range(1, 1025, 16)), None, None),
], ids=str)
def test_decode_long_gpu(poison, case, dtype):
    test_decode_matches_reference(poison, case, dtype)
