"""
nanoGPT's causal self-attention as a module whose attention step runs on the kernels.

`CausalSelfAttention(n_embd, n_head)` takes and returns (B, T, C) and keeps nanoGPT's parameter
names and shapes (`c_attn`: C -> 3C, `c_proj`: C -> C), so a nanoGPT checkpoint's attention
weights load unchanged; `swap_attention(model)` replaces every such module of a model in place.
With `n_kv_head < n_head` it is the grouped-query variant: `c_attn` maps C -> C + 2 * n_kv_head * D
and the kernels read the shared k/v heads directly, never repeated in memory.
"""

import torch.nn as nn
import torch.nn.functional as F

from .dispatch import IMPLS, attention

MODULE_IMPLS = IMPLS + ("sdpa",)  # "sdpa": torch's own scaled_dot_product_attention, to compare


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, nanoGPT's layout, the attention step by `impl`:
    "flash", "fused", "auto" (chosen by shape), "reference" or "sdpa" (torch's own).

    Attention-probability dropout is not in the kernels: while training with dropout > 0 the
    attention step runs torch's SDPA with dropout_p, as nanoGPT does; the residual dropout
    after `c_proj` is applied either way.
    """

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0, n_kv_head=None, impl="flash"):
        super().__init__()
        n_kv_head = n_head if n_kv_head is None else n_kv_head
        for name, value in (("n_embd", n_embd), ("n_head", n_head), ("n_kv_head", n_kv_head)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if n_embd % n_head != 0:
            raise ValueError(f"n_embd={n_embd} must be a multiple of n_head={n_head} (head dim = n_embd / n_head)")
        if n_head % n_kv_head != 0:
            raise ValueError(f"n_head={n_head} must be a multiple of n_kv_head={n_kv_head} (grouped-query heads)")
        if impl not in MODULE_IMPLS:
            raise ValueError(f"impl must be one of {', '.join(map(repr, MODULE_IMPLS))}; got {impl!r}")
        self.n_embd, self.n_head, self.n_kv_head = n_embd, n_head, n_kv_head
        self.head_dim = n_embd // n_head
        self.dropout, self.impl = dropout, impl
        self.c_attn = nn.Linear(n_embd, n_embd + 2 * n_kv_head * self.head_dim, bias=bias)  # q, k, v
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.resid_dropout = nn.Dropout(dropout)

    def forward(self, x):
        if x.dim() != 3 or x.shape[-1] != self.n_embd:
            raise ValueError(f"x must be (B, T, C) with C = n_embd = {self.n_embd}, got shape {tuple(x.shape)}")
        B, T, C = x.shape                                                  # (B, T, C)
        kv = self.n_kv_head * self.head_dim
        q, k, v = self.c_attn(x).split([C, kv, kv], dim=2)                 # (B, T, C), (B, T, Hkv*D) x 2
        q = q.view(B, T, self.n_head, self.head_dim).transpose(1, 2)       # (B, H, T, D), a strided view
        k = k.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)    # (B, Hkv, T, D)
        v = v.view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)    # (B, Hkv, T, D)
        if self.impl == "sdpa" or (self.training and self.dropout > 0):
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0,
                                               is_causal=True, enable_gqa=self.n_kv_head != self.n_head)
        else:
            y = attention(q, k, v, causal=True, impl=self.impl)           # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                             # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nanoGPT without torch's SDPA (and older nanoGPT always) keeps its causal mask as a
        # buffer named "bias", (1, 1, block_size, block_size); the kernels mask by index instead.
        mask = state_dict.get(prefix + "bias")
        if mask is not None and mask.dim() == 4:
            del state_dict[prefix + "bias"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, impl={self.impl!r}"


def _is_nanogpt_attention(module):
    return (all(hasattr(module, name) for name in ("c_attn", "c_proj", "n_head", "n_embd"))
            and isinstance(module.c_attn, nn.Linear) and module.c_attn.out_features == 3 * module.n_embd)


def swap_attention(model, impl="flash"):
    """Replace, in place, every nanoGPT-style `CausalSelfAttention` in `model` (any module with
    nanoGPT's `c_attn`, `c_proj`, `n_head` and `n_embd`) by this one running `impl`, with the same
    weights, frozen parameters, device, dtype and train/eval mode; a module held in two places
    becomes one new module held in both. Modules that already are ours get `impl` set. Returns
    the number of distinct modules swapped or set. Build optimizers after swapping: the new
    modules have new parameters."""
    if impl not in MODULE_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, MODULE_IMPLS))}; got {impl!r}")
    if _is_nanogpt_attention(model):
        raise ValueError("model is itself a nanoGPT attention module, which cannot be replaced in place: pass the "
                         "model that holds it, or build CausalSelfAttention and load its state_dict")
    done = {}  # id(old module) -> its replacement
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # not named_children: it skips repeats
            if id(child) in done:
                setattr(parent, name, done[id(child)])
            elif isinstance(child, CausalSelfAttention):
                child.impl = impl
                done[id(child)] = child
            elif _is_nanogpt_attention(child):
                new = CausalSelfAttention(child.n_embd, child.n_head, bias=child.c_attn.bias is not None,
                                          dropout=float(getattr(child, "dropout", 0.0)), impl=impl)
                new.load_state_dict(child.state_dict())
                new.to(device=child.c_attn.weight.device, dtype=child.c_attn.weight.dtype)
                frozen = {n for n, p in child.named_parameters() if not p.requires_grad}
                for n, p in new.named_parameters():
                    p.requires_grad_(n not in frozen)
                new.train(child.training)
                setattr(parent, name, new)
                done[id(child)] = new
    if isinstance(model, CausalSelfAttention):  # the model itself: nothing to replace it in
        model.impl = impl
        done[id(model)] = model
    return len(done)
