"""kernels.CausalSelfAttention loads nanoGPT's attention weights unchanged and computes what
nanoGPT computes; swap_attention replaces nanoGPT's, minGPT's and the "Let's build GPT" lecture's
attention modules in place (the last two with unchanged state_dicts), and says what it left."""

import copy
import logging
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR
from attention_kernels.benchmarks.lecture import Block, Head
from attention_kernels.kernels import CausalSelfAttention, dropout_mask, swap_attention
import attention_kernels.kernels.dropout as dropout_module
from attention_kernels.testing.rule import assert_close, seed_of


class NanoGPTAttention(nn.Module):
    """nanoGPT's CausalSelfAttention (model.py), as its state dict and forward are: `flash` uses
    torch's SDPA; otherwise the manual path with the causal mask kept as the buffer "bias"."""

    def __init__(self, n_embd, n_head, bias=True, block_size=64, flash=True):
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=bias)
        self.c_proj = nn.Linear(n_embd, n_embd, bias=bias)
        self.attn_dropout, self.resid_dropout = nn.Dropout(0.0), nn.Dropout(0.0)
        self.n_head, self.n_embd, self.dropout, self.flash = n_head, n_embd, 0.0, flash
        if not flash:
            self.register_buffer("bias", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        if self.flash:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / k.size(-1) ** 0.5)
            att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


def inputs(B, T, C, seed):
    g = torch.Generator(DEVICE).manual_seed(seed)
    x = torch.randn(B, T, C, generator=g, device=DEVICE).requires_grad_()
    return x, torch.randn(B, T, C, generator=g, device=DEVICE)


def check_module(ours, theirs, x, dy):
    """Ours in float32 against theirs in float64 (truth) and float32 (low): output, input
    gradient and every parameter's gradient, under the project's rule."""
    floor = FLOOR[torch.float32]
    theirs64 = copy.deepcopy(theirs).double()
    x64 = x.detach().double().requires_grad_()
    xl = x.detach().clone().requires_grad_()
    got, truth, low = ours(x), theirs64(x64), theirs(xl)
    assert_close("y", got, truth, low, FACTOR, floor)
    got.backward(dy)
    truth.backward(dy.double())
    low.backward(dy)
    assert_close("dx", x.grad, x64.grad, xl.grad, GRAD_FACTOR, floor)
    for (name, p), p64, pl in zip(ours.named_parameters(), theirs64.parameters(), theirs.parameters()):
        assert_close(f"d{name}", p.grad, p64.grad, pl.grad, GRAD_FACTOR, floor)


@pytest.mark.parametrize("impl", ["flash", "fused", "auto"])
@pytest.mark.parametrize("flash_path", [True, False], ids=["nanogpt-sdpa", "nanogpt-manual"])
def test_loads_nanogpt_weights_and_matches_it(impl, flash_path):
    torch.manual_seed(seed_of(impl, flash_path))
    theirs = NanoGPTAttention(48, 3, flash=flash_path).to(DEVICE)   # D = 16
    ours = CausalSelfAttention(48, 3, impl=impl).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes (the mask buffer dropped)
    check_module(ours, theirs, *inputs(2, 13, 48, seed_of("x", impl, flash_path)))


def test_swap_replaces_every_nanogpt_attention_in_place():
    torch.manual_seed(seed_of("swap"))
    model = nn.Sequential(*(nn.Sequential(nn.LayerNorm(32), NanoGPTAttention(32, 2, bias=False, flash=False))
                            for _ in range(3))).to(DEVICE).eval()
    x, _ = inputs(2, 9, 32, seed_of("swap x"))
    before = model(x).detach()
    assert swap_attention(model, impl="flash") == ["0.1", "1.1", "2.1"]
    swapped = [m for m in model.modules() if isinstance(m, CausalSelfAttention)]
    assert len(swapped) == 3 and not any(isinstance(m, NanoGPTAttention) for m in model.modules())
    assert all(m.impl == "flash" and not m.training and m.c_attn.bias is None for m in swapped)
    after = model(x)
    assert torch.allclose(after, before, atol=1e-5), (after - before).abs().max()
    assert len(swap_attention(model, impl="fused")) == 3 and all(m.impl == "fused" for m in swapped)


def test_swap_keeps_sharing_and_frozen_parameters():
    torch.manual_seed(seed_of("swap shared"))
    shared = NanoGPTAttention(16, 2).to(DEVICE)
    shared.c_proj.weight.requires_grad_(False)
    model = nn.Module()
    model.a, model.b = shared, nn.Sequential(shared)
    model.c = shared  # one module under two names of one parent
    assert swap_attention(model) == ["a"]
    assert model.a is model.b[0] is model.c and isinstance(model.a, CausalSelfAttention)
    assert not model.a.c_proj.weight.requires_grad and model.a.c_attn.weight.requires_grad
    with pytest.raises(ValueError, match="cannot be replaced in place"):
        swap_attention(NanoGPTAttention(16, 2))


def test_grouped_query_variant_matches_torch_sdpa():
    # the truth is torch's SDPA (enable_gqa) in float64, not the project's reference
    torch.manual_seed(seed_of("gqa"))
    ours = CausalSelfAttention(64, 4, n_kv_head=1, impl="flash").to(DEVICE)   # multi-query, D = 16
    assert ours.c_attn.out_features == 64 + 2 * 16
    truth, low = copy.deepcopy(ours).double(), copy.deepcopy(ours)
    truth.impl, low.impl = "sdpa", "sdpa"
    x, dy = inputs(2, 19, 64, seed_of("gqa x"))
    got, want, base = ours(x), truth(x.detach().double()), low(x.detach())
    assert_close("y", got, want, base, FACTOR, FLOOR[torch.float32])
    got.backward(dy)  # the backward runs through the shared k/v head


def record_dropout_seeds(monkeypatch):
    """The seeds the kernels' calls draw from torch's generator, in call order."""
    seeds, draw = [], dropout_module.draw_seed
    monkeypatch.setattr(dropout_module, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])
    return seeds


def written_out_causal_dropout(q, k, v, keep, p):
    """float64 causal attention of q, k, v (B, H, T, D) with dropout as torch's F.dropout has it:
    softmax(q k^T / sqrt(D) + causal mask), kept weights times 1 / (1 - p), dropped ones 0, @ v."""
    q, k, v = (x.double() for x in (q, k, v))
    T = q.shape[2]
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    w = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])).masked_fill(future, float("-inf")), -1)
    return torch.where(keep, w / (1 - p), 0.0) @ v                                    # (B, H, T, D)


def test_training_with_dropout_runs_the_kernels_with_dropout(monkeypatch):
    """Training with dropout drops attention weights on the kernel (here fused), reproducibly
    under torch.manual_seed, as torch's dropout does (written out, with the call's mask); eval
    mode has none."""
    torch.manual_seed(seed_of("dropout"))
    p = 0.5
    ours = CausalSelfAttention(32, 2, dropout=p, impl="fused").to(DEVICE).train()
    ours.resid_dropout.p = 0.0  # only the attention weights' dropout left on
    x, _ = inputs(2, 8, 32, seed_of("dropout x"))
    seeds = record_dropout_seeds(monkeypatch)
    torch.manual_seed(3)
    got = ours(x)
    torch.manual_seed(3)
    assert torch.equal(got, ours(x))
    assert not torch.equal(got, ours(x))
    assert len(seeds) == 3 and seeds[0] == seeds[1] != seeds[2]
    # the truth: nanoGPT's projections in float64, the attention written out with the call's mask
    m64 = copy.deepcopy(ours).double()
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, 16).transpose(1, 2) for t in m64.c_attn(x.detach().double()).split(C, dim=2))
    keep = dropout_mask(B, 2, T, T, p, seeds[0], DEVICE)
    y = written_out_causal_dropout(q, k, v, keep, p).transpose(1, 2).reshape(B, T, C)
    torch.testing.assert_close(got.double(), m64.c_proj(y), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours.eval()(x), got, atol=1e-3)
    torch_path = copy.deepcopy(ours)
    torch_path.impl = "sdpa"
    assert torch.allclose(ours(x), torch_path(x), atol=1e-5)  # eval: no dropout, the kernels run


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_embd=30, n_head=4), "multiple of n_head"),
    (dict(n_embd=32, n_head=4, n_kv_head=3), "multiple of n_kv_head"),
    (dict(n_embd=32, n_head=4, impl="cuda"), "impl must be one of"),
    (dict(n_embd=12, n_head=0), "n_head must be an int >= 1, got 0"),          # was a ZeroDivisionError
    (dict(n_embd=12, n_head=4, n_kv_head=0), "n_kv_head must be an int >= 1, got 0"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CausalSelfAttention(**kwargs)


# ----------------------------------------------------------------------------- the lecture's and minGPT's


class HeadScaledByC(Head):
    """The lecture's earlier Head, which scaled the scores by C ** -0.5 instead of head_size ** -0.5."""

    def forward(self, x):
        B, T, C = x.shape
        wei = self.query(x) @ self.key(x).transpose(-2, -1) * C ** -0.5
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))
        return self.dropout(F.softmax(wei, dim=-1)) @ self.value(x)


class MinGPTAttention(nn.Module):
    """minGPT's original CausalSelfAttention (separate key, query and value layers)."""

    def __init__(self, n_embd, n_head, block_size, attn_pdrop, resid_pdrop):
        super().__init__()
        self.key, self.query, self.value = (nn.Linear(n_embd, n_embd) for _ in range(3))
        self.attn_drop, self.resid_drop = nn.Dropout(attn_pdrop), nn.Dropout(resid_pdrop)
        self.proj = nn.Linear(n_embd, n_embd)
        self.register_buffer("mask", torch.tril(torch.ones(block_size, block_size)).view(1, 1, block_size, block_size))
        self.n_head = n_head

    def forward(self, x):
        B, T, C = x.size()
        k = self.key(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = self.query(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = self.value(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.mask[:, :, :T, :T] == 0, float('-inf'))
        att = self.attn_drop(F.softmax(att, dim=-1))
        y = (att @ v).transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_drop(self.proj(y))


def lecture_model(dropout=0.0, scale_by_C=False, seed=0):
    """The lecture's blocks (benchmarks/lecture.py: gpt.py's classes) at its seed sizes: C = 16
    over 4 heads, block size 8, two blocks."""
    torch.manual_seed(seed)
    model = nn.Sequential(Block(16, 4, 8, dropout), Block(16, 4, 8, dropout)).to(DEVICE)
    if scale_by_C:
        for head in (h for block in model for h in block.sa.heads):
            head.__class__ = HeadScaledByC
    return model


def mingpt_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.LayerNorm(32), MinGPTAttention(32, 4, 16, 0.0, 0.0)).to(DEVICE)


@pytest.mark.parametrize("make, swapped", [(lecture_model, ["0.sa", "1.sa"]), (mingpt_model, ["1"])],
                         ids=["lecture", "mingpt"])
def test_swap_keeps_the_state_dict_and_computes_the_same(make, swapped):
    """One kernel call per layer for all heads, the same names and shapes in the state_dict (it loads
    both ways, strict), and outputs and gradients under the rule against the original in float64."""
    theirs = make().eval()
    ours = copy.deepcopy(theirs)
    assert swap_attention(ours, impl="flash") == swapped
    assert not any(isinstance(m, (Head, MinGPTAttention)) for m in ours.modules())
    want_sd, got_sd = theirs.state_dict(), ours.state_dict()
    assert list(got_sd) == list(want_sd) and all(got_sd[k].shape == want_sd[k].shape for k in want_sd)
    make(seed=1).load_state_dict(got_sd)  # ours into theirs, and theirs into ours
    ours.load_state_dict(want_sd)
    C = 16 if make is lecture_model else 32
    check_module(ours, theirs, *inputs(2, 8, C, seed_of("swap layouts", make.__name__)))


def test_the_lecture_trains_with_dropout_on_the_kernels(monkeypatch):
    """With the lecture's dropout 0.2, training drops attention weights on the kernel, never
    silently not, as torch's dropout does (each layer's output written out with its call's mask);
    eval runs the kernels and equals the original."""
    theirs = lecture_model(dropout=0.2)
    ours = copy.deepcopy(theirs)
    swap_attention(ours)
    for name, m in ours.named_modules():  # only the attention weights' dropout left on
        if isinstance(m, nn.Dropout) and ".heads." not in name:
            m.p = 0.0
    seen = []  # (layer, its input, its output), in call order
    for block in ours:
        block.sa.register_forward_hook(lambda module, args, out: seen.append((module, args[0], out)))
    seeds = record_dropout_seeds(monkeypatch)
    x, _ = inputs(2, 8, 16, seed_of("lecture dropout"))
    a, b = ours(x), ours(x)
    assert not torch.equal(a, b)  # weights dropped, differently each call
    assert len(seeds) == len(seen) == 4 and len(set(seeds)) == 4  # one draw per layer and call
    for (layer, h, out), seed in zip(seen, seeds):
        q, k, v = (torch.stack([getattr(head, name)(h).double() for head in layer.heads], 1)  # (B, H, T, hs)
                   for name in ("query", "key", "value"))
        keep = dropout_mask(h.shape[0], len(layer.heads), h.shape[1], h.shape[1], 0.2, seed, DEVICE)
        y = written_out_causal_dropout(q, k, v, keep, 0.2)
        y = y.transpose(1, 2).reshape(h.shape[0], h.shape[1], -1)                    # (B, T, H * hs)
        want = F.linear(y, layer.proj.weight.double(), layer.proj.bias.double())
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)
    theirs.eval(), ours.eval()
    assert torch.allclose(ours(x), theirs(x), atol=1e-5)


def test_a_layer_that_computes_something_else_is_left_and_named():
    """The lecture's earlier code scaled by C, not the head size: it looks like the layout but is
    not it, so it is left as it is, and the warning says why."""
    model = lecture_model(scale_by_C=True).eval()
    x, _ = inputs(2, 8, 16, seed_of("scale by C"))
    before = model(x)
    with pytest.warns(UserWarning, match=r"0.sa: MultiHeadAttention computes something else"):
        assert swap_attention(model) == []
    assert torch.equal(model(x), before)


def test_swap_names_what_it_cannot_recognise():
    model = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    with pytest.warns(UserWarning) as seen:
        assert swap_attention(model) == []
    said = " / ".join(str(w.message) for w in seen)
    assert "0: MultiheadAttention is not a layout swap_attention knows" in said
    assert "replaced nothing in Sequential" in said
