"""Generation on the decode kernel: transformers' decode steps, with a DynamicCache and a
StaticCache, and the SDPA drop-in's, against eager attention's generation under the project's
rule (greedy tokens identical, every step's logits within the rule against float64 eager); a
static cache's decode step reads nothing on the host and compiles whole; the GPU generation
benchmark's smoke run at tiny sizes."""

import pytest
import torch

pytest.importorskip("transformers")

from transformers import StaticCache  # noqa: E402

from attention_kernels.kernels import patch_sdpa  # noqa: E402
from attention_kernels.kernels.hf import CALLS, DECODE, register_transformers  # noqa: E402
from attention_kernels.testing.cases import DEVICE, FACTOR, FLOOR  # noqa: E402
from attention_kernels.testing.rule import assert_close, seed_of  # noqa: E402
from test_hf import LAYERS, T, VOCAB, build, counted, eager_copies, llama  # noqa: E402

NEW = 6  # new tokens: the prompt's forward, then NEW - 1 decode steps
HOST_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture(scope="module")
def name():
    return register_transformers("attention_kernels_generate")  # impl="auto": decode steps on the decode kernel


def prompt(seed, B=2):
    """(B, T) token ids without the pad token 0: generate would read a 0 as padding and make a mask."""
    return torch.randint(1, VOCAB, (B, T), generator=torch.Generator().manual_seed(seed)).to(DEVICE)


def greedy(model, ids, cache):
    """Greedy generation of NEW tokens: the tokens (B, T + NEW) and every step's logits (B, NEW, VOCAB)."""
    kw = dict(max_new_tokens=NEW, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    if cache == "static":
        kw["cache_implementation"] = "static"
    out = model.generate(ids, **kw)
    return out.sequences, torch.stack(out.logits, 1)


def assert_generates_as_eager(got, truth, low, what):
    (tokens, logits), (want_tokens, want), (base_tokens, base) = got, truth, low
    assert torch.equal(tokens, base_tokens), f"{what}: tokens differ from eager's:\n{tokens}\n{base_tokens}"
    assert torch.equal(tokens, want_tokens), f"{what}: tokens differ from float64 eager's:\n{tokens}\n{want_tokens}"
    assert_close(f"{what}: logits", logits, want, base, FACTOR, FLOOR[torch.float32])


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_generate_decodes_on_the_decode_kernel(name, cache):
    """The prompt's forward on flash or fused, every decode step on the decode kernel: a
    DynamicCache's keys as they are, a StaticCache's whole (max_cache_len) with the lengths from
    its offset on the device."""
    model = build(llama(), name, seed=seed_of("generate", cache))
    truth, low = eager_copies(model)
    ids = prompt(seed_of("generate prompt", cache))
    got, calls = counted(greedy, model, ids, cache)
    assert calls == {"kernels": LAYERS * NEW, DECODE: LAYERS * (NEW - 1)}, calls
    assert_generates_as_eager(got, greedy(truth, ids, cache), greedy(low, ids, cache), f"{cache} cache")


def test_sdpa_drop_in_decodes_on_the_decode_kernel():
    """transformers' own "sdpa" path inside patch_sdpa: its decode steps (one query, is_causal=False,
    no mask, against a DynamicCache) run the decode kernel."""
    model = build(llama(), "sdpa", seed=seed_of("generate sdpa"))
    truth, low = eager_copies(model)
    ids = prompt(seed_of("generate sdpa prompt"))
    with patch_sdpa() as calls:
        got = greedy(model, ids, "dynamic")
    assert calls.kernel == LAYERS * NEW and calls.decode == LAYERS * (NEW - 1) and not calls.fallback, calls
    assert_generates_as_eager(got, greedy(truth, ids, "dynamic"), greedy(low, ids, "dynamic"), "sdpa drop-in")


def prefilled(model, ids, max_cache_len=T + NEW):
    """A StaticCache holding the prompt, and the next token (B, 1)."""
    cache = StaticCache(config=model.config, max_cache_len=max_cache_len)
    with torch.no_grad():
        logits = model(input_ids=ids, cache=cache, use_cache=True).logits
    return cache, logits[:, -1:].argmax(-1)


def test_static_decode_steps_read_nothing_on_the_host(name, monkeypatch):
    """A StaticCache's decode steps, the model's whole forward: no .item(), .tolist(), .cpu(),
    .numpy() and no tensor read as a bool or a number, so a CUDA graph can replay them."""
    model = build(llama(), name, seed=seed_of("host reads"))
    cache, token = prefilled(model, prompt(seed_of("host reads prompt")))

    def read(self, *args, **kwargs):
        pytest.fail(f"a decode step read a {tuple(self.shape)} tensor on the host")

    for method in HOST_READS:
        monkeypatch.setattr(torch.Tensor, method, read)
    with torch.no_grad():
        for _ in range(NEW - 1):
            token, calls = counted(lambda: model(input_ids=token, cache=cache, use_cache=True).logits[:, -1:].argmax(-1))
            assert calls == {"kernels": LAYERS, DECODE: LAYERS}, calls
    monkeypatch.undo()


def test_static_decode_step_compiles_whole(name):
    """torch.compile(fullgraph=True) of a StaticCache's decode step: one graph, no break (the
    decode kernel an opaque op under the interpreter), and the same logits as the uncompiled step,
    bit for bit (aot_eager runs the same ops; Inductor's fused arithmetic differs by ~1e-7)."""
    from torch._dynamo.utils import counters
    model = build(llama(), name, seed=seed_of("compiled step"))
    ids = prompt(seed_of("compiled step prompt"))
    (cache, token), (compiled_cache, _) = prefilled(model, ids), prefilled(model, ids)
    step = lambda token, cache: model(input_ids=token, cache=cache, use_cache=True).logits  # (B, 1, VOCAB)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    counters.clear()
    with torch.no_grad():
        for _ in range(2):  # the second step replays the graph: its lengths are on the device
            want, calls = counted(step, token, cache)
            got = compiled(token, compiled_cache)
            torch.testing.assert_close(got, want, rtol=0, atol=0)
            token = want[:, -1:].argmax(-1)
    assert calls == {"kernels": LAYERS, DECODE: LAYERS}, calls
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"], dict(counters["stats"])


def test_static_decode_step_with_a_gradient_or_float64(name):
    """Where the decode kernel cannot run a StaticCache's decode step: a gradient wanted runs flash
    with the lengths spelled out as a 4D mask on the device; float64, which the kernels refuse,
    runs SDPA with that mask. Both as eager computes the step."""
    model = build(llama(), name, seed=seed_of("static fallbacks"))
    truth, low = eager_copies(model)
    ids = prompt(seed_of("static fallbacks prompt"))
    logits, calls = {}, {}
    for m in (model, truth, low):  # grad enabled: the weights require it
        cache, token = prefilled(m, ids)
        logits[m], calls[m] = counted(lambda: m(input_ids=token, cache=cache, use_cache=True).logits)
    wanted = "kernels, the mask in 4D: a static cache's decode step with dropout or a gradient"
    assert calls[model] == {"kernels": LAYERS, wanted: LAYERS}, calls[model]
    assert_close("logits with a gradient", logits[model], logits[truth], logits[low], FACTOR, FLOOR[torch.float32])
    model64 = model.double()
    cache, token = prefilled(model64, ids)
    with torch.no_grad():
        got, calls = counted(lambda: model64(input_ids=token, cache=cache, use_cache=True).logits)
    assert calls == {"sdpa: q has dtype float64; supported: float16, bfloat16, float32": LAYERS}, calls
    torch.testing.assert_close(got, logits[truth], rtol=1e-10, atol=1e-10)


def test_generation_benchmark_runs(tmp_path):
    """The GPU command's generation timing (benchmarks.generate) at its tiny preset under the
    interpreter: every attention x batch writes a row, the kernels' decode steps on the decode
    kernel. The gpu preset refuses to run without CUDA."""
    from attention_kernels.benchmarks import generate
    before = CALLS.copy()
    rows = generate.run("tiny", str(tmp_path))
    p = generate.PRESETS["tiny"]
    assert [(r["attention"], r["B"]) for r in rows] == [(a, B) for B in p["batches"] for a in generate.ATTENTIONS]
    assert all(isinstance(r[k], float) for r in rows for k in ("step_ms", "tokens_per_s", "attention_share")), rows
    assert 0 <= rows[-1]["same_tokens"] <= 1, rows
    decode_steps = 3 * (p["new"] - 1) * p["layers"] * len(p["batches"])  # 3 generations each: warm-up, prompt, timed
    assert (CALLS - before)[DECODE] >= decode_steps, CALLS - before
    assert (tmp_path / "generate.csv").read_text().count("\n") == len(rows) + 1
    if DEVICE != "cuda":
        with pytest.raises(RuntimeError, match="the gpu preset needs a CUDA GPU"):
            generate.run("gpu", str(tmp_path / "gpu"))
