"""
The attention modules people write, with their attention step on the kernels.

`CausalSelfAttention(n_embd, n_head)` takes and returns (B, T, C) and keeps nanoGPT's parameter
names and shapes (`c_attn`: C -> 3C, `c_proj`: C -> C), so a nanoGPT checkpoint's attention
weights load unchanged. With `n_kv_head < n_head` it is the grouped-query variant: `c_attn` maps
C -> C + 2 * n_kv_head * D and the kernels read the shared k/v heads directly, never repeated.

`swap_attention(model)` replaces, in place, every module of a model in one of three layouts:
    - nanoGPT's `CausalSelfAttention` (and minGPT's current one): `c_attn`, `c_proj`, `n_head`,
      `n_embd` -> `CausalSelfAttention`;
    - the "Let's build GPT" lecture's `MultiHeadAttention` of `Head`s (ng-video-lecture's
      gpt.py): `heads[i].key/query/value` (no bias), their `tril` buffers, `proj`, `dropout`
      -> `LectureMultiHeadAttention`, the same names and shapes, all heads in one kernel call;
    - minGPT's original `CausalSelfAttention`: `key`, `query`, `value`, `proj`, `attn_drop`,
      `resid_drop`, the `mask` buffer, `n_head` -> `SeparateQKVAttention`, the same names.
The last two keep every parameter and buffer name, so their state_dicts load both ways; each is
checked on a random input against the module it replaces before it is put in (a layer that
computes something else, e.g. the lecture's early scale by C instead of the head size, is left
as it is and reported).
"""

import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dispatch import IMPLS, attention

MODULE_IMPLS = IMPLS + ("sdpa",)  # "sdpa": torch's own scaled_dot_product_attention, to compare


def _attend(module, q, k, v, p):
    """Causal attention of q (B, H, T, D) over k, v (B, Hkv, T, D) by `module.impl`, with the
    attention-weight dropout p while training, which the kernels draw themselves; impl="sdpa" is
    torch's own."""
    p = p if module.training else 0.0
    if module.impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
    return attention(q, k, v, causal=True, impl=module.impl, dropout_p=p)         # (B, H, T, D)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, nanoGPT's layout, the attention step by `impl`:
    "flash", "fused", "auto" (chosen by shape), "reference" or "sdpa" (torch's own).

    While training with dropout > 0 the kernel drops attention weights itself (its seed from
    torch's generator: `torch.manual_seed` makes a step reproducible); the residual dropout
    after `c_proj` is applied either way. `attn_pdrop` sets the attention's dropout apart from the
    residual's (minGPT's attn_pdrop and resid_pdrop); by default both are `dropout`.
    """

    def __init__(self, n_embd, n_head, bias=True, dropout=0.0, n_kv_head=None, impl="flash", attn_pdrop=None):
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
        self.attn_pdrop = dropout if attn_pdrop is None else attn_pdrop
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
        y = self.attend(q, k, v)                                           # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                             # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))

    def attend(self, q, k, v):
        """The attention step alone, q (B, H, T, D), k and v (B, Hkv, T, D) -> (B, H, T, D): what a
        subclass replaces to attend otherwise with the same projections (benchmarks.ring: a ring
        across processes)."""
        return _attend(self, q, k, v, self.attn_pdrop)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # nanoGPT without torch's SDPA (and older nanoGPT always) keeps its causal mask as a
        # buffer named "bias", (1, 1, block_size, block_size); the kernels mask by index instead.
        mask = state_dict.get(prefix + "bias")
        if mask is not None and mask.dim() == 4:
            del state_dict[prefix + "bias"]
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self):
        return f"n_head={self.n_head}, n_kv_head={self.n_kv_head}, head_dim={self.head_dim}, impl={self.impl!r}"


class LectureHead(nn.Module):
    """One head of the lecture's `Head`: the same parameter and buffer names (key, query, value,
    tril, dropout). Its own forward runs that head alone on the kernels; inside
    `LectureMultiHeadAttention` all heads run in one call."""

    def __init__(self, n_embd, head_size, block_size, dropout=0.0, bias=False, impl="flash"):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=bias)
        self.query = nn.Linear(n_embd, head_size, bias=bias)
        self.value = nn.Linear(n_embd, head_size, bias=bias)
        self.register_buffer("tril", torch.tril(torch.ones(block_size, block_size)))  # kept for the state_dict
        self.dropout = nn.Dropout(dropout)
        self.impl = impl

    def forward(self, x):
        heads = (lin(x)[:, None] for lin in (self.query, self.key, self.value))      # (B, 1, T, hs) each
        return _attend(self, *heads, self.dropout.p)[:, 0]                         # (B, T, hs)


class LectureMultiHeadAttention(nn.Module):
    """The lecture's `MultiHeadAttention(num_heads, head_size)` with the same names (heads.i.key,
    .query, .value, .tril; proj; dropout): the heads' weights are stacked per call, so the state
    dict and an optimizer's parameters are the lecture's own, and all heads run in one kernel call
    at the head size's scale, head_size ** -0.5, as the lecture's final gpt.py has it."""

    def __init__(self, n_embd, num_heads, head_size, block_size, dropout=0.0, bias=False, proj_bias=True,
                 impl="flash"):
        super().__init__()
        self.heads = nn.ModuleList(LectureHead(n_embd, head_size, block_size, dropout, bias, impl)
                                   for _ in range(num_heads))
        self.proj = nn.Linear(head_size * num_heads, n_embd, bias=proj_bias)
        self.dropout = nn.Dropout(dropout)
        self.impl = impl

    def forward(self, x):
        B, T, _ = x.shape                                                               # (B, T, C)
        H, hs = len(self.heads), self.heads[0].key.out_features

        def project(name):  # every head's Linear at once: (H * hs, C) stacked weights
            lins = [getattr(h, name) for h in self.heads]
            bias = None if lins[0].bias is None else torch.cat([lin.bias for lin in lins])
            y = F.linear(x, torch.cat([lin.weight for lin in lins]), bias)                # (B, T, H * hs)
            return y.view(B, T, H, hs).transpose(1, 2)                                  # (B, H, T, hs)

        y = _attend(self, project("query"), project("key"), project("value"), self.heads[0].dropout.p)
        y = y.transpose(1, 2).reshape(B, T, H * hs)                                     # heads side by side
        return self.dropout(self.proj(y))                                               # (B, T, C)


class SeparateQKVAttention(nn.Module):
    """minGPT's original `CausalSelfAttention` (separate key, query and value layers, `attn_drop`,
    `resid_drop`, the `mask` buffer), the same names, the attention on the kernels."""

    def __init__(self, n_embd, n_head, block_size, attn_pdrop=0.0, resid_pdrop=0.0, bias=True, impl="flash"):
        super().__init__()
        self.key = nn.Linear(n_embd, n_embd, bias=bias)
        self.query = nn.Linear(n_embd, n_embd, bias=bias)
        self.value = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_drop = nn.Dropout(attn_pdrop)
        self.resid_drop = nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.n_head, self.impl = n_head, impl

    def forward(self, x):
        B, T, C = x.shape                                                               # (B, T, C)
        q, k, v = (lin(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))                       # (B, H, T, D) each
        y = _attend(self, q, k, v, self.attn_drop.p).transpose(1, 2).reshape(B, T, C)    # (B, T, C)
        return self.resid_drop(self.proj(y))


def _dropout_p(module, name, default=0.0):
    m = getattr(module, name, None)
    return m.p if isinstance(m, nn.Dropout) else default


def _is_nanogpt_attention(module):
    return (all(hasattr(module, name) for name in ("c_attn", "c_proj", "n_head", "n_embd"))
            and isinstance(module.c_attn, nn.Linear) and module.c_attn.out_features == 3 * module.n_embd)


def _is_lecture_attention(module):
    heads = getattr(module, "heads", None)
    return (isinstance(heads, nn.ModuleList) and len(heads) > 0 and isinstance(getattr(module, "proj", None), nn.Linear)
            and all(all(isinstance(getattr(h, n, None), nn.Linear) for n in ("key", "query", "value"))
                    and isinstance(getattr(h, "tril", None), torch.Tensor) for h in heads))


def _is_separate_qkv_attention(module):
    return (all(isinstance(getattr(module, n, None), nn.Linear) for n in ("key", "query", "value", "proj"))
            and isinstance(getattr(module, "n_head", None), int) and isinstance(getattr(module, "mask", None), torch.Tensor))


def _replacement(child, impl):
    """(our module for `child`, the block size to check it against `child` at, or None for no
    check), or None for a layout swap_attention does not know."""
    if _is_nanogpt_attention(child):
        d = getattr(child, "dropout", 0.0)
        d = d.p if isinstance(d, nn.Dropout) else float(d)           # nanoGPT: a float; minGPT: none
        new = CausalSelfAttention(child.n_embd, child.n_head, bias=child.c_attn.bias is not None,
                                  dropout=_dropout_p(child, "resid_dropout", d),
                                  attn_pdrop=_dropout_p(child, "attn_dropout", d), impl=impl)
        return new, None  # one formula, and the layout may have no forward of its own to compare with
    if _is_lecture_attention(child):
        head = child.heads[0]
        new = LectureMultiHeadAttention(head.key.in_features, len(child.heads), head.key.out_features,
                                        head.tril.shape[0], bias=head.key.bias is not None,
                                        proj_bias=child.proj.bias is not None, impl=impl)
        new.dropout.p = _dropout_p(child, "dropout")
        for ours, theirs in zip(new.heads, child.heads):
            ours.dropout.p = _dropout_p(theirs, "dropout")
        return new, head.tril.shape[0]
    if _is_separate_qkv_attention(child):
        new = SeparateQKVAttention(child.key.in_features, child.n_head, child.mask.shape[-1],
                                   _dropout_p(child, "attn_drop"), _dropout_p(child, "resid_drop"),
                                   bias=child.key.bias is not None, impl=impl)
        return new, child.mask.shape[-1]
    return None


def _differs(old, new, block_size):
    """How far `new` is from `old` on a random (2, T, C) input, in eval mode: the max |difference|
    over the output's scale, or None where they agree (to rounding of their dtype)."""
    weight = next(new.parameters())  # the first layer's (out, C) weight in every layout
    C = weight.shape[-1]
    g = torch.Generator(device=weight.device).manual_seed(0)
    x = torch.randn(2, min(block_size, 16), C, generator=g, device=weight.device).to(weight.dtype)
    modes = old.training, new.training
    old.eval(), new.eval()
    try:
        with torch.no_grad():
            want, got = old(x).float(), new(x).float()
    finally:
        old.train(modes[0]), new.train(modes[1])
    err = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
    return err if err > (1e-4 if weight.dtype == torch.float32 else 3e-2) else None


def swap_attention(model, impl="flash"):
    """Replace, in place, every attention module of `model` in a layout this module knows (see
    the module docstring: nanoGPT's and minGPT's `CausalSelfAttention`, the lecture's
    `MultiHeadAttention`) by ours running `impl`, with the same weights, frozen parameters,
    device, dtype and train/eval mode; a module held in two places becomes one new module held in
    both. Modules that already are ours get `impl` set. Returns the names of the modules replaced
    or set (as `model.named_modules()` names them). Warns, naming them, about modules that look
    like attention (a class name with "Attention", "Attn" or "Head") but were left as they are,
    and when nothing was replaced. Build optimizers after swapping: the new modules have new
    parameters."""
    if impl not in MODULE_IMPLS:
        raise ValueError(f"impl must be one of {', '.join(map(repr, MODULE_IMPLS))}; got {impl!r}")
    ours = (CausalSelfAttention, LectureMultiHeadAttention, SeparateQKVAttention)
    if isinstance(model, ours):  # the model itself: nothing to replace it in, only its impl to set
        for m in model.modules():
            if hasattr(m, "impl"):
                m.impl = impl
        return [""]
    if _replacement(model, impl) is not None:
        raise ValueError(f"model is itself an attention module ({type(model).__name__}), which cannot be replaced in "
                         "place: pass the model that holds it, or build ours and load its state_dict")
    names = {id(m): n for n, m in model.named_modules()}
    done, left = {}, {}  # id(old module) -> its replacement; name -> why it was left
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):  # not named_children: it skips repeats
            if child is None:
                continue
            if id(child) in done:
                setattr(parent, name, done[id(child)])
                continue
            if isinstance(child, ours):
                for m in child.modules():
                    if hasattr(m, "impl"):
                        m.impl = impl
                done[id(child)] = child
                continue
            found = _replacement(child, impl)
            if found is None:
                continue
            new, block_size = found
            new.load_state_dict(child.state_dict())
            new.to(device=next(child.parameters()).device, dtype=next(child.parameters()).dtype)
            frozen = {n for n, p in child.named_parameters() if not p.requires_grad}
            for n, p in new.named_parameters():
                p.requires_grad_(n not in frozen)
            new.train(child.training)
            err = None if block_size is None else _differs(child, new, block_size)
            if err is not None:
                left[names.get(id(child), name)] = (f"{type(child).__name__} computes something else than the layout it "
                                                    f"looks like (relative difference {err:.1e}), e.g. another scale")
                continue
            setattr(parent, name, new)
            done[id(child)] = new
    replaced = [names.get(k, "") for k in done]
    inside = tuple(n + "." for n in replaced)
    for n, m in model.named_modules():
        if (n and n not in replaced and n not in left and not n.startswith(inside)
                and any(w in type(m).__name__.lower() for w in ("attention", "attn", "head"))):
            left[n] = f"{type(m).__name__} is not a layout swap_attention knows"
    if left:
        warnings.warn("swap_attention left these modules as they are: " + "; ".join(f"{n}: {why}"
                      for n, why in left.items()), stacklevel=2)
    if not replaced:
        warnings.warn(f"swap_attention replaced nothing in {type(model).__name__}: no module in nanoGPT's, minGPT's or "
                      "the lecture's attention layout (see attention_kernels.kernels.module)", stacklevel=2)
    return replaced
