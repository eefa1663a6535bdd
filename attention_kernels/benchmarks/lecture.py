"""
The "Let's build GPT" lecture's own model (gpt.py in karpathy/ng-video-lecture), trained as it is
written and again after `swap_attention(model)` puts its attention on the kernels, from the same
initial weights and the same batches, with the lecture's dropout on: the loss curves side by side.

    python -m attention_kernels.benchmarks.tinygpt --model lecture                  # dropout 0.2, the preset's sizes
    python -m attention_kernels.benchmarks.tinygpt --model lecture --dropout 0 --impl flash   # the curves must agree

The lecture's hyperparameters scaled to the seed preset: B = 4 sequences of T = 8 characters,
C = 16 channels in 4 heads of 4, 2 blocks, dropout 0.2, AdamW at lr 1e-3, 200 steps (30 on the
CPU, where Triton's interpreter draws the dropout decisions in numpy: about 3 s a step with a
kernel, 4 minutes for the default runs) (the lecture: B 64, T 256, C 384, 6 heads, 6 layers,
dropout 0.2, lr 3e-4). On a GPU the default is tinygpt's gpu preset: B, T, C, steps and lr
as there, bf16 under the same autocast (--dtype fp32 to turn it off), and its tolerance
with it; heads and layers stay 4 and 2 unless given. `Head`, `MultiHeadAttention`,
`FeedForward`, `Block` and `GPTLanguageModel` are the lecture's code with its globals as
arguments. "lecture" is the model as written (its attention eager PyTorch, its dropout
nn.Dropout on the weights); each impl is the same model after `swap_attention(model, impl)`: all
heads of a layer in one call, the weights dropped inside the kernel (or, "sdpa", torch's
scaled_dot_product_attention with dropout_p).

With dropout 0 the runs are deterministic and must agree with "lecture" within the tiny GPT's
TOLERANCE at every step (exit 1 otherwise). With dropout the kernels draw other weights to drop
than nn.Dropout does (their own generator, seeded from torch's), so the curves differ step by
step as two runs of the lecture with different seeds would; what to compare is their course,
and the final loss (the mean of the last 10 steps) beside the lecture's. Written to --out
(default runs/lecture-<time>/): log.txt, losses.csv (step, run, loss) and loss.png.
"""

import datetime
import os
import sys
import time
from dataclasses import replace

import torch
import torch.nn as nn
from torch.nn import functional as F

from .impls import DEVICE  # first: sets up the interpreter on a CPU  # noqa: F401

from attention_kernels.kernels import swap_attention  # noqa: E402
from .sweep import environment, run_log  # noqa: E402
from .training import FINAL_STEPS, autocast, batch_offsets, encode, get_batch, load_text, max_deviation  # noqa: E402


# ----------------------------------------------------------------------------- the lecture's model


class Head(nn.Module):
    """ one head of self-attention """

    def __init__(self, n_embd, head_size, block_size, dropout):
        super().__init__()
        self.key = nn.Linear(n_embd, head_size, bias=False)
        self.query = nn.Linear(n_embd, head_size, bias=False)
        self.value = nn.Linear(n_embd, head_size, bias=False)
        self.register_buffer('tril', torch.tril(torch.ones(block_size, block_size)))
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        B, T, C = x.shape
        k = self.key(x)    # (B,T,hs)
        q = self.query(x)  # (B,T,hs)
        wei = q @ k.transpose(-2, -1) * k.shape[-1]**-0.5  # (B, T, hs) @ (B, hs, T) -> (B, T, T)
        wei = wei.masked_fill(self.tril[:T, :T] == 0, float('-inf'))  # (B, T, T)
        wei = F.softmax(wei, dim=-1)  # (B, T, T)
        wei = self.dropout(wei)
        v = self.value(x)  # (B,T,hs)
        out = wei @ v  # (B, T, T) @ (B, T, hs) -> (B, T, hs)
        return out


class MultiHeadAttention(nn.Module):
    """ multiple heads of self-attention in parallel """

    def __init__(self, n_embd, num_heads, head_size, block_size, dropout):
        super().__init__()
        self.heads = nn.ModuleList([Head(n_embd, head_size, block_size, dropout) for _ in range(num_heads)])
        self.proj = nn.Linear(head_size * num_heads, n_embd)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x):
        out = torch.cat([h(x) for h in self.heads], dim=-1)
        out = self.dropout(self.proj(out))
        return out


class FeedFoward(nn.Module):
    """ a simple linear layer followed by a non-linearity """

    def __init__(self, n_embd, dropout):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.ReLU(), nn.Linear(4 * n_embd, n_embd),
                                 nn.Dropout(dropout))

    def forward(self, x):
        return self.net(x)


class Block(nn.Module):
    """ Transformer block: communication followed by computation """

    def __init__(self, n_embd, n_head, block_size, dropout):
        super().__init__()
        head_size = n_embd // n_head
        self.sa = MultiHeadAttention(n_embd, n_head, head_size, block_size, dropout)
        self.ffwd = FeedFoward(n_embd, dropout)
        self.ln1 = nn.LayerNorm(n_embd)
        self.ln2 = nn.LayerNorm(n_embd)

    def forward(self, x):
        x = x + self.sa(self.ln1(x))
        x = x + self.ffwd(self.ln2(x))
        return x


class GPTLanguageModel(nn.Module):

    def __init__(self, vocab_size, n_embd, n_head, n_layer, block_size, dropout):
        super().__init__()
        self.token_embedding_table = nn.Embedding(vocab_size, n_embd)
        self.position_embedding_table = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, block_size, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.lm_head = nn.Linear(n_embd, vocab_size)
        self.apply(self._init_weights)

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        B, T = idx.shape
        tok_emb = self.token_embedding_table(idx)  # (B,T,C)
        pos_emb = self.position_embedding_table(torch.arange(T, device=idx.device))  # (T,C)
        x = tok_emb + pos_emb  # (B,T,C)
        x = self.blocks(x)  # (B,T,C)
        x = self.ln_f(x)  # (B,T,C)
        logits = self.lm_head(x)  # (B,T,vocab_size)
        if targets is None:
            return logits, None
        B, T, C = logits.shape
        return logits, F.cross_entropy(logits.view(B * T, C), targets.view(B * T))


# ----------------------------------------------------------------------------- the run


def train(model, data, offsets, T, lr, seed, dtype="fp32"):
    """Train from the model's weights on the batches `offsets` (steps, B), under tinygpt's
    autocast for `dtype`; the dropout draws seeded by `seed` (nn.Dropout's and the kernels' both
    come from torch's generator)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    torch.manual_seed(seed)
    losses = []
    model.train()
    for row in offsets:
        x, y = get_batch(data, row, T)
        with autocast(dtype):
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.detach())  # read at the end: .item() here would sync the GPU every step
    return torch.stack(losses).tolist()


def plot(path, curves):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for (name, losses), style in zip(curves.items(), ("-", "--", ":", "-.")):
        ax.plot(range(1, len(losses) + 1), losses, style, label=name, linewidth=1.2)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (nats)")
    ax.set_title("the lecture's GPT: as written and on the kernels")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run(args, cfg, tolerance):
    """`python -m attention_kernels.benchmarks.tinygpt --model lecture`: args from tinygpt's parser, cfg its preset
    (B, T, steps, lr; the lecture's own layout: 4 heads, 2 blocks at the seed preset's C)."""
    impls = [i for i in dict.fromkeys(args.impl) if i != "reference"]
    if args.steps is None and DEVICE == "cpu":  # the interpreter draws each dropout decision in numpy: ~3 s a step
        cfg = replace(cfg, steps=30)
    heads = args.heads or 4
    layers = args.layers or 2
    if cfg.C % heads:
        raise SystemExit(f"--heads {heads} does not divide C={cfg.C}")
    out = args.out or os.path.join("runs", "lecture-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    say = run_log(out)
    text, alphabet = load_text(args.data)
    data = encode(text, alphabet)
    offsets = batch_offsets(len(data), cfg, args.seed)
    env = environment()
    say(f"the lecture's GPT on {env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    say("python -m attention_kernels.benchmarks.tinygpt " + " ".join(sys.argv[1:] if args.argv is None else args.argv))
    say(f"B={cfg.B} T={cfg.T} C={cfg.C} heads={heads} (head size {cfg.C // heads}) layers={layers} "
        f"dropout={args.dropout} steps={cfg.steps} lr={cfg.lr} {cfg.dtype}"
        f"{' (autocast)' if cfg.dtype == 'bf16' else ''} seed={args.seed}")

    torch.manual_seed(args.seed)
    make = lambda: GPTLanguageModel(len(alphabet), cfg.C, heads, layers, cfg.T, args.dropout).to(DEVICE)
    init = make().state_dict()
    curves = {}
    for name in ["lecture", *impls]:
        model = make()
        model.load_state_dict(init)
        if name != "lecture":
            swapped = swap_attention(model, impl=name)
            assert len(swapped) == layers, swapped
        start = time.perf_counter()
        curves[name] = train(model, data, offsets, cfg.T, cfg.lr, args.seed, cfg.dtype)
        say(f"{name}: loss {curves[name][0]:.4f} -> {curves[name][-1]:.4f} in {time.perf_counter() - start:.1f} s"
            + ("" if name == "lecture" else f" (swap_attention replaced {', '.join(swapped)})"))

    with open(os.path.join(out, "losses.csv"), "w") as f:
        f.write("step,run,loss\n")
        for name, losses in curves.items():
            f.writelines(f"{i + 1},{name},{loss:.8g}\n" for i, loss in enumerate(losses))
    plot(os.path.join(out, "loss.png"), curves)
    final = {name: sum(losses[-FINAL_STEPS:]) / len(losses[-FINAL_STEPS:]) for name, losses in curves.items()}
    say(f"{'run':10}{'final loss':>11}{'vs lecture':>12}{'max |dloss|':>13}")
    failed = []
    for name, losses in curves.items():
        dmax = max_deviation(losses, curves["lecture"])
        say(f"{name:10}{final[name]:11.4f}{final[name] - final['lecture']:+12.4f}{dmax:13.2e}")
        if args.dropout == 0 and dmax > tolerance:
            failed.append(name)
    if args.dropout > 0:
        say("with dropout each run drops other weights: the curves agree in course, not step by step")
    say(f"written: {out}/losses.csv, loss.png, log.txt")
    if failed:
        say(f"FAILED: {', '.join(failed)} left the lecture's loss by more than {tolerance} nats without dropout")
        return 1
    return 0
