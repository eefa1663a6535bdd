"""The readable specification of causal attention; see `reference/naive.py`."""

from reference.naive import (
    apply_mask,
    attention,
    causal_mask,
    expand_kv,
    logsumexp,
    masked_scores,
    scores,
    softmax,
    weighted_sum,
)

__all__ = [
    "attention",
    "logsumexp",
    "scores",
    "causal_mask",
    "apply_mask",
    "softmax",
    "weighted_sum",
    "expand_kv",
    "masked_scores",
]
