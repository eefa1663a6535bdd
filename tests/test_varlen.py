"""Packed variable-length batches on the flash kernel: flash_attention_varlen against
`reference.varlen_attention`, forward and backward, and its input checks."""

import pytest
import torch

from attention_kernels.testing.checks import check_varlen
from attention_kernels.testing.cases import DEVICE, VARLEN_CASES
from attention_kernels.kernels import flash_attention_varlen
from attention_kernels.testing.rule import make_packed, seed_of


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=str)
def test_varlen_matches_reference(poison, case, dtype):
    check_varlen(*case, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_varlen_peaky_softmax(poison, dtype):
    # short sequences at a large scale: one key takes each row (see test_kernels' peaky test)
    check_varlen((2, 1, 6), (2, 1, 3), 2, 1, 64, False, None, dtype, scale=6.0)


def test_varlen_log_sum_exp_is_differentiable(poison):
    check_varlen((7, 1, 45), (19, 3, 45), 4, 2, 32, True, None, torch.float16, use_lse=True)


def test_varlen_strided_rows(poison):
    # (H, total, D) storage: rows are not adjacent, and the kernel reads them in place
    check_varlen((7, 0, 45), (7, 3, 45), 4, 2, 32, True, None, torch.float32, strided=True)


def test_varlen_equals_one_call_per_sequence(poison):
    # The packed call and separate calls on each sequence give the same numbers
    from attention_kernels.kernels import flash_attention
    lengths = (9, 33, 1)
    q, k, v, _, cu, _ = make_packed(lengths, lengths, 2, 1, 16, torch.float32, seed_of("separate"))
    o = flash_attention_varlen(q, k, v, cu, cu, 33, 33)
    for a, b in zip(cu.tolist(), cu[1:].tolist()):
        one = lambda x: x[a:b].transpose(0, 1)[None]  # (1, H, T, D)
        torch.testing.assert_close(o[a:b], flash_attention(one(q), one(k), one(v))[0].transpose(0, 1),
                                   rtol=0, atol=1e-6)


def test_unchecked_offsets_give_the_same_result(poison, monkeypatch):
    # check_seqlens=False: no host read of the offsets (a .tolist() would fail here), same numbers
    q, k, v, _, cu, _ = make_packed((4, 0, 19), (4, 0, 19), 2, 1, 16, torch.float32, seed_of("unchecked"))
    checked = flash_attention_varlen(q, k, v, cu, cu, 19, 19)
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: pytest.fail("the offsets were read on the host"))
    torch.testing.assert_close(flash_attention_varlen(q, k, v, cu, cu, 19, 19, check_seqlens=False), checked,
                               rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"max_seqlen_k must be an int, got 19.0 \(float\)"):
        flash_attention_varlen(q, k, v, cu, cu, 19, 19.0, check_seqlens=False)
    with pytest.raises(ValueError, match="max_seqlen_k must be an int from 0 to the packed length 23"):
        flash_attention_varlen(q, k, v, cu, cu, 19, 24, check_seqlens=False)


def packed():
    q, k, v, _, cu, _ = make_packed((3, 5), (3, 5), 2, 2, 16, torch.float32)
    return q.detach(), k.detach(), v.detach(), cu


I32 = dict(dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("change, message", [
    (lambda a: {**a, "cu_seqlens_q": a["cu_seqlens_q"].long()}, "cu_seqlens_q must be a 1-D int32 tensor"),
    (lambda a: {**a, "cu_seqlens_k": a["cu_seqlens_k"][None]}, "cu_seqlens_k must be a 1-D int32 tensor"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([0], **I32)}, "B \\+ 1 >= 2 offsets"),
    (lambda a: {**a, "cu_seqlens_q": [0, 3, 8]}, "must be a torch.Tensor"),
    (lambda a: {**a, "cu_seqlens_q": torch.tensor([0, 6, 5], **I32)}, "never decrease"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 3, 7], **I32)}, "end at the packed length 8"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([1, 3, 8], **I32)}, "start at 0"),
    (lambda a: {**a, "cu_seqlens_k": torch.tensor([0, 8], **I32)}, "the same number of sequences"),
    (lambda a: {**a, "max_seqlen_q": 4}, "max_seqlen_q must be an int >= the longest sequence, 5"),
    (lambda a: {**a, "max_seqlen_k": 5.0}, "max_seqlen_k must be an int"),
    # it sizes the grid: 2**40 launched ~2**36 programs (a hang under the interpreter, past CUDA's grid)
    (lambda a: {**a, "max_seqlen_q": 2**40}, "max_seqlen_q must be an int from 0 to the packed length 8"),
    (lambda a: {**a, "max_seqlen_k": 9}, "max_seqlen_k must be an int from 0 to the packed length 8"),
    (lambda a: {**a, "q": a["q"][None]}, "q must have 3 dimensions \\(total_tokens, H, D\\)"),
    (lambda a: {**a, "v": a["v"][:, :1]}, "k and v must have the same shape"),
    (lambda a: {**a, "q": a["q"].double()}, "q has dtype float64"),
    (lambda a: {**a, "k": a["k"][:0], "v": a["v"][:0]}, "k holds no tokens"),
])
def test_bad_packed_inputs_are_refused(change, message):
    q, k, v, cu = packed()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=5, max_seqlen_k=5)
    with pytest.raises((ValueError, TypeError), match=message):
        flash_attention_varlen(**change(args))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_varlen_long_gpu(poison, dtype):
    g = torch.Generator().manual_seed(seed_of("varlen gpu", dtype))
    lengths = [0, 1, *torch.randint(1, 3000, (14,), generator=g).tolist()]
    check_varlen(lengths, lengths, 16, 4, 128, True, None, dtype)
    check_varlen(lengths, lengths[::-1], 8, 8, 64, False, (200, 100), dtype)
