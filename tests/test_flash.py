"""What only the flash kernel has: tiles of any size, any length, memory linear in T."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from attention_kernels import reference
from attention_kernels.testing.cases import Shape
from attention_kernels.kernels import flash, flash_attention
from attention_kernels.kernels.checks import INTERPRET
from attention_kernels.kernels.fused import max_seqlen
from attention_kernels.testing.rule import check_against_reference, make_qkv, seed_of

# (fwd and dq blocks, dk/dv blocks) as (BLOCK_M, BLOCK_N): equal, and unequal both ways round
BLOCKS = [((16, 16), (16, 16)), ((16, 64), (64, 16)), ((64, 16), (16, 64))]


@pytest.mark.skipif(not INTERPRET, reason="on a GPU the blocks are autotuned, not set")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [Shape(1, 2, 1, 97, 40, 32), Shape(1, 4, 2, 40, 97, 80),
                                   Shape(1, 2, 2, 113, 203, 64)], ids=str)
@pytest.mark.parametrize("blocks", BLOCKS, ids=str)
def test_any_block_sizes(poison, monkeypatch, blocks, shape, dtype, causal):
    # The causal limits (blocks skipped, blocks masked) must hold for every BLOCK_M, BLOCK_N pair
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "fwd", blocks[0])
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "dq", blocks[0])
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "dkdv", blocks[1])
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of(blocks, shape, dtype, causal))
    check_against_reference(flash_attention, q, k, v, do, causal)


def test_beyond_the_fused_row_limit(poison):
    shape = Shape(1, 2, 1, 300, 3 * max_seqlen(128, torch.float32) + 5, 128)
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("long"))
    check_against_reference(flash_attention, q, k, v, do, causal=True)


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any torch op hands back: every
    allocation, the launchers' torch.empty and the interpreter's copies of the arguments."""

    def __init__(self):
        super().__init__()
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self.bytes = max(self.bytes, t.numel() * t.element_size())
        return out


def largest_tensor(attention, shape):
    q, k, v, do = make_qkv(shape, torch.float32, seed=seed_of("memory", shape))
    attention(q, k, v).backward(do)  # a GPU autotunes on the first call, with a 256 MiB cache-flush buffer
    with LargestTensor() as mode:
        attention(q, k, v).backward(do)
    return mode.bytes


def test_memory_is_linear_in_T():
    # Forward + backward: flash makes nothing larger than q (B * H * T * D); the reference makes
    # the scores (B * H * T * T). Doubling T doubles the first and quadruples the second.
    for T in (256, 512):
        shape = Shape(1, 2, 2, T, T, 16)
        bhtd, bhtt = 2 * T * 16 * 4, 2 * T * T * 4  # fp32 bytes
        assert largest_tensor(flash_attention, shape) <= bhtd
        assert largest_tensor(reference.attention, shape) == bhtt


@pytest.mark.gpu
def test_memory_is_linear_in_T_gpu():
    B, H, T, D = 1, 16, 16384, 128
    q, k, v, do = make_qkv(Shape(B, H, H, T, T, D), torch.bfloat16, seed=seed_of("memory", "gpu"))
    flash_attention(q, k, v).backward(do)  # autotuning, and its 256 MiB cache-flush buffer, happen here
    for x in (q, k, v):
        x.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    flash_attention(q, k, v).backward(do)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    bhtd = B * H * T * D * q.element_size()
    # o, dq, dk, dv and the fp32 (B, H, T) lse and delta; the reference's fp32 scores alone
    # would be B * H * T * T * 4 bytes = 16 GiB
    assert extra <= 4 * bhtd + 2 * B * H * T * 4 + (1 << 20), \
        f"flash forward + backward took {extra / 2**20:.0f} MiB beyond its inputs, q is {bhtd / 2**20:.0f} MiB"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [Shape(1, 1, 1, 16384, 16384, 64), Shape(1, 2, 1, 8191, 16384, 128),
                                   Shape(2, 4, 2, 4096, 4096, 256), Shape(1, 2, 2, 3000, 1000, 256)], ids=str)
def test_long_sequences_gpu(poison, shape, dtype):
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of("long", shape, dtype))
    check_against_reference(flash_attention, q, k, v, do, causal=True)
