"""
What each entry point supports, as data: one table, features x entry points, each cell supported
(with how it is spelled there, or its values) or not (with the reason). The support table of
docs/support.md and the README's are rendered from it (`markdown`), and tests/test_support.py runs
every cell: a supported one against the reference under the rule, an unsupported one for its error.

    python -m attention_kernels.kernels.support              # the full table and its reasons
    python -m attention_kernels.kernels.support --compact    # yes / no only: the README's
"""

import argparse
from typing import NamedTuple

import torch


class Cell(NamedTuple):
    """One feature on one entry point. `note`: how it is spelled there, or why it is not supported.
    `values`: the head dims or dtypes taken, for those two rows."""
    supported: bool
    note: str = ""
    values: tuple = ()


def yes(note="", values=()):
    return Cell(True, note, tuple(values))


def no(reason):
    return Cell(False, reason)


# column: what a user calls
ENTRY_POINTS = {
    "flash": "flash_attention",
    "varlen": "flash_attention_varlen",
    "fused": "fused_attention",
    "decode": "decode_attention",
    "paged": "paged_attention",
    "ring": "ring_attention",
    "attention": "attention",
    "sdpa": "scaled_dot_product_attention",
    "module": "CausalSelfAttention",
    "transformers": "register_transformers",
}

# row: what it is
FEATURES = {
    "causal": "causal attention, aligned bottom-right (query i sees key j <= i + Tk - Tq)",
    "full": "non-causal attention: every query sees every key",
    "window": "a sliding window (left, right), FlashAttention's window_size",
    "GQA": "grouped-query heads: k and v with fewer heads than q (Hq % Hkv == 0), read in place",
    "softcap": "Gemma 2's soft-capping of the scores",
    "sinks": "GPT-OSS's attention sinks, a logit per head",
    "ALiBi": "ALiBi's linear bias by distance, alibi_slopes",
    "dropout": "dropout of the attention weights, dropout_p",
    "attn_mask": "a bool or float mask, torch SDPA's attn_mask",
    "mask_mod": "a mask function in Triton (kernels.mods), evaluated inside the tiles",
    "score_mod": "a score function in Triton, with its derivative for the backward",
    "block_map": "a block map (block_map()): the key blocks a mask hides are skipped",
    "tree_mask": "a draft tree over each sequence's new tokens (speculative decoding)",
    "bidirectional": "position ranges that see each other in full (image tokens, prefix-LM prompts)",
    "return_lse": "each row's log-sum-exp returned beside the output",
    "gradients": "a backward pass: dq, dk, dv (and the mods' own)",
    "torch.compile": "torch.compile(fullgraph=True) compiles through it (with the host checks off, where named)",
    "head dims": "the head dims D taken",
    "dtypes": "the input dtypes taken",
}

HEAD_DIMS = range(1, 257)
DTYPES = (torch.float16, torch.bfloat16, torch.float32)

NOT_YET = no("ring: not yet")
NO_SDPA_ARG = no("torch's SDPA signature, which the drop-in keeps, has no such argument (a TypeError); a window or "
                 "an ALiBi bias can be spelled as a float attn_mask")
NO_MODULE_ARG = no("nanoGPT's causal self-attention, (B, T, C) in and out, takes no such argument (a TypeError)")
NO_DROPOUT = no("for inference only: no dropout_p argument (a TypeError)")
NO_FUNCTION = no("no such argument (a TypeError): only flash's kernels call mask and score functions")
NO_MAP = no("no such argument (a TypeError): only the dense flash kernels read a block map (an attn_mask gets one "
            "made by flash itself)")
NOT_FROM_MODELS = no("not a choice there: models hand their attention function tensors (any mask pattern as a "
                     "4D mask), never a Triton function, block map, tree or ranges")
NO_SERVING_MASK = no("no such argument (a TypeError): a mask over decoding's new tokens is decode's and paged's; "
                     "elsewhere an attn_mask or a mask function says the same")
NO_BACKWARD = no("for inference only: no backward, and inputs that require grad are refused (a RuntimeError)")


def _row(note="", values=(), **cells):
    """One feature's cells: every entry point supported (with `note` and `values`), except those named."""
    return {entry: cells.get(entry, yes(note, values)) for entry in ENTRY_POINTS}


SUPPORT = {
    "causal": _row("yes", sdpa=yes("is_causal=True (top-left, as torch)"), module=yes("always")),
    "full": _row("causal=False", sdpa=yes("is_causal=False"), module=NO_MODULE_ARG,
                 transformers=yes("is_causal=False")),
    "window": _row("window=",
                   fused=no("fused_attention holds whole rows and takes no window (a TypeError); attention() runs "
                            "flash for one"),
                   attention=yes("window= (runs flash)"),
                   sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                   transformers=yes("sliding_window")),
    "GQA": _row("yes", sdpa=yes("enable_gqa=True"), module=yes("n_kv_head=")),
    "softcap": _row("softcap=", sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG),
    "sinks": _row("sinks=", sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG, transformers=yes("s_aux")),
    "ALiBi": _row("alibi_slopes=", sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                  transformers=no("not a choice there: the ALiBi models (BLOOM, MPT) compute attention themselves, "
                                  "and setting the kernels on them is refused (a ValueError naming the model)")),
    "dropout": _row("dropout_p=", decode=NO_DROPOUT, paged=NO_DROPOUT,
                    module=yes("attn_pdrop= (training)"),
                    transformers=yes("attention_dropout (training)")),
    "attn_mask": _row("attn_mask=",
                      varlen=no("no attn_mask argument (a TypeError): cu_seqlens keeps the sequences apart"),
                      decode=no("no attn_mask argument (a TypeError): the cache lengths and a window mask the keys"),
                      paged=no("no attn_mask argument (a TypeError): the cache lengths and a window mask the keys"),
                      ring=no("no attn_mask argument (a TypeError): a mask over the whole sequence is not split "
                              "across the ranks"),
                      module=NO_MODULE_ARG,
                      transformers=yes("4D masks")),
    "mask_mod": _row("mask_mod=", fused=NO_FUNCTION, decode=NO_FUNCTION, paged=NO_FUNCTION, ring=NO_FUNCTION,
                     attention=yes("mask_mod= (runs flash)"), sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                     transformers=NOT_FROM_MODELS),
    "score_mod": _row("score_mod=", fused=NO_FUNCTION, decode=NO_FUNCTION, paged=NO_FUNCTION, ring=NO_FUNCTION,
                      attention=yes("score_mod= (runs flash)"), sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                      transformers=NOT_FROM_MODELS),
    "block_map": _row("block_map=", varlen=NO_MAP, fused=NO_MAP, decode=NO_MAP, paged=NO_MAP, ring=NO_MAP,
                      attention=yes("block_map= (runs flash)"),
                      sdpa=no("torch's SDPA signature has no such argument (a TypeError); flash makes a map for "
                              "every attn_mask it runs, kept by the mask's identity"),
                      module=NO_MODULE_ARG,
                      transformers=no("not a choice there: models pass no block map; flash makes one for every 4D "
                                      "mask it runs, once a forward")),
    "tree_mask": _row("tree_mask=", flash=NO_SERVING_MASK, varlen=NO_SERVING_MASK, fused=NO_SERVING_MASK,
                      ring=NO_SERVING_MASK, attention=NO_SERVING_MASK, sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                      transformers=NOT_FROM_MODELS),
    "bidirectional": _row("bidirectional=", flash=NO_SERVING_MASK, varlen=NO_SERVING_MASK, fused=NO_SERVING_MASK,
                          ring=NO_SERVING_MASK, attention=NO_SERVING_MASK, sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                          transformers=no("not a choice there: models pass no ranges; Gemma 3's bidirectional "
                                          "image tokens arrive as a 4D mask, which runs on the kernels")),
    "return_lse": _row("return_lse=True", sdpa=NO_SDPA_ARG, module=NO_MODULE_ARG,
                       transformers=no("not a choice there: an attention function returns (output, attention "
                                       "weights), and the weights are None")),
    "gradients": _row("yes", decode=NO_BACKWARD, paged=NO_BACKWARD),
    "torch.compile": _row("yes", varlen=yes("check_seqlens=False"), decode=yes("check_seqlens=False"),
                          paged=yes("check=False"),
                          ring=no("torch.compile fails on it, fullgraph or not: dynamo cannot trace the process "
                                  "group the ring sends through (a torch._dynamo error)")),
    "head dims": _row("1-256", HEAD_DIMS, sdpa=yes("1-256 (others: torch)", HEAD_DIMS),
                      transformers=yes("1-256 (others: SDPA)", HEAD_DIMS)),
    "dtypes": _row("fp16, bf16, fp32", DTYPES, sdpa=yes("fp16, bf16, fp32 (others: torch)", DTYPES),
                   transformers=yes("fp16, bf16, fp32 (others: SDPA)", DTYPES)),
}


def cells():
    """Every (feature, entry point, cell), row by row."""
    return [(feature, entry, SUPPORT[feature][entry]) for feature in FEATURES for entry in ENTRY_POINTS]


def markdown(compact=False):
    """The support table in markdown: a row per feature, a column per entry point (named in a line
    below it). A supported cell shows how it is spelled there (compact: "yes"); an unsupported one
    "no", and unless compact the number of a note below that gives the reason."""
    lines = ["| | " + " | ".join(ENTRY_POINTS) + " |", "|---" * (len(ENTRY_POINTS) + 1) + "|"]
    reasons = []  # each distinct reason once, numbered in order of appearance
    alike = [f for f in ("head dims", "dtypes") if len({c.values for c in SUPPORT[f].values()}) == 1]
    for feature in FEATURES:
        if compact and feature in alike:  # the same everywhere: said once below the table
            continue
        row = []
        for entry in ENTRY_POINTS:
            cell = SUPPORT[feature][entry]
            if cell.supported:
                row.append("yes" if compact else cell.note or "yes")
            elif compact:
                row.append("no")
            else:
                if cell.note not in reasons:
                    reasons.append(cell.note)
                row.append(f"no ({reasons.index(cell.note) + 1})")
        lines.append(f"| {feature} | " + " | ".join(row) + " |")
    lines += ["", "Columns: " + ", ".join(f"{entry} `{name}`" for entry, name in ENTRY_POINTS.items()) + "."]
    if compact and alike:
        said = [f"{feature} {_values(SUPPORT[feature]['flash'].values)}" for feature in alike]
        lines[-1] += " Every one takes " + " and ".join(said) + "."
    if not compact:
        lines += ["", "Rows:", ""] + [f"- {feature}: {meaning}" for feature, meaning in FEATURES.items()]
        lines += ["", "Why not:", ""] + [f"{n}. {reason}" for n, reason in enumerate(reasons, 1)]
    return "\n".join(lines) + "\n"


def _values(values):
    """Head dims as their range, dtypes by name."""
    if all(isinstance(v, int) for v in values):
        return f"{min(values)} to {max(values)}"
    return ", ".join(str(v).removeprefix("torch.") for v in values)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Print the support table (markdown), features x entry points.")
    parser.add_argument("--compact", action="store_true", help="yes / no only, without the notes (the README's)")
    print(markdown(compact=parser.parse_args(argv).compact), end="")


if __name__ == "__main__":
    main()
