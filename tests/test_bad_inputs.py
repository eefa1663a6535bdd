"""Bad input, generated: for every entry point, a call that works, then every argument in turn
replaced by each illegal value of its kind (wrong type, dtype, device, shape, out-of-range numbers and
indices, non-bool flags, integers that are not integers). Each must raise ValueError or TypeError
whose message names the argument: never a crash inside Triton, never a silent clamp, never a
skipped check. (tests/test_checks.py holds the exact messages of the common cases.)"""

import numpy as np
import pytest
import torch

from attention_kernels import (attention, decode_attention, dropout_mask, flash_attention, flash_attention_varlen,
                               fused_attention, paged_attention)
from attention_kernels.kernels import PagedKVCache
from attention_kernels.testing.cases import DEVICE

F16 = dict(dtype=torch.float16, device=DEVICE)
I32 = dict(dtype=torch.int32, device=DEVICE)


def dense():
    return dict(q=torch.randn(1, 2, 5, 16, **F16), k=torch.randn(1, 1, 5, 16, **F16), v=torch.randn(1, 1, 5, 16, **F16))


def packed():
    return dict(q=torch.randn(5, 2, 16, **F16), k=torch.randn(5, 1, 16, **F16), v=torch.randn(5, 1, 16, **F16),
                cu_seqlens_q=torch.tensor([0, 2, 5], **I32), cu_seqlens_k=torch.tensor([0, 2, 5], **I32),
                max_seqlen_q=3, max_seqlen_k=3)


def cache():
    return dict(q=torch.randn(2, 2, 1, 16, **F16), k_cache=torch.randn(2, 1, 8, 16, **F16),
                v_cache=torch.randn(2, 1, 8, 16, **F16), cache_seqlens=torch.tensor([3, 8], **I32))


def pages():
    return dict(q=torch.randn(2, 2, 16, **F16), k_cache=torch.randn(4, 4, 1, 16, **F16),
                v_cache=torch.randn(4, 4, 1, 16, **F16), block_table=torch.tensor([[0, 1], [2, 3]], **I32),
                cache_seqlens=torch.tensor([5, 3], **I32), cu_seqlens_q=torch.tensor([0, 1, 2], **I32),
                max_seqlen_q=1)


def mask():
    return dict(B=1, Hq=2, Tq=5, Tk=5, dropout_p=0.5, seed=1, device=DEVICE)


# Illegal values by kind of argument. "tensor": q, k, v and caches; "index": int32 index tensors.
NOT_A_FLAG = ["yes", 2, 1.0, None, torch.tensor(True)]
NOT_AN_INT = ["3", 1.5, float("nan"), True, torch.tensor(1.0), [3]]
BAD = {
    "tensor": lambda t: [t.tolist(), t.double(), t.to(torch.int32), t[0], t.unsqueeze(0), t.narrow(-1, 0, 0),
                         t.to("meta")],
    "index": lambda t: [t.tolist(), t.float(), t.long(), t.unsqueeze(0), t[:0], t.to("meta")],
    "flag": lambda _: NOT_A_FLAG,
    "scale": lambda _: [0.0, -1.0, float("nan"), float("inf"), "0.1", torch.ones(2)],
    "window": lambda _: [(1,), (-2, 0), (1.5, 0), "3,0", (0, 0, 0), 3],
    "softcap": lambda _: [0.0, -1.0, float("nan"), float("inf"), "30", 1e39],
    "sinks": lambda _: [torch.zeros(3, device=DEVICE), torch.zeros(1, 2, device=DEVICE),
                        torch.zeros(2, dtype=torch.int32, device=DEVICE), [0.0, 0.0], torch.zeros(2, device="meta")],
    "slopes": lambda _: [torch.ones(3, device=DEVICE), torch.ones(1, 1, 2, device=DEVICE),
                         torch.ones(2, dtype=torch.int32, device=DEVICE), [0.5, 0.5], torch.ones(2, device="meta")],
    "p": lambda _: [-0.1, 1.0, 1.5, float("nan"), "0.1"],
    "seed": lambda _: [-1, 2**64, 1.5, "1", None],
    "count": lambda _: [-1, *NOT_AN_INT],                      # a size: B, Hq, Tq, Tk, max_seqlen
    "splits": lambda _: [0, -1, 1.5, "2", True],
    "impl": lambda _: ["triton", 1, None],
    "device": lambda _: ["meta", "nowhere", 3, torch.float32],
    "mask": lambda _: [torch.ones(5, 5, dtype=torch.int32, device=DEVICE), torch.zeros(5, 5, dtype=torch.float64,
                       device=DEVICE), torch.ones(5, 5, dtype=torch.bool, device="meta"),
                       torch.ones(3, 5, dtype=torch.bool, device=DEVICE), torch.zeros(1, 3, 5, 5, **F16),
                       [[True] * 5] * 5],
}

ENTRY_POINTS = {
    "flash_attention": (flash_attention, dense, dict(
        q="tensor", k="tensor", v="tensor", causal="flag", scale="scale", return_lse="flag", window="window",
        softcap="softcap", sinks="sinks", alibi_slopes="slopes", dropout_p="p", dropout_seed="seed",
        attn_mask="mask")),
    "fused_attention": (fused_attention, dense, dict(
        q="tensor", k="tensor", v="tensor", causal="flag", scale="scale", return_lse="flag", softcap="softcap",
        sinks="sinks", alibi_slopes="slopes", dropout_p="p", dropout_seed="seed")),
    "attention": (attention, dense, dict(
        q="tensor", k="tensor", v="tensor", causal="flag", scale="scale", impl="impl", softcap="softcap",
        sinks="sinks", alibi_slopes="slopes", dropout_p="p", dropout_seed="seed", attn_mask="mask")),
    "flash_attention_varlen": (flash_attention_varlen, packed, dict(
        q="tensor", k="tensor", v="tensor", cu_seqlens_q="index", cu_seqlens_k="index", max_seqlen_q="count",
        max_seqlen_k="count", causal="flag", scale="scale", return_lse="flag", window="window",
        check_seqlens="flag", softcap="softcap", sinks="sinks", alibi_slopes="slopes", dropout_p="p",
        dropout_seed="seed")),
    "decode_attention": (decode_attention, cache, dict(
        q="tensor", k_cache="tensor", v_cache="tensor", cache_seqlens="index", scale="scale", num_splits="splits",
        return_lse="flag", check_seqlens="flag", softcap="softcap", sinks="sinks", alibi_slopes="slopes",
        causal="flag")),
    "paged_attention": (paged_attention, pages, dict(
        q="tensor", k_cache="tensor", v_cache="tensor", block_table="index", cache_seqlens="index",
        cu_seqlens_q="index", max_seqlen_q="count", scale="scale", num_splits="splits", softcap="softcap",
        sinks="sinks", alibi_slopes="slopes", return_lse="flag", check="flag", causal="flag")),
    "dropout_mask": (dropout_mask, mask, dict(B="count", Hq="count", Tq="count", Tk="count", dropout_p="p",
                                              seed="seed", device="device")),
}

# (entry point, argument, bad value's index) that are not errors, and why.
ALLOWED = {
    ("attention", "dropout_seed", 4),            # None: a fresh seed, as in every entry point taking dropout
    ("flash_attention", "dropout_seed", 4), ("fused_attention", "dropout_seed", 4),
    ("flash_attention_varlen", "dropout_seed", 4),
    ("decode_attention", "cache_seqlens", 0),    # a list of lengths, and int64 ones: converted to int32
    ("decode_attention", "cache_seqlens", 2),
}


def cases():
    for entry, (fn, base, kinds) in ENTRY_POINTS.items():
        args = base()
        for name, kind in kinds.items():
            for i, bad in enumerate(BAD[kind](args.get(name))):
                if (entry, name, i) not in ALLOWED:
                    yield pytest.param(entry, name, i, id=f"{entry}-{name}-{i}")


def call(entry, name, i):
    fn, base, kinds = ENTRY_POINTS[entry]
    args = base()
    bad = BAD[kinds[name]](args.get(name))[i]
    if name == "dropout_seed" or (name == "dropout_p" and entry != "dropout_mask"):
        args.setdefault("dropout_p", 0.5)                    # the seed is read only with dropout on
        args.setdefault("dropout_seed", 1)
    args[name] = bad
    return fn(**args), bad


@pytest.mark.parametrize("entry, name, i", list(cases()))
def test_each_bad_argument_is_refused_by_name(entry, name, i):
    with pytest.raises((TypeError, ValueError)) as raised:
        call(entry, name, i)
    message = str(raised.value)
    assert name in message, f"{entry}({name}=...): the message does not name {name}: {message}"
    assert "triton" not in type(raised.value).__module__.lower(), message


def test_each_good_call_runs():
    for entry, (fn, base, _) in ENTRY_POINTS.items():
        out = fn(**base())
        assert out is not None, entry


@pytest.mark.parametrize("kind", [np.int64, torch.tensor, int])
def test_integers_of_any_kind_are_taken_where_an_int_is(kind):
    # paged_attention(max_seqlen_q=np.int64(1)) once crashed inside torch's launch
    args, paged = packed(), pages()
    want = flash_attention_varlen(**args)
    assert torch.equal(flash_attention_varlen(**{**args, "max_seqlen_q": kind(3), "max_seqlen_k": kind(3)}), want)
    assert torch.equal(paged_attention(**{**paged, "max_seqlen_q": kind(1)}), paged_attention(**paged))
    assert dropout_mask(**{**mask(), "Tq": kind(5)}).shape == (1, 2, 5, 5)
    assert torch.equal(dropout_mask(**{**mask(), "seed": kind(7)}), dropout_mask(**{**mask(), "seed": 7}))
    q = dense()["q"]
    assert torch.equal(flash_attention(q, q, q, dropout_p=0.5, dropout_seed=kind(7)),
                       flash_attention(q, q, q, dropout_p=0.5, dropout_seed=7))


def test_the_page_pool_refuses_bad_calls_by_name():
    pool = PagedKVCache(1, 4, 2, 1, 16, max_seqs=2, max_pages=2, dtype=torch.float16, device=DEVICE)
    pool.reserve(0, 2)                                       # one page: 2 positions reserved, none filled
    bad = [(lambda: pool.reserve(0, -3), r"n must be an int >= 0 .*got -3"),
           (lambda: pool.reserve(0, 1.5), r"n must be an int >= 0 .*got 1.5"),
           (lambda: pool.reserve(5, 1), "seq must be a sequence slot from 0 to 1, got 5"),
           (lambda: pool.advance([0], [3]), "sequence 0 would hold 3 positions, but only 2 are reserved"),
           (lambda: pool.advance([0], [-1]), "counts must be ints >= 0"),
           (lambda: pool.advance([0, 1], [1]), "seqs and counts must have the same length")]
    for call_, words in bad:
        with pytest.raises((TypeError, ValueError), match=words):
            call_()
    assert pool.lengths == [0, 0] and pool.pages[0] != [] and pool.pages[1] == []  # nothing changed
