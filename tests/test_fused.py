"""What only the fused kernel has: a row limit."""

import pytest
import torch

from attention_kernels.testing.cases import Shape
from attention_kernels.kernels import fused_attention
from attention_kernels.kernels.fused import max_seqlen
from attention_kernels.testing.rule import check_against_reference, make_qkv, seed_of


def test_at_the_row_limit(poison):
    shape = Shape(1, 1, 1, 16, max_seqlen(128, torch.float32), 128)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("limit"))
    check_against_reference(fused_attention, q, k, v, do, causal=True)


def test_beyond_the_row_limit_names_flash():
    limit = max_seqlen(64, torch.float16)
    q, k, v, _ = make_qkv(Shape(1, 1, 1, 4, limit + 1, 64), torch.float16)
    with pytest.raises(ValueError, match=rf"(?s)at most {limit} keys.*Tk={limit + 1}.*flash_attention"):
        fused_attention(q, k, v)
