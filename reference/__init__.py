"""The readable specification of causal attention (`reference/naive.py`), the flash kernel's
tiled forward written the same way (`reference/tiled.py`), and `python -m reference.explain`,
which prints every step."""

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
