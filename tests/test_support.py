"""Every cell of the support table (`kernels.support`) run, so the table cannot claim what the code
does not do, nor deny what it does.

A supported cell calls its entry point with that feature on small random inputs and holds the
output (the log-sum-exp, for return_lse; the gradients, for gradients) to the reference under the
rule (`testing.hold_to_rule`: float64 truth, the inputs' own precision as the yardstick). An
unsupported cell makes the same call and requires an error that names the feature's argument and
the entry point; the few cells whose feature is not a choice at that entry point check what the
reason says instead (`SPECIAL`). Ring cells run together on two spawned gloo processes and are also
held against single-process flash. The docs' and the README's tables must be the rendered ones.
"""

import functools
import inspect
import os
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import reference
from attention_kernels.kernels import (CausalSelfAttention, attention, decode_attention, dropout_mask,
                                       flash_attention, flash_attention_varlen, fused_attention, paged_attention,
                                       scaled_dot_product_attention, support)
from attention_kernels.kernels import dropout as dropout_module, flash as flash_module, fused as fused_module
from attention_kernels.kernels import mods, sdpa as sdpa_module
from attention_kernels.kernels.blockmap import block_map
from attention_kernels.kernels.distributed import gather_sequence, ring_attention, shard_sequence
from attention_kernels.kernels.support import ENTRY_POINTS, FEATURES, SUPPORT
from attention_kernels.testing import FACTOR, FLOOR, assert_close, hold_to_rule, seed_of
from attention_kernels.testing.cases import DEVICE
from interpret import patch_lang_once_per_launch

patch_lang_once_per_launch()  # the ring's ranks, spawned, import this module but not conftest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 1234       # every dropout cell's seed, passed or (where no argument takes it) drawn
SAMPLE_DIMS = 59  # head dims run: the smallest, this odd one and the largest of a cell's list
# the argument an unsupported cell's error must name (gradients: "backward"; the ring's torch.compile: dynamo's)
ARGUMENT = {"full": "causal", "window": "window", "softcap": "softcap", "sinks": "sinks", "ALiBi": "alibi_slopes",
            "dropout": "dropout_p", "attn_mask": "attn_mask", "return_lse": "return_lse", "gradients": "backward",
            "mask_mod": "mask_mod", "score_mod": "score_mod", "block_map": "block_map", "tree_mask": "tree_mask",
            "bidirectional": "bidirectional"}
# the other names a feature goes by (the module's, torch's, transformers'): a module that lacks it takes none
OTHER_SPELLINGS = {"full": ("is_causal",), "window": ("sliding_window",), "sinks": ("s_aux",),
                   "dropout": ("dropout", "attn_pdrop")}


# ----------------------------------------------------------------------------- a cell's call


def setting(feature, entry, dtype=torch.float32, D=16):
    """What a cell runs: sizes, dtype, causal, the keyword arguments of the feature (`mods`, in
    flash_attention's names), whether it returns the log-sum-exp, runs backward or compiles."""
    Tq, Tk = (3, 11) if entry in ("decode", "paged") else (9, 9)  # decoding: 3 new tokens after 8 cached
    s = SimpleNamespace(B=2, Hq=2, Hkv=1 if feature == "GQA" else 2, Tq=Tq, Tk=Tk, D=D, dtype=dtype,
                        causal=feature not in ("full", "attn_mask"), mods={}, return_lse=feature == "return_lse",
                        backward=feature == "gradients", compile=feature == "torch.compile")
    g = torch.Generator(DEVICE).manual_seed(seed_of("support", feature, entry, dtype, D))
    s.q = torch.randn(s.B, s.Hq, Tq, D, generator=g, device=DEVICE).to(dtype)
    s.k, s.v = (torch.randn(s.B, s.Hkv, Tk, D, generator=g, device=DEVICE).to(dtype) for _ in range(2))
    s.do = torch.randn(s.q.shape, generator=g, device=DEVICE).to(dtype)
    s.mods = {
        "window": {"window": (3, 0)},
        "softcap": {"softcap": 1.5},
        "sinks": {"sinks": torch.randn(s.Hq, generator=g, device=DEVICE)},
        "ALiBi": {"alibi_slopes": reference.alibi_slopes(s.Hq).to(DEVICE)},
        "dropout": {"dropout_p": 0.3, "dropout_seed": SEED},
        "attn_mask": {"attn_mask": torch.randn(1, 1, Tq, Tk, generator=g, device=DEVICE).to(dtype)},
        "mask_mod": {"mask_mod": mods.chunked(4, device=DEVICE)},
        "score_mod": {"score_mod": mods.softcap(1.5, device=DEVICE)},
    }.get(feature, {})
    s.spec_causal, s.spec_mods = s.causal, dict(s.mods)
    if feature == "block_map":  # the map first: an entry point without it names it in its TypeError
        visible = torch.rand(Tq, Tk, generator=g, device=DEVICE) < 0.7
        s.mods = {"block_map": block_map(visible, Tq, Tk, causal=s.causal, block_size=16), "attn_mask": visible}
        s.spec_mods = {"attn_mask": visible}
    if feature in ("tree_mask", "bidirectional"):  # over the new tokens: the last Tq keys
        new = torch.arange(Tq, device=DEVICE)
        seen = torch.ones(Tq, Tk, dtype=torch.bool, device=DEVICE)                  # (Tq, Tk) within causal
        if feature == "tree_mask":
            tree = (new[:, None] == new[None, :]) | (torch.rand(Tq, Tq, generator=g, device=DEVICE) < 0.5)
            tree &= new[:, None] >= new[None, :]                                    # a draft tree: parents first
            seen[:, Tk - Tq:] = tree
            s.mods = {"tree_mask": tree}
        else:  # positions 2 to Tk - 2 see each other, the first new tokens ahead of themselves too
            ranges = torch.tensor([[2, Tk - 1]] * s.B, dtype=torch.int32, device=DEVICE)  # (B, 2)
            pos = torch.arange(Tk, device=DEVICE)
            inside = (pos >= 2) & (pos < Tk - 1)
            seen = (pos[None, :] <= pos[Tk - Tq:, None]) | (inside[Tk - Tq:, None] & inside[None, :])
            s.mods, s.spec_causal = {"bidirectional": ranges}, False
        s.spec_mods = {"attn_mask": seen}
    return s


def spec_of(s):
    """The reference for setting s: spec(q, k, v, upcast=) and spec_lse(q, k). Mask and score
    functions by their PyTorch twins; a tree or ranges as the attn_mask they mean."""
    mods = {name: value for name, value in s.spec_mods.items() if not name.startswith("dropout")}
    for name in ("mask_mod", "score_mod"):
        if name in mods:
            mods[name] = mods[name].torch_fn
    if "dropout_p" in s.mods:
        mods["dropout_p"] = s.mods["dropout_p"]
        mods["dropout_mask"] = dropout_mask(s.B, s.Hq, s.Tq, s.Tk, s.mods["dropout_p"], SEED, DEVICE)
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, s.spec_causal, None, upcast, **mods)
    lse_mods = {name: value for name, value in mods.items() if not name.startswith("dropout")}
    spec_lse = lambda q, k: reference.logsumexp(q, k, s.spec_causal, None, **lse_mods)
    return spec, spec_lse


def as_packed(x):
    """(B, H, T, D) -> (B * T, H, D), the sequences one after another."""
    return x.transpose(1, 2).reshape(-1, *x.shape[1:2], x.shape[-1])


def as_dense(x, B):
    """(B * T, H, D) -> (B, H, T, D)."""
    return x.reshape(B, -1, *x.shape[1:]).transpose(1, 2)


def offsets(B, T):
    return torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=DEVICE)


def run_flash(q, k, v, s):
    return flash_attention(q, k, v, causal=s.causal, **lse_flag(s), **s.mods)


def run_fused(q, k, v, s):
    return fused_attention(q, k, v, causal=s.causal, **lse_flag(s), **s.mods)


def run_attention(q, k, v, s):
    return attention(q, k, v, causal=s.causal, **lse_flag(s), **s.mods)


def run_varlen(q, k, v, s):
    got = flash_attention_varlen(as_packed(q), as_packed(k), as_packed(v), offsets(s.B, s.Tq), offsets(s.B, s.Tk),
                                 s.Tq, s.Tk, causal=s.causal, check_seqlens=not s.compile, **lse_flag(s), **s.mods)
    if not s.return_lse:
        return as_dense(got, s.B)                                          # (B, Hq, Tq, D)
    o, lse = got
    return as_dense(o, s.B), lse.reshape(s.Hq, s.B, s.Tq).transpose(0, 1)  # lse (Hq, B * Tq) -> (B, Hq, Tq)


def run_decode(q, k, v, s):
    lengths = torch.full((s.B,), s.Tk, dtype=torch.int32, device=DEVICE)
    return decode_attention(q, k, v, lengths, causal=s.causal, check_seqlens=not s.compile, **lse_flag(s), **s.mods)


def run_paged(q, k, v, s, page_size=4):
    pages = -(-s.Tk // page_size)                                          # per sequence
    pool = lambda x: F.pad(x, (0, 0, 0, pages * page_size - s.Tk)).transpose(1, 2).reshape(
        s.B * pages, page_size, s.Hkv, s.D)                                # (B * pages, page_size, Hkv, D)
    table = torch.arange(s.B * pages, dtype=torch.int32, device=DEVICE).reshape(s.B, pages)
    lengths = torch.full((s.B,), s.Tk, dtype=torch.int32, device=DEVICE)
    got = paged_attention(as_packed(q), pool(k), pool(v), table, lengths, offsets(s.B, s.Tq), s.Tq, causal=s.causal,
                          check=not s.compile, **lse_flag(s), **s.mods)
    if not s.return_lse:
        return as_dense(got, s.B)
    o, lse = got
    return as_dense(o, s.B), lse.reshape(s.Hq, s.B, s.Tq).transpose(0, 1)


def run_sdpa(q, k, v, s):
    """The drop-in, as torch's signature spells the feature; any other feature goes by its own name."""
    mods = {name: value for name, value in s.mods.items() if name != "dropout_seed"}  # the seed is drawn: SEED
    return scaled_dot_product_attention(q, k, v, is_causal=s.causal, enable_gqa=s.Hq != s.Hkv, **lse_flag(s), **mods)


def run_transformers(q, k, v, s, attend=None):
    """`attend`, the attention function a model calls (as registered), with the feature as models
    pass it; the layer a plain causal one, which is_causal overrides."""
    kwargs, mask, mods = {"is_causal": s.causal}, None, dict(s.mods)
    if "window" in mods:  # a padding mask (here nothing padded) and the layer's window: Mistral's layers
        mask = torch.ones(s.B, s.Tk, dtype=torch.bool, device=DEVICE)
        kwargs["sliding_window"] = mods.pop("window")[0] + 1
    if "attn_mask" in mods:
        mask = mods.pop("attn_mask")
    if "sinks" in mods:
        kwargs["s_aux"] = mods.pop("sinks")
    if "dropout_p" in mods:
        kwargs["dropout"] = mods.pop("dropout_p")
        mods.pop("dropout_seed")
    out, weights = attend(LAYER, q, k, v, mask, **kwargs, **mods)
    return out.transpose(1, 2)                                             # (B, Tq, Hq, D) -> (B, Hq, Tq, D)


LAYER = SimpleNamespace(is_causal=True)


def lse_flag(s):
    return {"return_lse": True} if s.return_lse else {}


def transformers_attention():
    """The kernels' attention function as transformers holds it, once registered."""
    from attention_kernels.kernels import register_transformers
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    return ALL_ATTENTION_FUNCTIONS[register_transformers("attention_kernels_support")]


RUN = {"flash": run_flash, "varlen": run_varlen, "fused": run_fused, "decode": run_decode, "paged": run_paged,
       "attention": run_attention, "sdpa": run_sdpa, "transformers": run_transformers}


def variants(feature, cell):
    """(dtype, head dim) pairs a cell runs: every dtype of its list; three head dims of its list."""
    if feature == "dtypes":
        return [(dtype, 16) for dtype in cell.values]
    if feature == "head dims":
        assert SAMPLE_DIMS in cell.values
        return [(torch.float32, D) for D in (min(cell.values), SAMPLE_DIMS, max(cell.values))]
    return [(torch.float32, 16)]


def call(entry, s):
    """Run setting s through entry (compiled, for torch.compile): (out, lse or None), out (B, Hq, Tq, D).
    transformers: on the kernels, not falling back to its SDPA or eager attention (`hf.CALLS`)."""
    run = RUN[entry]
    if entry == "transformers":
        from attention_kernels.kernels.hf import CALLS
        run, before = functools.partial(run_transformers, attend=transformers_attention()), Counter(CALLS)
    fn = lambda q, k, v: run(q, k, v, s)
    if s.compile:
        torch._dynamo.reset()
        fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
    q, k, v = (x.requires_grad_(s.backward) for x in (s.q, s.k, s.v))
    launched = []  # the kernels' forwards run (what transformers' CALLS cannot count inside a compiled graph)
    saved = [(m, m._run_forward) for m in (flash_module, fused_module)]
    for m, run_forward in saved:
        m._run_forward = functools.partial(lambda f, *args, **kwargs: launched.append(1) or f(*args, **kwargs),
                                           run_forward)
    try:
        got = fn(q, k, v)
    finally:
        for m, run_forward in saved:
            m._run_forward = run_forward
    if entry == "transformers":
        ran = Counter(CALLS) - before
        if s.compile:  # not counted while compiled: the kernels' own launches say where it ran
            assert launched and not ran, f"not on the kernels: {ran}, {len(launched)} flash launches"
        else:
            assert ran["kernels"] >= 1 and all(key.startswith("kernels") for key in ran), f"not on the kernels: {ran}"
    return got if s.return_lse else (got, None)


def check_supported(entry, s):
    out, lse = call(entry, s)
    spec, spec_lse = spec_of(s)
    hold_to_rule(out, lse, (s.q, s.k, s.v), s.do if s.backward else None, spec, spec_lse)


def check_refused(entry, feature, s):
    with pytest.raises((TypeError, ValueError, RuntimeError)) as refused:
        call(entry, s)
    said = str(refused.value)
    assert ARGUMENT[feature] in said and ENTRY_POINTS[entry] in said, (
        f"{entry} with {feature}: the error must name {ARGUMENT[feature]!r} and {ENTRY_POINTS[entry]!r}: {said}")


# ----------------------------------------------------------------------------- nanoGPT's module


def check_module(feature, cell, dtype, D):
    """CausalSelfAttention, (B, T, C) in and out, against its own projections around the reference."""
    s = setting(feature, "module", dtype, D)
    p = s.mods.get("dropout_p", 0.0)
    torch.manual_seed(seed_of("support module", feature, dtype, D))
    module = CausalSelfAttention(s.Hq * D, s.Hq, n_kv_head=s.Hkv, attn_pdrop=p).to(DEVICE, dtype).train(p > 0)
    x = torch.randn(s.B, s.Tq, s.Hq * D, device=DEVICE).to(dtype).requires_grad_(s.backward)
    if not cell.supported:  # no spelling of the feature where the module takes arguments; at the call, an error
        taken = {*inspect.signature(CausalSelfAttention).parameters, *inspect.signature(module.forward).parameters}
        assert not taken & {ARGUMENT[feature], *OTHER_SPELLINGS.get(feature, ())}, taken
        unasked = {ARGUMENT[feature]: False if feature == "full" else s.mods.get(ARGUMENT[feature], True)}
        with pytest.raises(TypeError, match=f"CausalSelfAttention.forward\\(\\) got an unexpected keyword argument "
                                            f"'{ARGUMENT[feature]}'"):
            module(x, **unasked)
        return
    keep = dropout_mask(s.B, s.Hq, s.Tq, s.Tq, p, SEED, DEVICE) if p else None

    def spec(x, upcast=True):
        w = {name: t.detach().to(x.dtype) for name, t in module.state_dict().items()}
        C, kv = module.n_embd, module.n_kv_head * module.head_dim
        q, k, v = F.linear(x, w["c_attn.weight"], w["c_attn.bias"]).split([C, kv, kv], dim=2)  # (B, T, C), ...
        heads = lambda t, n: t.view(s.B, s.Tq, n, D).transpose(1, 2)                           # (B, n, T, D)
        y = reference.attention(heads(q, s.Hq), heads(k, s.Hkv), heads(v, s.Hkv), True, upcast=upcast,
                                dropout_p=p, dropout_mask=keep).to(x.dtype)                    # (B, Hq, T, D)
        return F.linear(y.transpose(1, 2).reshape(s.B, s.Tq, C), w["c_proj.weight"], w["c_proj.bias"])

    run = torch.compile(module, fullgraph=True, backend="aot_eager") if s.compile else module
    if s.compile:
        torch._dynamo.reset()
    hold_to_rule(run(x), None, (x,), torch.randn_like(x) if s.backward else None, spec)


# ----------------------------------------------------------------------------- not a choice there


def check_no_alibi_model(s):
    """ALiBi reaches transformers' attention functions from no model: BLOOM and MPT compute their
    attention themselves, and the kernels are refused on them by name."""
    from transformers import BloomConfig, BloomForCausalLM
    from attention_kernels.kernels import register_transformers
    name = register_transformers("attention_kernels_support")
    with pytest.raises(ValueError, match=f"BloomForCausalLM cannot use attn_implementation='{name}'"):
        BloomForCausalLM._from_config(BloomConfig(vocab_size=16, hidden_size=8, n_layer=1, n_head=2),
                                      attn_implementation=name)


def check_no_lse(s):
    """An attention function returns (output, weights); ours returns None for the weights, no lse."""
    got = transformers_attention()(LAYER, s.q, s.k, s.v, None)
    assert len(got) == 2 and got[1] is None


def check_models_pass_no_such_argument(s):
    """A tiny Llama's forward, through the kernels' registered attention function: what a model
    hands it has none of the table's Triton-side arguments (functions, maps, trees, ranges)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from attention_kernels.kernels import register_transformers
    name, seen = register_transformers("attention_kernels_support"), []
    attend = ALL_ATTENTION_FUNCTIONS[name]
    ALL_ATTENTION_FUNCTIONS[name] = lambda *args, **kwargs: seen.append(set(kwargs)) or attend(*args, **kwargs)
    try:
        config = LlamaConfig(vocab_size=16, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=1)
        model = LlamaForCausalLM._from_config(config, attn_implementation=name).to(DEVICE)
        model(torch.randint(0, 16, (2, 6), device=DEVICE), attention_mask=torch.ones(2, 6, device=DEVICE, dtype=torch.long))
    finally:
        ALL_ATTENTION_FUNCTIONS[name] = attend
    assert seen and not set().union(*seen) & {"mask_mod", "score_mod", "block_map", "tree_mask", "bidirectional"}


SPECIAL = {("ALiBi", "transformers"): check_no_alibi_model, ("return_lse", "transformers"): check_no_lse,
           **{(feature, "transformers"): check_models_pass_no_such_argument
              for feature in ("mask_mod", "score_mod", "block_map", "tree_mask", "bidirectional")}}


# ----------------------------------------------------------------------------- every cell but the ring's


LOCAL = [(feature, entry) for feature in FEATURES for entry in ENTRY_POINTS if entry != "ring"]


@pytest.mark.parametrize("feature, entry", LOCAL, ids=[f"{e}-{f}".replace(" ", "_") for f, e in LOCAL])
def test_cell(feature, entry, monkeypatch):
    cell = SUPPORT[feature][entry]
    monkeypatch.setattr(dropout_module, "draw_seed", lambda: SEED)  # where no argument takes the seed

    def fell_back(*args, **kwargs):
        raise AssertionError("the SDPA drop-in fell back to torch")

    monkeypatch.setattr(sdpa_module, "_torch_sdpa", fell_back)
    for dtype, D in variants(feature, cell):
        s = setting(feature, entry, dtype, D)
        if entry == "module":
            check_module(feature, cell, dtype, D)
        elif (feature, entry) in SPECIAL:
            assert not cell.supported, "a special check is for a cell the table says is not supported"
            SPECIAL[feature, entry](s)
        elif cell.supported:
            check_supported(entry, s)
        else:
            check_refused(entry, feature, s)


# ----------------------------------------------------------------------------- the ring's cells


def _ring_cells(rank, world, jobs):
    """On each rank: every ring cell's call on this rank's zigzag shard; each result gathered whole
    (out, lse, dq, dk, dv; None where not asked), or the error raised as (type, message)."""
    results = {}
    for feature, s in jobs:
        shard = lambda x: shard_sequence(x, dim=2).requires_grad_(s.backward)
        q, k, v = shard(s.q), shard(s.k), shard(s.v)
        fn = lambda q, k, v: ring_attention(q, k, v, causal=s.causal, **lse_flag(s), **s.mods)
        if s.compile:
            fn = torch.compile(fn, fullgraph=True, backend="aot_eager")
        try:
            got = fn(q, k, v)
        except Exception as e:
            results[feature] = (f"{type(e).__module__}.{type(e).__name__}", str(e))
            continue
        out, lse = got if s.return_lse else (got, None)
        grads = [None] * 3
        if s.backward:
            out.backward(shard_sequence(s.do, dim=2))
            grads = [gather_sequence(x.grad, dim=2) for x in (q, k, v)]
        results[feature] = [gather_sequence(out.detach(), dim=2),
                            None if lse is None else gather_sequence(lse.detach(), dim=2), *grads]
    return results


class _Replay(torch.autograd.Function):
    """An output computed elsewhere (on the ranks), with the gradients it gave, so that the rule's
    own `hold_to_rule` holds both: its backward hands back those gradients."""

    @staticmethod
    def forward(ctx, q, k, v, out, dq, dk, dv):
        ctx.grads = (dq, dk, dv)
        return out.clone()

    @staticmethod
    def backward(ctx, do):
        return (*ctx.grads, None, None, None, None)


def ring_jobs():
    jobs = []
    for feature in FEATURES:
        for dtype, D in variants(feature, SUPPORT[feature]["ring"]):
            s = setting(feature, "ring", dtype, D)
            if not SUPPORT[feature]["ring"].supported:  # the ranks are spawned: nothing that pickles badly
                # (a function's PyTorch twin); the keyword alone is what the ring must refuse
                s.mods = {name: None if isinstance(x, (mods.MaskMod, mods.ScoreMod)) else x for name, x in s.mods.items()}
                s.spec_mods = {}
            jobs.append((f"{feature} {dtype} {D}", s))
    return jobs


def test_ring_cells():
    from attention_kernels.benchmarks.ring import Spawned
    jobs = ring_jobs()
    group = Spawned(_ring_cells, 2, (jobs,), timeout_s=60)
    results = group.join(300)[0]
    assert set(results) == {name for name, _ in jobs}
    for name, s in jobs:
        feature = name.rsplit(" ", 2)[0]
        cell, got = SUPPORT[feature]["ring"], results[name]
        if feature == "torch.compile" and not cell.supported:
            assert isinstance(got, tuple) and got[0].startswith("torch._dynamo") and "ring_attention" in got[1], got
        elif not cell.supported:
            assert isinstance(got, tuple), f"ring with {feature}: the table says no, and it ran"
            assert ARGUMENT[feature] in got[1] and "ring_attention" in got[1], got
        else:
            assert not isinstance(got, tuple), f"ring with {feature}: {got[0]}: {got[1]}"
            out, lse, dq, dk, dv = got
            leaves = [x.detach().clone().requires_grad_(s.backward) for x in (s.q, s.k, s.v)]
            if s.backward:
                out = _Replay.apply(*leaves, out, dq, dk, dv)
            spec, spec_lse = spec_of(s)
            hold_to_rule(out, lse, leaves, s.do if s.backward else None, spec, spec_lse)
            flash = flash_attention(s.q, s.k, s.v, causal=s.causal, return_lse=True, **s.mods)
            low = spec(s.q, s.k, s.v, upcast=False)
            assert_close(f"ring with {feature} against one-process flash", out, flash[0], low, FACTOR,
                         FLOOR[s.dtype])


# ----------------------------------------------------------------------------- the table itself


def test_every_cell_is_run():
    assert set(SUPPORT) == set(FEATURES)
    assert all(set(row) == set(ENTRY_POINTS) for row in SUPPORT.values())
    ring = {(feature, "ring") for feature in FEATURES}
    assert set(LOCAL) | ring == {(feature, entry) for feature, entry, _ in support.cells()}
    for feature, entry, cell in support.cells():  # every unsupported cell has a way to be checked
        assert cell.supported or cell.note, f"{entry} {feature}: unsupported without a reason"
        if not cell.supported and entry != "module" and (feature, entry) not in SPECIAL:
            assert feature in ARGUMENT or (feature, entry) == ("torch.compile", "ring"), (feature, entry)
    assert set(RUN) | {"module", "ring"} == set(ENTRY_POINTS)


def read(page):
    with open(os.path.join(ROOT, page), encoding="utf-8") as f:
        return f.read()


def test_the_docs_show_the_rendered_table():
    redo = "out of date: paste in what `python -m attention_kernels.kernels.support{}` prints"
    assert support.markdown() in read("docs/support.md"), "docs/support.md's table is " + redo.format("")
    assert support.markdown(compact=True) in read("README.md"), "README.md's table is " + redo.format(" --compact")


def test_the_command_prints_the_table(capsys):
    support.main([])
    assert capsys.readouterr().out == support.markdown()
    support.main(["--compact"])
    assert capsys.readouterr().out == support.markdown(compact=True)

