"""
Attention-weight dropout in the flash and fused kernels: which weights a call keeps, and its seed.

A call with dropout_p > 0 draws one 62-bit seed from torch's default generator (so
`torch.manual_seed` makes a run reproducible) or takes `dropout_seed`. The kernels decide each
weight (b, h, i, j) with Philox 4x32 keyed by that seed (`common.dropout_keep`): the forward
drops weights after the softmax and scales the kept ones by 1 / (1 - p); the backward regenerates
the same decisions, so no mask is ever stored. `dropout_mask` writes the decisions of a call out,
for tests and the explain trace: the reference given that mask is the truth.
"""

import numbers

import torch
import triton
import triton.language as tl

from .checks import _is_int, as_device, as_int
from .common import dropout_keep, on_device, wrap_triton


def check_dropout(dropout_p, dropout_seed=None):
    """dropout_p as a float in [0, 1), and the seed to use (None when there is no dropout)."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"dropout_p must be a real number in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1) (the probability of dropping a weight), got {dropout_p}")
    if isinstance(dropout_seed, torch.Tensor):  # a 0-d integer tensor, read once; others refused by name
        dropout_seed = as_int(dropout_seed, "dropout_seed", "an int in [0, 2**63) or None")
    if dropout_seed is not None and (not _is_int(dropout_seed) or not 0 <= dropout_seed < 2 ** 63):
        raise ValueError(f"dropout_seed must be an int in [0, 2**63) or None, got {dropout_seed!r}")
    if dropout_p == 0.0:
        return 0.0, 0
    return float(dropout_p), draw_seed() if dropout_seed is None else int(dropout_seed)  # a numpy int too


def draw_seed():
    """A seed for one call's dropout, from torch's default generator."""
    return int(torch.randint(0, 2 ** 62, (), dtype=torch.int64).item())


@triton.jit
def _dropout_mask(KEEP, seed, p_drop, Tq, Tk, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(0)  # b * Hq + h, as the attention kernels number a head
    offs_m = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    base = KEEP + bh.to(tl.int64) * Tq * Tk
    for start in range(0, Tk, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        keep = dropout_keep(seed, bh, offs_m[:, None], offs_n[None, :], p_drop)
        ok = (offs_m < Tq)[:, None] & (offs_n < Tk)[None, :]
        tl.store(base + offs_m[:, None].to(tl.int64) * Tk + offs_n[None, :], keep.to(tl.int8), mask=ok)


def dropout_mask(B, Hq, Tq, Tk, dropout_p, seed, device):
    """The (B, Hq, Tq, Tk) bool mask of the weights a flash or fused call with this dropout_p and seed
    keeps: weight (b, h, i, j) of query i and key j, positions in their sequence. For a packed
    batch, sequence b's mask is [b, :, :len_q, :len_k] of the mask for (B, Hq, max_seqlen_q,
    max_seqlen_k). Checked like a kernel call's dropout: sizes >= 1, p in [0, 1), a seed in [0, 2**63)."""
    B, Hq, Tq, Tk = (as_int(n, name, "an int >= 1") for n, name in ((B, "B"), (Hq, "Hq"), (Tq, "Tq"), (Tk, "Tk")))
    for name, n in (("B", B), ("Hq", Hq), ("Tq", Tq), ("Tk", Tk)):
        if n < 1:
            raise ValueError(f"{name} must be an int >= 1, got {n}")
    if seed is None:
        raise TypeError("seed must be the call's dropout seed, an int in [0, 2**63), got None")
    dropout_p, _ = check_dropout(dropout_p, seed)
    seed = int(seed)  # checked: an integer of any kind, in [0, 2**63)
    device = as_device(device, "device")
    keep = torch.empty(B, Hq, Tq, Tk, dtype=torch.int8, device=device)
    block_m, block_n = 32, 32
    with on_device(keep):
        wrap_triton(_dropout_mask)[(B * Hq, triton.cdiv(Tq, block_m))](
            KEEP=keep, seed=seed, p_drop=float(dropout_p), Tq=Tq, Tk=Tk, BLOCK_M=block_m, BLOCK_N=block_n,
        )
    return keep.bool()
