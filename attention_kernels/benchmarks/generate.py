"""
Greedy generation of a small Llama-shaped model on the kernels beside the same model on torch's
SDPA: tokens per second, and how much of each decode step its attention takes.

    python -m attention_kernels.benchmarks.generate --out DIR                  # on a GPU: the `gpu` preset
    python -m attention_kernels.benchmarks.generate --preset tiny --out DIR    # anywhere: the interpreter, tiny

Presets:
    gpu     Llama 3.2 1B's shape with random weights (hidden 2048, 16 layers, 32 query heads over 8
            k/v heads, head dim 64, MLP 8192, vocab 128256), bf16, batch 1 and 16, a 1024-token
            prompt, 256 new tokens, greedy, a StaticCache of 1280. generate compiles the decode
            step itself on CUDA (torch.compile, mode "reduce-overhead": CUDA graphs); the kernels'
            step reads nothing on the host, so it compiles whole. CUDA only.
    tiny    the same code at sizes the CPU interpreter runs in seconds (2 layers, hidden 64, 4 heads
            over 2, head dim 16, a 12-token prompt, 3 new tokens, batch 2), uncompiled: it proves the
            command runs; its times mean nothing (even their signs: one call each, on a busy CPU).

Each (attention, batch) generates once untimed (the compile, the autotuning), then twice more:
max_new_tokens=1 (the prompt's forward alone) and the whole generation, each timed with the device
synchronised. A decode step's time is (generation - prompt) / (new tokens - 1), tokens per second
B / that. The attention's share of a step: the attention function the model calls (transformers'
SDPA with its 4D mask, or the kernels' decode path with the lengths on the device), timed alone
(`measure.time_ms`) at the middle length of the generation, times the layers, over the step.

Writes into --out (default runs/generate-<time>/): generate.csv (one row per attention x batch,
CSV_FIELDS), log.txt (everything printed, with the environment and the command). `same_tokens` is
the fraction of the kernels' generated tokens equal to SDPA's: bf16 models may part ways after a
near tie, so it is reported, not required.
"""

import argparse
import csv
import datetime
import os
import shlex
import sys
import time
from types import SimpleNamespace

import torch

from .impls import DEVICE  # first: sets up the interpreter on a CPU
from .measure import time_ms
from .sweep import environment, run_log

PRESETS = {
    "gpu": dict(hidden=2048, layers=16, heads=32, kv_heads=8, mlp=8192, vocab=128256, dtype="bfloat16",
                batches=(1, 16), prompt=1024, new=256, compile=True),
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, mlp=128, vocab=128, dtype="bfloat16",
                 batches=(2,), prompt=12, new=3, compile=False),
}
ATTENTIONS = ("sdpa", "kernels")
CSV_FIELDS = ["attention", "B", "prompt", "new", "layers", "hidden", "heads", "kv_heads", "D", "dtype", "compiled",
              "prefill_ms", "step_ms", "tokens_per_s", "attention_ms_per_step", "attention_share", "same_tokens",
              "device", "torch", "triton", "commit", "timestamp"]


def llama(p, attention):
    """The preset's model with random weights, on DEVICE in its dtype, eval mode."""
    from transformers import AutoModelForCausalLM, LlamaConfig
    from attention_kernels.kernels import register_transformers

    name = register_transformers() if attention == "kernels" else "sdpa"
    config = LlamaConfig(hidden_size=p["hidden"], num_hidden_layers=p["layers"], num_attention_heads=p["heads"],
                         num_key_value_heads=p["kv_heads"], intermediate_size=p["mlp"], vocab_size=p["vocab"],
                         max_position_embeddings=p["prompt"] + p["new"])
    torch.manual_seed(0)  # the same weights for both
    return AutoModelForCausalLM.from_config(config, attn_implementation=name, dtype=getattr(torch, p["dtype"])).to(
        DEVICE).eval()


def seconds(fn):
    """fn()'s result and its wall time, the device synchronised on both sides."""
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - start


def attention_ms(p, attention, B, length):
    """One layer's attention in a decode step at `length` keys, as the model calls it: the kernels'
    decode path with the lengths on the device, or transformers' SDPA with its 4D mask over the
    StaticCache (B, 1, 1, max_cache_len)."""
    from attention_kernels.kernels.hf import kernel_attention_forward
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    D, Tmax, dtype = p["hidden"] // p["heads"], p["prompt"] + p["new"], getattr(torch, p["dtype"])
    g = torch.Generator(DEVICE).manual_seed(length)
    q = torch.randn(B, p["heads"], 1, D, generator=g, device=DEVICE, dtype=dtype)                # (B, Hq, 1, D)
    k, v = (torch.randn(B, p["kv_heads"], Tmax, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(2))
    module = SimpleNamespace(is_causal=True, num_key_value_groups=p["heads"] // p["kv_heads"], training=False)
    if attention == "kernels":
        lengths = torch.full((B,), length, dtype=torch.int32, device=DEVICE)
        call = lambda: kernel_attention_forward(module, q, k, v, lengths, scaling=D ** -0.5)
    else:
        mask = (torch.arange(Tmax, device=DEVICE) < length).expand(B, 1, 1, Tmax)              # (B, 1, 1, Tmax)
        call = lambda: sdpa_attention_forward(module, q, k, v, mask, scaling=D ** -0.5)
    with torch.no_grad():
        return time_ms(call)[1]


def time_generation(p, attention, B, seed=0):
    """One row of generate.csv, and the generated tokens (B, new): greedy generation of the preset's
    model with `attention` ("sdpa" or "kernels") at batch B from a random prompt."""
    model = llama(p, attention)
    ids = torch.randint(1, p["vocab"], (B, p["prompt"]), generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    # no attention mask (and no pad token in the prompt): with one, the kernels' step reads on the host
    kw = dict(do_sample=False, cache_implementation="static", pad_token_id=0, disable_compile=not p["compile"])
    with torch.no_grad():
        model.generate(ids, max_new_tokens=p["new"], **kw)                                   # compile, tune
        _, prefill = seconds(lambda: model.generate(ids, max_new_tokens=1, **kw))
        tokens, total = seconds(lambda: model.generate(ids, max_new_tokens=p["new"], **kw))
    step = (total - prefill) / (p["new"] - 1)
    attn = attention_ms(p, attention, B, p["prompt"] + p["new"] // 2) * p["layers"]
    D = p["hidden"] // p["heads"]
    row = dict(attention=attention, B=B, prompt=p["prompt"], new=p["new"], layers=p["layers"], hidden=p["hidden"],
               heads=p["heads"], kv_heads=p["kv_heads"], D=D, dtype=p["dtype"], compiled=p["compile"],
               prefill_ms=round(prefill * 1e3, 3), step_ms=round(step * 1e3, 4), tokens_per_s=round(B / step, 1),
               attention_ms_per_step=round(attn, 4), attention_share=round(attn / (step * 1e3), 3))
    return row, tokens[:, p["prompt"]:]


def run(preset, out_dir, command=""):
    """Every attention x batch of the preset into out_dir/generate.csv; returns the rows. The `gpu`
    preset needs CUDA (on the interpreter it would take days)."""
    p = PRESETS[preset]
    if preset == "gpu" and DEVICE != "cuda":
        raise RuntimeError("the gpu preset needs a CUDA GPU; use --preset tiny to run the command here")
    say, env, rows = run_log(out_dir), environment(), []
    say(f"$ {command}\n{env}")
    if DEVICE != "cuda":
        say("NOTE: no CUDA GPU: Triton's interpreter at tiny sizes; these times say nothing about a GPU's.")
    for B in p["batches"]:
        tokens = {}
        for attention in ATTENTIONS:
            row, tokens[attention] = time_generation(p, attention, B)
            rows.append({**row, **env})
        rows[-1]["same_tokens"] = round((tokens["kernels"] == tokens["sdpa"]).double().mean().item(), 4)
        for row in rows[-2:]:
            say(f"B {B:3d} {row['attention']:8s} {row['tokens_per_s']:10.1f} tok/s   step {row['step_ms']:9.3f} ms   "
                f"attention {100 * row['attention_share']:5.1f}% of it   prefill {row['prefill_ms']:9.1f} ms")
    with open(os.path.join(out_dir, "generate.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    say.close()
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[1], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--preset", choices=PRESETS, default="gpu" if DEVICE == "cuda" else "tiny")
    parser.add_argument("--out", default=None, help="output folder (default runs/generate-<time>/)")
    args = parser.parse_args(argv)
    out = args.out or os.path.join("runs", "generate-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    run(args.preset, out, " ".join(shlex.quote(a) for a in ["python -m attention_kernels.benchmarks.generate",
                                                            *(sys.argv[1:] if argv is None else argv)]))


if __name__ == "__main__":
    main()
