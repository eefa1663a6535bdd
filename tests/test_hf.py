"""kernels.hf: transformers models run the kernels through `attn_implementation`, match eager
attention under the project's rule, and fall back to SDPA, never losing a mask, where the kernels
cannot reproduce it exactly. Truth: the same weights in float64 with eager attention (its softmax in
float64 too); yardstick: transformers' eager attention in float32."""

import copy
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from transformers import (AttentionInterface, AutoModelForCausalLM, DynamicCache, GPT2Config,  # noqa: E402
                          LlamaConfig, MistralConfig, StaticCache)
from transformers.masking_utils import (AttentionMaskInterface, and_masks, bidirectional_mask_function,  # noqa: E402
                                        causal_mask_function, chunked_overlay, eager_mask,
                                        find_packed_sequence_indices, packed_sequence_mask_function,
                                        remap_positions_for_packed_sequence, sdpa_mask,
                                        sliding_window_causal_mask_function)

from attention_kernels import kernels  # noqa: E402  (its submodules below, by attribute)
import attention_kernels.kernels.dropout as dropout_module  # noqa: E402
import attention_kernels.kernels.hf  # noqa: E402
from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR, GRAD_FACTOR  # noqa: E402
from attention_kernels.kernels import dropout_mask  # noqa: E402
from attention_kernels.kernels.hf import CALLS, kernel_attention_forward, kernel_mask, register_transformers  # noqa: E402
from attention_kernels.testing.rule import assert_close, seed_of  # noqa: E402

IMPLS = ["fused", "flash"]
T = 12          # short: the interpreter is slow
VOCAB = 100
LAYERS = 2


def llama():
    """Grouped-query: 4 query heads share 2 k/v heads; head dim 16."""
    return LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
                       intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64)


def gpt2():
    """Layer l scales its scores by 1/(sqrt(D) (l + 1)): a scale that is not the default."""
    return GPT2Config(n_embd=64, n_head=4, n_layer=LAYERS, vocab_size=VOCAB, n_positions=64, resid_pdrop=0.0,
                      embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_by_inverse_layer_idx=True, bos_token_id=0,
                      eos_token_id=0)


def mistral(sliding_window):
    return MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=LAYERS,
                         intermediate_size=128, vocab_size=VOCAB, max_position_embeddings=64,
                         sliding_window=sliding_window)


CONFIGS = {"llama": llama, "gpt2": gpt2}


def eager_in_input_dtype(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention, with the softmax in the input's dtype: Llama's and Mistral's
    eager attention take it in float32 whatever the input, which a float64 truth must not (and
    their padded rows, which see no key, then turn into nan and spread)."""
    groups = query.shape[1] // key.shape[1]
    key, value = (x.repeat_interleave(groups, dim=1) for x in (key, value))             # (B, Hq, Tk, D)
    scores = query @ key.transpose(-1, -2) * (query.shape[-1] ** -0.5 if scaling is None else scaling)
    if attention_mask is not None:
        scores = scores + attention_mask                                                # (B, Hq, Tq, Tk)
    out = scores.softmax(-1) @ value                                                    # (B, Hq, Tq, D)
    return out.transpose(1, 2).contiguous(), None                                       # (B, Tq, Hq, D)


AttentionInterface.register("eager_in_input_dtype", eager_in_input_dtype)
AttentionMaskInterface.register("eager_in_input_dtype", eager_mask)


@pytest.fixture(scope="module")
def names():
    """One registered implementation name per impl ("flash" may not be in a name: transformers would
    take it for FlashAttention)."""
    return {impl: register_transformers(f"attention_kernels_{n}", impl) for n, impl in enumerate(("auto", *IMPLS))}


@pytest.fixture
def packed(monkeypatch):
    """Counts, in kernels.hf, of flash_attention_varlen calls ("varlen"), of padding masks packed
    ("packings", one host sync each) and of packed documents' masks packed ("documents", one host
    sync each)."""
    counts = Counter()

    def counting(key, fn):
        def wrapper(*args, **kwargs):
            counts[key] += 1
            return fn(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(kernels.hf, "flash_attention_varlen", counting("varlen", kernels.hf.flash_attention_varlen))
    monkeypatch.setattr(kernels.hf, "_pack", counting("packings", kernels.hf._pack))
    monkeypatch.setattr(kernels.hf, "_pack_documents", counting("documents", kernels.hf._pack_documents))
    return counts


# ----------------------------------------------------------------------------- helpers


def build(config, attn, seed):
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).to(DEVICE).eval()


def eager_copies(model):
    """The same weights under eager attention: float64 (the truth, softmax in float64 too) and
    transformers' own eager in float32 (the yardstick)."""
    copies = []
    for attn, dtype in (("eager_in_input_dtype", torch.float64), ("eager", torch.float32)):
        m = AutoModelForCausalLM.from_config(copy.deepcopy(model.config), attn_implementation=attn)
        m.load_state_dict(model.state_dict())
        copies.append(m.to(DEVICE, dtype).eval())
    return copies


def draw_inputs(padding, seed, B=2, pads=None):
    """Token ids, a 2D attention mask (long, 1 = token) and labels. Each row is padded on the side
    asked for by its own amount: `pads`, or random."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (B, T), generator=g)
    labels = torch.randint(VOCAB, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    for b, pad in enumerate(pads or torch.randint(1, T // 2, (B,), generator=g).tolist()):
        if padding == "left":
            mask[b, :pad] = 0
        elif padding == "right":
            mask[b, T - pad:] = 0
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def counted(fn, *args, **kwargs):
    """fn's result and what it added to kernels.hf.CALLS."""
    before = CALLS.copy()
    return fn(*args, **kwargs), CALLS - before


def loss_and_grads(model, ids, mask, labels, **kwargs):
    """Logits at the tokens the mask keeps, and every parameter's gradient of a cross-entropy over
    those tokens only (padded rows differ by design: eager averages, the kernels give zeros)."""
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs).logits  # (B, T, VOCAB)
    keep = torch.ones_like(ids, dtype=torch.bool) if mask is None or mask.ndim != 2 else mask.bool()
    F.cross_entropy(logits[keep], labels[keep]).backward()
    return logits[keep], {n: p.grad for n, p in model.named_parameters()}


def assert_matches_eager(model, ids, mask, labels, **kwargs):
    """Logits and all parameter gradients against eager attention under the rule; returns what the
    forward added to CALLS."""
    truth, low = eager_copies(model)
    (got, grads), calls = counted(loss_and_grads, model, ids, mask, labels, **kwargs)
    want, want_grads = loss_and_grads(truth, ids, mask, labels, **kwargs)
    base, base_grads = loss_and_grads(low, ids, mask, labels, **kwargs)
    floor = FLOOR[torch.float32]
    assert_close("logits", got, want, base, FACTOR, floor)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient reached {name}"
        assert_close(f"grad of {name}", grad, want_grads[name], base_grads[name], GRAD_FACTOR, floor)
    return calls


# ----------------------------------------------------------------------------- on the kernels


# Every model with every padding, and every kernel with every padding (the glue does not depend on
# the kernel, and the kernels have their own tests: the full product would only cost time).
MATCH_CASES = [("llama", "fused", "none"), ("llama", "flash", "left"), ("llama", "fused", "right"),
               ("gpt2", "flash", "none"), ("gpt2", "fused", "left"), ("gpt2", "flash", "right")]


@pytest.mark.parametrize("model_name, impl, padding", MATCH_CASES)
def test_matches_eager(poison, names, packed, model_name, impl, padding):
    """A padded batch runs one varlen call per layer (impl="fused" too: fused has no packed form),
    its mask packed once per forward."""
    model = build(CONFIGS[model_name](), names[impl], seed=seed_of("model", model_name, impl, padding))
    ids, mask, labels = draw_inputs(padding, seed_of("inputs", model_name, impl, padding))
    calls = assert_matches_eager(model, ids, mask, labels)
    assert calls == {"kernels": LAYERS}
    assert packed == ({} if padding == "none" else {"varlen": LAYERS, "packings": 1})


@pytest.mark.parametrize("padding", ["left", "right"])
def test_rows_of_one_token_and_none(poison, names, packed, padding):
    """Rows down to one token, and a row that is all padding (its tokens are not in the loss):
    each layer still makes one varlen call, with sequences of length 1 and 0."""
    model = build(llama(), names["auto"], seed=seed_of("short rows", padding))
    ids, mask, labels = draw_inputs(padding, seed_of("short rows inputs", padding), B=4, pads=[0, T - 1, T, 3])
    assert assert_matches_eager(model, ids, mask, labels) == {"kernels": LAYERS}
    assert packed == {"varlen": LAYERS, "packings": 1}


@pytest.mark.parametrize("model_name", CONFIGS)
def test_every_way_to_ask_runs_the_kernels(names, tmp_path, model_name):
    """set_attn_implementation on an eager model, from_config and from_pretrained."""
    name, config = names["auto"], CONFIGS[model_name]()
    eager = build(config, "eager", seed=seed_of("ask", model_name))
    ids, mask, _ = draw_inputs("left", seed_of("ask inputs", model_name))
    truth, low = eager_copies(eager)
    want, base = (m(input_ids=ids, attention_mask=mask).logits[mask.bool()] for m in (truth, low))

    switched = copy.deepcopy(eager)
    switched.set_attn_implementation(name)
    from_config = build(config, name, seed=seed_of("ask", model_name))  # same seed: same weights
    eager.save_pretrained(tmp_path)
    from_pretrained = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation=name).to(DEVICE).eval()
    for how, model in (("set_attn_implementation", switched), ("from_config", from_config),
                       ("from_pretrained", from_pretrained)):
        assert model.config._attn_implementation == name, how
        logits, calls = counted(lambda: model(input_ids=ids, attention_mask=mask).logits)
        assert calls == {"kernels": LAYERS}, how
        assert_close(f"logits ({how})", logits[mask.bool()], want, base, FACTOR, FLOOR[torch.float32])


def test_cached_decoding_matches_eager(names, packed):
    """A left-padded prompt, then a chunk of 3 tokens and one token against a DynamicCache: the
    queries sit after the cached keys, where bottom-right alignment is what makes it right."""
    model = build(llama(), names["auto"], seed=seed_of("decode"))
    truth, low = eager_copies(model)
    ids, mask, _ = draw_inputs("left", seed_of("decode inputs"))
    caches = {m: DynamicCache(config=m.config) for m in (model, truth, low)}
    for lo, hi in [(0, 8), (8, 11), (11, 12)]:  # prefill, a chunk, one token
        logits, calls = {}, {}
        for m in (model, truth, low):
            logits[m], calls[m] = counted(lambda: m(input_ids=ids[:, lo:hi], attention_mask=mask[:, :hi],
                                                    cache=caches[m], use_cache=True).logits)
        assert calls[model] == {"kernels": LAYERS}
        assert packed == {"varlen": LAYERS, "packings": 1}, f"tokens {lo}:{hi}"
        packed.clear()
        keep = mask[:, lo:hi].bool()
        assert_close(f"logits of tokens {lo}:{hi}", logits[model][keep], logits[truth][keep], logits[low][keep],
                     FACTOR, FLOOR[torch.float32])


@pytest.mark.parametrize("impl", ["flash", "reference"])
@pytest.mark.parametrize("causal", [True, False])
def test_padded_batch_rows(poison, packed, causal, impl):
    """The packed path on its own, with fewer queries than keys: valid query rows match SDPA with
    the padding mask, forward and backward; padded rows, a sequence with no valid key at all and
    one whose valid keys all sit before the queries are zeros. impl="reference" runs
    reference.varlen_attention instead of the varlen kernel."""
    B, Hq, Hkv, Tq, Tk, D = 5, 4, 2, 5, 9, 16
    g = torch.Generator().manual_seed(seed_of("rows", causal))
    q = torch.randn(B, Hq, Tq, D, generator=g).to(DEVICE).requires_grad_()
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g).to(DEVICE).requires_grad_() for _ in range(2))
    do = torch.randn(B, Tq, Hq, D, generator=g).to(DEVICE)
    valid = torch.zeros(B, Tk, dtype=torch.bool, device=DEVICE)
    valid[0, 3:], valid[1, :7], valid[2, 2:6] = True, True, True   # left, right, both; row 3: none
    valid[4, :3] = True                                            # keys, but no query on them

    def sdpa(q, k, v):
        keys = torch.arange(Tk, device=DEVICE)
        rows = torch.arange(Tq, device=DEVICE)[:, None] + (Tk - Tq)                     # (Tq, 1)
        row_valid = valid[:, rows.squeeze(1)][:, None, :, None]                         # (B, 1, Tq, 1)
        allowed = valid[:, None, None, :] & ((keys <= rows) if causal else True)        # (B, 1, Tq, Tk)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed | ~row_valid, enable_gqa=True)
        return (out * row_valid).transpose(1, 2)                                        # (B, Tq, Hq, D)

    module = SimpleNamespace(is_causal=True)  # the is_causal argument overrides it
    (out, weights), calls = counted(kernel_attention_forward, module, q, k, v, valid, impl=impl, is_causal=causal)
    assert calls == {"kernels": 1} and weights is None
    assert packed == ({"packings": 1} if impl == "reference" else {"varlen": 1, "packings": 1})
    assert out.shape == (B, Tq, Hq, D) and out.is_contiguous()
    assert torch.equal(out[3:], torch.zeros_like(out[3:]))
    leaves64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    leaves32 = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth, low = sdpa(*leaves64), sdpa(*leaves32)
    assert_close("out", out, truth, low, FACTOR, FLOOR[torch.float32])
    for o, leaves in ((out, (q, k, v)), (truth, leaves64), (low, leaves32)):
        o.backward(do.to(o.dtype))
    for name, x, x64, x32 in zip(("dq", "dk", "dv"), (q, k, v), leaves64, leaves32):
        assert_close(name, x.grad, x64.grad, x32.grad, GRAD_FACTOR, FLOOR[torch.float32])


# ----------------------------------------------------------------------------- packed documents


def packed_documents(lengths):
    """Documents of these lengths packed into rows of T tokens, one row per list, as
    DataCollatorWithFlattening packs them: position_ids restarting at 0 in each document, and (for
    one row) FlashAttention-2's cu_seq_lens_q, cu_seq_lens_k (int32) and max_length_q, max_length_k."""
    assert all(sum(row) == T for row in lengths)
    position_ids = torch.tensor([[i for n in row for i in range(n)] for row in lengths], device=DEVICE)  # (B, T)
    cu = torch.tensor([0, *torch.tensor(lengths[0]).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    fa_kwargs = dict(cu_seq_lens_q=cu, cu_seq_lens_k=cu.clone(), max_length_q=max(lengths[0]),
                     max_length_k=max(lengths[0]))
    return position_ids, fa_kwargs


PACKED_CASES = [  # (model, documents per row, how transformers is told)
    ("llama", [[5, 1, 6]], "position_ids"),
    ("llama", [[5, 1, 6]], "cu_seq_lens"),            # FlashAttention-2's keywords, no position_ids
    ("mistral", [[3, 9], [7, 5]], "position_ids"),    # a window of 4 in each document; documents in every row
]


@pytest.mark.parametrize("model_name, lengths, how", PACKED_CASES)
def test_packed_documents_match_eager(poison, names, packed, model_name, lengths, how):
    """Padding-free training: documents packed into a row, each seeing only itself, run as one
    flash_attention_varlen call per layer, logits and every gradient. position_ids that restart
    are found by transformers' own mask code (no cache, no padding mask), which builds eager's
    block-diagonal mask; the documents cost one host read per forward. cu_seq_lens_* name the
    documents themselves (eager, which ignores them, gets position_ids: the truth is the same)."""
    model = build(llama() if model_name == "llama" else mistral(4), names["flash"],
                  seed=seed_of("packed", model_name, len(lengths)))
    g = torch.Generator().manual_seed(seed_of("packed inputs", model_name, len(lengths)))
    ids, labels = (torch.randint(VOCAB, (len(lengths), T), generator=g).to(DEVICE) for _ in range(2))
    position_ids, fa_kwargs = packed_documents(lengths)
    kwargs = dict(position_ids=position_ids) if how == "position_ids" else fa_kwargs
    truth, low = eager_copies(model)
    (got, grads), calls = counted(loss_and_grads, model, ids, None, labels, **kwargs)
    want, want_grads = loss_and_grads(truth, ids, None, labels, position_ids=position_ids)
    base, base_grads = loss_and_grads(low, ids, None, labels, position_ids=position_ids)
    assert calls == {"kernels": LAYERS}
    assert packed == ({"varlen": LAYERS, "documents": 1} if how == "position_ids" else {"varlen": LAYERS})
    floor = FLOOR[torch.float32]
    assert_close("logits", got, want, base, FACTOR, floor)
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert grad is not None, f"no gradient reached {name}"
        assert_close(f"grad of {name}", grad, want_grads[name], base_grads[name], GRAD_FACTOR, floor)
    if how == "position_ids" and len(lengths) == 1:  # the last document alone gives the same logits
        start = T - lengths[0][-1]
        alone = truth(input_ids=ids[:, start:], use_cache=False).logits[0]                   # (T - start, VOCAB)
        assert_close("logits of the last document alone", got[start:], alone, base[start:], FACTOR, floor)


@pytest.mark.parametrize("how", ["position_ids", "both"])
def test_packed_documents_reach_sdpa_spelled_out(names, how):
    """A packed row the kernels cannot take (float64) goes to SDPA with its documents in the 4D
    mask, whichever way they were given (with both, as DataCollatorWithFlattening(
    return_flash_attn_kwargs=True) gives them, from cu_seq_lens_*)."""
    model = build(llama(), names["auto"], seed=seed_of("packed f64")).double()
    truth = eager_copies(model)[0]
    ids = torch.randint(VOCAB, (1, T), generator=torch.Generator().manual_seed(seed_of("packed f64 inputs")))
    position_ids, fa_kwargs = packed_documents([[4, 8]])
    kwargs = dict(position_ids=position_ids, **(fa_kwargs if how == "both" else {}))
    got, calls = counted(lambda: model(input_ids=ids.to(DEVICE), use_cache=False, **kwargs).logits)
    assert calls == {F64: LAYERS}
    want = truth(input_ids=ids.to(DEVICE), position_ids=position_ids, use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- falling back


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("window", [4, 2 * T])
def test_sliding_window(names, packed, window, padding):
    """Mistral's sliding window runs on the kernels' window, padded (one varlen call per layer) or
    not; one that covers every key masks nothing."""
    model = build(mistral(window), names["flash"], seed=seed_of("window", window, padding))
    ids, mask, labels = draw_inputs(padding, seed_of("window inputs", window, padding))
    assert assert_matches_eager(model, ids, mask, labels) == {"kernels": LAYERS}
    assert packed == ({} if padding == "none" else {"varlen": LAYERS, "packings": 1})


def user_4d_mask(B, hide_row=None):
    """Two packed documents, causal within each, as an additive float mask (transformers' finfo.min)."""
    doc = torch.arange(T, device=DEVICE) >= 5                                   # tokens 0-4, then 5-11
    allowed = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril() & (doc[:, None] == doc[None, :])
    if hide_row is not None:
        allowed[hide_row] = False
    mask = torch.zeros(T, T, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(B, 1, T, T)                                              # (B, 1, T, T)


def test_user_4d_mask_runs_on_the_kernels(names):
    """A custom 4D mask (two packed documents, additive float) runs on flash as its attn_mask."""
    model = build(llama(), names["auto"], seed=seed_of("4d"))
    ids, _, labels = draw_inputs("none", seed_of("4d inputs"))
    assert assert_matches_eager(model, ids, user_4d_mask(ids.shape[0]), labels) == {
        "kernels": LAYERS, "kernels, the mask in 4D: a 4D mask from the caller": LAYERS}


def test_a_row_hidden_by_finite_values_goes_to_sdpa(names):
    """A float mask that hides every key of a row with finfo.min: SDPA and eager average that row's
    values, the kernels would give zeros; so that mask goes to SDPA, checked once per mask."""
    ours, sdpa = (build(llama(), attn, seed=seed_of("4d")) for attn in (names["auto"], "sdpa"))
    ids, _, _ = draw_inputs("none", seed_of("4d inputs"))
    mask = user_4d_mask(ids.shape[0], hide_row=7)
    got, calls = counted(lambda: ours(input_ids=ids, attention_mask=mask).logits)
    why = "sdpa: a 4D mask from the caller (a row hidden by finite values, which SDPA averages)"
    assert calls == {why: LAYERS}
    torch.testing.assert_close(got, sdpa(input_ids=ids, attention_mask=mask).logits, rtol=0, atol=0)


def test_padding_mask_with_holes_runs_on_the_kernels(names):
    model = build(llama(), names["flash"], seed=seed_of("holes"))
    ids, mask, labels = draw_inputs("left", seed_of("holes inputs"))
    mask[0, T - 4] = 0                                                          # a hole in row 0
    assert assert_matches_eager(model, ids, mask, labels) == {
        "kernels": LAYERS, "kernels, the mask in 4D: a padding mask with holes": LAYERS}


def test_static_cache_runs_on_the_kernels(names):
    """A StaticCache's keys run past the queries (and its offsets are tensors): the kernels run on
    the keys up to the last query."""
    model = build(llama(), names["auto"], seed=seed_of("static"))
    truth, low = eager_copies(model)
    ids, mask, _ = draw_inputs("none", seed_of("static inputs"))
    logits, calls = {}, {}
    for m in (model, truth, low):
        cache = StaticCache(config=m.config, max_cache_len=16)
        logits[m], calls[m] = counted(lambda: m(input_ids=ids, cache=cache, use_cache=True).logits)
    assert calls[model] == {"kernels": LAYERS}
    assert_close("logits", logits[model], logits[truth], logits[low], FACTOR, FLOOR[torch.float32])


F64 = "sdpa: q has dtype float64; supported: float16, bfloat16, float32"  # the kernels' input check's words


@pytest.mark.parametrize("dtype, padded, window, path", [
    (torch.float64, False, None, F64), (torch.float64, True, None, F64),
    (torch.float64, True, 4, F64), (torch.float32, True, 4, "kernels"), (torch.float32, True, 7, "kernels"),
    (torch.float32, True, 8, "kernels"),  # a window of Tk keys masks nothing
])
def test_masks_reach_sdpa_spelled_out(dtype, padded, window, path):
    """Where the kernels hand a call to SDPA, a None or 2D mask becomes the 4D mask it stands for:
    SDPA would read None as top-left causal, and knows neither 2D padding masks nor windows. A 2D
    mask kernel_mask did not make is read as FlashAttention-2 reads it, with the layer's
    sliding_window. The truth is transformers' own sdpa_mask for the same pattern, queries after
    5 cached keys."""
    B, Hq, Hkv, Tq, Tk, D = 2, 4, 2, 3, 8, 16
    g = torch.Generator().manual_seed(seed_of("spelled out", dtype, padded, window))
    q = torch.randn(B, Hq, Tq, D, generator=g, dtype=dtype).to(DEVICE)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g, dtype=dtype).to(DEVICE) for _ in range(2))
    padding = torch.ones(B, Tk, dtype=torch.bool, device=DEVICE)
    padding[0, :3] = False
    padding = padding if padded else None
    mask_function = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
    allowed = sdpa_mask(batch_size=B, q_length=Tq, kv_length=Tk, q_offset=Tk - Tq, mask_function=mask_function,
                        attention_mask=padding, allow_is_causal_skip=False, device=DEVICE)  # (B, 1, Tq, Tk)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=Hq // Hkv)  # what SDPA reads of a module
    (out, _), calls = counted(kernel_attention_forward, module, q, k, v, padding, scaling=0.3, sliding_window=window)
    assert calls == {path: 1}
    additive = torch.zeros(allowed.shape, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    truth, low = (eager_in_input_dtype(module, q.to(t), k.to(t), v.to(t), additive.to(t), scaling=0.3)[0]
                  for t in (torch.float64, torch.float32))
    rows = allowed.any(-1).squeeze(1)                                             # (B, Tq): rows that see a key
    assert_close("out", out[rows], truth[rows], low[rows], FACTOR, FLOOR[torch.float32])


def test_mask_rules():
    """kernel_mask gives a 2D mask only where the kernels are exact (never None), and what it
    stands for (its window, where the keys end, causal or not) is exactly transformers' own
    sdpa_mask for the same arguments; elsewhere it gives sdpa_mask's 4D mask."""
    B, Tq, Tk = 2, 3, 8
    pad = torch.ones(B, Tk, dtype=torch.bool)
    pad[0, :2] = False
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0], [0, 1, 0, 1, 2, 3, 4, 5]])   # documents restart at 0
    docs = find_packed_sequence_indices(positions)                                  # transformers' own finding

    def mask(**kw):
        args = dict(batch_size=B, q_length=Tq, kv_length=Tk, q_offset=Tk - Tq, kv_offset=0,
                    mask_function=causal_mask_function, attention_mask=pad, device="cpu")
        return kernel_mask(**{**args, **kw}), sdpa_mask(**{**args, **kw, "allow_is_causal_skip": False,
                                                            "allow_is_bidirectional_skip": False})

    def meaning(got, q_length=Tq):
        """The (B, 1, Tq, Tk) mask the kernels compute for kernel_mask's 2D result."""
        spec = kernels.hf._recall(got)[1]
        dense = kernels.hf._dense_mask(got[:, :spec.end], q_length, spec.end, spec.causal, spec.left, "cpu", spec.docs)
        return F.pad(dense.expand(B, 1, q_length, spec.end), (0, Tk - spec.end))

    got, want = mask()
    assert torch.equal(got, pad) and torch.equal(meaning(got), want)
    on_kernels = {
        "no padding mask": dict(attention_mask=None),
        "no padding": dict(attention_mask=torch.ones(B, Tk, dtype=torch.bool)),
        "sliding window": dict(mask_function=sliding_window_causal_mask_function(4), local_size=4),
        "sliding, unpadded": dict(mask_function=sliding_window_causal_mask_function(4), local_size=4,
                                  attention_mask=None),
        "bidirectional": dict(mask_function=bidirectional_mask_function),
        "a StaticCache": dict(q_offset=torch.tensor(2)),                 # keys 5 to 7 are not written yet
        "a StaticCache, unpadded": dict(q_offset=torch.tensor(2), attention_mask=None),
        "queries on the first keys": dict(q_offset=0),
        "a longer padding mask": dict(attention_mask=torch.ones(B, Tk + 1, dtype=torch.bool).index_fill(1,
                                      torch.tensor([0]), False)),
        "one query, static decoding": dict(q_length=1, q_offset=torch.tensor(5), allow_is_causal_skip=False),
        **{f"packed sequences, {name}": dict(q_length=Tk, q_offset=0, attention_mask=None, allow_is_causal_skip=False,
                                             mask_function=and_masks(remap_positions_for_packed_sequence(f, positions),
                                                                     packed_sequence_mask_function(docs)))
           for name, f in (("causal", causal_mask_function), ("sliding", sliding_window_causal_mask_function(2)),
                           ("bidirectional", bidirectional_mask_function))},
    }
    for case, kw in on_kernels.items():
        got, want = mask(**kw)
        assert got is not None and got.shape == (B, Tk), case
        assert torch.equal(meaning(got, kw.get("q_length", Tq)), want), case
    for case, kw in {"the model adds onto the mask": dict(allow_is_causal_skip=False),
                     "chunked": dict(mask_function=and_masks(causal_mask_function, chunked_overlay(2, torch.zeros(B, dtype=torch.long)))),
                     "a static sliding layer": dict(kv_offset=torch.tensor(0)),
                     }.items():
        got, want = mask(**kw)
        assert got is not None and got.ndim == 4 and torch.equal(got, want), case
        assert isinstance(kernels.hf._recall(got)[1], str), case  # the reason, for CALLS


# ----------------------------------------------------------------------------- errors and imports


def test_clear_errors():
    with pytest.raises(ValueError, match="impl must be one of .*'flash'.*got 'triton'"):
        register_transformers("attention_kernels_bad", impl="triton")
    with pytest.raises(ValueError, match="name must be"):
        register_transformers("my_flash_kernels")
    q = torch.randn(1, 2, 4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=r"a 2D attention mask must be the \(B, Tk\) = \(1, 4\) bool mask"):
        kernel_attention_forward(SimpleNamespace(is_causal=True), q, q, q, torch.ones(1, 4))
    cu = torch.tensor([0, 3, 5], dtype=torch.int32, device=DEVICE)                  # ends at 5, not at T = 4
    with pytest.raises(ValueError, match=r"cu_seq_lens_q and cu_seq_lens_k must be the same offsets .* got \[0, 3, 5\]"):
        kernel_attention_forward(SimpleNamespace(is_causal=True), q, q, q, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                                 max_length_q=3, max_length_k=3)


def test_without_transformers_registering_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # what `import transformers` meets when it is missing
    with pytest.raises(ImportError, match=r"needs Hugging Face transformers 5 .*pip install -e '\.\[hf\]'"):
        register_transformers()


def test_importing_kernels_does_not_import_transformers():
    code = "import sys, attention_kernels, attention_kernels.kernels.hf; assert 'transformers' not in sys.modules, 'imported'"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_training_with_attention_dropout_runs_on_the_kernels(monkeypatch):
    """Llama's attention_dropout while training: the flash kernel drops the weights itself
    (reproducible under torch.manual_seed), where it once fell back to SDPA, as torch's dropout
    does: each layer's output is written out from its inputs and the mask its seed names (a
    padded batch runs packed: sequence b's mask is [b, :, :L_b, :L_b] of the (B, Hq, max L, max L)
    mask)."""
    seen, seeds, draw = [], [], dropout_module.draw_seed
    monkeypatch.setattr(dropout_module, "draw_seed", lambda: seeds.append(draw()) or seeds[-1])

    def recording(module, query, key, value, attention_mask, **kwargs):
        out = kernel_attention_forward(module, query, key, value, attention_mask, impl="fused", **kwargs)
        seen.append((query.detach(), key.detach(), value.detach(), attention_mask, kwargs, out[0].detach()))
        return out

    AttentionInterface.register("attention_kernels_recording", recording)
    AttentionMaskInterface.register("attention_kernels_recording", kernel_mask)
    p, config = 0.5, llama()
    config.attention_dropout = p
    model = build(config, "attention_kernels_recording", seed=seed_of("hf dropout")).train()
    ids, mask, _ = draw_inputs("left", seed_of("hf dropout inputs"))
    torch.manual_seed(0)
    a, calls = counted(lambda: model(input_ids=ids, attention_mask=mask).logits)
    torch.manual_seed(0)
    b = model(input_ids=ids, attention_mask=mask).logits
    c = model(input_ids=ids, attention_mask=mask).logits
    assert calls == {"kernels": LAYERS}
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(seeds) == len(seen) == 3 * LAYERS and seeds[:LAYERS] == seeds[LAYERS:2 * LAYERS]
    lengths = mask.sum(-1).tolist()                                                     # left padding: rows end at T
    for (q, k, v, valid, kwargs, out), seed in zip(seen, seeds):
        assert kwargs["dropout"] == p and torch.equal(valid, mask.bool())
        B, Hq = q.shape[:2]
        keep = dropout_mask(B, Hq, max(lengths), max(lengths), p, seed, DEVICE)
        for b_, L in enumerate(lengths):
            qb, kb, vb = (x[b_, :, T - L:].double() for x in (q, k, v))                 # (H, L, D)
            kb, vb = (x.repeat_interleave(Hq // x.shape[0], 0) for x in (kb, vb))       # q head h on k/v head h // 2
            s = (qb @ kb.transpose(-1, -2) * kwargs["scaling"]).masked_fill(
                torch.ones(L, L, dtype=torch.bool, device=DEVICE).triu(1), float("-inf"))
            w = torch.where(keep[b_, :, :L, :L], torch.softmax(s, -1) / (1 - p), 0.0)  # F.dropout's convention
            torch.testing.assert_close(out[b_, T - L:].double(), (w @ vb).transpose(0, 1), rtol=1e-5, atol=1e-5)
            assert torch.equal(out[b_, :T - L], torch.zeros_like(out[b_, :T - L]))      # padded rows
    model.eval()
    assert not torch.allclose(model(input_ids=ids, attention_mask=mask).logits, a, atol=1e-4)
