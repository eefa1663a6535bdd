"""The README's main command runs end to end (on small shapes here), and what it prints holds to
the project's rule: each kernel's error at most FACTOR times the reference's own in that dtype
(GRAD_FACTOR for gradients) plus the dtype's FLOOR at the tensor's scale."""

import pytest
import torch

from attention_kernels import reference
from attention_kernels.benchmarks import demo
from attention_kernels.testing.cases import FACTOR, FLOOR, GRAD_FACTOR

SHAPES = [(4, 4, 8, 4), (1, 1, 255, 128)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def truth_scales(shape, dtype):
    """max(1, max |truth|) of the output and of the gradients (dq, dk, dv together), float64 on
    the demo's inputs: the scale the rule's floor is taken at."""
    q, k, v, do = demo.inputs(shape, dtype)
    leaves = [x.detach().double().requires_grad_() for x in (q, k, v)]
    out = reference.attention(*leaves)
    out.backward(do.double())
    return max(1.0, out.abs().max().item()), max(1.0, *(x.grad.abs().max().item() for x in leaves))


def test_demo_prints_every_kernel_shape_and_dtype_within_the_rule(monkeypatch, capsys):
    monkeypatch.setattr(demo, "SHAPES", SHAPES)
    demo.main([])
    lines = capsys.readouterr().out.splitlines()
    fused = [line for line in lines if line.startswith("fused ")]
    flash = [line for line in lines if line.startswith("flash ")]
    assert len(fused) == len(flash) == len(SHAPES) * len(DTYPES)
    assert "refused: with head dim 128 and float32 it takes at most 128 keys" in fused[3]
    rows = [(SHAPES[i // 3], row) for i, row in enumerate(fused) if i != 3] + \
           [(SHAPES[i // 3], row) for i, row in enumerate(flash)]
    for shape, row in rows:
        fields = row.split()
        dtype = DTYPES[fields[-6]]
        out_err, ref_err, grad_err, ref_grad_err, ms = (float(x) for x in fields[-5:])
        out_scale, grad_scale = truth_scales(shape, dtype)
        floor = FLOOR[dtype]
        assert 0 < ref_err and 0 < ref_grad_err and ms > 0, row  # in low precision the reference rounds too
        assert out_err <= FACTOR * ref_err + floor * out_scale, row
        assert grad_err <= GRAD_FACTOR * ref_grad_err + floor * grad_scale, row


# A kernel off by a factor, the smallest each dtype's bound sees on the demo's founding shape
# (measured, flash as it is: its output error 0.004, 0.1 and 0.2 of the bound in fp32, fp16 and
# bf16, its gradients' 0.01, 0.07 and 0.3): 0.1% off in fp32, whose output then errs by 3.7e-3,
# which the former bound, 0.02 in every dtype, let through; 1% in fp16; 5% in bf16.
@pytest.mark.parametrize("dtype, off", [(torch.float32, 1.001), (torch.float16, 1.01), (torch.bfloat16, 1.05)],
                         ids=["float32", "float16", "bfloat16"])
def test_the_bound_sees_a_kernel_a_little_off(dtype, off):
    shape = SHAPES[0]
    wrong = lambda q, k, v, causal: demo.flash_attention(q, k, v, causal=causal) * off  # its gradients too
    out_err, ref_err, grad_err, ref_grad_err, _ = demo.run(wrong, shape, dtype)
    out_scale, grad_scale = truth_scales(shape, dtype)
    assert out_err > FACTOR * ref_err + FLOOR[dtype] * out_scale
    assert grad_err > GRAD_FACTOR * ref_grad_err + FLOOR[dtype] * grad_scale
