"""What the tiny GPT runs share (tinygpt, the lecture's model, the ring's training): the text and its
batches, the optimizer and its schedule, autocast, and how two loss curves are compared."""

import os

import torch

from .impls import DEVICE  # first: sets up the interpreter on a CPU

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data", "attention.txt")
FINAL_STEPS = 10  # "final loss" averages this many last steps


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


def autocast(dtype):
    return torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=dtype == "bf16")


def synchronize():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def adamw(model, cfg):
    """The optimizer every training run here uses (benchmarks.ring's too)."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.99))


def set_lr(optimizer, cfg, i):
    """Step i's learning rate: cfg.lr after a linear warm-up of cfg.lr_warmup steps."""
    for group in optimizer.param_groups:
        group["lr"] = cfg.lr * min(1.0, (i + 1) / (cfg.lr_warmup + 1))


def max_deviation(losses, baseline):
    """The largest |loss - baseline| at the same step."""
    return max(abs(a - b) for a, b in zip(losses, baseline))
