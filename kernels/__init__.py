"""Triton kernels for causal scaled dot-product attention, tested against `reference`.

    attention(q, k, v, causal=True, scale=None, impl="auto")   picks fused or flash by shape
    flash_attention(q, k, v, ...)                               tiled: any length, backward
    fused_attention(q, k, v, ...)                               whole rows on chip: short rows
    flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)  packed sequences of any lengths
    decode_attention(q, k_cache, v_cache, cache_seqlens, ...)   new tokens against a KV cache (split-KV)

In models:

    scaled_dot_product_attention(query, key, value, ...)        torch's function, on the kernels
    patch_sdpa()                                                makes F.scaled_dot_product_attention it
    CausalSelfAttention(n_embd, n_head, ..., impl="flash")      nanoGPT's module; swap_attention(model)
    register_transformers(name="attention_kernels")            Hugging Face's attn_implementation

The kernels are also the torch ops `torch.ops.attention_kernels.{flash,fused}_{forward,backward}`
and `flash_varlen_{forward,backward}`, which torch.compile compiles without graph breaks (the
varlen function's host check of cu_seqlens is one; decode_attention is a plain function). Run on CUDA tensors on a GPU, or on CPU
tensors under Triton's interpreter: set TRITON_INTERPRET=1 before importing this package.
"""

from kernels.decode import decode_attention
from kernels.dispatch import attention, choose_impl
from kernels.flash import flash_attention, flash_attention_varlen
from kernels.fused import fused_attention
from kernels.hf import register_transformers
from kernels.module import CausalSelfAttention, swap_attention
from kernels.sdpa import patch_sdpa, scaled_dot_product_attention

__all__ = ["attention", "choose_impl", "flash_attention", "flash_attention_varlen", "decode_attention",
           "fused_attention", "scaled_dot_product_attention",
           "patch_sdpa", "CausalSelfAttention", "swap_attention", "register_transformers"]
