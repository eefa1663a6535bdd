"""The tiny GPT trains the same, step for step, whichever attention runs it; it generates the same
tokens with a KV cache as without; the command writes its log and losses and fails when an impl's
loss curve leaves the reference's or its cached generation parts from the uncached one."""

import csv
import re

import pytest
import torch
import torch.nn.functional as F

from attention_kernels.benchmarks import tinygpt
from attention_kernels import kernels  # noqa: E402  (its submodules below, by attribute)
import attention_kernels.kernels.module

STEPS = 8  # under the interpreter a kernel step takes ~0.3 s
# Largest |loss - reference's loss| over these STEPS steps, in nats. Measured (seed preset, fp32,
# init and batch seeds 0 to 4): fused, flash and sdpa part from the reference by 2.4e-7 at most,
# one fp32 ulp of a loss near 4, at a single step, and by nothing in 6 of 15 runs. 1e-5 is 40x
# that; what a wrong backward gives in these 8 steps (seed 0): dv 1.1x too large 2.4e-4 (seeds
# 1, 2: 4.8e-5, 3.1e-4), dv 1.01x too large 1.7e-5. tinygpt.TOLERANCE["fp32"], 1e-3, bounds the
# command's 200 steps, where training has had time to amplify rounding: it lets both bugs through here.
STEP_TOLERANCE = 1e-5


@pytest.fixture(autouse=True)
def one_thread():
    # tensors of a few KB: a second OpenMP thread only adds hand-off cost (main() does the same)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup():
    """(config, alphabet, data, initial weights, batch offsets) of the seed preset, STEPS steps."""
    cfg = tinygpt.Config(steps=STEPS)
    text, alphabet = tinygpt.load_text()
    data = tinygpt.encode(text, alphabet)
    torch.manual_seed(0)
    init = tinygpt.TinyGPT(len(alphabet), cfg, "reference").state_dict()
    return cfg, alphabet, data, init, tinygpt.batch_offsets(len(data), cfg, seed=0)


def train(impl, setup):
    cfg, alphabet, data, init, offsets = setup
    return tinygpt.train(impl, cfg, len(alphabet), init, data, offsets)


@pytest.mark.parametrize("impl", ["fused", "flash", "sdpa"])
def test_loss_curve_agrees_with_the_reference(setup, impl):
    _, reference, _, _ = train("reference", setup)
    _, losses, tokens_per_s, peak = train(impl, setup)
    assert len(losses) == STEPS and tokens_per_s > 0 and peak > 0
    delta = tinygpt.max_deviation(losses, reference)
    worst = max(range(STEPS), key=lambda i: abs(losses[i] - reference[i]))
    assert delta <= STEP_TOLERANCE, (
        f"{impl} left the reference by {delta:.2e} nats (bound {STEP_TOLERANCE:g}) at step {worst}: "
        f"{losses[worst]:.8f} vs {reference[worst]:.8f}")


def test_training_lowers_the_loss(setup):
    _, alphabet, data, init, _ = setup
    cfg = tinygpt.Config(steps=30)
    offsets = tinygpt.batch_offsets(len(data), cfg, seed=0)
    _, losses, _, _ = tinygpt.train("reference", cfg, len(alphabet), init, data, offsets)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert first - last > 0.1, f"mean loss of the first 5 steps {first:.4f}, of the last 5 {last:.4f}"


def test_sample_has_the_requested_length_over_the_alphabet(setup):
    cfg, alphabet, data, init, _ = setup
    model = tinygpt.TinyGPT(len(alphabet), cfg, "flash")
    model.load_state_dict(init)
    text = tinygpt.sample(model, alphabet, 12, seed=1)  # longer than T = 8: the context is cropped
    assert len(text) == 12 and set(text) <= set(alphabet)
    assert text == tinygpt.sample(model, alphabet, 12, seed=1)  # the generator is seeded
    assert model.training  # sampling puts the model back in training mode


def test_cli_writes_log_and_losses(tmp_path, capsys):
    assert tinygpt.main(["--preset", "seed", "--steps", "7", "--sample", "10", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    assert list(rows[0]) == ["step", "impl", "loss"]
    assert [(r["impl"], int(r["step"])) for r in rows] == [(i, s) for i in tinygpt.IMPLS for s in range(7)]
    log, printed = (tmp_path / "log.txt").read_text(), capsys.readouterr()
    assert log == printed.out
    for impl in tinygpt.IMPLS:  # progress on stderr, a line per step here (7 steps, fewer than PROGRESS_LINES)
        assert re.search(rf"^  {impl}: step 7/7, loss \d\.\d{{4}}, \d+\.\d s$", printed.err, re.M), printed.err
    assert "B=4 T=8 C=16 heads=1 (D=16)" in log and "max |dloss|" in log and "FAILED" not in log
    for impl in tinygpt.IMPLS:
        assert f"--- {impl} samples 10 characters:" in log
        assert re.search(rf"^{impl} +yes +\S+ +\S+ +\S+ +yes +\S+ +[1-9]\d*$", log, re.M), \
            f"{impl}'s generation row: same tokens, with the cache and through pages, and steps that mixed"
    assert "same tokens  max |dlogit|  cached tok/s  uncached tok/s  paged same  paged |dlogit|  mixed steps" in log


def test_cli_fails_when_a_kernel_leaks_the_future(tmp_path, monkeypatch):
    real = kernels.module.attention

    def leaky(q, k, v, causal=True, impl="auto", **kwargs):  # a causal mask that is not there
        if impl == "flash":
            return F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return real(q, k, v, causal=causal, impl=impl, **kwargs)

    monkeypatch.setattr(kernels.module, "attention", leaky)
    argv = ["--preset", "seed", "--steps", "7", "--sample", "1", "--impl", "flash", "sdpa", "--out", str(tmp_path)]
    assert tinygpt.main(argv) == 1
    assert "FAILED: flash left the reference's loss" in (tmp_path / "log.txt").read_text()


@pytest.mark.parametrize("argv, words", [
    (["--heads", "3"], r"--heads 3 does not divide C=16.*one of \[1, 2, 4, 8, 16\]"),
    (["--steps", "5"], "more than the 5 warm-up steps"),
    (["-T", "5000"], r"the text has \d+ characters; a context of T=5000 needs more"),
])
def test_bad_settings_are_refused_clearly(tmp_path, argv, words):
    with pytest.raises(SystemExit, match=words):
        tinygpt.main(["--preset", "seed", "--out", str(tmp_path), *argv])


@pytest.mark.parametrize("argv, words", [
    (["--lr", "-1"], "argument --lr: must be above 0, got -1"),
    (["-T", "0"], "argument -T/--seqlen: must be above 0, got 0"),
    (["--data", "no-such-text.txt"], "--data no-such-text.txt: no such file"),
])
def test_bad_values_get_argparse_errors(tmp_path, argv, words, capsys):
    with pytest.raises(SystemExit) as done:
        tinygpt.main(["--out", str(tmp_path), *argv])
    assert done.value.code == 2 and words in capsys.readouterr().err


@pytest.mark.skipif(tinygpt.DEVICE == "cuda", reason="the gpu preset runs on a GPU")
def test_the_gpu_preset_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="the gpu preset needs a GPU"):
        tinygpt.main(["--preset", "gpu", "--out", str(tmp_path)])



# ----------------------------------------------------------------------------- generation with a KV cache

VOCAB = 13
SMALL = tinygpt.Config(T=32, C=16, heads=2, layers=2)  # block size 32, two heads of 8


@pytest.fixture(scope="module")
def small_init():
    """Random weights of a 2-layer GPT, drawn wider than nanoGPT's init (std 0.02) so that its
    attention is sharp and its logits far apart: a key or position off by one changes the tokens
    (at std 0.02, a cache that drops the newest key changed 1 token of 64, in one mode of two)."""
    torch.manual_seed(0)
    model = tinygpt.TinyGPT(VOCAB, SMALL, "reference")
    for p in model.parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.5)
    return model.state_dict()


def small_gpt(impl, init):
    model = tinygpt.TinyGPT(VOCAB, SMALL, impl).to(tinygpt.DEVICE)
    model.load_state_dict(init)
    return model


# flash: the prompt through kernels.flash_attention, each token after it through kernels.decode_attention;
# reference: both through the reference (and sampling, whose draws do not depend on the kernel)
@pytest.mark.parametrize("impl, greedy", [("flash", True), ("reference", True), ("reference", False)],
                         ids=["flash-greedy", "reference-greedy", "reference-sampled"])
def test_generation_with_the_cache_equals_generation_without(small_init, impl, greedy):
    model = small_gpt(impl, small_init)
    prompt = torch.tensor([[1, 2, 3], [7, 7, 0]], device=tinygpt.DEVICE)  # (B=2, t=3)
    n = SMALL.T - prompt.shape[1]                                          # up to the block size
    (cached, cached_logits), (uncached, uncached_logits) = (
        tinygpt.generate(model, prompt, n, use_cache=use_cache, greedy=greedy, seed=3, return_logits=True)
        for use_cache in (True, False))
    assert cached.shape == (2, SMALL.T) and torch.equal(cached[:, :3], prompt)
    assert cached_logits.shape == (2, n, VOCAB)
    differ = (cached != uncached).nonzero().tolist()
    assert not differ, (f"with the cache, sequence {differ[0][0]} parts from generation without it at position "
                        f"{differ[0][1]} ({len(differ)} of {cached.numel()} tokens differ):\n"
                        f"{cached.tolist()}\nvs\n{uncached.tolist()}")
    dlogits = (cached_logits - uncached_logits).abs()
    worst = divmod(int(dlogits.argmax()), n * VOCAB)
    assert dlogits.max() <= tinygpt.LOGITS_TOLERANCE, (
        f"logits with the cache differ from those without by {dlogits.max():.2e} "
        f"(sequence {worst[0]}, new token {worst[1] // VOCAB})")
    assert len(set(uncached[:, 3:].flatten().tolist())) > 2  # not one repeated token: the test can tell
    assert model.training  # generate restores the mode it found


@pytest.mark.parametrize("impl", ["flash", "reference"])
def test_batched_generation_through_pages_equals_each_prompt_alone(small_init, impl):
    # Prompts of 1 to 9 tokens in one batch through a paged cache (pages of 4, prompts read 3 a step
    # while others decode, sequences finishing at different steps): each gets the tokens, and the
    # logits, that it gets alone through the contiguous cache
    model = small_gpt(impl, small_init)
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(VOCAB, (n,), generator=g).to(tinygpt.DEVICE) for n in (5, 1, 9, 2)]
    new = [12, 20, 7, 15]
    batched, logits, mixed = tinygpt.generate_paged(model, prompts, new, chunk=3, page_size=4)
    assert mixed >= 2, "no step read a prompt while another sequence decoded"
    for p, n, tokens, got in zip(prompts, new, batched, logits):
        alone, want = tinygpt.generate(model, p[None], n, use_cache=True, greedy=True, return_logits=True)
        assert torch.equal(tokens, alone[0]), f"prompt {p.tolist()}: {tokens.tolist()} batched, {alone[0].tolist()} alone"
        assert (got - want[0]).abs().max() <= tinygpt.LOGITS_TOLERANCE
    assert model.training


@pytest.mark.parametrize("use_cache", [True, False])
def test_generation_past_the_block_size_is_refused(small_init, use_cache):
    model = small_gpt("reference", small_init)
    prompt = torch.zeros((1, 3), dtype=torch.long, device=tinygpt.DEVICE)
    with pytest.raises(ValueError, match=r"3 tokens and max_new_tokens=30 make 33 positions, more than the "
                                         r"model's block size T=32 .* at most 29 new tokens"):
        tinygpt.generate(model, prompt, 30, use_cache=use_cache)


def test_cli_fails_when_the_cache_drops_the_newest_key(tmp_path, monkeypatch):
    real = tinygpt.decode_attention

    def stale(q, k_cache, v_cache, cache_seqlens, **kwargs):  # the new token's own key not counted
        return real(q, k_cache, v_cache, cache_seqlens - 1, **kwargs)

    monkeypatch.setattr(tinygpt, "decode_attention", stale)
    argv = ["--preset", "seed", "--steps", "7", "--sample", "1", "--impl", "sdpa", "--out", str(tmp_path)]
    assert tinygpt.main(argv) == 1
    log = (tmp_path / "log.txt").read_text()
    assert "FAILED: sdpa generated with the KV cache" in log  # sdpa decodes on the kernels; the reference not
    assert re.search(r"^reference +yes ", log, re.M) and "left the reference's loss" not in log


def test_the_lecture_model_without_dropout_trains_as_written_on_the_kernels(tmp_path):
    """--model lecture: the lecture's gpt.py after swap_attention follows the model as written,
    step by step, when there is no dropout to draw differently."""
    # two sequences a batch, not the preset's four: the lecture's 4 heads of 4 make each kernel step
    # cost ~1.4 s under the interpreter at B=4 (and 6 steps is the fewest past the warm-up)
    argv = ["--model", "lecture", "--dropout", "0", "--impl", "flash", "--steps", "6", "-B", "2", "--out", str(tmp_path)]
    assert tinygpt.main(argv) == 0
    rows = list(csv.DictReader(open(tmp_path / "losses.csv")))
    by_run = {run: [float(r["loss"]) for r in rows if r["run"] == run] for run in ("lecture", "flash")}
    assert len(by_run["flash"]) == 6 and max(abs(a - b) for a, b in zip(*by_run.values())) < 1e-4
    assert (tmp_path / "loss.png").stat().st_size > 1000
    assert "swap_attention replaced blocks.0.sa, blocks.1.sa" in (tmp_path / "log.txt").read_text()

