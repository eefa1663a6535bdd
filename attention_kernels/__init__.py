"""
attention-kernels under one import name: `import attention_kernels`.

Three subpackages: `attention_kernels.kernels` (the Triton kernels and the ways into models),
`attention_kernels.reference` (the naive PyTorch specification) and `attention_kernels.benchmarks`
(sweeps, profiling, the GPU check, a tiny GPT: `python -m attention_kernels.benchmarks.<name>`). Nothing here takes a
generic top-level name such as `kernels`, which is Hugging Face's hub-kernels library (transformers
imports it when it is installed).

The kernels' functions are re-exported here:

    from attention_kernels import flash_attention, decode_attention, patch_sdpa
    from attention_kernels import reference               # the naive PyTorch specification

They are imported on first use, not with this package: `triton.jit` reads TRITON_INTERPRET when
the kernels are defined, so a command that turns Triton's interpreter on for a CPU (the benchmarks
do) must run before the kernels' modules are imported, and importing one of them imports this
package first.
"""

# attention_kernels.kernels.__all__, written out so that it needs no import (tests/test_package.py
# holds the two equal)
__all__ = ["attention", "choose_impl", "flash_attention", "flash_attention_varlen", "decode_attention", "dropout_mask",
           "block_map", "BlockMap", "MaskMod", "ScoreMod", "paged_attention", "PagedKVCache", "mla_decode",
           "cascade_attention", "merge_attention_states", "fused_attention", "scaled_dot_product_attention", "patch_sdpa",
           "CausalSelfAttention", "swap_attention", "register_transformers", "ring_attention", "ring_attention_varlen",
           "shard_sequence", "gather_sequence", "shard_positions"]


def __getattr__(name):
    if name not in __all__:
        raise AttributeError(f"module 'attention_kernels' has no attribute {name!r}")
    from attention_kernels import kernels
    value = globals()[name] = getattr(kernels, name)
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
