"""Property-based fuzzing: hypothesis draws whole configurations of every entry point (the
kernels, `attention`, the SDPA drop-in, nanoGPT's module and ring attention on 2 gloo processes; dtypes,
degenerate shapes, strided views of every tensor, grouped heads, windows, softcap, sinks, ALiBi
and dropout together, extreme but legal values, integers of every kind) and holds each draw to
the project's rule against the float64 reference (`attention_kernels.testing`).

Seeded and reproducible (derandomized, no example database). A failure prints the configuration
as a call to paste: `check_dense({...})` and so on, after
`import sys; sys.path.insert(0, "tests"); from test_fuzz import *` at the repository root.

Profiles (ATTENTION_KERNELS_FUZZ): `ci` (the default, about two minutes on 2 cores) and `long`
(20x the draws, the ring 12, not derandomized: new configurations each run; about fifteen minutes on 2 cores):

    ATTENTION_KERNELS_FUZZ=long python -m pytest -n 2 tests/test_fuzz.py
"""

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from attention_kernels import (attention, decode_attention, dropout_mask, flash_attention,  # noqa: E402
                               flash_attention_varlen, fused_attention, paged_attention, reference,
                               scaled_dot_product_attention)
from attention_kernels.kernels import CausalSelfAttention  # noqa: E402
from attention_kernels.kernels.fused import max_seqlen  # noqa: E402
from attention_kernels.testing import hold_to_rule, poisoned  # noqa: E402
from attention_kernels.kernels.distributed import _segments  # noqa: E402
from attention_kernels.testing.cases import DEVICE, Shape  # noqa: E402
from test_distributed import Case, run_cases  # noqa: E402

PROFILE = os.environ.get("ATTENTION_KERNELS_FUZZ", "ci")
if PROFILE not in ("ci", "long"):
    raise ValueError(f"ATTENTION_KERNELS_FUZZ must be 'ci' or 'long', got {PROFILE!r}")
SCALE = {"ci": 1, "long": 20}[PROFILE]
COMMON = dict(deadline=None, database=None, derandomize=PROFILE == "ci", print_blob=True,
              suppress_health_check=list(HealthCheck))


def draws(n):
    """hypothesis settings for n draws in the ci profile (SCALE x n in the long one)."""
    return settings(max_examples=n * SCALE, **COMMON)


DTYPES = [torch.float32, torch.float16, torch.bfloat16]
HEAD_DIMS = st.sampled_from([16, 16, 32, 32, 64, 80, 96])


# ----------------------------------------------------------------------------- the pieces of a draw


def strided(t, how):
    """The same values as `t`, as a view with other strides: "contiguous" as is; "flipped" laid out
    with its dimensions reversed in memory; "sliced" every other element of a tensor twice as long
    in the first dimension; "padded" the leading part of a tensor wider in the last dimension."""
    if how == "contiguous" or t.dim() == 0:
        return t.contiguous()
    if how == "flipped":
        dims = list(range(t.dim()))[::-1]
        return t.permute(*dims).contiguous().permute(*dims)
    if how == "sliced":
        big = torch.empty((2 * t.shape[0], *t.shape[1:]), dtype=t.dtype, device=t.device)
        big[::2] = t
        return big[::2]
    big = torch.zeros((*t.shape[:-1], t.shape[-1] + 3), dtype=t.dtype, device=t.device)
    big[..., :t.shape[-1]] = t
    return big[..., :t.shape[-1]]


LAYOUTS = st.sampled_from(["contiguous", "contiguous", "flipped", "sliced", "padded"])


def leaf(t):
    return t.detach().requires_grad_()


@st.composite
def variants(draw, Hq, B=None, dropout=True, sinks=True):
    """softcap, sinks, ALiBi slopes and dropout: each absent or drawn, extreme values included."""
    v = {}
    if draw(st.booleans()):
        v["softcap"] = draw(st.sampled_from([0.5, 5.0, 30.0, 50.0, 1e3, 1e6, 1e30]))
    if sinks and draw(st.booleans()):
        v["sinks"] = draw(st.lists(st.sampled_from([-math.inf, -30.0, -2.0, 0.0, 0.5, 3.0, 30.0, math.inf]),
                                   min_size=Hq, max_size=Hq))
    if draw(st.booleans()):
        per_sequence = B is not None and draw(st.booleans())
        n = Hq * (B if per_sequence else 1)
        slopes = draw(st.lists(st.sampled_from([0.0, 1 / 256, 0.0625, 0.5, 2.0]), min_size=n, max_size=n))
        v["alibi_slopes"] = (slopes, (B, Hq) if per_sequence else (Hq,))
    if dropout and draw(st.booleans()):
        v["dropout_p"] = draw(st.sampled_from([0.1, 0.5, 0.9]))
        v["dropout_seed"] = draw(st.integers(0, 2**63 - 1))
    return v


def variant_tensors(v, dtype=torch.float32):
    """The drawn variants as keyword arguments: lists become float32 tensors on the device."""
    out = dict(v)
    if "sinks" in v:
        out["sinks"] = torch.tensor(v["sinks"], dtype=torch.float32, device=DEVICE)
    if "alibi_slopes" in v:
        values, shape = v["alibi_slopes"]
        out["alibi_slopes"] = torch.tensor(values, dtype=torch.float32, device=DEVICE).reshape(shape)
    return out


def reference_variants(kw):
    """The reference's arguments for the kernels' variant keywords."""
    return {name: kw[name] for name in ("softcap", "sinks", "alibi_slopes") if name in kw}


def keep_mask(kw, B, Hq, Tq, Tk):
    """The weights a call with these keywords keeps, as the kernels draw them (None: no dropout)."""
    if kw.get("dropout_p", 0) == 0:
        return None
    return dropout_mask(B, Hq, Tq, Tk, kw["dropout_p"], kw["dropout_seed"], DEVICE).bool()


# ----------------------------------------------------------------------------- dense: flash, fused, attention()


@st.composite
def dense_configs(draw, kernel):
    Hkv = draw(st.integers(1, 2))
    cfg = dict(kernel=kernel, B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 1, 2, 3])),
               Tq=draw(st.sampled_from([1, 2, 7, 16, 17, 33, 40])), Tk=draw(st.sampled_from([1, 2, 9, 16, 31, 40])),
               D=draw(HEAD_DIMS), dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
               layouts=[draw(LAYOUTS) for _ in range(4)], seed=draw(st.integers(0, 2**32 - 1)),
               backward=draw(st.booleans()))
    cfg["scale"] = draw(st.sampled_from([None, None, 1e-3, 0.05, 0.3]))
    if kernel == "flash" and draw(st.booleans()):  # causal: a window that looks ahead is refused
        cfg["window"] = (draw(st.sampled_from([-1, 0, 1, 5, 50])),
                         draw(st.sampled_from([-1, 0] if cfg["causal"] else [-1, 0, 3])))
    if kernel == "fused":
        cfg["Tk"] = min(cfg["Tk"], max_seqlen(cfg["D"], cfg["dtype"]))
    cfg["variants"] = draw(variants(cfg["Hq"], cfg["B"]))
    if kernel in ("flash", "fused") and draw(st.booleans()):
        cfg["masking"] = draw(maskings(kernel, cfg["B"], cfg["Hq"], cfg["Tq"], cfg["Tk"]))
    if kernel == "attention":
        cfg["impl"] = draw(st.sampled_from(["auto", "fused", "flash"]))
        if cfg["impl"] == "fused":
            cfg["Tk"] = min(cfg["Tk"], max_seqlen(cfg["D"], cfg["dtype"]))
    return cfg


@st.composite
def maskings(draw, kernel, B, Hq, Tq, Tk):
    """A mask: an attn_mask (bool or float with -inf, any density, a broadcast shape) or, on flash,
    a ready-made mask function and a score function; on flash with or without a block map of a
    drawn block size (built from the mask, the call's causal and window)."""
    m = dict(seed=draw(st.integers(0, 2**32 - 1)))
    what = draw(st.sampled_from(["attn_mask"] * 2 + (["mask_mod", "score_mod"] if kernel == "flash" else [])))
    if what == "attn_mask":
        m["attn_mask"] = dict(kind=draw(st.sampled_from(["bool", "float"])),
                              density=draw(st.sampled_from([0.05, 0.5, 0.95, 1.0])),
                              shape=draw(st.sampled_from([(Tq, Tk), (B, 1, Tq, Tk), (1, Hq, Tq, Tk), (B, Hq, 1, Tk),
                                                          (Hq, 1, 1)])))
    elif what == "mask_mod":
        m["mask_mod"] = draw(st.sampled_from(["documents", "prefix_lm", "chunked", "sliding_window"]))
        m["param"] = draw(st.sampled_from([1, 3, 16, 33]))
        if draw(st.booleans()):
            m["score_mod"] = draw(st.sampled_from(["softcap", "alibi"]))
    else:
        m["score_mod"] = draw(st.sampled_from(["softcap", "alibi"]))
    if kernel == "flash" and ("attn_mask" in m or "mask_mod" in m):
        m["block_size"] = draw(st.sampled_from([None, 16, 32, 64]))
    return m


def masking_kwargs(m, B, Hq, Tq, Tk, causal, window):
    """(the kernel's keyword arguments, the reference's) for a drawn masking."""
    from attention_kernels.kernels import block_map, mods
    g = torch.Generator(DEVICE).manual_seed(m["seed"])
    kw, ref = {}, {}
    if "attn_mask" in m:
        a = m["attn_mask"]
        keep = torch.rand(a["shape"], generator=g, device=DEVICE) < a["density"]
        mask = keep if a["kind"] == "bool" else torch.randn(a["shape"], generator=g, device=DEVICE).masked_fill(
            ~keep, -math.inf)
        kw["attn_mask"] = ref["attn_mask"] = mask
    if "mask_mod" in m:
        p = m["param"]
        if m["mask_mod"] == "documents":
            ids = torch.randint(0, p + 1, (max(Tq, Tk),), generator=g, device=DEVICE).sort().values
            f = mods.documents(ids)
        elif m["mask_mod"] == "prefix_lm":
            f = mods.prefix_lm(torch.randint(0, p + 1, (B,), generator=g, device=DEVICE))
        else:
            f = getattr(mods, m["mask_mod"])(p, device=DEVICE)
        kw["mask_mod"], ref["mask_mod"] = f, f.torch_fn
    if "score_mod" in m:
        f = (mods.softcap(2.0, device=DEVICE) if m["score_mod"] == "softcap"
             else mods.alibi(torch.rand(Hq, generator=g, device=DEVICE)))
        kw["score_mod"], ref["score_mod"] = f, f.torch_fn
    if m.get("block_size"):
        source = kw.get("mask_mod", kw.get("attn_mask"))
        kw["block_map"] = block_map(source, Tq, Tk, causal=causal, window=window, block_size=m["block_size"],
                                    B=B if "mask_mod" in kw else None, H=Hq if "mask_mod" in kw else None)
    return kw, ref


def check_dense(cfg):
    """One draw of flash_attention, fused_attention or attention() against the reference."""
    B, Hq, Hkv, Tq, Tk, D, dtype = (cfg[n] for n in ("B", "Hq", "Hkv", "Tq", "Tk", "D", "dtype"))
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    q, k, v, do = (leaf(strided(t, how)) for t, how in zip((rand(B, Hq, Tq, D), rand(B, Hkv, Tk, D),
                                                             rand(B, Hkv, Tk, D), rand(B, Hq, Tq, D)), cfg["layouts"]))
    do = do.detach()
    kw = variant_tensors(cfg["variants"])
    if "sinks" in kw and cfg["backward"] and torch.isfinite(kw["sinks"]).all():
        kw["sinks"].requires_grad_()
    window = cfg.get("window")
    masked, masked_ref = {}, {}
    if "masking" in cfg:
        masked, masked_ref = masking_kwargs(cfg["masking"], B, Hq, Tq, Tk, cfg["causal"], window)
        kw.update(masked)
    with poisoned():
        if cfg["kernel"] == "attention":
            o = attention(q, k, v, cfg["causal"], cfg["scale"], impl=cfg["impl"], **kw)
            lse = None
        else:
            fn = flash_attention if cfg["kernel"] == "flash" else fused_attention
            extra = {"window": window} if window is not None else {}
            o, lse = fn(q, k, v, cfg["causal"], cfg["scale"], return_lse=True, **extra, **kw)
    keep = keep_mask(kw, B, Hq, Tq, Tk)
    w = tuple(window) if window is not None else (-1, -1)
    ref = {**reference_variants(kw), **masked_ref}
    drop = dict(dropout_p=kw["dropout_p"], dropout_mask=keep) if keep is not None else {}
    # finite sinks are a leaf too: their gradient is held to the rule with q's, k's and v's
    sinks = kw.get("sinks")
    inputs = (q, k, v) + ((sinks,) if sinks is not None and sinks.requires_grad else ())
    spec = lambda q, k, v, s=sinks, upcast=True: reference.attention(
        q, k, v, cfg["causal"], cfg["scale"], upcast, w, **{**ref, "sinks": s} if "sinks" in ref else ref, **drop)
    spec_lse = lambda q, k, s=sinks: reference.logsumexp(q, k, cfg["causal"], cfg["scale"], w,
                                                         **{**ref, "sinks": s} if "sinks" in ref else ref)
    hold_to_rule(o, lse, inputs, do if cfg["backward"] else None, spec, spec_lse)


def pasteable(name, cfg):
    """Print the draw as a call to paste (hypothesis shows notes with a failing example)."""
    note(f"{name}({cfg!r})")


@draws(60)
@given(dense_configs("flash"))
def test_flash_holds_the_rule_on_any_draw(cfg):
    pasteable("check_dense", cfg)
    check_dense(cfg)


@draws(30)
@given(dense_configs("fused"))
def test_fused_holds_the_rule_on_any_draw(cfg):
    pasteable("check_dense", cfg)
    check_dense(cfg)


@draws(15)
@given(dense_configs("attention"))
def test_attention_holds_the_rule_on_any_draw(cfg):
    pasteable("check_dense", cfg)
    check_dense(cfg)


# ----------------------------------------------------------------------------- packed batches


@st.composite
def varlen_configs(draw):
    Hkv = draw(st.integers(1, 2))
    n = draw(st.integers(1, 4))
    lengths_q = draw(st.lists(st.sampled_from([0, 1, 2, 5, 17, 33]), min_size=n, max_size=n))
    same = draw(st.booleans())
    lengths_k = lengths_q if same else draw(st.lists(st.sampled_from([0, 1, 3, 16, 40]), min_size=n, max_size=n))
    if sum(lengths_q) == 0:
        lengths_q = [1, *lengths_q[1:]]
    if sum(lengths_k) == 0:
        lengths_k = [1, *lengths_k[1:]]
    cfg = dict(lengths_q=lengths_q, lengths_k=lengths_k, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2])),
               D=draw(HEAD_DIMS), dtype=draw(st.sampled_from(DTYPES)), causal=draw(st.booleans()),
               layouts=[draw(st.sampled_from(["contiguous", "flipped", "sliced", "padded"])) for _ in range(6)],
               seed=draw(st.integers(0, 2**32 - 1)), backward=draw(st.booleans()),
               scale=draw(st.sampled_from([None, 0.05])))
    if draw(st.booleans()):
        cfg["window"] = (draw(st.sampled_from([-1, 0, 4])), draw(st.sampled_from([-1, 0] if cfg["causal"] else [-1, 0, 2])))
    cfg["variants"] = draw(variants(cfg["Hq"], n, dropout=False))
    cfg["max_kind"] = [draw(st.sampled_from(["int", "numpy", "tensor"])) for _ in range(2)]
    return cfg


def as_kind(value, kind):
    return value if kind == "int" else np.int64(value) if kind == "numpy" else torch.tensor(value)


def check_varlen_draw(cfg):
    """One draw of flash_attention_varlen against the reference, sequence by sequence."""
    lq, lk, Hq, Hkv, D, dtype = (cfg[n] for n in ("lengths_q", "lengths_k", "Hq", "Hkv", "D", "dtype"))
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    offsets = lambda lengths: torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)
    cu_q, cu_k = (strided(offsets(x), how) for x, how in zip((lq, lk), cfg["layouts"][4:]))
    q, k, v = (leaf(strided(t, how)) for t, how in zip((rand(sum(lq), Hq, D), rand(sum(lk), Hkv, D),
                                                         rand(sum(lk), Hkv, D)), cfg["layouts"]))
    do = strided(rand(sum(lq), Hq, D), cfg["layouts"][3])
    kw = variant_tensors(cfg["variants"])
    window = cfg.get("window")
    w = {} if window is None else {"window": tuple(window)}
    with poisoned():
        o, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, as_kind(max(lq), cfg["max_kind"][0]),
                                        as_kind(max(lk), cfg["max_kind"][1]), cfg["causal"], cfg["scale"],
                                        return_lse=True, **w, **kw)
    ref = reference_variants(kw)
    spec = lambda q, k, v, upcast=True: reference.varlen_attention(q, k, v, cu_q, cu_k, cfg["causal"], cfg["scale"],
                                                                   upcast, **w, **ref)
    spec_lse = lambda q, k: reference.varlen_logsumexp(q, k, cu_q, cu_k, cfg["causal"], cfg["scale"], **w, **ref)
    hold_to_rule(o, lse, (q, k, v), do if cfg["backward"] else None, spec, spec_lse)


@draws(40)
@given(varlen_configs())
def test_varlen_holds_the_rule_on_any_draw(cfg):
    pasteable("check_varlen_draw", cfg)
    check_varlen_draw(cfg)


# ----------------------------------------------------------------------------- decoding against a cache


@st.composite
def decode_configs(draw):
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 3))
    Tq = draw(st.sampled_from([1, 1, 2, 5, 16]))
    Tmax = draw(st.sampled_from([1, 16, 40, 70]))
    lengths = draw(st.lists(st.integers(0, Tmax), min_size=B, max_size=B))
    cfg = dict(B=B, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2, 4])), Tq=Tq, Tmax=Tmax, lengths=lengths,
               D=draw(HEAD_DIMS), dtype=draw(st.sampled_from(DTYPES)), seed=draw(st.integers(0, 2**32 - 1)),
               layouts=[draw(LAYOUTS) for _ in range(4)], num_splits=draw(st.sampled_from([None, 1, 3, 8])),
               scale=draw(st.sampled_from([None, 0.05, 1.0])), causal=draw(st.sampled_from([True, True, False])),
               lengths_kind=draw(st.sampled_from(["int32", "int32", "int64", "list", "int"])))
    if cfg["lengths_kind"] == "int":  # one length for every sequence
        cfg["lengths"] = [lengths[0]] * B
    if draw(st.booleans()):
        cfg["window"] = (draw(st.sampled_from([-1, 0, 3, 20])), 0 if cfg["causal"] else draw(st.sampled_from([-1, 0, 2])))
    cfg["variants"] = draw(variants(cfg["Hq"], B, dropout=False))
    return cfg


def lengths_as(lengths, kind, layout):
    """Cache lengths as a call may give them: an int32 tensor (a strided view), int64, a list, one int."""
    if kind == "int":
        return lengths[0]
    if kind == "list":
        return list(lengths)
    dtype = torch.int32 if kind == "int32" else torch.int64
    return strided(torch.tensor(lengths, dtype=dtype, device=DEVICE), layout)


def check_decode_draw(cfg):
    """One draw of decode_attention against the reference, cache lengths of any kind (`lengths_as`)."""
    B, Hq, Hkv, Tq, Tmax, D, dtype = (cfg[n] for n in ("B", "Hq", "Hkv", "Tq", "Tmax", "D", "dtype"))
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    q, k_cache, v_cache = (strided(t, how) for t, how in zip((rand(B, Hq, Tq, D), rand(B, Hkv, Tmax, D),
                                                              rand(B, Hkv, Tmax, D)), cfg["layouts"]))
    seqlens = lengths_as(cfg["lengths"], cfg.get("lengths_kind", "int32"), cfg["layouts"][3])
    kw = variant_tensors(cfg["variants"])
    window = cfg.get("window")
    causal = cfg.get("causal", True)
    with poisoned():
        o, lse = decode_attention(q, k_cache, v_cache, seqlens, cfg["scale"], cfg["num_splits"], window,
                                  return_lse=True, causal=causal, **kw)
    w = tuple(window) if window is not None else (-1, -1)
    ref = reference_variants(kw)
    lengths = cfg["lengths"]

    def per_sequence(b):  # ALiBi slopes (B, Hq): sequence b's row
        slopes = ref.get("alibi_slopes")
        return ref if slopes is None or slopes.dim() == 1 else {**ref, "alibi_slopes": slopes[b]}

    spec = lambda q, k, v, upcast=True: torch.cat([
        reference.attention(q[b:b + 1], k[b:b + 1, :, :L], v[b:b + 1, :, :L], causal, cfg["scale"], upcast, w,
                            **per_sequence(b)) for b, L in enumerate(lengths)])
    spec_lse = lambda q, k: torch.cat([reference.logsumexp(q[b:b + 1], k[b:b + 1, :, :L], causal, cfg["scale"], w,
                                                           **per_sequence(b)) for b, L in enumerate(lengths)])
    hold_to_rule(o, lse, (q, k_cache, v_cache), None, spec, spec_lse)


@draws(40)
@given(decode_configs())
def test_decode_holds_the_rule_on_any_draw(cfg):
    pasteable("check_decode_draw", cfg)
    check_decode_draw(cfg)


# ----------------------------------------------------------------------------- a paged cache


@st.composite
def paged_configs(draw):
    Hkv = draw(st.integers(1, 2))
    B = draw(st.integers(1, 3))
    page_size = draw(st.sampled_from([1, 3, 4, 16, 64]))
    new = draw(st.lists(st.sampled_from([0, 1, 1, 2, 7]), min_size=B, max_size=B))
    if sum(new) == 0:
        new = [1, *new[1:]]
    before = draw(st.lists(st.sampled_from([0, 1, 5, 16, 30]), min_size=B, max_size=B))
    cfg = dict(B=B, Hkv=Hkv, Hq=Hkv * draw(st.sampled_from([1, 2])), page_size=page_size, new=new, before=before,
               append=draw(st.booleans()), D=draw(HEAD_DIMS), dtype=draw(st.sampled_from(DTYPES)),
               seed=draw(st.integers(0, 2**32 - 1)), num_splits=draw(st.sampled_from([None, 1, 4])),
               max_kind=draw(st.sampled_from(["int", "numpy", "tensor"])), spare=draw(st.integers(0, 3)),
               layouts=[draw(st.sampled_from(["contiguous", "sliced"])) for _ in range(3)],
               causal=draw(st.sampled_from([True, True, False])))
    if draw(st.booleans()):
        cfg["window"] = (draw(st.sampled_from([-1, 0, 6])), 0 if cfg["causal"] else draw(st.sampled_from([-1, 0, 3])))
    cfg["variants"] = draw(variants(cfg["Hq"], B, dropout=False))
    return cfg


def check_paged_draw(cfg):
    """One draw of paged_attention (prefill chunks and decoding mixed, with or without the append)
    against the reference on the gathered pages."""
    B, Hq, Hkv, D, dtype, P = (cfg[n] for n in ("B", "Hq", "Hkv", "D", "dtype", "page_size"))
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    new, before = cfg["new"], cfg["before"]
    total = [b + n for b, n in zip(before, new)]             # each sequence's keys, its new tokens' included
    need = [-(-L // P) for L in total]
    num_pages = sum(need) + cfg["spare"]
    order = torch.randperm(num_pages, generator=g, device=DEVICE).tolist()
    table = torch.full((B, max(need) + 1), 1 << 20, dtype=torch.int32, device=DEVICE)  # past the pages: unused
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[:n], dtype=torch.int32)
        order = order[n:]
    k_cache, v_cache = rand(num_pages, P, Hkv, D), rand(num_pages, P, Hkv, D)
    q = rand(sum(new), Hq, D)
    cu_q = torch.tensor([0, *new], device=DEVICE).cumsum(0).to(torch.int32)
    kw = variant_tensors(cfg["variants"])
    window = cfg.get("window")
    max_q = as_kind(max(new), cfg["max_kind"])
    if cfg["append"]:
        k_new, v_new = rand(sum(new), Hkv, D), rand(sum(new), Hkv, D)
        seqlens = torch.tensor(before, dtype=torch.int32, device=DEVICE)
        call_k, call_v = k_cache.clone(), v_cache.clone()
        extra = dict(k_new=k_new, v_new=v_new)
        for b in range(B):                                   # what the append writes, written by hand
            for t in range(new[b]):
                j = before[b] + t
                page, slot = table[b, j // P].item(), j % P
                k_cache[page, slot], v_cache[page, slot] = k_new[cu_q[b] + t], v_new[cu_q[b] + t]
    else:
        seqlens = torch.tensor(total, dtype=torch.int32, device=DEVICE)
        call_k, call_v, extra = k_cache, v_cache, {}
    table_v, seqlens_v, cu_v = (strided(t, how) for t, how in zip((table, seqlens, cu_q), cfg["layouts"]))
    with poisoned():
        o, lse = paged_attention(q, call_k, call_v, table_v, seqlens_v, cu_v, max_q, **extra, scale=None,
                                 window=window, num_splits=cfg["num_splits"], return_lse=True,
                                 causal=cfg.get("causal", True), **kw)
    if cfg["append"]:
        torch.testing.assert_close(call_k, k_cache, rtol=0, atol=0)
        torch.testing.assert_close(call_v, v_cache, rtol=0, atol=0)
    w = tuple(window) if window is not None else (-1, -1)
    ref = reference_variants(kw)
    lengths = torch.tensor(total, dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, *total], device=DEVICE).cumsum(0).to(torch.int32)
    causal = cfg.get("causal", True)
    spec = lambda q, k, v, upcast=True: reference.paged_attention(q, k, v, table, lengths, cu_q, upcast=upcast,
                                                                  window=w, causal=causal, **ref)
    spec_lse = lambda q, k: reference.varlen_logsumexp(q, reference.gather_pages(k, table, lengths), cu_q, cu_k,
                                                       causal, window=w, **ref)
    hold_to_rule(o, lse, (q, k_cache, v_cache), None, spec, spec_lse)


@draws(40)
@given(paged_configs())
def test_paged_holds_the_rule_on_any_draw(cfg):
    pasteable("check_paged_draw", cfg)
    check_paged_draw(cfg)


# ----------------------------------------------------------------------------- the SDPA drop-in


@st.composite
def sdpa_configs(draw):
    Hkv = draw(st.integers(1, 2))
    gqa = draw(st.booleans())
    cfg = dict(B=draw(st.integers(1, 2)), Hkv=Hkv, Hq=Hkv * (draw(st.sampled_from([2, 3])) if gqa else 1),
               Tq=draw(st.sampled_from([1, 5, 17, 33])), Tk=draw(st.sampled_from([1, 5, 17, 33])), D=draw(HEAD_DIMS),
               dtype=draw(st.sampled_from(DTYPES)), is_causal=draw(st.booleans()), enable_gqa=gqa,
               scale=draw(st.sampled_from([None, 0.05, 0.5])), seed=draw(st.integers(0, 2**32 - 1)),
               layouts=[draw(LAYOUTS) for _ in range(3)], mask=draw(st.sampled_from([None, None, "bool", "float"])),
               backward=draw(st.booleans()))
    return cfg


def check_sdpa_draw(cfg):
    """One draw of the drop-in against torch's own function in float64 (the math it defines)."""
    B, Hq, Hkv, Tq, Tk, D, dtype = (cfg[n] for n in ("B", "Hq", "Hkv", "Tq", "Tk", "D", "dtype"))
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    rand = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    q, k, v = (leaf(strided(t, how)) for t, how in zip((rand(B, Hq, Tq, D), rand(B, Hkv, Tk, D),
                                                         rand(B, Hkv, Tk, D)), cfg["layouts"]))
    do = rand(B, Hq, Tq, D)
    mask = None
    if cfg["mask"] == "bool":
        mask = torch.rand(Tq, Tk, generator=g, device=DEVICE) < 0.7
        mask[:, 0] = True                                    # every row sees a key: torch's NaN rows aside
    elif cfg["mask"] == "float":
        mask = torch.randn(Tq, Tk, generator=g, device=DEVICE).to(dtype)
    if mask is not None and cfg["is_causal"]:
        cfg = {**cfg, "is_causal": False}                    # torch refuses both
    kw = dict(is_causal=cfg["is_causal"], scale=cfg["scale"], enable_gqa=cfg["enable_gqa"])
    with poisoned():
        o = scaled_dot_product_attention(q, k, v, attn_mask=mask, **kw)

    def spec(q, k, v, upcast=True):
        m = mask
        if upcast:
            q, k, v = q.double(), k.double(), v.double()
            m = mask if mask is None or mask.dtype == torch.bool else mask.double()
        return F.scaled_dot_product_attention(q, k, v, attn_mask=m, **kw).to(q.dtype if upcast else dtype)

    hold_to_rule(o, None, (q, k, v), do if cfg["backward"] else None, spec)


@draws(30)
@given(sdpa_configs())
def test_the_sdpa_drop_in_holds_the_rule_on_any_draw(cfg):
    pasteable("check_sdpa_draw", cfg)
    check_sdpa_draw(cfg)


# ----------------------------------------------------------------------------- nanoGPT's module


@st.composite
def module_configs(draw):
    n_kv_head = draw(st.integers(1, 2))
    n_head = n_kv_head * draw(st.sampled_from([1, 2, 3]))
    return dict(n_head=n_head, n_kv_head=n_kv_head, head_dim=draw(st.sampled_from([16, 32, 80])),
                B=draw(st.integers(1, 2)), T=draw(st.sampled_from([1, 5, 17, 40])), dtype=draw(st.sampled_from(DTYPES)),
                impl=draw(st.sampled_from(["fused", "flash", "auto"])), bias=draw(st.booleans()),
                layout=draw(LAYOUTS), seed=draw(st.integers(0, 2**32 - 1)), backward=draw(st.booleans()))


def check_module_draw(cfg):
    """One draw of CausalSelfAttention on the kernels against the same weights on the reference."""
    torch.manual_seed(cfg["seed"])
    C = cfg["n_head"] * cfg["head_dim"]
    make = lambda impl: CausalSelfAttention(C, cfg["n_head"], bias=cfg["bias"], n_kv_head=cfg["n_kv_head"], impl=impl)
    ours = make(cfg["impl"]).to(DEVICE, cfg["dtype"]).eval()
    low = make("reference").to(DEVICE, cfg["dtype"]).eval()
    low.load_state_dict(ours.state_dict())
    truth = make("reference").to(DEVICE, torch.float64).eval()
    truth.load_state_dict({name: w.double() for name, w in ours.state_dict().items()})
    g = torch.Generator(DEVICE).manual_seed(cfg["seed"])
    x = leaf(strided(torch.randn(cfg["B"], cfg["T"], C, generator=g, device=DEVICE, dtype=cfg["dtype"]), cfg["layout"]))
    do = torch.randn(x.shape, generator=g, device=DEVICE, dtype=cfg["dtype"])
    with poisoned():
        o = ours(x)
    spec = lambda x, upcast=True: truth(x.double()).to(x.dtype) if upcast and x.dtype != torch.float64 else \
        (truth(x) if upcast else low(x))
    hold_to_rule(o, None, (x,), do if cfg["backward"] else None, spec)


@draws(20)
@given(module_configs())
def test_the_module_holds_the_rule_on_any_draw(cfg):
    pasteable("check_module_draw", cfg)
    check_module_draw(cfg)


# ----------------------------------------------------------------------------- ring attention on 2 processes


@st.composite
def ring_configs(draw):
    """A few ring cases for one group of 2 gloo processes (starting them costs seconds, so a draw
    is a list): one sequence or a packed batch, causal or full, windows, GQA, both layouts, every
    dtype; every rank holds rows (the ring refuses a rank with none)."""
    cases = []
    for _ in range(3):
        Hkv = draw(st.integers(1, 2))
        Hq, D = Hkv * draw(st.sampled_from([1, 2])), draw(st.sampled_from([16, 32, 80]))
        causal, layout, dtype = draw(st.booleans()), draw(st.sampled_from(["zigzag", "contiguous"])), draw(
            st.sampled_from(DTYPES))
        window = None
        if draw(st.booleans()):
            window = (draw(st.sampled_from([-1, 0, 3, 9])), draw(st.sampled_from([-1, 0] if causal else [-1, 0, 4])))
        lengths = None
        if draw(st.booleans()):
            lengths = tuple(draw(st.lists(st.integers(0, 19), min_size=1, max_size=4)))
            T = sum(lengths)
            hypothesis.assume(all(_segments(lengths, 2, r, layout) for r in range(2)))
        else:
            T = draw(st.integers(2, 40))
        shape = Shape(draw(st.integers(1, 2)) if lengths is None else 1, Hq, Hkv, T, T, D)
        cases.append((shape, causal, window, layout, dtype, lengths))
    return cases


@settings(max_examples={"ci": 3, "long": 12}[PROFILE], **COMMON)  # a draw starts 2 processes: seconds each
@given(ring_configs())
def test_ring_attention_holds_the_rule_on_any_draw(cases):
    # every rank's output, log-sum-exp and gradients against the reference and one-process flash
    pasteable("run_cases", cases)
    run_cases(2, [Case(2, *case) for case in cases])


def test_the_profile_is_known():
    assert PROFILE in ("ci", "long") and SCALE >= 1
