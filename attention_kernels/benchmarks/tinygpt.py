"""
A tiny character-level GPT trained once per attention implementation, from the same seed, the
same initial weights and the same batches, so that the loss curves can be laid on top of each
other: the kernels are right inside a model when the curves agree to rounding.

    python -m attention_kernels.benchmarks.tinygpt                              # `gpu` preset on a GPU, `seed` on the CPU
    python -m attention_kernels.benchmarks.tinygpt --preset seed --steps 100 --impl flash sdpa
    python -m attention_kernels.benchmarks.tinygpt -T 64 -C 64 --heads 4 --layers 2 --data my.txt
    python -m attention_kernels.benchmarks.tinygpt --model lecture              # the lecture's gpt.py, with dropout, on the kernels

The model is nanoGPT's: token and position embeddings, `layers` blocks of LayerNorm -> causal
self-attention -> residual, LayerNorm -> MLP (4C, GELU) -> residual, a final LayerNorm and an lm
head tied to the token embedding. Its attention is `kernels.module.CausalSelfAttention` with
impl "reference" (eager PyTorch, the baseline, always run), "fused", "flash" or "sdpa" (torch's
own scaled_dot_product_attention). No dropout, so every run is deterministic. It trains with
AdamW at a constant learning rate (after a linear warm-up in the gpu preset, as nanoGPT does) on
`data/attention.txt`, a few KB of prose about attention (any text file with --data), and then
samples text, one plain forward over the cropped context per character. Last it generates up to
the block size twice, with a KV cache and without (`generate`), and checks that the two give the
same characters from the same logits, to rounding: the cache holds each layer's keys and values,
the prompt runs once (prefill) and then each new character alone, its attention
`kernels.decode_attention` against the cache.

Presets (B sequences of T characters, width C, heads, layers):
    seed   B 4, T 8, C 16, 1 head of 16, 1 layer, fp32, lr 1e-3, 200 steps: the project's founding
           example (Karpathy's "Let's build GPT": one head of 16 channels). About a minute on a
           2-core CPU under Triton's interpreter, four impls together (a training step takes
           ~0.15 s with the fused kernel, ~0.18 s with flash, 2 ms without).
    gpu    B 64, T 256, C 384, 6 heads of 64, 6 layers, bf16 autocast, lr 1e-3 after 50 warm-up
           steps, 300 steps: nanoGPT's shakespeare-char baby GPT without its dropout. On a few KB of
           text it memorizes; give it more with --data.

Printed, and written to --out (default runs/tinygpt-<time>/) as log.txt, with every step's loss
in losses.csv (step, impl, loss):
    final loss     mean training loss of the last 10 steps
    max |dloss|    the largest |loss - reference's loss| at the same step, over all steps (nats)
    tokens/s       training tokens (B * T per step) per second of forward, backward and AdamW,
                   after 5 warm-up steps; on a GPU synchronized. Under the CPU interpreter this
                   says nothing about GPU speed: the kernels run as numpy, program by program.
    peak MiB       memory one training step allocates beyond what exists before it (weights and
                   optimizer state): `benchmarks.measure.peak_mib`, i.e.
                   torch.cuda.max_memory_allocated on a GPU, live tensor storage on the CPU.
and, for generation (T - 1 characters after "\n", greedy, fp32 whatever --dtype):
    same tokens    yes when generation with the KV cache gives the tokens it gives without
    max |dlogit|   the largest difference between the logits each character was chosen from,
                   with the cache and without
    cached tok/s   new characters per second with the cache, and without it (on a GPU the second
    uncached tok/s of two runs: the first compiles the kernels)
    paged same     yes when prompts of 1, 2, 3 and 5 characters, generated up to the block size in
                   one batch through a paged KV cache (`generate_paged`: prompts read 2 characters
                   a step while the others decode, `kernels.paged_attention` appending each
                   layer's keys and values to their pages), give each the tokens it gives alone
                   through the cache above
    paged |dlogit| the largest difference between their logits
    mixed steps    how many of the batch's steps read a prompt while another sequence decoded
It exits 1 if any impl's loss leaves the reference's by more than TOLERANCE nats at any step, or if
any impl's generation with the cache (contiguous or paged) gives other tokens than without, or
logits more than LOGITS_TOLERANCE apart.

Why those bounds: two correct attentions round differently, and training amplifies the
difference. Measured on the seed preset's shape with 2 heads of 8, fp32, the worst seed (with its
one head of 16, 200 steps: 5e-7 for fused, flash and sdpa alike): over 100 steps fused and flash
part from the reference by 1e-6 nats (4 seeds) and sdpa by 7e-7 (20 seeds); sdpa by 5e-5 over 300
steps and 3e-4 over 500. The fp32 bound, 1e-3, is above all of that and below what a wrong kernel
gives in 100 steps: 0.13 for a causal mask that leaks the future, 6e-3 for a dv 1% too large.
Longer or faster, the runs part like any chaotic system: at lr 1e-2 two correct fp32 runs differ
by up to 0.4 nats on one batch within 500 steps, which is why the seed preset trains at 1e-3.
bf16 rounds 2^16 times coarser: over 100 steps flash parts by 2e-2 (4 seeds), sdpa by 1e-2 (20
seeds), and by 300 steps two correct runs differ by 0.2 on a 32-character batch. The bf16 bound,
5e-2, holds for about 100 seed-preset steps; for the gpu preset it is a guess until measured on a
GPU. When sdpa, torch's own attention, fails too, blame the settings, not a kernel.

Generation compares logits as well as tokens because the seed preset's model, near a unigram
model after 200 steps, hardly looks at its context: its greedy characters stay the same under a
cache that drops the newest key, its logits move by 6e-3 (by 1.5e-2 after 7 steps; adding 1 to
the attention output moves them by 8e-2). With a correct cache they differ by 5e-7 (reference,
sdpa) and 7e-7 (fused, flash), in fp32: hence LOGITS_TOLERANCE, 1e-4, in between; for the gpu
preset a guess until measured on a GPU. Generation runs in fp32 whatever --dtype: the check is of
the cache, and in bf16, which rounds 2^16 times coarser, a bound on the logits would be a guess.
"""

import argparse
import csv
import datetime
import math
import os
import sys
import time
from dataclasses import dataclass, replace

import torch

from .impls import DEVICE  # first: sets up the interpreter on a CPU

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_kernels import reference  # noqa: E402
from .measure import peak_mib  # noqa: E402
from .sweep import environment, fmt, positive, run_log  # noqa: E402
from .training import (DATA, FINAL_STEPS, adamw, autocast, batch_offsets, encode, get_batch, load_text,  # noqa: E402,F401
                       max_deviation, set_lr, synchronize)
from attention_kernels.kernels import PagedKVCache, decode_attention, flash_attention, paged_attention  # noqa: E402
from attention_kernels.kernels.module import MODULE_IMPLS, CausalSelfAttention  # noqa: E402

IMPLS = ("reference", "fused", "flash", "sdpa")
WARMUP = 5       # untimed steps; the last one is measured for memory (autotuning and AdamW state exist by then)
PROGRESS_LINES = 10  # per impl's training, on stderr: a kernel's run takes a minute on the CPU
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # largest |loss - reference's loss| in nats at any step; see the docstring
LOGITS_TOLERANCE = 1e-4  # largest |logit with the KV cache - without| in generation (fp32); see the docstring
PAGED_PROMPTS = (1, 2, 3, 5)  # prompt lengths of the batched generation through the paged cache
CPU_NOTE = ("NOTE: no CUDA GPU, so the kernels run under Triton's CPU interpreter (numpy). Tokens/s "
            "says nothing about GPU speed; the losses and samples are what to compare.")


@dataclass
class Config:
    B: int = 4        # sequences per batch
    T: int = 8        # context length, characters
    C: int = 16       # model width
    heads: int = 1    # the founding example's single head of 16 channels
    layers: int = 1
    steps: int = 200
    lr: float = 1e-3  # at 1e-2 training this tiny model is chaotic: rounding differences grow ~10% a step
    lr_warmup: int = 0  # steps of linear learning-rate warm-up: without it 6 layers at 1e-3 spike at once
    dtype: str = "fp32"  # "bf16": autocast, weights and AdamW stay fp32 (as nanoGPT does)


PRESETS = {
    "seed": Config(),
    "gpu": Config(B=64, T=256, C=384, heads=6, layers=6, steps=300, lr=1e-3, lr_warmup=50, dtype="bf16"),
}


# ----------------------------------------------------------------------------- the model


class MLP(nn.Module):
    def __init__(self, C):
        super().__init__()
        self.c_fc = nn.Linear(C, 4 * C, bias=False)
        self.c_proj = nn.Linear(4 * C, C, bias=False)

    def forward(self, x):                               # (B, T, C)
        return self.c_proj(F.gelu(self.c_fc(x)))        # through (B, T, 4C)


class KVCache:
    """One layer's keys and values of every token generated so far, so that each new token computes
    only its own: k and v (B, H, Tmax, D), allocated once at the first write (in the keys' dtype),
    of which the first `length` positions are filled."""

    def __init__(self, Tmax):
        self.Tmax, self.length = Tmax, 0
        self.k = self.v = None

    def append(self, k, v):
        """Write k, v (B, H, T, D) at the next T positions; return the whole cache (k, v)."""
        B, H, T, D = k.shape
        if self.length + T > self.Tmax:
            raise ValueError(f"the KV cache holds {self.Tmax} positions, {self.length} filled: {T} more do not fit")
        if self.k is None:
            self.k = k.new_zeros(B, H, self.Tmax, D)                     # (B, H, Tmax, D)
            self.v = v.new_zeros(B, H, self.Tmax, D)
        self.k[:, :, self.length:self.length + T] = k
        self.v[:, :, self.length:self.length + T] = v
        self.length += T
        return self.k, self.v


class PagedStep:
    """One step of batched generation through a `kernels.PagedKVCache`: sequence slots `seqs` bring
    counts[i] new tokens each, packed into one row (1, total_q) in that order (a chunk of a prompt,
    or the one token a decoding sequence chose last). Each layer's attention appends its keys and
    values to the sequences' pages and attends over them (`kernels.paged_attention`; impl
    "reference": the same pages written by indexing, then `reference.paged_attention`)."""

    def __init__(self, cache, seqs, counts, device):
        for seq, n in zip(seqs, counts):
            cache.reserve(seq, n)
        self.cache, self.seqs, self.counts = cache, seqs, counts
        self.cu = torch.tensor([0, *counts], device=device).cumsum(0).to(torch.int32)  # (B + 1,)
        self.positions = torch.cat([torch.arange(cache.lengths[s], cache.lengths[s] + n, device=device)
                                    for s, n in zip(seqs, counts)])       # (total_q,) each token's position
        self.last = (self.cu[1:] - 1).long()                               # (B,) each sequence's last token
        index = torch.tensor(seqs, device=device)                          # (B,) the sequence slots
        self.new = torch.tensor(counts, dtype=torch.int32, device=device)  # (B,) their new tokens
        # the same in every layer (reserve is done, advance comes after the last): gathered once
        self.table, self.seqlens = cache.block_table[index], cache.seqlens[index]  # (B, max_pages), (B,)
        seq = torch.repeat_interleave(torch.arange(len(seqs), device=device), self.new)  # (total_q,) row of table
        page_size = cache.page_size
        self.page = self.table[seq, self.positions // page_size].long()   # (total_q,) each new token's page
        self.slot = self.positions % page_size                             # (total_q,) and slot in it

    def layers(self, n):
        return [PagedLayer(self, i) for i in range(n)]

    def attend(self, layer, q, k, v, impl):
        k_cache, v_cache = self.cache.k[layer], self.cache.v[layer]
        if impl != "reference":
            return paged_attention(q, k_cache, v_cache, self.table, self.seqlens, self.cu, max(self.counts), k, v)
        k_cache[self.page, self.slot] = k                                  # the new tokens into their slots
        v_cache[self.page, self.slot] = v
        return reference.paged_attention(q, k_cache, v_cache, self.table, self.seqlens + self.new, self.cu)

    def done(self):
        self.cache.advance(self.seqs, self.counts)


class PagedLayer:
    """Layer `layer`'s view of a PagedStep: what CachedSelfAttention receives as its cache."""

    def __init__(self, step, layer):
        self.step, self.layer = step, layer

    def attend(self, q, k, v, impl):
        return self.step.attend(self.layer, q, k, v, impl)


class CachedSelfAttention(CausalSelfAttention):
    """`kernels.module.CausalSelfAttention` (nanoGPT's, the attention step by `impl`) with a KV
    cache for generation. Given a cache, x holds only the tokens after the cached ones; their k
    and v are written into the cache first. The prompt (the cache empty) attends to itself, causal;
    each later token attends to the cache up to and including itself. Impl "reference" does both
    with the reference (PyTorch); every other impl with the kernels: `flash_attention` for the
    prompt, `decode_attention` for the tokens after it."""

    def forward(self, x, cache=None):
        if cache is None:
            return super().forward(x)
        if isinstance(cache, PagedLayer):  # several sequences' new tokens packed: x (1, total_q, C)
            _, T, C = x.shape
            q, k, v = (t.view(T, self.n_head, self.head_dim) for t in self.c_attn(x[0]).split(C, dim=1))  # (T, H, D)
            y = cache.attend(q, k, v, self.impl)                           # (T, H, D)
            return self.resid_dropout(self.c_proj(y.reshape(1, T, C)))
        B, T, C = x.shape                                                  # (B, T, C): the tokens after the cache
        q, k, v = self.c_attn(x).split(C, dim=2)                           # (B, T, C) x 3
        q, k, v = (t.view(B, T, self.n_head, self.head_dim).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        prefill = cache.length == 0                                        # the prompt: the cache still empty
        k_cache, v_cache = cache.append(k, v)                              # (B, H, Tmax, D) each, these T included
        if prefill:  # the prompt attends to itself
            attend = reference.attention if self.impl == "reference" else flash_attention
            y = attend(q, k, v, causal=True)                               # (B, H, T, D)
        else:  # token t of T, at position length - T + t, sees the cache up to its own position
            lengths = torch.full((B,), cache.length, dtype=torch.int32, device=x.device)  # (B,) valid positions
            decode = reference.decode_attention if self.impl == "reference" else decode_attention
            y = decode(q, k_cache, v_cache, lengths)                       # (B, H, T, D)
        y = y.transpose(1, 2).reshape(B, T, C)                             # (B, T, C): heads side by side
        return self.resid_dropout(self.c_proj(y))


class Block(nn.Module):
    """One transformer block, pre-LayerNorm as in GPT-2: attention then MLP, each added back."""

    def __init__(self, cfg, impl):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.C, bias=False)
        self.attn = CachedSelfAttention(cfg.C, cfg.heads, bias=False, dropout=0.0, impl=impl)
        self.ln_2 = nn.LayerNorm(cfg.C, bias=False)
        self.mlp = MLP(cfg.C)

    def forward(self, x, cache=None):  # (B, T, C); cache: this block's KVCache when generating with one
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class TinyGPT(nn.Module):
    """nanoGPT's GPT at any size, its attention run by `impl`. The impl changes no parameter, so
    one set of initial weights loads into the model of every impl."""

    def __init__(self, vocab_size, cfg, impl):
        super().__init__()
        self.T = cfg.T
        self.wte = nn.Embedding(vocab_size, cfg.C)
        self.wpe = nn.Embedding(cfg.T, cfg.C)
        self.h = nn.ModuleList(Block(cfg, impl) for _ in range(cfg.layers))
        self.ln_f = nn.LayerNorm(cfg.C, bias=False)
        self.lm_head = nn.Linear(cfg.C, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight  # tied: reading and writing a character share a vector
        for name, p in self.named_parameters():
            if p.dim() == 2:  # nanoGPT's init; the projections into the residual scaled by depth
                std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith("c_proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets=None, caches=None, positions=None):
        """idx (B, T) character ids; with `caches` (one KVCache per block) the T characters after
        those cached, at the positions after theirs. Positions stop at the block size self.T.
        `positions` (T,) overrides them: packed sequences' own (PagedStep), a shard's (benchmarks.ring)."""
        B, T = idx.shape                                                   # (B, T) character ids
        if positions is None:
            start = caches[0].length if caches else 0
            positions = torch.arange(start, start + T, device=idx.device)  # (T,)
        x = self.wte(idx) + self.wpe(positions)                            # (B, T, C)
        for block, cache in zip(self.h, caches or [None] * len(self.h)):
            x = block(x, cache)                                            # (B, T, C)
        logits = self.lm_head(self.ln_f(x))                                # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(B * T, -1), targets.view(B * T))


# ----------------------------------------------------------------------------- training


def train(impl, cfg, vocab_size, init, data, offsets, progress=None):
    """Train a TinyGPT running `impl` from the weights `init` on the batches `offsets`. Returns
    (model, losses per step, training tokens/s after the warm-up, peak MiB of one step).
    progress(step, loss), if given, is called PROGRESS_LINES times, evenly over the steps."""
    every = max(1, cfg.steps // PROGRESS_LINES)
    model = TinyGPT(vocab_size, cfg, impl).to(DEVICE)
    model.load_state_dict(init)
    optimizer = adamw(model, cfg)
    losses = []

    def step(i):
        set_lr(optimizer, cfg, i)
        x, y = get_batch(data, offsets[i], cfg.T)    # (B, T) each
        with autocast(cfg.dtype):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())                 # read later: .item() here would sync the GPU every step
        if progress and (i + 1) % every == 0:
            progress(i + 1, loss.item())

    for i in range(WARMUP - 1):
        step(i)
    peak = peak_mib(lambda: step(WARMUP - 1))
    synchronize()
    start = time.perf_counter()
    for i in range(WARMUP, cfg.steps):
        step(i)
    synchronize()
    tokens_per_s = (cfg.steps - WARMUP) * cfg.B * cfg.T / (time.perf_counter() - start)
    return model, torch.stack(losses).tolist(), tokens_per_s, peak


@torch.no_grad()
def sample(model, alphabet, length, seed=0, dtype="fp32", start="\n"):
    """`length` characters drawn one at a time from the model's softmax with a seeded generator,
    each from a plain forward over the last T characters."""
    model.eval()
    g = torch.Generator(DEVICE).manual_seed(seed)
    idx = encode(start, alphabet).to(DEVICE)[None]                 # (1, t)
    for _ in range(length):
        with autocast(dtype):
            logits, _ = model(idx[:, -model.T:])                   # (1, t, vocab)
        probs = F.softmax(logits[:, -1].float(), dim=-1)           # (1, vocab): the next character
        idx = torch.cat([idx, torch.multinomial(probs, 1, generator=g)], dim=1)
    model.train()
    return "".join(alphabet[i] for i in idx[0, len(start):].tolist())


@torch.no_grad()
def generate(model, idx, max_new_tokens, use_cache=False, greedy=False, temperature=1.0, seed=0,
             return_logits=False):
    """idx (B, t) followed by max_new_tokens more characters, (B, t + max_new_tokens): each the
    argmax of the logits (greedy) or drawn from softmax(logits / temperature) with a generator
    seeded by `seed`; with `return_logits`, also the logits each was chosen from, fp32
    (B, max_new_tokens, vocab). Without the cache each step reruns the model over the whole
    sequence; with it the prompt runs once and then each new token alone against the cache
    (CachedSelfAttention). Both give the same tokens, from logits equal to rounding.

    The position embeddings are learned for the block size T only, so t + max_new_tokens may not
    exceed it (`sample` crops the context instead, which a cache cannot: every key would move)."""
    B, t = idx.shape
    if t + max_new_tokens > model.T:
        raise ValueError(f"a prompt of {t} tokens and max_new_tokens={max_new_tokens} make {t + max_new_tokens} "
                         f"positions, more than the model's block size T={model.T} (its position embeddings are "
                         f"learned for {model.T} positions): ask for at most {max(model.T - t, 0)} new tokens")
    training = model.training
    model.eval()
    g = torch.Generator(idx.device).manual_seed(seed)
    caches = [KVCache(model.T) for _ in model.h] if use_cache else None
    new, steps = idx, []                                               # (B, t): what the cache lacks
    for _ in range(max_new_tokens):
        logits, _ = model(new, caches=caches) if use_cache else model(idx)  # (B, t or 1, vocab)
        logits = logits[:, -1].float()                                 # (B, vocab): the next token's
        if greedy:
            new = logits.argmax(dim=-1, keepdim=True)                  # (B, 1)
        else:
            new = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=g)  # (B, 1)
        idx = torch.cat([idx, new], dim=1)                             # (B, t + 1)
        steps.append(logits)
    model.train(training)
    return (idx, torch.stack(steps, dim=1)) if return_logits else idx  # logits (B, max_new_tokens, vocab)


@torch.no_grad()
def generate_paged(model, prompts, max_new_tokens, chunk=2, page_size=4):
    """Greedy generation for prompts of different lengths (a list of 1-D tensors) in one batch
    through a paged KV cache: every step packs each unfinished sequence's new tokens, the next
    `chunk` characters of a prompt still being read (chunked prefill) or the one character it
    chose last (decoding), so prompts are read while other sequences decode. A sequence stops
    after max_new_tokens[i] characters and gives its pages back. Returns each prompt followed by
    its characters, the logits each was chosen from ((n_i, vocab) each), and how many steps mixed
    prefill chunks with decoding."""
    training = model.training
    model.eval()
    device = prompts[0].device
    H, D = model.h[0].attn.n_head, model.h[0].attn.head_dim
    longest = max(len(p) + n for p, n in zip(prompts, max_new_tokens))
    if longest > model.T:
        raise ValueError(f"a prompt and its new tokens make {longest} positions, more than the block size T={model.T}")
    if min(len(p) for p in prompts) < 1:
        raise ValueError("every prompt needs a token at least (the first character's logits come from it)")
    pages = -(-model.T // page_size)
    cache = PagedKVCache(len(model.h), len(prompts) * pages, page_size, H, D, max_seqs=len(prompts), max_pages=pages,
                         dtype=model.lm_head.weight.dtype, device=device)
    tokens = [p.tolist() for p in prompts]
    read = [0] * len(prompts)                                          # prompt characters in the cache
    logits_of = [[] for _ in prompts]
    mixed = 0
    while True:
        live = [i for i, (p, n) in enumerate(zip(prompts, max_new_tokens)) if len(tokens[i]) < len(p) + n]
        if not live:
            break
        feed = [tokens[i][read[i]:read[i] + chunk] if read[i] < len(prompts[i]) else tokens[i][-1:] for i in live]
        mixed += len({read[i] < len(prompts[i]) for i in live}) == 2
        step = PagedStep(cache, live, [len(f) for f in feed], device)
        idx = torch.tensor([sum(feed, [])], device=device)             # (1, total_q)
        logits, _ = model(idx, caches=step.layers(len(model.h)), positions=step.positions)  # (1, total_q, vocab)
        step.done()
        for j, i in enumerate(live):
            read[i] += len(feed[j])
            if read[i] >= len(prompts[i]):                             # its prompt is in: choose the next one
                row = logits[0, step.last[j]].float()                  # (vocab,)
                logits_of[i].append(row)
                tokens[i].append(int(row.argmax()))
                if len(tokens[i]) == len(prompts[i]) + max_new_tokens[i]:
                    cache.free(i)
    model.train(training)
    vocab = model.lm_head.out_features
    return ([torch.tensor(t, device=device) for t in tokens],
            [torch.stack(l) if l else torch.zeros(0, vocab, device=device) for l in logits_of], mixed)


def paged_against_unbatched(model, data, T):
    """Greedy characters after PAGED_PROMPTS prompts of the text (lengths 1, 2, 3, 5, ... below
    the block size), batched through the paged cache and one at a time through the contiguous
    cache (`generate`): (same tokens, max |dlogit|, steps that mixed prefill and decoding)."""
    lengths = [min(n, T - 1) for n in PAGED_PROMPTS]
    prompts = [data[17 * i:17 * i + n].to(DEVICE) for i, n in enumerate(lengths)]
    new = [T - n for n in lengths]
    batched, logits, mixed = generate_paged(model, prompts, new, chunk=2, page_size=max(4, T // 16))
    same, worst = True, 0.0
    for p, n, tokens, got in zip(prompts, new, batched, logits):
        alone, want = generate(model, p[None], n, use_cache=True, greedy=True, return_logits=True)
        same &= torch.equal(tokens, alone[0])
        worst = max(worst, (got - want[0]).abs().max().item())
    return same, worst, mixed


def time_generation(model, idx, max_new_tokens, use_cache):
    """(tokens, logits, new tokens per second) of greedy `generate`; on a GPU timed on a second
    run, the first having compiled the kernels (the interpreter compiles nothing)."""
    if DEVICE == "cuda":
        generate(model, idx, max_new_tokens, use_cache, greedy=True)
        synchronize()
    start = time.perf_counter()
    tokens, logits = generate(model, idx, max_new_tokens, use_cache, greedy=True, return_logits=True)
    synchronize()
    return tokens, logits, idx.shape[0] * max_new_tokens / (time.perf_counter() - start)


# ----------------------------------------------------------------------------- the run


def config_from(args):
    preset = args.preset or ("gpu" if DEVICE == "cuda" else "seed")
    if preset == "gpu" and DEVICE == "cpu":
        raise SystemExit("the gpu preset needs a GPU (a step would take minutes under the CPU interpreter); "
                         "on the CPU use the seed preset, with -B, -T, -C, --heads, --layers to grow it")
    cfg = replace(PRESETS[preset], **{k: v for k, v in (("B", args.batch), ("T", args.seqlen), ("C", args.width),
                                                        ("heads", args.heads), ("layers", args.layers),
                                                        ("steps", args.steps), ("lr", args.lr),
                                                        ("dtype", args.dtype)) if v is not None})
    if cfg.C % cfg.heads:
        raise SystemExit(f"--heads {cfg.heads} does not divide C={cfg.C}: the head dim is C / heads. "
                         f"For C={cfg.C}, heads may be one of {[h for h in range(1, cfg.C + 1) if cfg.C % h == 0]}")
    if cfg.steps <= WARMUP:
        raise SystemExit(f"--steps must be more than the {WARMUP} warm-up steps, got {cfg.steps}")
    return preset, cfg


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="default: gpu on a GPU, seed on the CPU")
    p.add_argument("-B", "--batch", type=positive(int))
    p.add_argument("-T", "--seqlen", type=positive(int), help="context length")
    p.add_argument("-C", "--width", type=positive(int), help="model width C = heads * head dim")
    p.add_argument("--heads", type=positive(int))
    p.add_argument("--layers", type=positive(int))
    p.add_argument("--steps", type=positive(int))
    p.add_argument("--lr", type=positive(float))
    p.add_argument("--dtype", choices=list(TOLERANCE))
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=MODULE_IMPLS,
                   help="the reference always runs too: it is the baseline")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and sampling")
    p.add_argument("--sample", type=int, default=100, metavar="N", help="characters to sample per impl")
    p.add_argument("--data", default=DATA, help="training text (default: benchmarks/data/attention.txt)")
    p.add_argument("--out", help="output folder (default: runs/tinygpt-<time>)")
    p.add_argument("--model", choices=["nanogpt", "lecture"], default="nanogpt",
                   help="lecture: the \"Let's build GPT\" lecture's own model, as written and after swap_attention "
                        "(benchmarks/lecture.py)")
    p.add_argument("--dropout", type=float, default=0.2, help="--model lecture: its dropout (default 0.2)")
    args = p.parse_args(argv)
    args.argv = argv
    if not os.path.isfile(args.data):
        p.error(f"--data {args.data}: no such file (the training text: any UTF-8 text file)")
    if not 0 <= args.dropout < 1:
        p.error(f"--dropout must be in [0, 1), got {args.dropout}")
    preset, cfg = config_from(args)
    if args.model == "lecture":
        from . import lecture
        return lecture.run(args, cfg, TOLERANCE[cfg.dtype])
    impls = ["reference"] + [i for i in dict.fromkeys(args.impl) if i != "reference"]

    out = args.out or os.path.join("runs", "tinygpt-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    say = run_log(out)
    text, alphabet = load_text(args.data)
    data = encode(text, alphabet)
    torch.manual_seed(args.seed)
    first = TinyGPT(len(alphabet), cfg, "reference")
    init, n_params = first.state_dict(), sum(p.numel() for p in first.parameters())  # tied weights counted once
    offsets = batch_offsets(len(data), cfg, args.seed)
    env = environment()
    say(f"tinygpt on {env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    say("python -m attention_kernels.benchmarks.tinygpt " + " ".join(sys.argv[1:] if argv is None else argv))
    say(f"preset {preset}: B={cfg.B} T={cfg.T} C={cfg.C} heads={cfg.heads} (D={cfg.C // cfg.heads}) "
        f"layers={cfg.layers} steps={cfg.steps} lr={cfg.lr} dtype={cfg.dtype}"
        f"{' (autocast)' if cfg.dtype == 'bf16' else ''} seed={args.seed}; {n_params} parameters")
    say(f"text: {os.path.relpath(args.data)}, {len(text)} characters, alphabet of {len(alphabet)}")
    if DEVICE == "cpu":
        say(CPU_NOTE)

    runs, threads = {}, torch.get_num_threads()
    if DEVICE == "cpu":  # tensors of a few KB: handing ops to a second OpenMP thread costs more than the op
        torch.set_num_threads(1)
    try:
        for impl in impls:
            start = time.perf_counter()

            def progress(step, loss):  # on stderr, flushed: the log and the tables stay as they were
                print(f"  {impl}: step {step}/{cfg.steps}, loss {loss:.4f}, {time.perf_counter() - start:.1f} s",
                      file=sys.stderr, flush=True)
            model, losses, tokens_per_s, peak = train(impl, cfg, len(alphabet), init, data, offsets, progress)
            print(f"  {impl}: sampling {args.sample} characters, generating {cfg.T - 1} with and without the "
                  "KV cache", file=sys.stderr, flush=True)
            text_out = sample(model, alphabet, args.sample, args.seed, cfg.dtype)
            prompt = encode("\n", alphabet).to(DEVICE)[None]                # (1, 1)
            cached, cached_logits, cached_per_s = time_generation(model, prompt, cfg.T - 1, use_cache=True)
            uncached, uncached_logits, uncached_per_s = time_generation(model, prompt, cfg.T - 1, use_cache=False)
            paged_same, paged_dlogits, mixed = paged_against_unbatched(model, data, cfg.T)
            runs[impl] = dict(losses=losses, tokens_per_s=tokens_per_s, peak=peak, sample=text_out,
                              same=torch.equal(cached, uncached),
                              dlogits=(cached_logits - uncached_logits).abs().max().item(),
                              cached_per_s=cached_per_s, uncached_per_s=uncached_per_s,
                              paged_same=paged_same, paged_dlogits=paged_dlogits, mixed=mixed)
            say(f"{impl}: loss {losses[0]:.4f} -> {losses[-1]:.4f} in {time.perf_counter() - start:.1f} s")
    finally:
        torch.set_num_threads(threads)

    with open(os.path.join(out, "losses.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "impl", "loss"])
        for impl, run in runs.items():
            writer.writerows((step, impl, f"{loss:.8g}") for step, loss in enumerate(run["losses"]))

    tolerance, failed = TOLERANCE[cfg.dtype], []
    say()
    say(f"{'impl':11}{'final loss':>11}{'max |dloss|':>13}{'tokens/s':>10}{'peak MiB':>10}")
    for impl, run in runs.items():
        delta = max_deviation(run["losses"], runs["reference"]["losses"])
        if delta > tolerance:
            failed.append(impl)
        last = run["losses"][-FINAL_STEPS:]
        final = sum(last) / len(last)
        say(f"{impl:11}{fmt(final, '11.4f')}{fmt(delta, '13.2e')}{fmt(run['tokens_per_s'], '10.0f')}"
            f"{fmt(run['peak'], '10.3g')}")
    say(f"final loss: mean of the last {FINAL_STEPS} steps; max |dloss|: against the reference's loss at the same "
        f"step, bound {tolerance:g} nats for {cfg.dtype}")
    say(f"tokens/s: after {WARMUP} warm-up steps; peak MiB: one training step beyond weights and optimizer state")
    say()
    say(f"{'impl':11}{'same tokens':>12}{'max |dlogit|':>14}{'cached tok/s':>14}{'uncached tok/s':>16}"
        f"{'paged same':>12}{'paged |dlogit|':>16}{'mixed steps':>13}")
    for impl, run in runs.items():
        say(f"{impl:11}{'yes' if run['same'] else 'no':>12}{fmt(run['dlogits'], '14.2e')}"
            f"{fmt(run['cached_per_s'], '14.0f')}{fmt(run['uncached_per_s'], '16.0f')}"
            f"{'yes' if run['paged_same'] else 'no':>12}{fmt(run['paged_dlogits'], '16.2e')}{run['mixed']:>13}")
    say(f"generation: {cfg.T - 1} characters after \"\\n\" up to the block size T={cfg.T}, greedy, fp32"
        f"{', each way timed on its second run' if DEVICE == 'cuda' else ''}")
    say("cached: the prompt once, then each character alone against a KV cache (kernels.decode_attention; "
        "the reference's own for the reference); uncached: the whole sequence every step")
    say(f"paged: prompts of {', '.join(str(min(n, cfg.T - 1)) for n in PAGED_PROMPTS)} characters generated up to T "
        "in one batch through a paged KV cache (kernels.paged_attention; prompts read 2 characters a step while "
        "others decode, 'mixed steps' of them), against each alone through the cache above")
    say()
    for impl, run in runs.items():
        say(f"--- {impl} samples {args.sample} characters:")
        say(run["sample"])
    say()
    if DEVICE == "cpu":
        say(CPU_NOTE)
    differ = [impl for impl, run in runs.items() if not run["same"] or run["dlogits"] > LOGITS_TOLERANCE]
    if differ:
        say(f"FAILED: {', '.join(differ)} generated with the KV cache other tokens, or logits more than "
            f"{LOGITS_TOLERANCE:g} apart, than without it")
    paged_differ = [impl for impl, run in runs.items()
                    if not run["paged_same"] or run["paged_dlogits"] > LOGITS_TOLERANCE]
    if paged_differ:
        say(f"FAILED: {', '.join(paged_differ)} generated through the paged cache, batched, other tokens, or logits "
            f"more than {LOGITS_TOLERANCE:g} apart, than each prompt alone through the contiguous cache")
    differ += paged_differ
    if failed:
        say(f"FAILED: {', '.join(failed)} left the reference's loss by more than {tolerance:g} nats ({cfg.dtype})"
            + ("; sdpa, torch's own attention, is among them: at these settings rounding alone parts the "
               "runs (training is chaotic), so lower --lr or --steps" if "sdpa" in failed else ""))
    say(f"wrote {os.path.join(out, 'losses.csv')} and {os.path.join(out, 'log.txt')}")
    say.close()
    return 1 if failed or differ else 0


if __name__ == "__main__":
    sys.exit(main())
