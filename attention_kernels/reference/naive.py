"""
Causal scaled dot-product attention, written to be read. This file is the specification:
every kernel in `kernels/` is tested against it, and `reference.explain` prints its steps.

    out = softmax(mask(q @ k^T * scale)) @ v

Shapes (torch SDPA's layout):
    q    (B, Hq,  Tq, D)   B batch, Hq query heads, Tq query positions, D head dim
    k, v (B, Hkv, Tk, D)   Hq must be a multiple of Hkv: each k/v head serves Hq // Hkv
                           consecutive query heads (grouped-query; Hkv = 1 is multi-query)

Causal alignment is bottom-right: query i sees key j only when j <= i + (Tk - Tq), so Tq new
queries after a cached prefix see the whole prefix. A query that sees no key (possible when
Tq > Tk) returns zeros, and its log-sum-exp is -inf.

A sliding window (left, right) narrows that to i - left <= j - (Tk - Tq) <= i + right: at most
`left` keys before the query's diagonal and `right` after it; -1 leaves a side unbounded, and
causal means right = 0, whatever right says (FlashAttention's `window_size`; the kernels refuse
a right > 0 with causal instead). The packed, variable-length batch
(`varlen_attention`) and decoding against a KV cache (`decode_attention`) are this same
attention, run one sequence at a time.

Low-precision inputs are computed in float32 and the result is rounded back to the input's
dtype; float64 inputs are computed in float64 (the tests' ground truth). `upcast=False` computes
in the input's own dtype instead: that is the error a low precision makes by itself, the
yardstick the tests hold kernels to (as FlashAttention's tests do).
"""

import math

import torch


def compute_dtype(dtype, upcast=True):
    """float64 stays float64 (the truth); lower precisions are computed in float32 if upcast."""
    return torch.float64 if dtype == torch.float64 else torch.float32 if upcast else dtype


def expand_kv(k, num_q_heads):
    """Repeat each k/v head for the query heads it serves (grouped-query attention)."""
    group = num_q_heads // k.shape[1]                      # query heads per k/v head
    return k.repeat_interleave(group, dim=1)               # (B, Hq, Tk, D)


def scores(q, k, scale):
    """How well each query matches each key: dot products, scaled so their variance stays ~1."""
    return q @ k.transpose(-2, -1) * scale                 # (B, Hq, Tq, D) @ (B, Hq, D, Tk) -> (B, Hq, Tq, Tk)


def causal_mask(Tq, Tk, device=None):
    """True where query i may see key j: j <= i + (Tk - Tq), a bottom-right lower triangle."""
    i = torch.arange(Tq, device=device)[:, None]           # (Tq, 1) query positions
    j = torch.arange(Tk, device=device)[None, :]           # (1, Tk) key positions
    return j <= i + (Tk - Tq)                              # (Tq, Tk) bool


def window_mask(Tq, Tk, left=-1, right=-1, device=None):
    """True where key j lies within the window around query i's diagonal j = i + (Tk - Tq)."""
    i = torch.arange(Tq, device=device)[:, None]           # (Tq, 1) query positions
    j = torch.arange(Tk, device=device)[None, :]           # (1, Tk) key positions
    past = j - (i + Tk - Tq)                               # (Tq, Tk) how far key j lies past query i's diagonal
    visible = torch.ones(Tq, Tk, dtype=torch.bool, device=device)
    if left >= 0:
        visible &= past >= -left                           # at most `left` keys before the diagonal
    if right >= 0:
        visible &= past <= right                           # at most `right` keys after it
    return visible                                         # (Tq, Tk) bool


def apply_softcap(s, cap):
    """Gemma 2's logit soft-capping: cap * tanh(s / cap), smooth, and never past +-cap."""
    return cap * torch.tanh(s / cap)                       # (B, Hq, Tq, Tk)


def alibi_slopes(num_heads):
    """ALiBi's standard slopes for num_heads heads (Press et al., as BLOOM and MPT use them): the
    geometric sequence 2^(-8/n), 2^(-16/n), ... for the largest power of two n <= num_heads, and
    for the heads past it every other slope of the sequence for 2n, interleaved after."""
    n = 2 ** math.floor(math.log2(num_heads))
    slopes = [2 ** (-8 * (i + 1) / n) for i in range(n)]
    extra = [2 ** (-4 * (2 * i + 1) / n) for i in range(num_heads - n)]  # odd steps of the 2n sequence
    return torch.tensor(slopes + extra, dtype=torch.float32)  # (num_heads,)


def alibi_bias(slopes, Tq, Tk, device=None):
    """ALiBi's linear position bias, -slope * |distance from the query's diagonal key|: query i's
    diagonal is key i + (Tk - Tq) (bottom-right, as the causal mask), and the bias is symmetric,
    so full attention penalises keys ahead as much as behind (FlashAttention's convention).
    slopes (Hq,) or (B, Hq); returns (1 or B, Hq, Tq, Tk)."""
    i = torch.arange(Tq, device=device)[:, None]           # (Tq, 1) query positions
    j = torch.arange(Tk, device=device)[None, :]           # (1, Tk) key positions
    distance = (j - (i + Tk - Tq)).abs()                   # (Tq, Tk)
    slopes = slopes if slopes.dim() == 2 else slopes[None]  # (1 or B, Hq)
    return -slopes[:, :, None, None] * distance            # (1 or B, Hq, Tq, Tk)


def apply_mask(s, visible):
    """Hidden keys get -inf, so exp() turns them into exactly zero weight."""
    return s.masked_fill(~visible, float("-inf"))          # (B, Hq, Tq, Tk)


def softmax(s, sinks=None):
    """Each row's scores become weights that are >= 0 and sum to 1 (rows with no key: all 0).
    With `sinks` (Hq,), GPT-OSS's attention sinks: each head's sink logit joins every row's
    denominator and takes weight but gives no value, so a row's weights sum to less than 1."""
    m = s.amax(dim=-1, keepdim=True)                       # (B, Hq, Tq, 1) row max, subtracted so exp() cannot overflow
    if sinks is not None:
        sink = sinks.to(s.dtype)[None, :, None, None]      # (1, Hq, 1, 1)
        m = torch.maximum(m, sink)                         # (B, Hq, Tq, 1) the sink may be the largest logit
    m = m.masked_fill(m == float("-inf"), 0.0)             # (B, Hq, Tq, 1) a row with no key: avoid -inf - -inf = nan
    e = torch.exp(s - m)                                   # (B, Hq, Tq, Tk)
    total = e.sum(dim=-1, keepdim=True)                    # (B, Hq, Tq, 1)
    if sinks is not None:
        share = torch.exp(sink - m).masked_fill(sink == m, 1.0)  # (B, Hq, Tq, 1) a sink of +inf: exp(inf - inf) is 1
        total = total + share                              # (B, Hq, Tq, 1) the sink's share of the denominator
    return e / total.masked_fill(total == 0, 1.0)          # (B, Hq, Tq, Tk) an empty row stays 0, not 0/0


def weighted_sum(weights, v):
    """Each query's output is the average of the values, weighted by attention."""
    return weights @ v                                     # (B, Hq, Tq, Tk) @ (B, Hq, Tk, D) -> (B, Hq, Tq, D)


def apply_attn_mask(s, attn_mask):
    """A user's mask, broadcast to the scores (torch SDPA's `attn_mask`): bool hides the keys where
    it is False; a float mask is added to the scores (-inf hides a key too)."""
    if attn_mask.dtype == torch.bool:
        return apply_mask(s, attn_mask)                    # (B, Hq, Tq, Tk)
    return s + attn_mask.to(s.dtype)                       # (B, Hq, Tq, Tk)


def positions(B, Hq, Tq, Tk, device=None):
    """The indices a mask or score function sees, each shaped to broadcast against the scores:
    batch (B, 1, 1, 1), head (1, Hq, 1, 1), query (1, 1, Tq, 1), key (1, 1, 1, Tk)."""
    ar = lambda n: torch.arange(n, device=device)
    return ar(B).view(-1, 1, 1, 1), ar(Hq).view(1, -1, 1, 1), ar(Tq).view(1, 1, -1, 1), ar(Tk).view(1, 1, 1, -1)


def masked_scores(q, k, causal=True, scale=None, upcast=True, window=(-1, -1), softcap=None, alibi_slopes=None,
                  attn_mask=None, score_mod=None, mask_mod=None):
    """The first steps: upcast, expand grouped k heads, score, soft-cap (Gemma 2: after the scale,
    before the mask), add ALiBi's bias, the user's `score_mod(s, b, h, q_idx, kv_idx)`, add or
    apply the user's `attn_mask`, hide where `mask_mod(b, h, q_idx, kv_idx)` is False, mask.
    score_mod and mask_mod are plain PyTorch here, on the indices of `positions`: the
    specification of the kernels' Triton mask and score functions (`kernels.mods`)."""
    dt = compute_dtype(q.dtype, upcast)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    q, k = q.to(dt), expand_kv(k.to(dt), q.shape[1])       # (B, Hq, Tq, D), (B, Hq, Tk, D)
    s = scores(q, k, scale)                                # (B, Hq, Tq, Tk)
    Tq, Tk = q.shape[2], k.shape[2]
    if softcap is not None:
        s = apply_softcap(s, softcap)                      # (B, Hq, Tq, Tk)
    if alibi_slopes is not None:
        s = s + alibi_bias(alibi_slopes.to(dt), Tq, Tk, q.device)  # (B, Hq, Tq, Tk)
    if score_mod is not None or mask_mod is not None:
        b, h, qi, ki = positions(q.shape[0], q.shape[1], Tq, Tk, q.device)
        if score_mod is not None:
            s = score_mod(s, b, h, qi, ki).to(dt).expand_as(s)  # (B, Hq, Tq, Tk)
    if attn_mask is not None:
        s = apply_attn_mask(s, attn_mask)                  # (B, Hq, Tq, Tk)
    if mask_mod is not None:
        s = apply_mask(s, mask_mod(b, h, qi, ki))          # (B, Hq, Tq, Tk)
    left, right = window
    if left >= 0 or right >= 0:
        s = apply_mask(s, window_mask(Tq, Tk, left, 0 if causal else right, q.device))
    elif causal:
        s = apply_mask(s, causal_mask(Tq, Tk, q.device))
    return s                                               # (B, Hq, Tq, Tk)


def dropout(w, keep, p):
    """Attention dropout: each weight kept (keep True) is scaled by 1 / (1 - p), the others are 0,
    so the expected weights are unchanged. The kernels draw `keep` themselves
    (`kernels.dropout_mask` writes it out); here it is given."""
    return w * keep.to(w.dtype) / (1.0 - p)                # (B, Hq, Tq, Tk)


def attention(q, k, v, causal=True, scale=None, upcast=True, window=(-1, -1), softcap=None, sinks=None,
              alibi_slopes=None, dropout_p=0.0, dropout_mask=None, attn_mask=None, score_mod=None, mask_mod=None):
    """softmax(mask(q @ k^T * scale)) @ v, with grouped-query heads and bottom-right causal mask;
    optionally Gemma 2's `softcap`, GPT-OSS's attention `sinks` (Hq,), ALiBi's `alibi_slopes`
    (Hq,) or (B, Hq), dropout of the weights with probability `dropout_p`, keeping those where
    `dropout_mask` (B, Hq, Tq, Tk) is True, and a user's `attn_mask` broadcastable to (B, Hq,
    Tq, Tk), as torch SDPA takes it: bool (True attends) or float (added to the scaled scores,
    after soft-cap and ALiBi), within the causal mask and the window, not instead of them; and
    `score_mod`, `mask_mod`, PyTorch functions of the scores and their indices (`masked_scores`)."""
    if k.shape[2] == 0:                                    # no keys at all (an empty sequence): every row is empty
        kept = 0 * sinks.nan_to_num(posinf=0.0, neginf=0.0).sum() if sinks is not None else 0  # in the graph, not inf * 0
        return torch.zeros_like(q) + 0 * v.sum() + kept    # (B, Hq, Tq, D)
    s = masked_scores(q, k, causal, scale, upcast, window, softcap, alibi_slopes, attn_mask, score_mod,
                      mask_mod)                            # (B, Hq, Tq, Tk)
    w = softmax(s, sinks)                                  # (B, Hq, Tq, Tk)
    if dropout_p > 0:
        w = dropout(w, dropout_mask, dropout_p)            # (B, Hq, Tq, Tk) after the softmax: the row sums stay
    v = expand_kv(v.to(w.dtype), q.shape[1])               # (B, Hq, Tk, D)
    return weighted_sum(w, v).to(q.dtype)                  # (B, Hq, Tq, D)


def logsumexp(q, k, causal=True, scale=None, window=(-1, -1), softcap=None, sinks=None, alibi_slopes=None,
              attn_mask=None, score_mod=None, mask_mod=None):
    """log(sum_j exp(s_ij)) per query row, natural log: the softmax's normaliser, which kernels
    store for their backward pass, the sink's exp(sink) included. float32 (float64 for float64
    inputs), -inf for empty rows (the sink, with one)."""
    s = masked_scores(q, k, causal, scale, True, window, softcap, alibi_slopes, attn_mask, score_mod,
                      mask_mod)                            # (B, Hq, Tq, Tk)
    if sinks is not None:
        sink = sinks.to(s.dtype)[None, :, None, None].expand(*s.shape[:3], 1)   # (B, Hq, Tq, 1)
        s = torch.cat([s, sink], dim=-1)                   # (B, Hq, Tq, Tk + 1)
    return torch.logsumexp(s, dim=-1)                      # (B, Hq, Tq)


def _one_sequence(fn, q, k, v):
    """Run fn on one packed sequence, q (Tq, Hq, D) and k, v (Tk, Hkv, D), as a batch of one."""
    as_batch = lambda x: x.transpose(0, 1)[None]           # (T, H, D) -> (1, H, T, D)
    return fn(as_batch(q), as_batch(k), as_batch(v))[0].transpose(0, 1)  # (Tq, Hq, ...)


def _per_sequence(slopes, b):
    """ALiBi slopes for sequence b: (Hq,) for every sequence, or row b of (B, Hq)."""
    return None if slopes is None else slopes if slopes.dim() == 1 else slopes[b]


def _sequences(cu_seqlens_q, cu_seqlens_k):
    return enumerate(zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k.tolist(),
                         cu_seqlens_k[1:].tolist()))


def varlen_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=True, scale=None, upcast=True, window=(-1, -1),
                     softcap=None, sinks=None, alibi_slopes=None, dropout_p=0.0, dropout_mask=None):
    """Attention over a packed batch of sequences of different lengths, none seeing another:
    q (total_q, Hq, D) and k, v (total_k, Hkv, D) hold the sequences one after another, and
    sequence b is rows cu_seqlens_q[b]:cu_seqlens_q[b + 1] of q (of k and v: cu_seqlens_k).
    Dropout keeps the weights where `dropout_mask` (B, Hq, max Tq, max Tk) is True, sequence b's
    in its top-left (Tq_b, Tk_b) corner, as the kernels number them."""
    keep = lambda b, tq, tk: None if dropout_mask is None else dropout_mask[b:b + 1, :, :tq, :tk]  # (1, Hq, Tq_b, Tk_b)
    out = [_one_sequence(lambda q, k, v: attention(q, k, v, causal, scale, upcast, window, softcap, sinks,
                                                   _per_sequence(alibi_slopes, b), dropout_p,
                                                   keep(b, q1 - q0, k1 - k0)),
                         q[q0:q1], k[k0:k1], v[k0:k1])    # (Tq_b, Hq, D)
           for b, (q0, q1, k0, k1) in _sequences(cu_seqlens_q, cu_seqlens_k)]
    return torch.cat(out)                                  # (total_q, Hq, D)


def varlen_logsumexp(q, k, cu_seqlens_q, cu_seqlens_k, causal=True, scale=None, window=(-1, -1), softcap=None,
                     sinks=None, alibi_slopes=None):
    """`logsumexp` of each packed sequence, laid out (Hq, total_q) as the varlen kernel stores it."""
    out = [_one_sequence(lambda q, k, v: logsumexp(q, k, causal, scale, window, softcap, sinks,
                                                   _per_sequence(alibi_slopes, b))[..., None],
                         q[q0:q1], k[k0:k1], k[k0:k1])[..., 0]  # (Tq_b, Hq)
           for b, (q0, q1, k0, k1) in _sequences(cu_seqlens_q, cu_seqlens_k)]
    return torch.cat(out).transpose(0, 1)                  # (Hq, total_q)


def decode_attention(q, k_cache, v_cache, cache_seqlens, scale=None, window=(-1, -1), softcap=None, sinks=None,
                     alibi_slopes=None, causal=True, upcast=True, tree_mask=None, bidirectional=None, return_lse=False,
                     k_scale=None, v_scale=None):
    """Tq new tokens per sequence attending to a KV cache: q (B, Hq, Tq, D); k_cache, v_cache
    (B, Hkv, Tmax, D), of which sequence b's first cache_seqlens[b] = L positions are valid, the
    new tokens' own keys included (they are the last Tq: new token i sits at position L - Tq + i).
    Causal: each new token sees the cache before it and itself; not causal: the whole valid cache
    (within the window).

    Serving masks: `tree_mask` (B, Tq, Tq) or (Tq, Tq) bool says which new token sees which: among
    the new tokens' keys it replaces causal and the window's right side (the window's left bound
    still holds). `bidirectional` (B, R, 2) or (B, 2): [start, end) position ranges; a query inside
    one also sees every key inside it, whatever the rest says. With `return_lse`, also the
    log-sum-exp (B, Hq, Tq).

    An fp8 cache (or any cache given `k_scale`, `v_scale`) is attended as its values, stored *
    scale in float64 (`dequantize`), then rounded as any key is to the precision computed in."""
    B, Hq, Tq, D = q.shape
    left, right = window
    out, lse = [], []
    for b, L in enumerate(cache_seqlens.tolist()):
        pos = torch.arange(L - Tq, L, device=q.device)[:, None]   # (Tq, 1) each new token's position
        j = torch.arange(L, device=q.device)[None, :]             # (1, L) each key's position
        visible = window_mask(Tq, L, left, 0 if causal else right, q.device)  # (Tq, L) as causal and window say
        if tree_mask is not None:
            tree = tree_mask if tree_mask.dim() == 2 else tree_mask[b]        # (Tq, Tq)
            n = min(Tq, L)                                        # the new tokens with a key in the cache: the last n
            seen = torch.zeros_like(visible)
            seen[:, L - n:] = tree[:, Tq - n:]                    # (Tq, L) the tree over the new tokens' keys
            in_window = j >= pos - left if left >= 0 else torch.ones_like(visible)
            visible = torch.where(j >= L - Tq, seen & in_window, visible)  # (Tq, L)
        if bidirectional is not None:
            ranges = bidirectional[b].view(-1, 2)                 # (R, 2)
            start, end = ranges[:, 0, None, None], ranges[:, 1, None, None]  # (R, 1, 1)
            together = (start <= pos) & (pos < end) & (start <= j) & (j < end)  # (R, Tq, L)
            visible = visible | together.any(0)                   # (Tq, L)
        args = (q[b:b + 1], dequantize(k_cache[b:b + 1, :, :L], k_scale, 1))  # (1, Hq, Tq, D), (1, Hkv, L, D)
        mods = dict(softcap=softcap, sinks=sinks, alibi_slopes=_per_sequence(alibi_slopes, b), attn_mask=visible)
        v = dequantize(v_cache[b:b + 1, :, :L], v_scale, 1)         # (1, Hkv, L, D)
        out.append(attention(*args, v, False, scale, upcast, **mods))  # (1, Hq, Tq, D)
        if return_lse:
            lse.append(logsumexp(*args, False, scale, **mods))   # (1, Hq, Tq)
    return (torch.cat(out), torch.cat(lse)) if return_lse else torch.cat(out)  # (B, Hq, Tq, D), (B, Hq, Tq)


def gather_pages(cache, block_table, cache_seqlens):
    """A paged cache's keys (or values) of every sequence, one after another: cache
    (num_pages, page_size, Hkv, D), sequence b's position j at slot j % page_size of page
    block_table[b, j // page_size], its first cache_seqlens[b] positions valid."""
    page_size = cache.shape[1]
    rows = [block_table[b, j // page_size].long() * page_size + j % page_size   # (L,) rows of the flat cache
            for b, L in enumerate(cache_seqlens.tolist()) for j in [torch.arange(L, device=cache.device)]]
    return cache.flatten(0, 1)[torch.cat(rows)]           # (sum L, Hkv, D)


def paged_attention(q, k_cache, v_cache, block_table, cache_seqlens, cu_seqlens_q, scale=None, upcast=True,
                    window=(-1, -1), softcap=None, sinks=None, alibi_slopes=None, causal=True, tree_mask=None,
                    bidirectional=None, return_lse=False, k_scale=None, v_scale=None):
    """New tokens attending to a paged KV cache: q (total_q, Hq, D) holds each sequence's new
    tokens one after another (sequence b's are rows cu_seqlens_q[b]:cu_seqlens_q[b + 1]: one
    while decoding, many for a chunk of a prompt); k_cache, v_cache (num_pages, page_size, Hkv, D)
    hold sequence b's first cache_seqlens[b] keys in the pages its block_table row names, the new
    tokens' own among them (the last). Each sequence is `decode_attention` of its new tokens to
    its keys, causal bottom-right: each new token sees the cache before it and itself
    (`causal=False`: all of them). `tree_mask` (B, max_seqlen_q, max_seqlen_q) or (max_seqlen_q,
    max_seqlen_q) bool, sequence b's tree in the top-left corner [b, :q_len, :q_len], and
    `bidirectional` (B, R, 2) or (B, 2) as there. With `return_lse`, also the log-sum-exp
    (Hq, total_q). An fp8 pool with `k_scale`, `v_scale` as in `decode_attention`."""
    k = gather_pages(k_cache, block_table, cache_seqlens)                     # (sum L, Hkv, D)
    v = gather_pages(v_cache, block_table, cache_seqlens)
    cu_seqlens_k = torch.cat([cache_seqlens.new_zeros(1), cache_seqlens.cumsum(0)]).tolist()  # (B + 1,)
    as_batch = lambda x: x.transpose(0, 1)[None]                              # (T, H, D) -> (1, H, T, D)
    out, lse = [], []
    for b, (q0, q1, k0, k1) in enumerate(zip(cu_seqlens_q.tolist(), cu_seqlens_q[1:].tolist(), cu_seqlens_k,
                                             cu_seqlens_k[1:])):
        n = q1 - q0                                                           # sequence b's new tokens
        tree = None if tree_mask is None else tree_mask[..., :n, :n] if tree_mask.dim() == 2 else tree_mask[b, :n, :n]
        o, l = decode_attention(as_batch(q[q0:q1]), as_batch(k[k0:k1]), as_batch(v[k0:k1]),
                                cache_seqlens[b:b + 1], scale, window, softcap, sinks, _per_sequence(alibi_slopes, b),
                                causal, upcast, tree, None if bidirectional is None else bidirectional[b:b + 1],
                                return_lse=True, k_scale=k_scale, v_scale=v_scale)  # (1, Hq, n, D), (1, Hq, n)
        out.append(o[0].transpose(0, 1))                                      # (n, Hq, D)
        lse.append(l[0])                                                      # (Hq, n)
    out = torch.cat(out)                                                      # (total_q, Hq, D)
    return (out, torch.cat(lse, dim=1)) if return_lse else out               # (Hq, total_q)


def mla_decode(q, kv_cache, block_table, cache_seqlens, cu_seqlens_q, head_dim_v=512, scale=None, upcast=True,
               return_lse=False):
    """Multi-head latent attention (DeepSeek V2/V3, Kimi K2) as serving engines decode it: every
    query head attends to ONE latent head per position, whose first head_dim_v columns are also the
    value. q (total_q, Hq, D) packed as in `paged_attention` (D = 576 = 512 latent + 64 rotary in
    DeepSeek); kv_cache (num_pages, page_size, D) the paged latent cache, sequence b's first
    cache_seqlens[b] positions valid, its new tokens' own the last. Causal among the new tokens.
    The scale defaults to 1/sqrt(D); DeepSeek passes its own (that of its 192-wide q.k head).
    Returns out (total_q, Hq, head_dim_v), with `return_lse` also the log-sum-exp (Hq, total_q)."""
    kv = kv_cache[:, :, None]                              # (num_pages, page_size, 1, D) one head: keys and values
    out, lse = paged_attention(q, kv, kv, block_table, cache_seqlens, cu_seqlens_q, scale=scale, upcast=upcast,
                               return_lse=True)            # (total_q, Hq, D), (Hq, total_q)
    out = out[..., :head_dim_v]                            # (total_q, Hq, head_dim_v) a value is its key's first columns
    return (out, lse) if return_lse else out


# ----------------------------------------------------------------------------- fp8 caches

FP8_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}  # each format's largest finite value


def _along(scale, x, dim):
    """A scale (a float, or a tensor of one value or one per head) shaped to broadcast along x's `dim`, float64."""
    s = torch.as_tensor(scale, dtype=torch.float64, device=x.device).reshape(-1)   # (1,) or (H,)
    shape = [1] * x.dim()
    shape[dim] = s.numel()
    return s.view(shape)


def quantize(x, scale, dtype, heads_dim):
    """x as an fp8 cache stores it (vLLM's convention): x / scale in fp32, saturated at the format's
    largest finite value, rounded to nearest even. `scale` a float or a tensor of one value or one
    per head along x's `heads_dim`."""
    s = _along(scale, x, heads_dim).float()
    return (x.float() / s).clamp(-FP8_MAX[dtype], FP8_MAX[dtype]).to(dtype)


def dequantize(cache, scale, heads_dim):
    """A cache's values: stored * scale, float64 (exact); scale None is 1. A cache of another dtype
    without a scale is returned as it is."""
    if scale is None and cache.dtype not in FP8_MAX:
        return cache
    return cache.double() if scale is None else cache.double() * _along(scale, cache, heads_dim)


# ----------------------------------------------------------------------------- merging attention states


def merge_states(o_a, lse_a, o_b, lse_b):
    """Attention over two sets of keys from attention over each: o_a (..., D) with its natural-log
    log-sum-exp lse_a (...), o_b with lse_b. Each side weighs by its share of the whole softmax sum,
    exp(lse_side - lse); a side that saw no key (-inf) weighs 0, and a row that saw none on either
    side is 0 with lse -inf."""
    lse = torch.logaddexp(lse_a, lse_b)                    # (...)
    weight = lambda side: torch.exp(side - lse).nan_to_num(0.0)[..., None]  # (..., 1) -inf - -inf: no key at all
    return weight(lse_a) * o_a + weight(lse_b) * o_b, lse  # (..., D), (...)
