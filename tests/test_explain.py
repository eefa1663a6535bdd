"""reference.explain: the trace is the reference's computation, the tiled trace follows the flash
kernel, and the picture is drawn."""

import pytest
import torch

from attention_kernels import reference
from cases import DEVICE
from attention_kernels.kernels import flash, flash_attention
from attention_kernels.reference import explain
from attention_kernels.reference.tiled import flash_forward
from rule import seed_of

SIZES = [(1, 2, 3, 1), (2, 8, 16, 4), (1, 5, 6, 2)]  # (B, T, C, heads): the seed, its first sketch, odd


@pytest.mark.parametrize("integers", [False, True], ids=["random", "integers"])
@pytest.mark.parametrize("B, T, C, H", SIZES)
def test_trace_ends_in_the_reference_output(B, T, C, H, integers):
    x, (w_q, w_k, w_v) = explain.make_inputs(B, T, C, seed=seed_of("explain", B, T, C), integers=integers)
    steps, q, k, v = explain.trace(x, w_q, w_k, w_v, H)
    titles = [s.title for s in steps]
    assert titles[0] == "x" and titles[-1] == "heads joined back to C"
    assert "causal mask" in titles and any(t.startswith("weights = softmax") for t in titles)
    # q, k, v are x's projections split into heads; the end is reference.attention on them, joined
    D = C // H
    torch.testing.assert_close(q, (x @ w_q).view(B, T, H, D).transpose(1, 2), rtol=0, atol=0)
    expected = reference.attention(q, k, v).transpose(1, 2).reshape(B, T, C)
    assert torch.equal(steps[-1].tensors["y"], expected)
    weights = steps[-3].tensors["weights"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T, dtype=weights.dtype))
    assert (weights.triu(1) == 0).all()  # nothing from the future


@pytest.mark.parametrize("block_size", [1, 2, 3, 8], ids=lambda n: f"block{n}")  # 3 does not divide T = 8
def test_tiled_trace_equals_the_naive_one(block_size):
    x, w = explain.make_inputs(2, 8, 16, seed=seed_of("tiled", block_size))
    steps, q, k, v = explain.trace(x, *w, 4)
    seen = []

    def check_block(start, end, state):
        # after each block, acc / l is attention over the keys seen so far
        prefix = reference.softmax(reference.apply_mask(reference.scores(q, k[:, :, :end], 0.5),
                                                        reference.causal_mask(8, 8)[:, :end])) @ v[:, :, :end]
        partial = state["acc"] / state["l"].masked_fill(state["l"] == 0, 1)[..., None]
        torch.testing.assert_close(partial, prefix, rtol=0, atol=1e-12)
        seen.append((start, end))

    out, _ = flash_forward(q, k, v, block_size=block_size, on_block=check_block)
    torch.testing.assert_close(out, steps[-2].tensors["out"], rtol=0, atol=1e-12)
    assert seen == [(s, min(s + block_size, 8)) for s in range(0, 8, block_size)]


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Hq, Hkv, Tq, Tk", [(2, 2, 8, 8), (4, 2, 97, 40), (2, 1, 17, 100)])
def test_tiled_rule_agrees_with_the_flash_kernel(monkeypatch, Hq, Hkv, Tq, Tk, causal):
    monkeypatch.setitem(flash.INTERPRETER_BLOCKS, "fwd", (16, 16))  # the interpreter's blocks; a GPU autotunes
    g = torch.Generator(DEVICE).manual_seed(seed_of("kernel", Hq, Tq, Tk, causal))
    q = torch.randn(2, Hq, Tq, 32, generator=g, device=DEVICE)
    k, v = (torch.randn(2, Hkv, Tk, 32, generator=g, device=DEVICE) for _ in range(2))
    out, lse = flash_attention(q, k, v, causal=causal, return_lse=True)
    t_out, t_lse = flash_forward(q, k, v, causal=causal, block_size=16)
    torch.testing.assert_close(out, t_out, rtol=0, atol=5e-6)
    torch.testing.assert_close(lse, t_lse, rtol=0, atol=5e-6)


def test_the_command_prints_every_step_and_the_tiled_check(capsys):
    explain.main(["--integers", "--tiled", "--block-size", "1"])
    out = capsys.readouterr().out
    for words in ("1. x   (B, T, C)", "scores = q @ k^T", "1/sqrt(D)", "causal mask", "-inf", "row sums: 1.0000",
                  "out = weights @ v", "heads joined back to C", "keys 0..0", "keys 1..1", "out = acc / l"):
        assert words in out, words
    diffs = [float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max difference" in line]
    assert len(diffs) == 2 and max(diffs) < 1e-12


def test_png_is_written_and_not_blank(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "pictures" / "attention.png"  # a folder that does not exist yet
    explain.main(["-T", "8", "-C", "16", "--png", str(path)])
    pixels = image.imread(path)
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.1  # drawn panels, not an empty canvas


def test_heads_must_divide_the_width(capsys):
    with pytest.raises(SystemExit):
        explain.main(["-C", "3", "--heads", "2"])
    assert "--heads 2 does not divide C=3" in capsys.readouterr().err
