"""
Shared prefixes: attention over a prefix every sequence shares, plus each sequence's own suffix,
as two attentions merged by their log-sum-exps (cascade inference: FlashInfer's
`MultiLevelCascadeAttentionWrapper`, Hydragen, vLLM's cascade attention).

A batch of B sequences that all begin with one prompt of P positions (a system prompt, few-shot
examples, a document asked many questions) would read the prompt's keys and values B times,
once per sequence. Attention over a concatenation of keys splits into attention over each part:

    softmax over [prefix; suffix]  =  merge(attention over prefix, attention over suffix)

    merge       lse = log(exp(lse_a) + exp(lse_b))
                o   = exp(lse_a - lse) o_a + exp(lse_b - lse) o_b

so the prefix is attended once, by every new token of the batch together (decode's split-KV
kernel with the whole batch's new tokens as one sequence's, non-causal: every token sees the
whole prefix, each K/V tile loaded once per block of tokens x query heads of its group), and
each sequence's suffix through the paged cache (`paged_attention`, causal within it, the new
tokens' keys the last of it). The two log-sum-exps weigh the outputs.

`merge_attention_states` is that merge, in natural logs: the log-sum-exps `flash_attention`,
`decode_attention` and `paged_attention` return (and vLLM's `merge_attn_states`), in fp32 (fp64
inputs: fp64). FlashInfer's `merge_state` takes base-2 log-sum-exps: multiply them by ln 2
before and divide the result by it after. A side that saw no key (lse -inf) weighs 0; a row that
saw no key on either side is 0 with lse -inf. Ring attention folds each step's piece in with it.

Limits: positions are each part's own, so windows and ALiBi (which need a key's distance from
the query across both parts) are not taken; the soft-cap is per score and is. Inference only.
"""

import torch

from .checks import _dtype_name
from .decode import decode_attention
from .paged import paged_attention

# ----------------------------------------------------------------------------- the merge


def _check_states(o_a, lse_a, o_b, lse_b):
    for name, t in (("o_a", o_a), ("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() or t.dtype.itemsize < 2:
            raise TypeError(f"{name} must be a float tensor (fp16, bf16, fp32 or fp64), got {_dtype_name(t.dtype)}")
    if o_a.dim() < 1 or o_a.shape != o_b.shape:
        raise ValueError(f"o_a and o_b must have one shape (..., D), got o_a {tuple(o_a.shape)}, o_b {tuple(o_b.shape)}")
    for name, lse in (("lse_a", lse_a), ("lse_b", lse_b)):
        if lse.shape != o_a.shape[:-1]:
            raise ValueError(f"{name} must have shape o.shape[:-1] = {tuple(o_a.shape[:-1])} (one log-sum-exp per "
                             f"row; transpose paged_attention's (Hq, total_q)), got {tuple(lse.shape)}")
    for name, t in (("lse_a", lse_a), ("o_b", o_b), ("lse_b", lse_b)):
        if t.device != o_a.device:
            raise ValueError(f"{name} must be on o_a's device {o_a.device}, got {t.device}")


def merge_attention_states(o_a, lse_a, o_b, lse_b):
    """Attention over two sets of keys from attention over each: (o, lse).

    o_a, o_b (..., D) the two outputs (any float dtype, one shape); lse_a, lse_b (...) = o.shape[:-1]
    their log-sum-exps, natural log, as `flash_attention`, `decode_attention` and `paged_attention`
    return them (`paged_attention`'s is (Hq, total_q): pass `lse.T`). Computed in fp32 (fp64 if
    any input is) relative to the larger log-sum-exp, so nothing overflows; returns o (..., D) and
    lse (...) in that dtype. A side with lse -inf (it saw no key) weighs 0; a row with -inf on both
    sides is 0, its lse -inf. FlashInfer's `merge_state` takes base-2 log-sum-exps: lse2 * ln(2)
    is this one.

        o_p, lse_p = flash_attention(q, k[:, :, :n], v[:, :, :n], causal=False, return_lse=True)
        o_s, lse_s = flash_attention(q, k[:, :, n:], v[:, :, n:], causal=False, return_lse=True)
        o, lse = merge_attention_states(o_p, lse_p, o_s, lse_s)   # flash_attention(q, k, v, causal=False)
    """
    _check_states(o_a, lse_a, o_b, lse_b)
    dtype = torch.float64 if torch.float64 in (o_a.dtype, lse_a.dtype, o_b.dtype, lse_b.dtype) else torch.float32
    lse_a, lse_b = lse_a.to(dtype), lse_b.to(dtype)
    m = torch.maximum(lse_a, lse_b)
    m = torch.where(m == float("-inf"), 0.0, m)                           # (...) both -inf: anything finite
    w_a, w_b = torch.exp(lse_a - m), torch.exp(lse_b - m)                  # (...) each side's weight
    total = w_a + w_b
    lse = m + torch.log(total)                                             # log(0) = -inf: no key on either side
    total = torch.where(total == 0, 1.0, total)
    o = (o_a.to(dtype) * w_a[..., None] + o_b.to(dtype) * w_b[..., None]) / total[..., None]  # (..., D)
    return o, lse


# ----------------------------------------------------------------------------- a shared prefix


def _check_prefix(k_prefix, v_prefix, k_cache):
    """k_prefix and v_prefix (P, Hkv, D) like the pool's rows: its k/v heads, head dim, dtype and
    device (the pool itself is `paged_attention`'s to check)."""
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor (P, Hkv, D), got {type(t).__name__}")
        if t.dim() != 3:
            raise ValueError(f"{name} must have 3 dimensions (P, Hkv, D), got shape {tuple(t.shape)}")
    if k_prefix.shape != v_prefix.shape:
        raise ValueError(f"k_prefix and v_prefix must have one shape (P, Hkv, D), got k_prefix "
                         f"{tuple(k_prefix.shape)}, v_prefix {tuple(v_prefix.shape)}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() != 4:
        return
    want = (k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k_prefix", k_prefix), ("v_prefix", v_prefix)):
        if tuple(t.shape[1:]) != want or t.dtype != k_cache.dtype or t.device != k_cache.device:
            raise ValueError(f"{name} must be (P, Hkv, D) = (P, {want[0]}, {want[1]}) in the pool's dtype "
                             f"{_dtype_name(k_cache.dtype)} on its device {k_cache.device}, got "
                             f"{tuple(t.shape)} {_dtype_name(t.dtype)} on {t.device}")


def cascade_attention(q, k_prefix, v_prefix, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q,
                      max_seqlen_q, k_new=None, v_new=None, scale=None, num_splits=None, softcap=None,
                      return_lse=False, check=True, k_scale=None, v_scale=None):
    """New tokens of B sequences that share a prefix: the prefix attended once for the whole batch,
    each sequence's own keys through a paged cache, merged (`merge_attention_states`).

    q (total_q, Hq, D) packed as in `paged_attention`: sequence b's new tokens are rows
    cu_seqlens_q[b]:cu_seqlens_q[b + 1]. k_prefix, v_prefix (P, Hkv, D): the shared prefix's
    keys and values, any strides (P may be 0). k_cache, v_cache, block_table, cache_seqlens,
    max_seqlen_q, k_new, v_new, num_splits, check: each sequence's suffix, as `paged_attention`
    takes them (the new tokens' keys the last of it, or appended from k_new, v_new). Sequence b's
    keys are the prefix followed by its suffix; new token t of q_len sees the whole prefix and its
    suffix up to itself (causal, bottom-right). Equal to `reference.varlen_attention` of q over
    each sequence's concatenated keys.

    Returns out (total_q, Hq, D) in q's dtype, and with return_lse the log-sum-exp (Hq,
    total_q) fp32, natural log. scale and softcap as in `paged_attention`; k_scale, v_scale the
    scales of an fp8 prefix and pool (they share one dtype then, and the scales). No windows,
    ALiBi or sinks (see the module's docstring). No backward.
    """
    _check_prefix(k_prefix, v_prefix, k_cache)  # before the pool is appended to
    o_s, lse_s = paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, max_seqlen_q, k_new,
                                 v_new, scale=scale, num_splits=num_splits, softcap=softcap, return_lse=True,
                                 check=check, k_scale=k_scale, v_scale=v_scale)  # (total_q, Hq, D), (Hq, total_q)
    if k_prefix.shape[0] == 0:
        return (o_s, lse_s) if return_lse else o_s
    as_batch = lambda t: t.transpose(0, 1)[None]                          # (T, H, D) -> (1, H, T, D), a view
    P = k_prefix.shape[0]
    o_p, lse_p = decode_attention(as_batch(q), as_batch(k_prefix), as_batch(v_prefix), P, scale=scale,
                                  num_splits=num_splits, return_lse=True, check_seqlens=False, softcap=softcap,
                                  causal=False, k_scale=k_scale, v_scale=v_scale)  # (1, Hq, total_q, D), (1, Hq, total_q)
    o, lse = merge_attention_states(o_p[0].transpose(0, 1), lse_p[0].T, o_s, lse_s.T)  # (total_q, Hq, D), (total_q, Hq)
    o = o.to(q.dtype)
    return (o, lse.T.contiguous()) if return_lse else o
