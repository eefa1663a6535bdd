"""A user's attn_mask on flash_attention and fused_attention (torch SDPA's: bool True attends, float added to the
scores): random bool masks of any density, rows the mask hides whole, float masks with -inf and
with finfo.min, every broadcast shape and strided masks, causal and full, windows, grouped heads,
Tq != Tk, every dtype, with what models add; forward, log-sum-exp and the gradients of q, k, v and
of a float mask, under the project's rule; torch's SDPA; the ops' contract; attention(). Each kernel
test runs both kernels where fused applies (no window; Tk within `fused.max_seqlen`)."""

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import attention, flash_attention, fused_attention, reference
from attention_kernels.kernels.fused import max_seqlen
from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.testing.rule import hold_to_rule, make_qkv, seed_of

NEG_INF = float("-inf")


def random_mask(shape, kind, density, seed, dtype=torch.float32, grad=True):
    """A mask of `shape` that lets each key through with probability `density`: bool, or a float
    bias N(0, 1) with -inf where it hides (a leaf that requires grad, when `grad`)."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    keep = torch.rand(shape, generator=g, device=DEVICE) < density
    if kind == "bool":
        return keep
    bias = torch.randn(shape, generator=g, device=DEVICE).masked_fill(~keep, NEG_INF).to(dtype)
    return bias.requires_grad_(grad)


KERNELS = ["flash", "fused"]


def run(kernel, q, k, v, causal=True, window=None, **kwargs):
    """flash_attention, or fused_attention (which has no window and a row limit)."""
    if kernel == "flash":
        return flash_attention(q, k, v, causal=causal, window=window, **kwargs)
    assert window is None and k.shape[-2] <= max_seqlen(q.shape[-1], q.dtype), "fused does not apply"
    return fused_attention(q, k, v, causal=causal, **kwargs)


def check(q, k, v, do, mask, causal=True, window=None, lse=True, kernel="flash", **mods):
    """`kernel` with `mask` held to the rule against the reference: out, the log-sum-exp (unless
    lse=False) and the gradients of q, k, v, and of the mask when it requires grad."""
    w = window or (-1, -1)
    o, got_lse = run(kernel, q, k, v, causal, window, return_lse=True, attn_mask=mask, **mods)
    spec = lambda q, k, v, m=mask, upcast=True: reference.attention(q, k, v, causal, None, upcast, w, attn_mask=m,
                                                                     **mods)
    spec_lse = lambda q, k: reference.logsumexp(q, k, causal, None, w, attn_mask=mask.detach(), **mods)
    inputs = (q, k, v, mask) if mask.requires_grad else (q, k, v)
    hold_to_rule(o, got_lse if lse else None, inputs, do, spec, spec_lse)
    return o, got_lse


SHAPE = Shape(2, 4, 2, 37, 53, 16)  # grouped heads, lengths that miss the blocks


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("density", [0.05, 0.5, 0.95])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bool_masks_of_any_density(poison, kernel, density, causal):
    q, k, v, do = make_qkv(SHAPE, torch.float32, "bthd", seed_of("bool mask", density, causal))
    mask = random_mask((SHAPE.B, 1, SHAPE.Tq, SHAPE.Tk), "bool", density, seed_of("mask", density, causal))
    check(q, k, v, do, mask, causal, kernel=kernel)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_rows_the_mask_hides_whole_give_zeros(poison, kernel, kind):
    # full attention over 70 queries: flash's second query block (and the dk/dv kernel's first,
    # fused's too) takes the unmasked path, where a row the mask hides has lse = -inf too; fused's
    # whole row of -inf has its max held at 0
    shape = Shape(1, 2, 1, 70, 67, 16)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("hidden rows", kind))
    mask = random_mask((shape.Hq, shape.Tq, shape.Tk), kind, 0.5, seed_of("hidden rows mask", kind))
    hidden = [0, 5, 40, 66, 69]
    with torch.no_grad():
        mask[:, hidden] = False if kind == "bool" else NEG_INF
    o, lse = check(q, k, v, do, mask, causal=False, kernel=kernel)
    assert torch.equal(o[:, :, hidden], torch.zeros_like(o[:, :, hidden]))
    assert (lse[:, :, hidden] == NEG_INF).all()
    if kind == "float":
        assert torch.equal(mask.grad[:, hidden], torch.zeros_like(mask.grad[:, hidden]))


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # the interpreter's numpy, by design
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("kernel", KERNELS)
def test_finfo_min_hides_keys_as_minus_inf_does(poison, kernel, dtype):
    # transformers' masks hold finfo(dtype).min: past float32's range in base 2, so -inf there. Keys
    # it hides in a row that sees others weigh 0 as in the reference; a row of nothing else sees no
    # key (zeros, lse -inf), where the reference would average its values (docs/masks.md)
    shape = Shape(1, 2, 2, 40, 33, 16)
    q, k, v, do = make_qkv(shape, dtype, seed=seed_of("finfo.min", dtype))
    keep = random_mask((shape.Tq, shape.Tk), "bool", 0.5, seed_of("finfo.min mask", dtype))
    keep[[3, 17]] = False
    results = []
    for hide in (torch.finfo(dtype).min, NEG_INF):
        mask = torch.zeros(shape.Tq, shape.Tk, device=DEVICE, dtype=dtype).masked_fill(~keep, hide).requires_grad_()
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        o, lse = run(kernel, *leaves, causal=False, return_lse=True, attn_mask=mask)
        o.backward(do)
        results.append([o, lse] + [x.grad for x in leaves + [mask]])
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dmask"), *results):
        assert torch.equal(a, b), f"{name}: finfo.min and -inf differ by up to {(a - b).abs().max().item():.3g}"
    assert (results[0][0][:, :, [3, 17]] == 0).all() and (results[0][1][:, :, [3, 17]] == NEG_INF).all()


BROADCASTS = {  # name: the mask's shape, for (B, Hq, Tq, Tk)
    "TqTk": lambda B, H, Tq, Tk: (Tq, Tk),
    "11TqTk": lambda B, H, Tq, Tk: (1, 1, Tq, Tk),
    "B1TqTk": lambda B, H, Tq, Tk: (B, 1, Tq, Tk),
    "1H1Tk": lambda B, H, Tq, Tk: (1, H, 1, Tk),
    "BHTqTk": lambda B, H, Tq, Tk: (B, H, Tq, Tk),
    "HTqTk": lambda B, H, Tq, Tk: (H, Tq, Tk),
}


@pytest.mark.parametrize("i, name", list(enumerate(BROADCASTS)), ids=list(BROADCASTS))
@pytest.mark.parametrize("kernel", KERNELS)
def test_every_broadcast_shape_and_its_gradient(poison, kernel, i, name):
    # a float mask with -inf entries; its gradient summed over the dimensions it was broadcast along
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("broadcast", name))
    mask = random_mask(BROADCASTS[name](SHAPE.B, SHAPE.Hq, SHAPE.Tq, SHAPE.Tk), "float", 0.8,
                       seed_of("broadcast mask", name))
    check(q, k, v, do, mask, causal=i % 2 == 0, kernel=kernel)
    assert mask.grad.shape == mask.shape


# (shape, causal, window): windows (flash only), Tq > Tk (the first causal rows see no key),
# Tq < Tk, head dim 80, multi-query
CASES = [
    (Shape(1, 4, 1, 70, 40, 16), True, (8, 0)),
    (Shape(1, 4, 2, 40, 70, 80), False, (5, 3)),
    (Shape(2, 2, 2, 61, 19, 16), True, None),
    (Shape(1, 4, 4, 9, 66, 80), False, None),
]
KERNEL_CASES = [(kernel, *case) for case in CASES for kernel in KERNELS if kernel == "flash" or case[2] is None]


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("kernel, shape, causal, window", KERNEL_CASES, ids=str)
def test_windows_grouped_heads_and_lengths(poison, kernel, shape, causal, window, kind):
    q, k, v, do = make_qkv(shape, torch.float32, "bthd", seed_of("mask cases", shape, causal, window, kind))
    mask = random_mask((shape.B, shape.Hq, shape.Tq, shape.Tk), kind, 0.6, seed_of("mask", shape, kind))
    check(q, k, v, do, mask, causal, window, kernel=kernel)


@pytest.mark.parametrize("dtype, mask_dtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32), (torch.float16, torch.bool)],
                         ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("kernel", KERNELS)
def test_16_bit_inputs_and_masks(poison, kernel, dtype, mask_dtype):
    shape = Shape(1, 2, 2, 33, 47, 16)
    q, k, v, do = make_qkv(shape, dtype, seed=seed_of("16-bit mask", dtype, mask_dtype))
    kind = "bool" if mask_dtype == torch.bool else "float"
    mask = random_mask((1, shape.Hq, shape.Tq, shape.Tk), kind, 0.7, seed_of("mask", dtype, mask_dtype),
                       dtype=mask_dtype)
    check(q, k, v, do, mask, causal=True, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_strided_masks(poison, kernel):
    # a transposed float mask (key-major), a bool mask read every other column of a wider one, and
    # a mask broadcast by expand (stride 0): read where they lie, no copy; gradients like the mask
    q, k, v, do = make_qkv(SHAPE, torch.float32, "bthd", seed=seed_of("strided masks"))
    Tq, Tk = SHAPE.Tq, SHAPE.Tk
    base = random_mask((Tk, Tq), "float", 0.7, seed_of("transposed"), grad=False)
    transposed = base.t().detach().requires_grad_()                         # (Tq, Tk), strides (1, Tq)
    check(q, k, v, do, transposed, causal=False, kernel=kernel)
    assert transposed.grad.shape == (Tq, Tk)
    for x in (q, k, v):
        x.grad = None
    wide = random_mask((SHAPE.B, 1, Tq, 2 * Tk), "bool", 0.5, seed_of("every other"))
    check(q, k, v, do, wide[..., ::2], causal=True, kernel=kernel)
    for x in (q, k, v):
        x.grad = None
    row = random_mask((1, SHAPE.Hq, 1, Tk), "float", 0.9, seed_of("expanded"), grad=False)
    expanded = row.expand(SHAPE.B, SHAPE.Hq, Tq, Tk).detach().requires_grad_()  # a leaf with stride 0
    check(q, k, v, do, expanded, causal=True, kernel=kernel)


@pytest.mark.parametrize("kernel", KERNELS)
def test_with_softcap_alibi_and_sinks(poison, kernel):
    # the mask added after the soft-cap and ALiBi's bias: its gradient is dS, not through the cap
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("mask mods"))
    mask = random_mask((SHAPE.B, 1, SHAPE.Tq, SHAPE.Tk), "float", 0.7, seed_of("mask mods mask"))
    sinks = torch.randn(SHAPE.Hq, generator=torch.Generator(DEVICE).manual_seed(3), device=DEVICE)
    slopes = reference.alibi_slopes(SHAPE.Hq).to(DEVICE)
    check(q, k, v, do, mask, causal=False, kernel=kernel, softcap=3.0, sinks=sinks, alibi_slopes=slopes)


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_log_sum_exp_gradient_reaches_q_and_k_through_the_mask(poison, kernel):
    # a caller that uses the log-sum-exp (merging chunks): dlse shifts delta, masked keys included
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("mask dlse"))
    mask = random_mask((SHAPE.Tq, SHAPE.Tk), "bool", 0.4, seed_of("mask dlse mask"))
    o, lse = run(kernel, q, k, v, return_lse=True, attn_mask=mask)
    dlse = torch.randn(lse.shape, generator=torch.Generator(DEVICE).manual_seed(4), device=DEVICE)
    spec = lambda q, k, v, upcast=True: reference.attention(q, k, v, True, None, upcast, attn_mask=mask)
    spec_lse = lambda q, k: reference.logsumexp(q, k, True, attn_mask=mask)
    hold_to_rule(o, lse, (q, k, v), do, spec, spec_lse, dlse)


@pytest.mark.parametrize("kernel", KERNELS)
def test_matches_torch_sdpa(kernel):
    # float32, full attention (SDPA's is_causal is top-left aligned), grouped heads, Tq != Tk; a
    # float mask and a bool one that leave every row a key (SDPA's empty rows are NaN or 0 by backend)
    q, k, v, do = make_qkv(SHAPE, torch.float32, seed=seed_of("sdpa"))
    keep = random_mask((SHAPE.B, 1, SHAPE.Tq, SHAPE.Tk), "bool", 0.5, seed_of("sdpa keep"))
    keep[..., 0] = True
    bias = random_mask((SHAPE.Hq, SHAPE.Tq, SHAPE.Tk), "float", 1.0, seed_of("sdpa bias"), grad=False)
    for mask in (keep, bias.masked_fill(~keep, NEG_INF)):
        got_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        want_leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
        float_mask = mask.is_floating_point()
        got_mask, want_mask = (mask.clone().requires_grad_(float_mask) for _ in range(2))
        got = run(kernel, *got_leaves, causal=False, attn_mask=got_mask)
        want = F.scaled_dot_product_attention(*want_leaves, attn_mask=want_mask, enable_gqa=True)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        got.backward(do)
        want.backward(do)
        for name, a, b in zip(("dq", "dk", "dv", "dmask"), got_leaves + [got_mask], want_leaves + [want_mask]):
            if a.grad is not None or b.grad is not None:
                torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("kernel", KERNELS)
def test_the_mask_gradient_is_bitwise_repeatable(kernel):
    # one writer per element (the dq kernel) and a torch sum over the broadcast dimensions
    q, k, v, do = make_qkv(SHAPE, torch.float16, seed=seed_of("mask deterministic"))
    mask = random_mask((1, SHAPE.Hq, 1, SHAPE.Tk), "float", 0.8, seed_of("mask deterministic mask"),
                       dtype=torch.float16)
    grads = []
    for _ in range(2):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
        run(kernel, *leaves[:3], attn_mask=leaves[3]).backward(do)
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), *grads):
        assert torch.equal(a, b), f"{name} differs between two runs by up to {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_mask_that_needs_no_gradient_gets_none(kernel):
    q, k, v, do = make_qkv(Shape(1, 2, 1, 8, 9, 16), torch.float32, seed=seed_of("no mask grad"))
    mask = random_mask((8, 9), "float", 0.9, seed_of("no mask grad mask"), grad=False)
    run(kernel, q, k, v, attn_mask=mask).backward(do)
    assert mask.grad is None and q.grad is not None
    leaf = mask.clone().requires_grad_()
    run(kernel, *(x.detach() for x in (q, k, v)), attn_mask=leaf).backward(do)  # only the mask learns
    assert leaf.grad is not None and leaf.grad.shape == (8, 9)


def test_attention_passes_the_mask_to_every_impl_and_auto_chooses_as_without(monkeypatch):
    from attention_kernels.kernels import dispatch
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 16, 16, 16), torch.float32, seed=seed_of("attention mask"))
    mask = random_mask((16, 16), "float", 0.7, seed_of("attention mask mask"), grad=False)
    want = reference.attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    for impl in ("auto", "fused", "flash", "reference"):
        torch.testing.assert_close(attention(q, k, v, impl=impl, attn_mask=mask).double(), want, atol=1e-5, rtol=0)
    ran = []  # "auto" runs fused on this short row, the mask with it, as it would without a mask
    for name in ("fused_attention", "flash_attention"):
        kernel = getattr(dispatch, name)
        monkeypatch.setattr(dispatch, name, lambda *a, kernel=kernel, name=name, **kw: ran.append(
            (name, kw.get("attn_mask") is mask)) or kernel(*a, **kw))
    attention(q, k, v, attn_mask=mask)
    assert ran == [("fused_attention", True)]


@pytest.mark.parametrize("mask, error, words", [
    (torch.zeros(4, 4, dtype=torch.float64), TypeError, "attn_mask has dtype float64; accepted: bool"),
    (torch.zeros(4, 4, dtype=torch.int32), TypeError, "attn_mask has dtype int32"),
    (torch.zeros(3, 4, dtype=torch.bool), ValueError, (r"attn_mask of shape \(3, 4\) does not broadcast to the "
                                                       r"scores' shape \(B, Hq, Tq, Tk\) = \(1, 2, 4, 5\)")),
    (torch.zeros(1, 1, 1, 4, 5, dtype=torch.bool), ValueError, "at most 4 dimensions"),
    (torch.zeros(4, 5, device="meta"), ValueError, "attn_mask must be on q's device"),
    ([[True] * 5] * 4, TypeError, "attn_mask must be a torch.Tensor, bool"),
], ids=["float64", "int32", "shape", "5-d", "device", "list"])
@pytest.mark.parametrize("kernel", KERNELS)
def test_bad_masks_are_refused_clearly(kernel, mask, error, words):
    q = torch.randn(1, 2, 4, 16, device=DEVICE)
    k = torch.randn(1, 1, 5, 16, device=DEVICE)
    mask = mask.to(DEVICE) if isinstance(mask, torch.Tensor) and mask.device.type != "meta" else mask
    with pytest.raises(error, match=words):
        run(kernel, q, k, k, attn_mask=mask)


def test_opcheck():
    # the dense ops with a float mask: the forward (and its autograd, the mask's gradient included)
    # and the backward asked for the mask's gradient
    ops = torch.ops.attention_kernels
    q, k, v, do = make_qkv(Shape(1, 2, 1, 11, 13, 16), torch.float32, seed=seed_of("mask opcheck"))
    mask = random_mask((2, 1, 13), "float", 0.8, seed_of("mask opcheck mask"))
    d = [x.detach() for x in (q, k, v)]
    o, lse, _ = ops.flash_forward(*d, -1, 0, 0.3, 0.0, None, None, 0.0, 0, False, mask.detach())
    assert len(ops.flash_backward(*d, o, None, lse, do, None, -1, 0, 0.3, 0.0, None, None, 0.0, 0, mask.detach(),
                                  True)) == 5
    cases = [
        (ops.flash_forward.default, (q, k, v, -1, 0, 0.3, 0.0, None, None, 0.0, 0, False, mask), None),
        (ops.flash_forward.default, (q, k, v, -1, -1, 0.3, 0.0, None, None, 0.0, 0, False,
                                     mask.detach() > 0), ("test_schema", "test_autograd_registration",
                                                          "test_faketensor")),
        (ops.flash_backward.default, (*d, o, None, lse, do, None, -1, 0, 0.3, 0.0, None, None, 0.0, 0, mask.detach(),
                                      True), None),
    ]
    # the fused ops, the same way
    _, flse = ops.fused_forward(*d, True, 0.3, 0.0, None, None, 0.0, 0, mask.detach())
    assert len(ops.fused_backward(*d, flse, do, None, True, 0.3, 0.0, None, None, 0.0, 0, mask.detach(), True)) == 5
    cases += [
        (ops.fused_forward.default, (q, k, v, True, 0.3, 0.0, None, None, 0.0, 0, mask), None),
        (ops.fused_forward.default, (q, k, v, False, 0.3, 0.0, None, None, 0.0, 0, mask.detach() > 0),
         ("test_schema", "test_autograd_registration", "test_faketensor")),
        (ops.fused_backward.default, (*d, flse, do, None, True, 0.3, 0.0, None, None, 0.0, 0, mask.detach(), True),
         None),
    ]
    for op, args, utils in cases:
        results = torch.library.opcheck(op, args, **({} if utils is None else {"test_utils": utils}))
        assert set(results.values()) == {"SUCCESS"}, (op, results)


@pytest.mark.parametrize("kernel", KERNELS)
def test_compiles_without_graph_breaks(kernel):
    q, k, v, do = make_qkv(Shape(1, 4, 2, 19, 19, 16), torch.float32, seed=seed_of("mask compile"))
    mask = random_mask((4, 19, 19), "float", 0.8, seed_of("mask compile mask"), grad=False)
    fn = lambda q, k, v, m: run(kernel, q, k, v, causal=False, attn_mask=m)
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    results = []
    for f in (compiled, fn):
        leaves = [x.detach().clone().requires_grad_() for x in (q, k, v, mask)]
        out = f(*leaves)
        out.backward(do)
        results.append([out] + [x.grad for x in leaves])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
