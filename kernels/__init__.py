"""Triton kernels for causal scaled dot-product attention, tested against `reference`.

    attention(q, k, v, causal=True, scale=None, impl="auto")   picks fused or flash by shape
    flash_attention(q, k, v, ...)                               tiled: any length, backward
    fused_attention(q, k, v, ...)                               whole rows on chip: short rows

Run on CUDA tensors on a GPU, or on CPU tensors under Triton's interpreter: set
TRITON_INTERPRET=1 before importing this package.
"""

from kernels.dispatch import attention, choose_impl
from kernels.flash import flash_attention
from kernels.fused import fused_attention

__all__ = ["attention", "choose_impl", "flash_attention", "fused_attention"]
