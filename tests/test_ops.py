"""The kernels as torch custom ops: opcheck's contract, and torch.compile(fullgraph=True).

On the CPU the ops are opaque custom ops (the interpreter cannot run a kernel on torch.compile's
fake tensors), so compiling there shows no graph breaks and the right answer; on a GPU they are
triton_ops, and the `gpu` tests check that Inductor's generated code launches our kernels itself.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.kernels import CausalSelfAttention, attention, flash_attention, fused_attention
from attention_kernels.testing.rule import make_qkv, seed_of

OPS = torch.ops.attention_kernels
SHAPE = Shape(2, 4, 2, 19, 23, 16)  # grouped heads, Tq != Tk, lengths that miss the blocks


def opcheck_args(layout):
    q, k, v, do = make_qkv(SHAPE, torch.float32, layout=layout, seed=seed_of("opcheck", layout))
    o, lse, _ = OPS.flash_forward(q.detach(), k.detach(), v.detach(), -1, 0, 0.3, 0.0, None, None, 0.0, 0, False)
    return q, k, v, do, o, lse


def packed_args(seed):
    """A packed batch of lengths (5, 0, 14) for q and (9, 3, 11) for k, v: (total, H, D) tensors."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    q, do = (torch.randn(19, 4, 16, generator=g, device=DEVICE) for _ in range(2))
    k, v = (torch.randn(23, 2, 16, generator=g, device=DEVICE) for _ in range(2))
    cu_q = torch.tensor([0, 5, 5, 19], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 9, 12, 23], dtype=torch.int32, device=DEVICE)
    return q, k, v, do, cu_q, cu_k


@pytest.mark.parametrize("layout", ["contiguous", "bthd"])
def test_opcheck(layout):
    q, k, v, do, o, lse = opcheck_args(layout)
    d = [x.detach() for x in (q, k, v)]
    cases = [
        (OPS.flash_forward.default, (q, k, v, -1, 0, 0.3, 0.0, None, None, 0.0, 0, False)),
        (OPS.flash_forward.default, (q, k, v, 3, 2, 0.3, 0.0, None, None, 0.0, 0, False)),  # a window
        (OPS.fused_forward.default, (q, k, v, False, 0.3, 0.0, None, None, 0.0, 0)),
        (OPS.flash_backward.default, (*d, o, None, lse, do, None, -1, 0, 0.3, 0.0, None, None, 0.0, 0)),
        (OPS.flash_backward.default, (*d, o, None, lse, do, torch.randn_like(lse), -1, 0, 0.3, 0.0, None, None, 0.0, 0)),
        (OPS.fused_backward.default, (*d, lse, do, None, True, 0.3, 0.0, None, None, 0.0, 0)),
    ]
    # what models add: a soft-cap, sinks (with their gradient) and ALiBi slopes
    sinks, slopes = torch.randn(q.shape[1], device=q.device), torch.rand(q.shape[1], device=q.device)
    mo, mlse, _ = OPS.flash_forward(*d, -1, 0, 0.3, 2.0, sinks, slopes, 0.0, 0, False)
    cases += [
        (OPS.flash_forward.default, (q, k, v, -1, 0, 0.3, 2.0, sinks.clone().requires_grad_(), slopes, 0.0, 0, False)),
        (OPS.flash_backward.default, (*d, mo, None, mlse, do, None, -1, 0, 0.3, 2.0, sinks, slopes, 0.0, 0)),
        (OPS.fused_forward.default, (q, k, v, True, 0.3, 2.0, sinks.clone().requires_grad_(), slopes, 0.0, 0)),
    ]
    # dropout: the same seed in the forward and the backward
    do_, dlse_, _ = OPS.flash_forward(*d, -1, 0, 0.3, 0.0, None, None, 0.25, 11, False)
    cases += [
        (OPS.flash_forward.default, (q, k, v, -1, 0, 0.3, 0.0, None, None, 0.25, 11, False)),
        (OPS.flash_backward.default, (*d, do_, None, dlse_, do, None, -1, 0, 0.3, 0.0, None, None, 0.25, 11)),
        (OPS.fused_forward.default, (q, k, v, True, 0.3, 0.0, None, None, 0.25, 11)),
    ]
    # 16-bit: the forward also returns O's rounding residual, which the backward reads
    h = [x.half() for x in d]
    ho, hlse, hres = OPS.flash_forward(*h, -1, 0, 0.3, 0.0, None, None, 0.0, 0, True)
    assert hres.shape == ho.shape
    cases += [
        (OPS.flash_forward.default, (*[x.clone().requires_grad_() for x in h], -1, 0, 0.3, 0.0, None, None, 0.0, 0, True)),
        (OPS.flash_backward.default, (*h, ho, hres, hlse, do.half(), None, -1, 0, 0.3, 0.0, None, None, 0.0, 0)),
    ]
    pq, pk, pv, pdo, cu_q, cu_k = packed_args(seed_of("opcheck packed", layout))
    if layout == "bthd":  # (H, total, D) storage: strided rows
        pq, pk, pv = (x.transpose(0, 1).contiguous().transpose(0, 1) for x in (pq, pk, pv))
    packed = (cu_q, cu_k, 14, 11, -1, 0, 0.3, 0.0, None, None, 0.25, 7)  # with dropout
    po, plse, _ = OPS.flash_varlen_forward(pq, pk, pv, *packed, False)
    cases += [
        (OPS.flash_varlen_forward.default, (pq.requires_grad_(), pk.requires_grad_(), pv.requires_grad_(), *packed,
                                            False)),
        (OPS.flash_varlen_backward.default, (pq.detach(), pk.detach(), pv.detach(), po, None, plse, pdo, None,
                                             *packed)),
    ]
    if layout == "bthd":  # strides matter to the plain flash and packed ops; the variants are checked contiguous
        cases = [cases[0], cases[3]] + cases[-2:]
    plain = {id(c) for c in cases[:6] + cases[-2:]}
    for case in cases:
        op, args = case
        # the variants (soft-cap, sinks and slopes; dropout; 16-bit with the residual) take the same
        # path through torch as the plain ops: aot_autograd's dynamic-shape replay, the slow check
        # under the interpreter, runs on the plain ones
        utils = None if id(case) in plain else ("test_schema", "test_autograd_registration", "test_faketensor")
        results = torch.library.opcheck(op, args, **({} if utils is None else {"test_utils": utils}))
        assert set(results.values()) == {"SUCCESS"}, (op, results)


def test_gpu_ops_name_their_kernels():
    """On a GPU the ops are triton_ops; torch reads `wrap_triton(<kernel>)` in their source to
    know which kernels each launches (its compile cache key changes when they do). Checked in a
    process without the interpreter, where the GPU registration happens even on a CPU machine."""
    script = ("import attention_kernels.kernels; from torch._library.triton import triton_ops_to_kernels as t; "
              "print({op: sorted(k.fn.__name__ for k in ks) for op, ks in t.items() if op.startswith('attention_')})")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    found = eval(subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                                check=True).stdout)
    assert found == {
        "attention_kernels::flash_forward": ["_flash_fwd"],
        "attention_kernels::flash_backward": ["_flash_bwd_delta", "_flash_bwd_dkdv", "_flash_bwd_dq"],
        "attention_kernels::flash_varlen_forward": ["_flash_fwd"],
        "attention_kernels::flash_varlen_backward": ["_flash_bwd_delta", "_flash_bwd_dkdv", "_flash_bwd_dq"],
        "attention_kernels::fused_forward": ["_fused_fwd"],
        "attention_kernels::fused_backward": ["_flash_bwd_dkdv", "_fused_bwd_dq"],
        "attention_kernels::decode": ["_decode_merge", "_decode_split"],
        "attention_kernels::paged": ["_decode_merge", "_decode_split"],
        "attention_kernels::paged_append": ["_append_kv"],
        "attention_kernels::mla": ["_decode_merge", "_mla_split"],
        "attention_kernels::mla_append": ["_mla_append"],
    }


def test_importing_under_the_interpreter_leaves_inductor_unloaded():
    """torch._inductor, with torch._dynamo under it, takes seconds to import; under the interpreter
    only compiling needs it. (On a GPU, torch.library.triton_op imports it while registering each
    op, to read the op's kernels from its source, as the test above relies on.)"""
    script = ("import sys, attention_kernels, attention_kernels.kernels, attention_kernels.benchmarks.sweep; "
              "print(sorted(m for m in ('torch._inductor', 'torch._dynamo') if m in sys.modules))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    loaded = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"


class TinyBlock(nn.Module):
    def __init__(self, impl):
        super().__init__()
        self.ln = nn.LayerNorm(32)
        self.attn = CausalSelfAttention(32, 4, n_kv_head=2, impl=impl)

    def forward(self, x):
        return x + self.attn(self.ln(x))


def compiled_matches_eager(model, x, backend, dynamic=None):
    torch._dynamo.reset()
    model.zero_grad()
    compiled = torch.compile(model, fullgraph=True, backend=backend, dynamic=dynamic)  # fullgraph: no breaks
    got = compiled(x)
    got.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    want = model(x)
    want.sum().backward()
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    for g, p in zip(grads, model.parameters()):
        assert torch.allclose(g, p.grad, atol=1e-4), (g - p.grad).abs().max()


@pytest.mark.parametrize("impl", ["flash", "fused"])
def test_model_compiles_without_graph_breaks(impl):
    torch.manual_seed(seed_of("compile", impl))
    model = TinyBlock(impl).to(DEVICE)
    x = torch.randn(2, 11, 32, device=DEVICE)
    compiled_matches_eager(model, x, backend="aot_eager")


def test_model_compiles_with_inductor_and_dynamic_shapes():
    torch.manual_seed(seed_of("inductor"))
    model = TinyBlock("auto").to(DEVICE)
    compiled_matches_eager(model, torch.randn(2, 11, 32, device=DEVICE), backend="inductor")
    compiled_matches_eager(model, torch.randn(3, 7, 32, device=DEVICE), backend="aot_eager", dynamic=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kernel, name", [(flash_attention, "_flash_fwd"), (fused_attention, "_fused_fwd")])
def test_inductor_launches_the_kernels_itself(kernel, name, dtype):
    from torch._inductor.utils import run_and_get_code
    q, k, v, _ = make_qkv(Shape(2, 8, 2, 128, 128, 64), dtype, seed=seed_of("inductor-code", name))
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: kernel(q, k, v) * 2, fullgraph=True)
    out, code = run_and_get_code(fn, q, k, v)
    assert name in "\n".join(code), "the triton_op was not traced into: Inductor calls it as an opaque op"
    assert torch.allclose(out, attention(q, k, v, impl="reference") * 2, atol=2e-2)


@pytest.mark.gpu
def test_gpu_model_compiles_with_dynamic_shapes():
    torch.manual_seed(seed_of("gpu-dynamic"))
    model = TinyBlock("flash").to(DEVICE)
    for B, T in ((2, 100), (3, 257)):
        compiled_matches_eager(model, torch.randn(B, T, 32, device=DEVICE), backend="inductor", dynamic=True)


@pytest.mark.gpu
def test_gpu_compiles_with_dynamic_head_dims():
    fn = torch.compile(lambda q, k, v: flash_attention(q, k, v), fullgraph=True, dynamic=True)
    for D in (80, 128):  # head dims above 64 select another autotuning table
        q, k, v, _ = make_qkv(Shape(2, 4, 2, 97, 97, D), torch.float16, seed=seed_of("dyn-d", D))
        assert torch.allclose(fn(q, k, v), attention(q, k, v, impl="reference"), atol=2e-2)


def test_decode_and_paged_are_ops_that_compile_whole(poison):
    """decode_attention and paged_attention (its append, which writes the pool in place, too) are
    torch ops: opcheck's contract, and torch.compile(fullgraph=True) with the host checks off
    (check_seqlens=False, check=False) has no graph break and gives the eager answer."""
    from attention_kernels.kernels import decode_attention, paged_attention
    from attention_kernels.testing.checks import paged_inputs
    g = torch.Generator(DEVICE).manual_seed(seed_of("decode op"))
    q, k, v = (torch.randn(shape, generator=g, device=DEVICE) for shape in ((2, 4, 3, 16), (2, 2, 40, 16),
                                                                            (2, 2, 40, 16)))
    lengths = torch.tensor([5, 40], dtype=torch.int32, device=DEVICE)
    mods = (2.0, torch.randn(4, generator=g, device=DEVICE), torch.rand(2, 4, generator=g, device=DEVICE))
    for args in [(q, k, v, lengths, 0.25, None, -1, 0, 0.0, None, None), (q, k, v, lengths, 0.25, 3, 4, -1, *mods)]:
        assert set(torch.library.opcheck(OPS.decode.default, args).values()) == {"SUCCESS"}
    pq, pool_k, pool_v, table, seqlens, cu = paged_inputs((1, 3), (9, 20), 4, 2, 16, 4, torch.float32, 7)
    k_new, v_new = (torch.randn(4, 2, 16, generator=g, device=DEVICE) for _ in range(2))
    assert set(torch.library.opcheck(OPS.paged.default, (pq, pool_k, pool_v, table, seqlens, cu, 3, 0.25, None,
                                                         -1, 0, 0.0, None, None)).values()) == {"SUCCESS"}
    before = seqlens - torch.tensor([1, 3], dtype=torch.int32, device=DEVICE)  # room for the new tokens' keys
    assert set(torch.library.opcheck(OPS.paged_append.default, (k_new, v_new, pool_k.clone(), pool_v.clone(), table,
                                                                before, cu, 3)).values()) == {"SUCCESS"}

    step = lambda q, k, v, lengths: decode_attention(q, k, v, lengths, check_seqlens=False, num_splits=2)
    torch.testing.assert_close(torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lengths),
                               step(q, k, v, lengths), rtol=0, atol=0)

    def serve(q, pool_k, pool_v):
        return paged_attention(q, pool_k, pool_v, table, before, cu, 3, k_new=k_new, v_new=v_new, check=False)

    eager_k, eager_v, compiled_k, compiled_v = pool_k.clone(), pool_v.clone(), pool_k.clone(), pool_v.clone()
    want = serve(pq, eager_k, eager_v)
    got = torch.compile(serve, fullgraph=True, backend="aot_eager")(pq, compiled_k, compiled_v)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert torch.equal(compiled_k, eager_k) and torch.equal(compiled_v, eager_v)  # the append wrote the same pages
