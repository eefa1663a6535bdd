"""transformers' models on the kernels, family by family, and a walk over every decoder-only model
class transformers ships: each one either runs on the kernels (or a named fallback) and computes
what eager attention computes, or is refused when the implementation is set, naming its class.

Truth: the same weights with attn_implementation="eager" in float32 (tests/test_hf.py holds the
glue to the project's rule against a float64 truth; here whole models are compared, so a wrong
mask shows as a difference orders of magnitude above float32 rounding)."""

import copy
import logging
import re
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from attention_kernels.kernels import hf  # noqa: E402
from attention_kernels.kernels.hf import CALLS, model_problem, register_transformers  # noqa: E402
from attention_kernels.testing.cases import DEVICE  # noqa: E402

T = 12
VOCAB = 100
TOL = 1e-4  # float32 models of two layers: rounding differences are ~1e-6; a lost mask moves logits ~1e-3

# What shrinks any config to a few layers of a few heads: set where the config has the field.
TINY = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=128,
            vocab_size=128, head_dim=16, max_position_embeddings=256, num_experts=4, num_local_experts=4,
            n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, n_positions=256, n_ctx=256,
            max_seq_len=256, d_model=64, n_layer=2, n_head=4, n_heads=4, n_layers=2, n_embd=64, ffn_dim=128,
            num_layers=2, sliding_window=5,  # a window shorter than T, so that sliding layers bind
            pad_token_id=0, rotary_dim=8, n_group=1, topk_group=1, qk_rope_head_dim=16, qk_nope_head_dim=16, n_shared_experts=1,
            v_head_dim=16, kv_lora_rank=16, q_lora_rank=32, decoder_layers=2, encoder_layers=2,
            decoder_attention_heads=4, encoder_attention_heads=4, decoder_ffn_dim=128, encoder_ffn_dim=128,
            vocab_size_per_layer_input=128, global_head_dim=16)
EXTRA = {"gpt_neo": dict(attention_types=[[["global", "local"], 1]], window_size=5)}


def tiny_config(model_type):
    cls = CONFIG_MAPPING[model_type]
    fields, aliases = cls().to_dict(), getattr(cls, "attribute_map", {})
    kw = {k: v for k, v in TINY.items() if k in fields or k in aliases}
    if "kv_lora_rank" in fields:  # multi-head latent attention: as many k/v heads as query heads
        kw["num_key_value_heads"] = kw["num_attention_heads"]
    return cls(**{**kw, **EXTRA.get(model_type, {})})


@pytest.fixture(scope="module")
def name():
    return register_transformers("attention_kernels_models", impl="auto")


@pytest.fixture(scope="module")
def reference_name():
    """The glue on the reference: the walk tests the masks and the routing, which do not depend
    on the kernel, at the cost of PyTorch (the kernels have their own tests)."""
    return register_transformers("attention_kernels_walk", impl="reference")


def pair(config, attn, seed=0):
    """(eager model, the same weights under attn), float32, eval."""
    torch.manual_seed(seed)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").to(DEVICE).eval()
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=attn).to(DEVICE).eval()
    ours.load_state_dict(eager.state_dict())
    return eager, ours


def inputs(padding, seed, B=2, vocab=VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    if padding == "left":
        mask[0, :4], mask[1, :1] = 0, 0
    elif padding == "right":
        mask[0, T - 4:], mask[1, T - 1:] = 0, 0
    return ids.to(DEVICE), mask.to(DEVICE)


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def counted(fn):
    before = CALLS.copy()
    return fn(), CALLS - before


def assert_same(what, got, want, tol=TOL):
    err = (got - want).abs().max().item()
    assert err <= tol, f"{what}: max |ours - eager| = {err:.2e} > {tol:.0e}"


# ----------------------------------------------------------------------------- the families


def gemma2():
    return transformers.Gemma2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                     sliding_window=5, attn_logit_softcapping=5.0, final_logit_softcapping=None)


def gpt_oss():
    return transformers.GptOssConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                     num_hidden_layers=2, intermediate_size=64, vocab_size=VOCAB, num_local_experts=4,
                                     num_experts_per_tok=2, sliding_window=5)


FAMILIES = {  # what each adds: grouped heads, a sliding window, a soft-cap, sinks, a scale
    "llama": lambda: transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                              num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB),
    "mistral": lambda: transformers.MistralConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                  num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                                  sliding_window=5),
    "gemma2": gemma2,
    "gpt_oss": gpt_oss,
    "gpt2": lambda: transformers.GPT2Config(n_embd=64, n_head=4, n_layer=2, vocab_size=VOCAB,
                                            scale_attn_by_inverse_layer_idx=True),
}


@pytest.fixture(scope="module")
def families(name):
    return {family: pair(make(), name, seed=i) for i, (family, make) in enumerate(FAMILIES.items())}


@pytest.mark.parametrize("padding", ["none", "left", "right"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_matches_eager_forward_and_backward(families, family, padding):
    """Logits at the kept tokens and every parameter's gradient (the sinks' too), on the kernels
    at every layer."""
    eager, ours = families[family]
    ids, mask = inputs(padding, seed=len(family))
    keep = mask.bool()
    grads = []
    for model in (eager, ours):
        model.zero_grad(set_to_none=True)
        out, calls = counted(lambda: model(input_ids=ids, attention_mask=mask).logits)
        out[keep].square().mean().backward()
        grads.append((out[keep].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None},
                      calls))
    (want, want_grads, _), (got, got_grads, calls) = grads
    assert calls == {"kernels": 2}
    assert_same("logits", got, want)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        assert_same(f"grad of {n}", got_grads[n], want_grads[n], tol=1e-3)


@pytest.mark.parametrize("cache", ["dynamic", "static"])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_generates_as_eager(families, family, cache):
    """Greedy generation of 10 tokens after a left-padded prompt: the same tokens, every call on
    the kernels (a static cache's keys run past the queries)."""
    eager, ours = families[family]
    ids, mask = inputs("left", seed=len(family) + 1)
    kw = dict(attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=0)
    if cache == "static":
        kw["cache_implementation"] = "static"
    want = eager.generate(ids, **kw)
    got, calls = counted(lambda: ours.generate(ids, **kw))
    assert torch.equal(got, want), f"tokens differ:\n{got}\n{want}"
    assert set(calls) <= {"kernels", hf.DECODE}, calls


def qwen3():
    return transformers.Qwen3Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB)


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3"])
def test_family_packed_documents_match_eager(families, name, family):
    """Padding-free training: documents of 5, 1 and 6 tokens packed into one row as
    DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives them (position_ids restarting
    at 0 and FlashAttention-2's cu_seq_lens_*), no mask, no cache: one flash_attention_varlen call
    per layer (window, soft-cap and sinks within each document) against eager on each document
    alone. Logits and every gradient. (GPT-OSS's mask code is not handed position_ids: there the
    keywords make the documents.)"""
    eager, ours = families[family] if family in FAMILIES else pair(qwen3(), name)
    ids, _ = inputs("none", seed=len(family) + 2, B=1)
    lengths = [5, 1, 6]
    cu = torch.tensor([0, 5, 6, T], dtype=torch.int32, device=DEVICE)
    position_ids = torch.tensor([[i for n in lengths for i in range(n)]], device=DEVICE)          # (1, T)
    packed = dict(position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=6, max_length_k=6)
    results = []
    for model, run in ((eager, lambda: torch.cat([eager(input_ids=ids[:, a:b], use_cache=False).logits
                                                  for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())], dim=1)),
                       (ours, lambda: ours(input_ids=ids, use_cache=False, **packed).logits)):
        model.zero_grad(set_to_none=True)
        out, calls = counted(run)                                                               # (1, T, VOCAB)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}, calls))
    (want, want_grads, _), (got, got_grads, calls) = results
    assert calls == {"kernels": 2}
    assert_same("logits", got, want)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        assert_same(f"grad of {n}", got_grads[n], want_grads[n], tol=1e-3)


def llama4_chunked():
    """Llama 4's chunked layers, in chunks of 4 tokens (the default, 8192, would not bind at T = 12)."""
    config = tiny_config("llama4_text")
    config.attention_chunk_size = 4
    return config


def gemma3_with_images():
    """Gemma 3 with a 1-layer SigLIP tower: an image's 4 tokens see one another (an overlay on the
    causal and sliding masks)."""
    return transformers.Gemma3Config(
        text_config=dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                         intermediate_size=128, vocab_size=VOCAB, sliding_window=5,
                         layer_types=["sliding_attention", "full_attention"]),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=28, patch_size=14),
        mm_tokens_per_image=4, image_token_index=VOCAB - 1, boi_token_index=VOCAB - 3, eoi_token_index=VOCAB - 2)


SPELLED_OUT = {  # model: (config, its mask's reason in CALLS, what differs from causal)
    "llama4_chunked": (llama4_chunked, "a mask pattern the kernels lack (chunked or an overlay)"),
    "doge": (lambda: tiny_config("doge"), "a 4D mask from the caller"),  # adds its dynamic mask onto the causal one
    "gemma3_images": (gemma3_with_images, "a mask pattern the kernels lack (chunked or an overlay)"),
}


@pytest.mark.parametrize("model", SPELLED_OUT)
def test_masks_the_kernels_take_in_4d_match_eager(name, model):
    """Masks with no pattern of the kernels' own run on them as their 4D attn_mask, every text
    layer (the vision tower's calls run on the kernels too): logits and every gradient."""
    make, reason = SPELLED_OUT[model]
    eager, ours = pair(make(), name)
    ids, _ = inputs("none", seed=11, B=1)
    kw = {}
    if model == "gemma3_images":
        ids[0, 3:7] = VOCAB - 1                                          # an image's 4 tokens
        kw = dict(pixel_values=torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(11)).to(DEVICE),
                  token_type_ids=(ids == VOCAB - 1).long())
    results = []
    for m in (eager, ours):
        m.zero_grad(set_to_none=True)
        out, calls = counted(lambda: m(input_ids=ids, **kw).logits)
        out.square().mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in m.named_parameters() if p.grad is not None}, calls))
    (want, want_grads, _), (got, got_grads, calls) = results
    assert {k for k in calls if k != "kernels"} == {f"kernels, the mask in 4D: {reason}"}, calls
    assert calls[f"kernels, the mask in 4D: {reason}"] == 2
    assert_same("logits", got, want)
    assert got_grads.keys() == want_grads.keys()
    for n in want_grads:
        assert_same(f"grad of {n}", got_grads[n], want_grads[n], tol=1e-3)
    if model == "gemma3_images":  # the overlay binds: without it the image tokens' logits move
        plain = logits(eager, ids, None)
        assert (plain[0, 3:7] - want[0, 3:7]).abs().max() > 100 * TOL


def test_future_tokens_never_leak(families):
    """Change the last token: every earlier position's logits stay what they were, in every family."""
    for family, (_, ours) in families.items():
        ids, mask = inputs("left", seed=3)
        changed = ids.clone()
        changed[:, -1] = 3 + (changed[:, -1] - 2) % (VOCAB - 3)
        before, after = logits(ours, ids, mask), logits(ours, changed, mask)
        # not bit-equal: a mixture of experts batches its tokens per expert, and the last one moves
        assert_same(f"{family}: earlier logits after the last token changed", after[:, :-1], before[:, :-1], 1e-5)


# ----------------------------------------------------------------------------- refusals and reasons


# Falcon computed its attention itself too until transformers 5.25, which sends it through the
# attention interface: the walk below holds it to eager there.
@pytest.mark.parametrize("model_type", ["bloom", "xglm", "mpt", "gpt_neo"])
def test_models_that_compute_attention_themselves_are_refused_when_set(name, model_type):
    """BLOOM and XGLM read the mask function's result as their own mask (a causal mask lost, a 2D
    mask crashing them), MPT and GPT-Neo index their own attention classes by the name: each is
    refused at construction and at set_attn_implementation, naming its class and the reason."""
    config = tiny_config(model_type)
    cls = getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    words = f"{cls.__name__} cannot use attn_implementation='{name}': it computes its attention itself"
    with pytest.raises(ValueError, match=words):
        AutoModelForCausalLM.from_config(config, attn_implementation=name)
    model = AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    try:  # transformers itself declines (a warning) for models that cannot switch
        model.set_attn_implementation(name)
    except ValueError as e:
        assert "cannot use attn_implementation" in str(e)
    assert model.config._attn_implementation == "eager"
    assert model_problem(cls) is not None


def test_fallbacks_name_their_reason_and_log_it_once(name, caplog, monkeypatch):
    """A 4D mask from the caller (causal within chunks of 4 tokens) runs on the kernels as their
    attn_mask, unless a row sees only finfo.min entries (SDPA averages such a row, the kernels give
    zeros): then SDPA runs it, CALLS says why, and the first such call in the process logs one line."""
    monkeypatch.setattr(hf, "_said", set())
    eager, ours = pair(FAMILIES["llama"](), name)
    ids, _ = inputs("none", seed=5)
    pos = torch.arange(T, device=DEVICE)
    allowed = (pos[None, :] <= pos[:, None]) & (pos[None, :] // 4 == pos[:, None] // 4)     # (T, T)
    mask4d = torch.zeros(2, 1, T, T, device=DEVICE).masked_fill(~allowed, torch.finfo(torch.float32).min)
    got, calls = counted(lambda: logits(ours, ids, mask4d))
    assert_same("logits", got, logits(eager, ids, mask4d))
    assert calls == {"kernels": 2, "kernels, the mask in 4D: a 4D mask from the caller": 2}
    hidden = mask4d.clone()
    hidden[:, :, 3] = torch.finfo(torch.float32).min                                         # row 3 sees nothing
    with caplog.at_level(logging.WARNING, logger=hf.__name__):
        _, calls = counted(lambda: logits(ours, ids, hidden))
        logits(ours, ids, hidden)
    assert calls == {"sdpa: a 4D mask from the caller (a row hidden by finite values, which SDPA averages)": 2}
    lines = [r.getMessage() for r in caplog.records if r.name == hf.__name__]
    assert len(lines) == 1 and "runs transformers' SDPA attention instead of the kernels: a 4D mask" in lines[0]


# ----------------------------------------------------------------------------- every model class

# Model types whose tiny config still builds a large or slow model (a vision tower, hundreds of
# layers' worth of defaults), or needs a library this suite does not install: not walked.
# qwen4_exp spends 21 s building before its tiny config fails (NoneType // NoneType).
SLOW = {"gemma4_unified_assistant", "qwen3_5", "qwen3_5_moe", "blt", "dots3_note", "emu3", "fuyu", "gemma3", "gemma3n", "falcon_h1", "got_ocr2", "phi4_multimodal",
        "mllama", "llama4", "moshi", "musicgen", "musicgen_melody", "gemma4", "gemma4_unified", "whisper",
        "moss_transcribe_diarize", "minimax_m3_vl_text", "inkling2_loop_text", "reformer", "git", "qwen4_exp"}
WALK = sorted(set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES) - SLOW)

# Model types whose tiny config does not run even in eager attention (transformers 5.25), with
# transformers' own error: its kind and words of its message. Not compared; each is checked to
# fail so still (test_the_decoders_left_out_still_fail_in_eager), so that one that runs in a
# newer transformers is walked. Hybrid models that keep only linear-attention layers in 2 layers:
LINEAR_ONLY = ("ValueError", "`get_mask_sizes` can only be called on Attention layers")
NO_TINY_CONFIG = {
    **dict.fromkeys(["bailing_hybrid", "bamba", "granitemoehybrid", "jamba", "kimi_linear", "qwen3_5_moe_text",
                     "qwen3_5_text", "qwen3_next", "qwen4_exp_text", "recurrent_gemma"], LINEAR_ONLY),
    "cohere_compass_text": ("KeyError", "full_attention"),
    "dbrx": ("AttributeError", "'DbrxAttentionConfig' object has no attribute 'rope_theta'"),
    "dory": ("RuntimeError", "The size of tensor a (16) must match the size of tensor b (12)"),
    "gemma3n_text": ("ValueError", "The set of layer types producing a cache is different"),
    "gemma4_assistant": ("StrictDataclassClassValidationError", "hidden_size_per_layer_input must be 0"),
    "kolibri1_1": ("StrictDataclassClassValidationError", "`index_num_heads` must be between 1"),
    "lfm2_moe": ("TypeError", "'NoneType' object is not subscriptable"),
    "mamba2": ("StrictDataclassClassValidationError", "hidden_size * expand (128) must equal"),
    "xlstm": ("ValueError", "matC_old has wrong shape"),
    "xmod": ("ValueError", "Input language unknown"),
    "zamba": ("StrictDataclassClassValidationError", "must be equal to the number of `layer_types`"),
    "zamba2": ("StrictDataclassClassValidationError", "must be equal to the number of `layer_types`"),
    "zaya": ("StrictDataclassClassValidationError", "ZAYA currently supports `num_experts_per_tok=1` only"),
}
# Model types that compute their attention themselves: kernels.hf.model_problem refuses them
REFUSED = {"big_bird", "bloom", "cpmant", "falcon_mamba", "gpt_neo", "gpt_neox_japanese", "mamba", "megatron-bert",
           "mpt", "mvp", "openai-gpt", "prophetnet", "rembert", "roformer", "rwkv", "trocr", "xglm", "xlm", "xlnet"}
LEFT_OUT = sorted(set(NO_TINY_CONFIG) & set(WALK))
REFUSED_WALK = sorted(REFUSED & set(WALK))
COMPARED = sorted(set(WALK) - set(NO_TINY_CONFIG) - REFUSED)
# Measured with transformers 5.25: 174 walked, 132 compared with eager, 19 refused, 23 with no
# tiny config that runs in eager (~60 s on one core, all three kinds). Each COMPARED type's test
# compares or fails (no skip), so this many parametrisations passing is this many models compared.
COMPARED_FLOOR = 132


# Why a call may still leave the kernels for transformers' own attention (words of kernels.hf's
# reasons): the walk fails on any other, so that a new fallback gets a name here and in
# docs/models.md. A "kernels, the mask in 4D: ..." call runs on the kernels: not a fallback.
NAMED_FALLBACKS = {
    "head dim over 256 (Gemma 4's global layers)": "is not supported; accepted: 1 to 256",
    "a position bias (Inkling)": "a position bias",
    "a float mask with a row that sees only finfo.min (Doge's padded rows)": "a row hidden by finite values",
    "float64": "q has dtype float64",
}


def unnamed_fallbacks(calls):
    """The fallbacks in `calls` (CALLS' keys "sdpa: ..." and "eager: ...") that NAMED_FALLBACKS does not name."""
    return [k for k in calls if k.split(":")[0] in ("sdpa", "eager") and not any(w in k for w in NAMED_FALLBACKS.values())]


@pytest.fixture(scope="module")
def walk_calls(request):
    """What each walked model's calls ran on, by model type. At the end of the walk, the types
    with a call that did not run on the kernels' own patterns are printed with the reasons (a 4D
    mask on the kernels, or a named fallback), so a reader sees every one left."""
    table = {}
    yield table
    plugins = request.config.pluginmanager
    reporter, capture = plugins.get_plugin("terminalreporter"), plugins.get_plugin("capturemanager")
    rows = {t: c for t, c in sorted(table.items()) if set(c) != {"kernels"}}
    if reporter is None or capture is None or not rows:
        return  # no terminal (a pytest-xdist worker): each test has asserted its own reasons
    with capture.global_and_fixture_disabled():  # what capsys.disabled() does
        reporter.write_line(f"\nthe walk: {len(table)} model types compared, {len(table) - len(rows)} with every call on "
                            f"the kernels' own patterns; the others, with what their calls ran on:")
        for model_type, calls in rows.items():
            reporter.write_line(f"  {model_type}: " + "; ".join(f"{n} x {k}" for k, n in sorted(calls.items())))


def eager_model(model_type):
    """(config, the model in eager attention, eval, seeded weights, vocab for inputs)."""
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    config = tiny_config(model_type)
    torch.manual_seed(0)
    eager = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation="eager").eval()
    return config, eager, min(getattr(config, "vocab_size", VOCAB) or VOCAB, VOCAB)


@pytest.mark.parametrize("model_type", COMPARED)
def test_every_decoder_runs_as_eager(reference_name, walk_calls, model_type):
    """Built from a tiny config: the same logits as eager, unpadded, left-padded and with the last
    token changed (a lost causal mask shows there), and every call that leaves the kernels has a
    reason NAMED_FALLBACKS names. Any error fails: a model type whose tiny config no longer runs in
    eager goes to NO_TINY_CONFIG, with the error, by hand."""
    config, eager, vocab = eager_model(model_type)
    assert model_problem(type(eager)) is None, f"{type(eager).__name__} is refused now: move {model_type} to REFUSED"
    ours = AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference_name).eval()
    ours.load_state_dict(eager.state_dict())
    ids, mask = inputs("left", seed=7, vocab=vocab)
    changed = ids.clone()
    changed[:, -1] = 3 + (changed[:, -1] - 2) % (vocab - 3)  # another token, still in [3, vocab)
    before = CALLS.copy()
    assert_same("logits", logits(ours, ids), logits(eager, ids))
    assert_same("logits, last token changed", logits(ours, changed), logits(eager, changed))
    keep = mask.bool()
    assert_same("logits, left-padded", logits(ours, ids, mask)[keep], logits(eager, ids, mask)[keep])
    walk_calls[model_type] = calls = CALLS - before
    assert not unnamed_fallbacks(calls), f"{model_type}: fallbacks without a name in NAMED_FALLBACKS: {dict(calls)}"


@pytest.mark.parametrize("model_type", REFUSED_WALK)
def test_decoders_that_compute_attention_themselves_are_refused(reference_name, model_type):
    """Refused when the implementation is set, naming the class and model_problem's reason."""
    config, eager, _ = eager_model(model_type)
    cls = type(eager).__name__
    assert model_problem(type(eager)) is not None, f"{cls} is not refused now: walk {model_type} (out of REFUSED)"
    words = f"{cls} cannot use attn_implementation='{reference_name}': it computes its attention itself"
    with pytest.raises(ValueError, match=re.escape(words)):
        AutoModelForCausalLM.from_config(copy.deepcopy(config), attn_implementation=reference_name)


@pytest.mark.parametrize("model_type", LEFT_OUT)
def test_the_decoders_left_out_still_fail_in_eager(model_type):
    kind, words = NO_TINY_CONFIG[model_type]
    try:
        _, eager, vocab = eager_model(model_type)
        logits(eager, inputs("left", seed=7, vocab=vocab)[0])
    except Exception as e:  # noqa: BLE001  (the error is transformers', checked by its kind and words)
        assert type(e).__name__ == kind and words in str(e), f"{model_type} fails otherwise now: {e!r}"
    else:
        pytest.fail(f"{model_type}'s tiny config runs in eager now: take it out of NO_TINY_CONFIG to compare it")


def test_the_walk_compares_most_decoders():
    """Every walked type is compared, refused or listed as failing in eager, and the compared are
    at least COMPARED_FLOOR: a transformers, or an edit, that moves models out of the comparison fails here."""
    assert len(WALK) >= 150, len(WALK)
    assert set(COMPARED) | set(REFUSED_WALK) | set(LEFT_OUT) == set(WALK)
    counts = f"{len(COMPARED)} compared, {len(REFUSED_WALK)} refused, {len(LEFT_OUT)} with no tiny config in eager"
    assert len(COMPARED) >= COMPARED_FLOOR, f"{counts}: fewer than {COMPARED_FLOOR} compared"
