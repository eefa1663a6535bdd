"""The tiny GPT trains the same, step for step, whichever attention runs it; the command writes its
log and losses and fails when an impl's loss curve leaves the reference's."""

import csv

import pytest
import torch
import torch.nn.functional as F

from benchmarks import tinygpt
import kernels.module

STEPS = 8  # under the interpreter a kernel step takes ~0.3 s; rounding differences are ~1e-7 nats this early


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
    assert delta <= tinygpt.TOLERANCE["fp32"], (
        f"{impl} left the reference by {delta:.2e} nats at step {worst}: {losses[worst]:.6f} vs {reference[worst]:.6f}")


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
    log = (tmp_path / "log.txt").read_text()
    assert log == capsys.readouterr().out
    assert "B=4 T=8 C=16 heads=1 (D=16)" in log and "max |dloss|" in log and "FAILED" not in log
    for impl in tinygpt.IMPLS:
        assert f"--- {impl} samples 10 characters:" in log


def test_cli_fails_when_a_kernel_leaks_the_future(tmp_path, monkeypatch):
    real = kernels.module.attention

    def leaky(q, k, v, causal=True, impl="auto"):  # a causal mask that is not there
        if impl == "flash":
            return F.scaled_dot_product_attention(q, k, v, is_causal=False)
        return real(q, k, v, causal=causal, impl=impl)

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


@pytest.mark.skipif(tinygpt.DEVICE == "cuda", reason="the gpu preset runs on a GPU")
def test_the_gpu_preset_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="the gpu preset needs a GPU"):
        tinygpt.main(["--preset", "gpu", "--out", str(tmp_path)])
