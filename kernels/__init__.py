"""Triton kernels for causal scaled dot-product attention, tested against `reference`.

Run on CUDA tensors on a GPU, or on CPU tensors under Triton's interpreter: set
TRITON_INTERPRET=1 before importing this package.
"""

from kernels.fused import fused_attention

__all__ = ["fused_attention"]
