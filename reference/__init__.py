"""The readable specification of causal attention (`reference/naive.py`), the flash kernel's
tiled forward written the same way (`reference/tiled.py`), and `python -m reference.explain`,
which prints every step."""

from .naive import (
    alibi_bias,
    alibi_slopes,
    apply_mask,
    attention,
    causal_mask,
    decode_attention,
    dropout,
    expand_kv,
    logsumexp,
    masked_scores,
    scores,
    apply_softcap,
    softmax,
    varlen_attention,
    varlen_logsumexp,
    weighted_sum,
    window_mask,
)

__all__ = [
    "attention",
    "logsumexp",
    "scores",
    "causal_mask",
    "apply_mask",
    "softmax",
    "apply_softcap",
    "alibi_slopes",
    "alibi_bias",
    "weighted_sum",
    "expand_kv",
    "masked_scores",
    "window_mask",
    "varlen_attention",
    "varlen_logsumexp",
    "decode_attention",
    "dropout",
]
