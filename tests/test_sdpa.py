"""kernels.scaled_dot_product_attention has torch's semantics, and patch_sdpa routes unchanged
code through it. The truth here is torch's own SDPA in float64: the drop-in's spec is torch."""

import pytest
import torch
import torch.nn.functional as F

from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR, Shape
from attention_kernels.kernels import (attention, dropout_mask, flash_attention, flash_attention_varlen, fused_attention,
                                       patch_sdpa, scaled_dot_product_attention)
import attention_kernels.kernels.dropout as dropout_module  # its draw_seed, which the tests record
from attention_kernels.kernels.sdpa import SdpaCalls, _sdpa
from attention_kernels.testing.rule import assert_close, make_qkv, seed_of

TORCH_SDPA = F.scaled_dot_product_attention

# Tq < Tk and Tq > Tk are where torch's top-left causal alignment differs from the kernels'.
SHAPES = [Shape(2, 4, 4, 17, 17, 32), Shape(1, 4, 2, 9, 40, 16), Shape(1, 2, 2, 40, 9, 64), Shape(1, 2, 1, 1, 33, 80)]


def check_like_torch(q, k, v, do, **kwargs):
    """The drop-in's output and gradients against torch's SDPA in float64, held to the rule."""
    out = scaled_dot_product_attention(q, k, v, **kwargs)
    out.backward(do)
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves_low = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth, low = TORCH_SDPA(*leaves64, **kwargs), TORCH_SDPA(*leaves_low, **kwargs)
    truth.backward(do.double())
    low.backward(do)
    floor = FLOOR[q.dtype]
    assert_close("out", out, truth, low, FACTOR, floor)
    for name, x, x64, xl in zip(("dq", "dk", "dv"), (q, k, v), leaves64, leaves_low):
        assert_close(name, x.grad, x64.grad, xl.grad, GRAD_FACTOR, floor)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("is_causal", [True, False])
def test_matches_torch(shape, is_causal, poison):
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of(shape, is_causal))
    check_like_torch(q, k, v, do, is_causal=is_causal, enable_gqa=shape.Hq != shape.Hkv)


def test_scale_and_transposed_layout(poison):
    shape = Shape(2, 4, 4, 24, 24, 32)
    q, k, v, do = make_qkv(shape, torch.float32, layout="bthd", seed=seed_of("scale"))
    check_like_torch(q, k, v, do, is_causal=True, scale=0.3)


def test_unchanged_code_runs_on_the_kernels_inside_patch():
    def model_code(q, k, v):  # what nanoGPT and Hugging Face's "sdpa" path do
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v, _ = make_qkv(Shape(1, 2, 2, 20, 20, 16), torch.float32, seed=seed_of("patch"))
    with patch_sdpa(impl="flash") as calls:
        got = model_code(q, k, v)
        model_code(q, k, v)
    assert calls.kernel == 2 and not calls.fallback, calls
    assert F.scaled_dot_product_attention is TORCH_SDPA  # restored
    assert_close("out", got, model_code(q.double(), k.double(), v.double()), model_code(q, k, v), FACTOR,
                 FLOOR[torch.float32])


def test_a_block_without_calls_says_so():
    with pytest.warns(UserWarning, match="no call reached F.scaled_dot_product_attention inside the block"):
        with patch_sdpa():
            torch.ones(3).softmax(-1)  # attention written by hand: nothing goes through the patch


def test_fallbacks_are_torch_and_counted():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 12, 12, 16), torch.float32, seed=seed_of("fallback"))
    hidden = torch.zeros(12, 12, device=DEVICE)
    hidden[4] = torch.finfo(torch.float32).min                          # row 4 sees no key but by finite values
    with pytest.warns(UserWarning, match=r"patch_sdpa: 3 calls: 1 on the kernels, 2 fell back to torch \(.*mask"), \
            patch_sdpa(impl="fused") as calls:
        masked = F.scaled_dot_product_attention(q, k, v, attn_mask=hidden)  # a row torch averages
        F.scaled_dot_product_attention(q.double(), k.double(), v.double())
        F.scaled_dot_product_attention(q, k, v)
    assert calls.kernel == 1, calls
    assert calls.fallback == {"attn_mask hides a row with finite values (torch averages it)": 1,
                              "q has dtype float64; supported: float16, bfloat16, float32": 1}, calls
    assert "2 fell back to torch" in repr(calls)
    assert torch.equal(masked, TORCH_SDPA(q, k, v, attn_mask=hidden))


MASK_SHAPES = [(12, 17), (1, 1, 12, 17), (2, 1, 12, 17), (1, 4, 1, 17), (4, 12, 17), (2, 4, 12, 17)]


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("shape", MASK_SHAPES, ids=str)
def test_masks_run_on_the_kernels_as_torch_computes_them(poison, shape, kind):
    # every shape that broadcasts to the scores (B, H, Tq, Tk) = (2, 4, 12, 17), grouped heads, a
    # row hidden entirely (torch gives it zeros: so must the drop-in); a float mask's gradient too
    q, k, v, do = make_qkv(Shape(2, 4, 2, 12, 17, 16), torch.float32, seed=seed_of("mask", shape, kind))
    g = torch.Generator(DEVICE).manual_seed(seed_of("mask values", shape, kind))
    visible = torch.rand(shape, generator=g, device=DEVICE) > 0.4
    hidden_row = shape[-2] != 1             # a mask of one row for every query hides no row alone
    if hidden_row:
        visible[..., 3, :] = False
    if kind == "bool":
        mask = visible
    else:
        mask = torch.randn(shape, generator=g, device=DEVICE).masked_fill(~visible, float("-inf")).requires_grad_()
    with patch_sdpa() as calls:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert calls.kernel == 1 and not calls.fallback, calls
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    mask64 = mask.detach().double().requires_grad_() if kind == "float" else mask
    want = TORCH_SDPA(*leaves, attn_mask=mask64, enable_gqa=True)
    if hidden_row:
        assert not want[..., 3, :].any() and not out[..., 3, :].any()  # the hidden row: zeros in both
    out.backward(do)
    want.backward(do.double())
    compared = [("out", out, want), *zip(("dq", "dk", "dv"), (q.grad, k.grad, v.grad), (x.grad for x in leaves))]
    compared += [("dmask", mask.grad, mask64.grad)] if kind == "float" else []
    for name, got, truth in compared:
        finite = torch.isfinite(truth)
        torch.testing.assert_close(got.double()[finite], truth[finite], rtol=0, atol=2e-5, msg=name)


def test_masks_torch_refuses_stay_torchs_errors():
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 5, 5, 16), torch.float32, seed=seed_of("mask errors"))
    mask = torch.rand(5, 5, generator=torch.Generator(DEVICE).manual_seed(0), device=DEVICE) > 0.3
    with pytest.warns(UserWarning, match="fell back"), patch_sdpa() as calls:
        for bad in [dict(attn_mask=mask.double()), dict(attn_mask=torch.ones(3, 5, dtype=torch.bool, device=DEVICE))]:
            with pytest.raises(RuntimeError) as ours:
                F.scaled_dot_product_attention(q, k, v, **bad)
            with pytest.raises(RuntimeError) as theirs:
                TORCH_SDPA(q, k, v, **bad)
            assert str(ours.value) == str(theirs.value)
        # a mask with is_causal: refused by some torch versions, combined with a top-left causal
        # mask by others; torch's own function decides
        both = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    assert torch.equal(both, TORCH_SDPA(q, k, v, attn_mask=mask, is_causal=True))
    assert calls.kernel == 0 and calls.fallback["attn_mask with is_causal"] == 1, calls


def record_dropout_seeds(monkeypatch):
    """The seeds the kernels' calls draw from torch's generator, in call order."""
    seeds, draw = [], dropout_module.draw_seed
    monkeypatch.setattr(dropout_module, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    return seeds


def written_out_sdpa_dropout(q, k, v, keep, p):
    """torch's SDPA with is_causal (Tq = Tk) and dropout, in float64, written out: softmax(q k^T /
    sqrt(D) + causal mask), a kept weight times 1 / (1 - p) and a dropped one 0 (F.dropout's
    convention), @ v; query head h on k/v head h // (Hq / Hkv) (enable_gqa)."""
    q, k, v = (x.detach().double() for x in (q, k, v))
    group, T = q.shape[1] // k.shape[1], q.shape[2]
    k, v = (x.repeat_interleave(group, dim=1) for x in (k, v))
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    w = torch.softmax((q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).masked_fill(future, float("-inf")), -1)
    return torch.where(keep, w / (1 - p), 0.0) @ v


@pytest.mark.parametrize("impl", ["auto", "fused", "flash"])
def test_dropout_runs_on_the_kernels(impl, monkeypatch):
    """dropout_p > 0 (nanoGPT training with dropout): the kernels drop the weights themselves, a
    seed from torch's generator, so torch.manual_seed repeats a call; the output is torch's
    dropout convention with the mask the seed names, written out."""
    p, shape = 0.5, Shape(1, 4, 2, 12, 12, 16)
    q, k, v, _ = make_qkv(shape, torch.float32, seed=seed_of("dropout"))
    seeds = record_dropout_seeds(monkeypatch)
    with patch_sdpa(impl=impl) as calls:
        torch.manual_seed(5)
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        torch.manual_seed(5)
        b = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
        c = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=True)
    assert calls.kernel == 3 and not calls.fallback, calls
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(seeds) == 3 and seeds[0] == seeds[1] != seeds[2]
    for out, seed in ((a, seeds[0]), (c, seeds[2])):
        keep = dropout_mask(shape.B, shape.Hq, shape.Tq, shape.Tk, p, seed, DEVICE)
        torch.testing.assert_close(out.double(), written_out_sdpa_dropout(q, k, v, keep, p), rtol=1e-5, atol=1e-5)


def test_rows_too_long_for_a_forced_fused_fall_back():
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, 2000, 16), torch.float32, seed=seed_of("long"))
    with patch_sdpa(impl="fused") as calls:
        got = F.scaled_dot_product_attention(q, k, v)
    assert calls.fallback == {"Tk beyond fused's row limit": 1}, calls
    assert torch.equal(got, TORCH_SDPA(q, k, v))


def test_torch_errors_stay_torch_errors():
    q = torch.randn(1, 4, 8, 16, device=DEVICE)
    kv = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(RuntimeError) as theirs:
        TORCH_SDPA(q, kv, kv)
    with pytest.raises(RuntimeError) as ours:  # different head counts need enable_gqa=True in torch
        scaled_dot_product_attention(q, kv, kv)
    assert str(ours.value) == str(theirs.value)


AUTOCAST_ENTRIES = {  # each public entry point, called as torch's SDPA would be with is_causal=True
    "sdpa drop-in": lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True),
    "patch_sdpa": lambda q, k, v: patched_call(q, k, v),
    "attention": lambda q, k, v: attention(q, k, v),
    "flash_attention": lambda q, k, v: flash_attention(q, k, v),
    "fused_attention": lambda q, k, v: fused_attention(q, k, v),
    "flash_attention_varlen": lambda q, k, v: packed_call(q, k, v),
}


def patched_call(q, k, v):
    with patch_sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def packed_call(q, k, v):
    B, H, T, D = q.shape
    cu = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
    as_packed = lambda x: x.transpose(1, 2).reshape(B * T, H, D)                 # (B * T, H, D)
    out = flash_attention_varlen(as_packed(q), as_packed(k), as_packed(v), cu, cu, T, T)
    return out.reshape(B, T, H, D).transpose(1, 2)                                # (B, H, T, D)


@pytest.mark.parametrize("entry", list(AUTOCAST_ENTRIES))
def test_under_autocast_the_kernels_return_what_torch_returns(entry):
    # SDPA is one of autocast's lower-precision ops: fp32 inputs run, and come back, in bf16
    q, k, v, do = make_qkv(Shape(1, 2, 2, 24, 24, 32), torch.float32, seed=seed_of("autocast", entry))
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        theirs = TORCH_SDPA(q, k, v, is_causal=True)
        ours = AUTOCAST_ENTRIES[entry](q, k, v)
    assert theirs.dtype == torch.bfloat16 and ours.dtype == theirs.dtype, (ours.dtype, theirs.dtype)
    torch.testing.assert_close(ours.float(), theirs.float(), atol=2e-2, rtol=2e-2)
    ours.backward(do.bfloat16())
    assert q.grad.dtype == torch.float32 and torch.isfinite(q.grad).all()  # back through the cast to fp32
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=False):
        assert AUTOCAST_ENTRIES[entry](q, k, v).dtype == torch.float32


def test_is_causal_must_be_a_bool_as_in_torch():
    q = torch.randn(1, 2, 8, 16, device=DEVICE)
    with pytest.raises(TypeError) as theirs:
        TORCH_SDPA(q, q, q, is_causal=1)
    with pytest.raises(TypeError, match="argument 'is_causal' must be bool, not int") as ours:
        scaled_dot_product_attention(q, q, q, is_causal=1)
    assert "must be bool" in str(theirs.value)


def test_patch_is_undone_on_error_and_rejects_bad_impl():
    with pytest.raises(KeyError):
        with patch_sdpa():
            raise KeyError("inside")
    assert F.scaled_dot_product_attention is TORCH_SDPA
    with pytest.raises(ValueError, match="impl must be one of"):
        with patch_sdpa(impl="triton"):
            pass


def test_compiles_without_graph_breaks():
    q, k, v, do = make_qkv(Shape(1, 4, 2, 16, 16, 32), torch.float32, seed=seed_of("compile"))
    fn = lambda q, k, v: scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), fn(q, k, v), atol=1e-6)


def test_a_row_hidden_by_finfo_min_goes_to_torch():
    # torch averages the values of a row whose every entry is finfo.min; the kernels read such
    # entries as -inf and would give zeros: that mask goes to torch, the others stay on the kernels
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 6, 6, 16), torch.float32, seed=seed_of("finfo"))
    low = torch.finfo(torch.float32).min
    bias = torch.zeros(6, 6, device=DEVICE).masked_fill(torch.ones(6, 6, dtype=torch.bool, device=DEVICE).triu(1), low)
    hidden = bias.clone()
    hidden[2] = low
    with pytest.warns(UserWarning, match="hides a row with finite values"), patch_sdpa() as calls:
        partly = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        wholly = F.scaled_dot_product_attention(q, k, v, attn_mask=hidden)
    assert calls.kernel == 1 and calls.fallback == {"attn_mask hides a row with finite values (torch averages it)": 1}
    assert torch.equal(wholly, TORCH_SDPA(q, k, v, attn_mask=hidden))
    torch.testing.assert_close(partly, TORCH_SDPA(q, k, v, attn_mask=bias), rtol=0, atol=2e-6)


def test_the_finfo_min_check_reads_a_mask_once_and_again_after_a_change(monkeypatch):
    from attention_kernels.kernels import checks
    mask = torch.zeros(2, 6, 6, device=DEVICE)
    mask[1, 3] = torch.finfo(torch.float32).min
    reads = []
    le = torch.Tensor.__le__
    monkeypatch.setattr(torch.Tensor, "__le__", lambda a, b: reads.append(1) or le(a, b))
    assert checks.hides_a_row_with_finite_values(mask) and checks.hides_a_row_with_finite_values(mask)
    assert len(reads) == 1                      # the second call (the next layer's) reads nothing
    mask[1, 3] = 0.0                            # in place: a new version, read again
    assert not checks.hides_a_row_with_finite_values(mask) and len(reads) == 2


def test_a_float_mask_under_autocast_is_cast_with_the_inputs():
    # torch's SDPA under autocast takes an fp32 mask with bf16 inputs: so does the drop-in, on the kernels
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 9, 9, 16), torch.float32, seed=seed_of("autocast mask"))
    bias = torch.randn(9, 9, generator=torch.Generator(DEVICE).manual_seed(3), device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16), patch_sdpa() as calls:
        got = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        want = TORCH_SDPA(q, k, v, attn_mask=bias)
    assert calls.kernel == 1 and not calls.fallback, calls
    assert got.dtype == want.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), rtol=0, atol=2e-2)


# One new token against two key blocks, a draft of 5 against 300 keys (num_splits=None: two splits
# of 256), 16 queries against 17 keys; grouped heads
DECODE_SHAPES = [Shape(2, 4, 2, 1, 40, 16), Shape(1, 4, 1, 5, 300, 32), Shape(1, 2, 1, 16, 17, 24)]


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=str)
def test_decode_steps_run_on_the_decode_kernel(poison, shape):
    """A few queries against more keys, is_causal=False, no mask, no gradient: the split-KV decode
    kernel, each query seeing every key, as torch computes it."""
    q, k, v, _ = make_qkv(shape, torch.float32, seed=seed_of("decode", shape))
    q, k, v = (x.detach() for x in (q, k, v))
    gqa = shape.Hq != shape.Hkv
    with patch_sdpa() as calls:
        got = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    assert calls.kernel == 1 and calls.decode == 1 and not calls.fallback, calls
    assert "(1 on the decode kernel)" in repr(calls)
    truth = TORCH_SDPA(q.double(), k.double(), v.double(), enable_gqa=gqa)
    assert_close("out", got, truth, TORCH_SDPA(q, k, v, enable_gqa=gqa), FACTOR, FLOOR[torch.float32])


def test_what_is_not_a_decode_step_stays_off_the_decode_kernel():
    """torch's is_causal (top-left: one query would see key 0 alone), a mask, a gradient wanted,
    more than 16 queries, as many queries as keys, and a kernel named by impl: not the decode kernel."""
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 17, 40, 16), torch.float32, seed=seed_of("not decode"))
    q, k, v = (x.detach() for x in (q, k, v))
    one = q[:, :, :1]
    mask = torch.ones(1, 40, dtype=torch.bool, device=DEVICE)
    with patch_sdpa() as calls:
        F.scaled_dot_product_attention(one, k, v, is_causal=True)
        F.scaled_dot_product_attention(one, k, v, attn_mask=mask)
        F.scaled_dot_product_attention(one.clone().requires_grad_(), k, v)
        F.scaled_dot_product_attention(q, k, v)                              # 17 queries
        F.scaled_dot_product_attention(one, k[:, :, :1], v[:, :, :1])        # Tq = Tk = 1
    assert calls.kernel == 5 and calls.decode == 0, calls
    with patch_sdpa(impl="flash") as calls:
        F.scaled_dot_product_attention(one, k, v)
    assert calls.kernel == 1 and calls.decode == 0, calls


@pytest.mark.parametrize("shape, mask_shape", [
    ((3, 20, 16), None),                  # (N, L, E): one head a batch
    ((3, 20, 16), (3, 20, 20)),           # with a per-batch mask
    ((2, 3, 2, 20, 16), (20, 20)),        # (B1, B2, H, L, E): the batch dimensions flattened
    ((2, 3, 2, 20, 16), (3, 1, 20, 20)),  # a mask broadcast over some of them
], ids=str)
def test_inputs_of_3_and_5_dimensions_run_on_the_kernels(shape, mask_shape):
    g = torch.Generator(DEVICE).manual_seed(seed_of("sdpa dims", shape, mask_shape))
    q, k, v = (torch.randn(shape, generator=g, device=DEVICE) for _ in range(3))
    mask = None if mask_shape is None else torch.rand(mask_shape, generator=g, device=DEVICE) < 0.7
    calls = SdpaCalls()
    with torch.no_grad():
        got = _sdpa(q, k, v, mask, 0.0, mask is None, None, False, "auto", calls)
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
    assert calls.kernel == 1 and not calls.fallback, calls
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
