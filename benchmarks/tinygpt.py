"""
A tiny character-level GPT trained once per attention implementation, from the same seed, the
same initial weights and the same batches, so that the loss curves can be laid on top of each
other: the kernels are right inside a model when the curves agree to rounding.

    python -m benchmarks.tinygpt                              # `gpu` preset on a GPU, `seed` on the CPU
    python -m benchmarks.tinygpt --preset seed --steps 100 --impl flash sdpa
    python -m benchmarks.tinygpt -T 64 -C 64 --heads 4 --layers 2 --data my.txt

The model is nanoGPT's: token and position embeddings, `layers` blocks of LayerNorm -> causal
self-attention -> residual, LayerNorm -> MLP (4C, GELU) -> residual, a final LayerNorm and an lm
head tied to the token embedding. Its attention is `kernels.module.CausalSelfAttention` with
impl "reference" (eager PyTorch, the baseline, always run), "fused", "flash" or "sdpa" (torch's
own scaled_dot_product_attention). No dropout, so every run is deterministic. It trains with
AdamW at a constant learning rate (after a linear warm-up in the gpu preset, as nanoGPT does) on
`data/attention.txt`, a few KB of prose about attention (any text file with --data), and then
samples text, one plain forward over the cropped context per character (no KV cache).

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
It exits 1 if any impl's loss leaves the reference's by more than TOLERANCE nats at any step.

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

from benchmarks.impls import DEVICE  # first: sets up the interpreter on a CPU

import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from benchmarks.measure import peak_mib  # noqa: E402
from benchmarks.sweep import environment, fmt, run_log  # noqa: E402
from kernels.module import MODULE_IMPLS, CausalSelfAttention  # noqa: E402

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "attention.txt")
IMPLS = ("reference", "fused", "flash", "sdpa")
WARMUP = 5       # untimed steps; the last one is measured for memory (autotuning and AdamW state exist by then)
FINAL_STEPS = 10  # "final loss" averages this many last steps
TOLERANCE = {"fp32": 1e-3, "bf16": 5e-2}  # largest |loss - reference's loss| in nats at any step; see the docstring
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


class Block(nn.Module):
    """One transformer block, pre-LayerNorm as in GPT-2: attention then MLP, each added back."""

    def __init__(self, cfg, impl):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.C, bias=False)
        self.attn = CausalSelfAttention(cfg.C, cfg.heads, bias=False, dropout=0.0, impl=impl)
        self.ln_2 = nn.LayerNorm(cfg.C, bias=False)
        self.mlp = MLP(cfg.C)

    def forward(self, x):            # (B, T, C)
        x = x + self.attn(self.ln_1(x))
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

    def forward(self, idx, targets=None):
        B, T = idx.shape                                                   # (B, T) character ids
        x = self.wte(idx) + self.wpe(torch.arange(T, device=idx.device))   # (B, T, C)
        for block in self.h:
            x = block(x)                                                   # (B, T, C)
        logits = self.lm_head(self.ln_f(x))                                # (B, T, vocab)
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().view(B * T, -1), targets.view(B * T))


# ----------------------------------------------------------------------------- data


def load_text(path=DATA):
    """(text, alphabet): the alphabet is the text's characters, sorted; a character's id is its index."""
    text = open(path, encoding="utf-8").read()
    return text, "".join(sorted(set(text)))


def encode(text, alphabet):
    index = {ch: i for i, ch in enumerate(alphabet)}
    return torch.tensor([index[ch] for ch in text], dtype=torch.long)


def batch_offsets(n_tokens, cfg, seed):
    """(steps, B) start offsets of every batch of the run, drawn once so every impl sees the same."""
    if n_tokens <= cfg.T:
        raise SystemExit(f"the text has {n_tokens} characters; a context of T={cfg.T} needs more than that")
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_tokens - cfg.T, (cfg.steps, cfg.B), generator=g)


def get_batch(data, offsets, T):
    idx = offsets[:, None] + torch.arange(T)          # (B, T) positions in the text
    return data[idx].to(DEVICE), data[idx + 1].to(DEVICE)  # inputs, and the next character of each


# ----------------------------------------------------------------------------- training


def autocast(dtype):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16")


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def train(impl, cfg, vocab_size, init, data, offsets):
    """Train a TinyGPT running `impl` from the weights `init` on the batches `offsets`. Returns
    (model, losses per step, training tokens/s after the warm-up, peak MiB of one step)."""
    model = TinyGPT(vocab_size, cfg, impl).to(DEVICE)
    model.load_state_dict(init)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))
    losses = []

    def step(i):
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * min(1.0, (i + 1) / (cfg.lr_warmup + 1))
        x, y = get_batch(data, offsets[i], cfg.T)    # (B, T) each
        with autocast(cfg.dtype):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())                 # read later: .item() here would sync the GPU every step

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


def max_deviation(losses, baseline):
    """The largest |loss - baseline| at the same step."""
    return max(abs(a - b) for a, b in zip(losses, baseline))


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
    for name in ("B", "T", "C", "heads", "layers"):
        if getattr(cfg, name) < 1:
            raise SystemExit(f"{name} must be >= 1, got {getattr(cfg, name)}")
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
    p.add_argument("-B", "--batch", type=int)
    p.add_argument("-T", "--seqlen", type=int, help="context length")
    p.add_argument("-C", "--width", type=int, help="model width C = heads * head dim")
    p.add_argument("--heads", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--steps", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--dtype", choices=list(TOLERANCE))
    p.add_argument("--impl", nargs="+", default=list(IMPLS), choices=MODULE_IMPLS,
                   help="the reference always runs too: it is the baseline")
    p.add_argument("--seed", type=int, default=0, help="initial weights, batches and sampling")
    p.add_argument("--sample", type=int, default=100, metavar="N", help="characters to sample per impl")
    p.add_argument("--data", default=DATA, help="training text (default: benchmarks/data/attention.txt)")
    p.add_argument("--out", help="output folder (default: runs/tinygpt-<time>)")
    args = p.parse_args(argv)
    preset, cfg = config_from(args)
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
    say("python -m benchmarks.tinygpt " + " ".join(sys.argv[1:] if argv is None else argv))
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
            model, losses, tokens_per_s, peak = train(impl, cfg, len(alphabet), init, data, offsets)
            text_out = sample(model, alphabet, args.sample, args.seed, cfg.dtype)
            runs[impl] = dict(losses=losses, tokens_per_s=tokens_per_s, peak=peak, sample=text_out)
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
    for impl, run in runs.items():
        say(f"--- {impl} samples {args.sample} characters:")
        say(run["sample"])
    say()
    if DEVICE == "cpu":
        say(CPU_NOTE)
    if failed:
        say(f"FAILED: {', '.join(failed)} left the reference's loss by more than {tolerance:g} nats ({cfg.dtype})"
            + ("; sdpa, torch's own attention, is among them: at these settings rounding alone parts the "
               "runs (training is chaotic), so lower --lr or --steps" if "sdpa" in failed else ""))
    say(f"wrote {os.path.join(out, 'losses.csv')} and {os.path.join(out, 'log.txt')}")
    say.close()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
