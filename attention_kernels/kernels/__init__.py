"""Triton kernels for causal scaled dot-product attention, tested against `reference`.

    attention(q, k, v, causal=True, impl="auto", ...)          picks fused or flash by shape; every flash keyword
    flash_attention(q, k, v, ...)                               tiled: any length, backward
    fused_attention(q, k, v, ...)                               whole rows on chip: short rows
    flash_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, ...)  packed sequences of any lengths
    decode_attention(q, k_cache, v_cache, cache_seqlens, ...)   new tokens against a KV cache (split-KV)
    paged_attention(q, k_cache, v_cache, block_table, ...)      prefill chunks and decoding over a paged cache
    mla_decode(q, kv_cache, block_table, ...)                   DeepSeek's latent attention, decoding (one latent head)
    cascade_attention(q, k_prefix, v_prefix, k_cache, ...)      a prefix shared by the batch attended once, merged
    merge_attention_states(o_a, lse_a, o_b, lse_b)              two attentions over disjoint keys joined by their lse
    dropout_mask(B, Hq, Tq, Tk, dropout_p, seed, device)        the weights a flash call's dropout keeps
    block_map(mask or mask_mod, Tq, Tk, ...)                    the key blocks a mask lets each query block see
    MaskMod, ScoreMod; kernels.mods                             mask and score functions in Triton, ready-made ones
    ring_attention(q, k, v, group=None, layout="zigzag", ...)   one sequence split across processes
    ring_attention_varlen(q, k, v, cu_seqlens, group=None, ...) (torch.distributed), or a packed batch;
                                                                shard_sequence, gather_sequence and
                                                                shard_positions cut and rejoin them

In models:

    scaled_dot_product_attention(query, key, value, ...)        torch's function, on the kernels
    patch_sdpa()                                                makes F.scaled_dot_product_attention it
    CausalSelfAttention(n_embd, n_head, ..., impl="flash")      nanoGPT's module; swap_attention(model)
    register_transformers(name="attention_kernels")            Hugging Face's attn_implementation

The kernels are also the torch ops `torch.ops.attention_kernels.{flash,fused}_{forward,backward}`
and `flash_varlen_{forward,backward}`, which torch.compile compiles without graph breaks (the
varlen function's host check of cu_seqlens is one; decode_attention is a plain function). Run on CUDA tensors on a GPU, or on CPU
tensors under Triton's interpreter: set TRITON_INTERPRET=1 before importing this package.
The same functions are `attention_kernels.flash_attention` and so on.
"""

from .decode import decode_attention
from .distributed import gather_sequence, ring_attention, ring_attention_varlen, shard_positions, shard_sequence
from .dispatch import attention, choose_impl
from .blockmap import BlockMap, block_map
from .cascade import cascade_attention, merge_attention_states
from .dropout import dropout_mask
from .mods import MaskMod, ScoreMod
from .flash import flash_attention, flash_attention_varlen
from .fused import fused_attention
from .mla import mla_decode
from .paged import PagedKVCache, paged_attention
from .hf import register_transformers
from .module import CausalSelfAttention, swap_attention
from .sdpa import patch_sdpa, scaled_dot_product_attention
from . import tuning  # noqa: F401  (attention_kernels.kernels.tuning, the tile table's command)

__all__ = ["attention", "choose_impl", "flash_attention", "flash_attention_varlen", "decode_attention", "dropout_mask",
           "block_map", "BlockMap", "MaskMod", "ScoreMod", "paged_attention", "PagedKVCache", "mla_decode",
           "cascade_attention", "merge_attention_states",
           "fused_attention", "scaled_dot_product_attention",
           "patch_sdpa", "CausalSelfAttention", "swap_attention", "register_transformers", "ring_attention",
           "ring_attention_varlen", "shard_sequence", "gather_sequence", "shard_positions"]
