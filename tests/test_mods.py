"""Mask and score functions in Triton (`kernels.mods`) and the block map (`kernels.blockmap`):
every ready-made function against its PyTorch twin in the reference, forward and backward under
the rule, with and without a map, grouped heads, lengths that miss the blocks, Tq != Tk, 16-bit;
ALiBi and the soft-cap as score functions equal to the built-in arguments; the map's counts (a
document mask costs what it shows), its reuse, a map that is read (a sabotaged one changes the
answer), maps refused for another call; bad input."""

import pytest
import torch

from attention_kernels import flash_attention, flash_attention_varlen, reference
from attention_kernels.kernels import blockmap, mods
from attention_kernels.kernels.blockmap import block_map
from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.testing.rule import hold_to_rule, make_packed, make_qkv, seed_of


def check(q, k, v, do, causal=True, window=None, mask_mod=None, score_mod=None, use_map=False, block_size=32,
          **kwargs):
    """flash_attention with the functions (and a map made for them) held to the rule against the
    reference given their PyTorch twins: out, log-sum-exp, and the gradients when do is given."""
    w = window or (-1, -1)
    bm = None
    if use_map:
        bm = block_map(mask_mod, q.shape[2], k.shape[2], causal=causal, window=window, block_size=block_size,
                       B=q.shape[0], H=q.shape[1])
    o, lse = flash_attention(q, k, v, causal=causal, window=window, return_lse=True, mask_mod=mask_mod,
                             score_mod=score_mod, block_map=bm, **kwargs)
    tm = mask_mod.torch_fn if mask_mod is not None else None
    ts = score_mod.torch_fn if score_mod is not None else None
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, causal, None, upcast, w, mask_mod=tm,
                                                            score_mod=ts, **kwargs)
    spec_lse = lambda q, k: reference.logsumexp(q, k, causal, None, w, mask_mod=tm, score_mod=ts, **kwargs)
    hold_to_rule(o, lse, (q, k, v), do, spec, spec_lse)
    return o, bm


def ids_of(lengths, device=DEVICE):
    return torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))


SHAPE = Shape(2, 4, 2, 75, 75, 16)  # grouped heads; 75 misses every block


def masks(T, B):
    g = torch.Generator().manual_seed(seed_of("document lengths", T))
    cut = sorted(torch.randperm(T - 1, generator=g)[:4].add(1).tolist())
    lengths = [b - a for a, b in zip([0] + cut, cut + [T])]
    per_seq = torch.randint(0, T, (B,), generator=g).to(DEVICE)
    cu = torch.tensor([0] + cut + [T], dtype=torch.int32, device=DEVICE)
    return {
        "documents": (mods.documents(ids_of(lengths)), True),
        "documents per sequence": (mods.documents(torch.stack([ids_of(lengths), ids_of(lengths[::-1])])), True),
        "documents from cu_seqlens": (mods.documents_from_cu_seqlens(cu, T), True),
        "prefix-LM": (mods.prefix_lm(per_seq), False),
        "prefix-LM, one length": (mods.prefix_lm(30, device=DEVICE), False),
        "chunked": (mods.chunked(24, device=DEVICE), True),
        "sliding window": (mods.sliding_window(9, device=DEVICE), True),
        "causal, top-left": (mods.causal(), False),
    }


@pytest.mark.parametrize("use_map", [False, True], ids=["no map", "map"])
@pytest.mark.parametrize("name", list(masks(SHAPE.Tq, SHAPE.B)))
def test_ready_made_mask_functions(poison, name, use_map):
    q, k, v, do = make_qkv(SHAPE, torch.float32, "bthd", seed_of("mask function", name, use_map))
    mask_mod, causal = masks(SHAPE.Tq, SHAPE.B)[name]
    check(q, k, v, do, causal, mask_mod=mask_mod, use_map=use_map)


@pytest.mark.parametrize("shape, window, causal", [
    (Shape(1, 2, 1, 1, 1, 16), None, True),                # one query, one key
    (Shape(2, 2, 2, 40, 97, 80), None, True),              # Tq != Tk, head dim 80
    (Shape(1, 3, 1, 97, 61, 96), (20, 7), False),          # a two-sided window, head dim 96
])
def test_lengths_head_dims_and_windows(poison, shape, window, causal):
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("mask function shapes", shape))
    # prefix-LM over the keys, so that Tq != Tk has a meaning: key positions below 13 are seen by all
    check(q, k, v, do, causal, window, mask_mod=mods.prefix_lm(13, device=DEVICE), use_map=True, block_size=16)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_16_bit(poison, dtype):
    q, k, v, do = make_qkv(SHAPE, dtype, seed=seed_of("mask function 16 bit", dtype))
    check(q, k, v, do, True, mask_mod=mods.chunked(16, device=DEVICE), score_mod=mods.softcap(2.0, device=DEVICE),
          use_map=True)


def test_score_functions_equal_the_built_in_arguments(poison):
    shape = Shape(2, 4, 2, 70, 70, 32)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("score functions"))
    slopes = reference.alibi_slopes(shape.Hq).to(DEVICE)
    for score_mod, builtin in ((mods.alibi(slopes), dict(alibi_slopes=slopes)),
                               (mods.softcap(3.0, device=DEVICE), dict(softcap=3.0))):
        o, lse = flash_attention(q, k, v, return_lse=True, score_mod=score_mod)
        spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, True, None, upcast, **builtin)
        spec_lse = lambda q, k: reference.logsumexp(q, k, True, None, **builtin)
        for x in (q, k, v):
            x.grad = None
        hold_to_rule(o, lse, (q, k, v), do, spec, spec_lse)


def test_score_and_mask_functions_with_an_attn_mask_and_sinks(poison):
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("functions and attn_mask"))
    g = torch.Generator(DEVICE).manual_seed(seed_of("functions and attn_mask, the mask"))
    attn_mask = torch.rand(SHAPE.Tq, SHAPE.Tk, generator=g, device=DEVICE) < 0.7
    sinks = torch.randn(SHAPE.Hq, device=DEVICE)
    check(q, k, v, do, True, mask_mod=mods.chunked(32, device=DEVICE), score_mod=mods.softcap(4.0, device=DEVICE),
          attn_mask=attn_mask, sinks=sinks)


def test_varlen_takes_the_functions(poison):
    lengths = [37, 1, 64]
    q, k, v, do, cu_q, cu_k = make_packed(lengths, lengths, 4, 2, 16, torch.float32, seed=seed_of("varlen mods"))
    prefix = torch.tensor([5, 0, 20], dtype=torch.int32, device=DEVICE)
    mask_mod, score_mod = mods.prefix_lm(prefix), mods.softcap(2.5, device=DEVICE)
    o = flash_attention_varlen(q, k, v, cu_q, cu_k, 64, 64, causal=False, mask_mod=mask_mod, score_mod=score_mod)
    o.backward(do)
    for b, (a, z) in enumerate(zip(cu_q.tolist(), cu_q.tolist()[1:])):
        one = lambda x: x[a:z].detach().double().transpose(0, 1)[None].requires_grad_()  # (1, H, T, D)
        qb, kb, vb = one(q), one(k), one(v)
        p = int(prefix[b])
        ref = reference.attention(qb, kb, vb, False, score_mod=score_mod.torch_fn,
                                  mask_mod=lambda bb, h, i, j: (j < p) | (i >= j))
        ref.backward(do[a:z].double().transpose(0, 1)[None])
        torch.testing.assert_close(o[a:z].double(), ref[0].transpose(0, 1), atol=2e-6, rtol=0)
        for got, want in ((q.grad, qb.grad), (k.grad, kb.grad), (v.grad, vb.grad)):
            torch.testing.assert_close(got[a:z].double(), want[0].transpose(0, 1), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------- the block map


def test_a_document_mask_costs_what_it_shows():
    # 8 documents of 128 at T = 1024: each query block sees only its own document's blocks
    T, docs = 1024, 8
    ids = ids_of([T // docs] * docs)
    causal = block_map(torch.ones(T, T, dtype=torch.bool, device=DEVICE), T, T, block_size=16)
    tensor = block_map(ids[:, None] == ids[None, :], T, T, block_size=16)
    n = T // 16
    assert causal.visits().item() == n * (n + 1) // 2                               # 2080
    per_doc = (T // docs // 16) * (T // docs // 16 + 1) // 2
    assert tensor.visits().item() == docs * per_doc                                 # 288: 0.14 of causal's
    # blocks on a document's diagonal are partial, those below it full: no mask work there
    assert tensor.kv_counts[..., 1].sum().item() == docs * (per_doc - T // docs // 16)
    # the mask function's map, made by a kernel, says the same at its block size
    function = block_map(mods.documents(ids), T, T, block_size=64)
    tensor64 = block_map(ids[:, None] == ids[None, :], T, T, block_size=64)
    for a, b in zip(function[:4], tensor64[:4]):
        assert torch.equal(a, b)
    assert function.visits().item() == docs * 3                                     # 24 of causal's 136


def test_chunked_and_window_maps():
    T = 256
    chunked = block_map(mods.chunked(64, device=DEVICE), T, T, block_size=32)
    assert chunked.visits().item() == 4 * 3                 # two 32-blocks a chunk: 3 causal blocks each
    window = block_map(torch.ones(T, T, dtype=torch.bool, device=DEVICE), T, T, window=(31, 0), block_size=32)
    assert window.visits().item() == 8 + 7                  # the diagonal and the one before it
    assert window.kv_counts[..., 1].sum().item() == 0       # no block is seen whole by a 32-wide window


def test_the_map_is_what_the_kernels_visit(poison):
    # the same mask with a map that lists nothing: every row sees no key (zeros), so the kernels
    # read the map rather than the mask alone; the true map gives the reference
    q, k, v, do = make_qkv(Shape(1, 2, 1, 64, 64, 16), torch.float32, seed=seed_of("map is read"))
    mask_mod = mods.chunked(32, device=DEVICE)
    bm = block_map(mask_mod, 64, 64, block_size=32)
    o = flash_attention(q, k, v, mask_mod=mask_mod, block_map=bm)
    empty = bm._replace(kv_counts=torch.zeros_like(bm.kv_counts))
    assert torch.equal(flash_attention(q, k, v, mask_mod=mask_mod, block_map=empty), torch.zeros_like(o))
    assert (o != 0).any()


@pytest.mark.parametrize("kind", ["mask_mod", "bool", "float"])
def test_blocks_seen_whole_take_the_path_without_mask_work(poison, kind):
    # two documents of 64 at T = 128 in blocks of 32: the blocks below each document's diagonal
    # are full (every query sees every key, nothing added), visited with no mask read at all
    shape = Shape(2, 4, 2, 128, 128, 16)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("full blocks", kind))
    ids = ids_of([64, 64])
    same = ids[:, None] == ids[None, :]
    if kind == "mask_mod":
        mask_mod, attn_mask = mods.documents(ids), None
        source = mask_mod
    else:
        mask_mod = None
        attn_mask = same if kind == "bool" else torch.zeros(shape.Tq, shape.Tk, device=DEVICE).masked_fill(
            ~same, float("-inf")).requires_grad_()
        source = attn_mask
    bm = block_map(source, shape.Tq, shape.Tk, block_size=32)
    assert bm.kv_counts[..., 1].sum().item() == 2 and bm.q_counts[..., 1].sum().item() == 2
    o, lse = flash_attention(q, k, v, return_lse=True, mask_mod=mask_mod, attn_mask=attn_mask, block_map=bm)
    m = same if kind == "mask_mod" else attn_mask
    spec = lambda q, k, v, *mask, upcast=True: reference.attention(q, k, v, True, None, upcast,
                                                                   attn_mask=mask[0] if mask else m.detach())
    spec_lse = lambda q, k: reference.logsumexp(q, k, True, None, attn_mask=m.detach())
    inputs = (q, k, v, attn_mask) if kind == "float" else (q, k, v)
    hold_to_rule(o, lse, inputs, do, spec, spec_lse)


def test_a_map_is_reused_across_calls_and_layers(poison):
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("map reuse"))
    mask_mod = mods.documents(ids_of([30, 45]))
    bm = block_map(mask_mod, SHAPE.Tq, SHAPE.Tk, block_size=32)
    first = flash_attention(q, k, v, mask_mod=mask_mod, block_map=bm)
    for _ in range(2):  # another layer's inputs, the same map
        q2, k2, v2 = (x * 0.5 for x in (q, k, v))
        out = flash_attention(q2, k2, v2, mask_mod=mask_mod, block_map=bm)
        want = flash_attention(q2, k2, v2, mask_mod=mask_mod)
        torch.testing.assert_close(out, want, atol=2e-6, rtol=0)
    assert torch.equal(first, flash_attention(q, k, v, mask_mod=mask_mod, block_map=bm))


def test_an_attn_mask_gets_a_map_kept_by_identity(poison):
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("attn_mask map"))
    mask = torch.zeros(SHAPE.B, 1, SHAPE.Tq, SHAPE.Tk, device=DEVICE)
    mask[0, ..., 40:] = float("-inf")
    flash_attention(q, k, v, attn_mask=mask)
    made = blockmap.mask_block_map(mask, SHAPE.Tq, SHAPE.Tk, -1, 0)
    assert made is blockmap.mask_block_map(mask, SHAPE.Tq, SHAPE.Tk, -1, 0)          # kept
    mask[1, ..., :3] = float("-inf")                                                  # changed in place
    assert blockmap.mask_block_map(mask, SHAPE.Tq, SHAPE.Tk, -1, 0) is not made
    # batch 0's key blocks past 40 are hidden: not listed; all-zero blocks below the diagonal are full
    assert made.kv_counts.shape[:2] == (SHAPE.B, 1)
    assert made.kv_counts[0].sum() < made.kv_counts[1].sum()
    small = block_map(mask, SHAPE.Tq, SHAPE.Tk, block_size=16)
    assert small.kv_counts[0, ..., 1].sum() > 0 and small.kv_counts[0].sum() < small.kv_counts[1].sum()


def test_a_float_mask_gradient_through_a_map(poison):
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("mask grad map"))
    g = torch.Generator(DEVICE).manual_seed(seed_of("mask grad map, the mask"))
    bias = torch.randn(SHAPE.Hq, SHAPE.Tq, SHAPE.Tk, generator=g, device=DEVICE)
    bias[:, :, 32:64] = float("-inf")                   # whole hidden blocks: skipped
    bias[:, 64:, :32] = 0.0                             # whole zero blocks: full, no mask work
    bias.requires_grad_()
    o, lse = flash_attention(q, k, v, return_lse=True, attn_mask=bias)
    spec = lambda q, k, v, m, upcast=True: reference.attention(q, k, v, True, None, upcast, attn_mask=m)
    spec_lse = lambda q, k: reference.logsumexp(q, k, True, None, attn_mask=bias.detach())
    hold_to_rule(o, lse, (q, k, v, bias), do, spec, spec_lse)


# ----------------------------------------------------------------------------- refused


def _not_jit(b, h, q, k):  # a plain Python function, not a @triton.jit one
    return q >= k


@pytest.mark.parametrize("call, error, words", [
    (lambda q: flash_attention(q, q, q, mask_mod=_not_jit), TypeError, "mask_mod must be a @triton.jit"),
    (lambda q: flash_attention(q, q, q, score_mod=lambda s, b, h, i, j: s), TypeError, "score_mod must be"),
    (lambda q: flash_attention(q, q, q, mask_mod=mods.MaskMod(mods._chunked, (3,))), TypeError, "args[0]"),
    (lambda q: flash_attention(q, q, q, mask_mod=mods.MaskMod(mods._chunked, (torch.ones(1, requires_grad=True),))),
     ValueError, "requires grad"),
    (lambda q: flash_attention(q, q, q, mask_mod=mods.MaskMod(mods._chunked, (torch.ones(1, dtype=torch.int32),) * 5)),
     ValueError, "at most 4"),
    (lambda q: flash_attention(q, q, q, block_map="all"), TypeError, "block_map must be a BlockMap"),
    (lambda q: flash_attention(q, q, q, mask_mod=mods.chunked(8, device=DEVICE),
                               block_map=block_map(mods.chunked(8, device=DEVICE), 24, 24)),
     ValueError, "another mask_mod"),
    (lambda q: flash_attention(q, q, q, causal=False, attn_mask=torch.ones(24, 24, dtype=torch.bool),
                               block_map=block_map(torch.ones(24, 24, dtype=torch.bool), 24, 24)),
     ValueError, "window=(-1, 0)"),
    (lambda q: flash_attention(q, q, q, attn_mask=torch.ones(24, 24, dtype=torch.bool),
                               block_map=block_map(torch.ones(24, 24, dtype=torch.bool), 24, 24)),
     ValueError, "another attn_mask"),
    (lambda q: block_map(torch.ones(24, 24, dtype=torch.bool), 24, 24, block_size=24), ValueError, "power of two"),
    (lambda q: block_map(torch.ones(24, 23, dtype=torch.bool), 24, 24), ValueError, "does not broadcast"),
    (lambda q: block_map(mods.chunked(8, device=DEVICE), 24, 24, B=0), ValueError, "B must be"),
])
def test_bad_input_is_refused_by_name(call, error, words):
    q = torch.randn(1, 2, 24, 16, device=DEVICE)
    with pytest.raises(error) as info:
        call(q)
    assert words in str(info.value), str(info.value)


def test_a_backward_through_a_score_function_without_its_derivative_is_refused():
    q, k, v, do = make_qkv(Shape(1, 1, 1, 16, 16, 16), torch.float32, seed=seed_of("no derivative"))
    o = flash_attention(q, k, v, score_mod=mods.ScoreMod(mods._softcap, None, mods.softcap(2.0, DEVICE).args))
    with pytest.raises(RuntimeError, match="score_mod has no derivative"):
        o.backward(do)
