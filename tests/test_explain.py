"""reference.explain: the trace is the reference's computation, the backward trace is autograd's,
the tiled traces follow the flash kernel, the picture is drawn and the page (--html) is written."""

import json
import os
import re

import pytest
import torch
import torch.nn.functional as F

from attention_kernels import reference
from attention_kernels.testing.cases import DEVICE
from attention_kernels.kernels import flash, flash_attention
from attention_kernels.reference import explain, explain_html
from attention_kernels.reference.tiled import flash_backward, flash_forward
from attention_kernels.testing.rule import seed_of

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
    # and that is causal attention at the default scale 1/sqrt(D) as torch has it, not only as the reference does
    torch.testing.assert_close(steps[-1].tensors["y"], F.scaled_dot_product_attention(q, k, v, is_causal=True)
                               .transpose(1, 2).reshape(B, T, C), rtol=0, atol=1e-12)
    weights = steps[-3].tensors["weights"]
    torch.testing.assert_close(weights.sum(-1), torch.ones(B, H, T, dtype=weights.dtype))
    assert (weights.triu(1) == 0).all()  # nothing from the future


def traced_backward(B, T, C, H, seed, integers=False):
    """The forward and backward traces' tensors by name, and the inputs they started from."""
    x, w = explain.make_inputs(B, T, C, seed=seed, integers=integers)
    forward, *_ = explain.trace(x, *w, H)
    dy = explain.make_upstream(B, T, C, seed=seed, integers=integers)
    return explain.named(forward + explain.trace_backward(forward, dy)), x, w, dy


@pytest.mark.parametrize("integers", [False, True], ids=["random", "integers"])
@pytest.mark.parametrize("B, T, C, H", SIZES)
def test_backward_trace_equals_autograd(B, T, C, H, integers):
    grads, x, w, dy = traced_backward(B, T, C, H, seed_of("backward", B, T, C), integers)
    assert dy.abs().sum() > 0  # a gradient to trace, not zeros
    # autograd through the reference itself, from the same float64 leaves
    x, w_q, w_k, w_v = (t.clone().requires_grad_() for t in (x, *w))
    q, k, v = ((x @ w_).view(B, T, H, C // H).transpose(1, 2) for w_ in (w_q, w_k, w_v))  # (B, H, T, D)
    for t in (q, k, v):
        t.retain_grad()
    reference.attention(q, k, v).transpose(1, 2).reshape(B, T, C).backward(dy)
    expected = {"dx": x.grad, "dW_q": w_q.grad, "dW_k": w_k.grad, "dW_v": w_v.grad, "dQ": q.grad, "dK": k.grad,
                "dV": v.grad}
    for name, truth in expected.items():
        torch.testing.assert_close(grads[name], truth, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    # the two ways to delta agree, and the rows of dS (a softmax's gradient) and of dK sum to 0
    torch.testing.assert_close(grads["delta"], (grads["dO"] * grads["out"]).sum(-1, keepdim=True), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["dS"].sum(-1), torch.zeros(B, H, T, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(grads["dK"].sum(-2), torch.zeros(B, H, C // H, dtype=torch.float64), rtol=0,
                               atol=1e-12)


@pytest.mark.parametrize("B, T, C, H", SIZES)
def test_masked_scores_get_exactly_no_gradient(B, T, C, H):
    grads, *_ = traced_backward(B, T, C, H, seed_of("masked", B, T, C))
    hidden = ~reference.causal_mask(T, T)                    # (T, T) the future
    assert (grads["dS"][..., hidden] == 0).all(), grads["dS"][..., hidden]
    assert (grads["dS"][..., 0, :] == 0).all()  # row 0 sees one key: its weight is 1 whatever the score
    assert (grads["dQ"][..., 0, :] == 0).all()


@pytest.mark.parametrize("block_size", [1, 2, 3, 8], ids=lambda n: f"block{n}")  # 3 does not divide T = 8
def test_tiled_backward_equals_the_untiled_one(block_size):
    grads, *_ = traced_backward(2, 8, 16, 4, seed_of("tiled backward", block_size))
    q, k, v, weights = grads["q"], grads["k"], grads["v"], grads["weights"]
    out, lse = flash_forward(q, k, v, block_size=block_size)
    tiles, skipped = [], []

    def check_tile(k0, k1, q0, q1, state):
        if state is None:
            skipped.append((k0, q0))
            return
        tiles.append((k0, q0))
        # P recomputed from the log-sum-exp is the forward's P, hidden keys exactly 0
        torch.testing.assert_close(state["p"], weights[:, :, q0:q1, k0:k1], rtol=0, atol=1e-12)
        assert (state["ds"][..., ~reference.causal_mask(8, 8)[q0:q1, k0:k1]] == 0).all()

    dq, dk, dv = flash_backward(q, k, v, out, lse, grads["dO"], block_size=block_size, on_tile=check_tile)
    for name, got in (("dQ", dq), ("dK", dk), ("dV", dv)):
        torch.testing.assert_close(got, grads[name], rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")
    starts = range(0, 8, block_size)
    # a tile is skipped exactly when its last query comes before its first key
    assert skipped == [(k0, q0) for k0 in starts for q0 in starts if min(q0 + block_size, 8) - 1 < k0]
    assert len(tiles) + len(skipped) == len(starts) ** 2


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("Hq, Hkv, Tq, Tk", [(4, 2, 9, 5), (2, 1, 5, 9)])  # grouped heads; queries with no key
def test_tiled_backward_equals_autograd(Hq, Hkv, Tq, Tk, causal):
    g = torch.Generator().manual_seed(seed_of("flash_backward", Hq, Tq, Tk, causal))
    q = torch.randn(2, Hq, Tq, 4, generator=g, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(2, Hkv, Tk, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    dout = torch.randn(2, Hq, Tq, 4, generator=g, dtype=torch.float64)
    reference.attention(q, k, v, causal=causal).backward(dout)
    out, lse = flash_forward(q.detach(), k.detach(), v.detach(), causal=causal, block_size=3)
    got = flash_backward(q.detach(), k.detach(), v.detach(), out, lse, dout, causal=causal, block_size=3)
    for name, g_, truth in zip(("dq", "dk", "dv"), got, (q.grad, k.grad, v.grad)):
        torch.testing.assert_close(g_, truth, rtol=0, atol=1e-12, msg=lambda m: f"{name}: {m}")


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


def test_the_command_traces_the_backward_and_checks_it(capsys):
    explain.main(["--backward"])
    out = capsys.readouterr().out
    for words in ("12. dy = g   (B, T, C)", "dV = P^T @ dO", "dP = dO @ V^T   (B, H, T, T)", "delta = rowsum(dP * P)",
                  "rowsum(dO * O)", "dS = P * (dP - delta)", "dQ = dS @ K * scale", "dK = dS^T @ Q * scale",
                  "dW_q, dW_k, dW_v = x^T @ dq", "dx = dq @ W_q^T + dk @ W_k^T + dv @ W_v^T",
                  "check: torch's autograd"):
        assert words in out, words
    diffs = {line.split()[0]: float(line.rsplit(" ", 1)[1]) for line in out.splitlines() if "max |difference|" in line}
    assert set(diffs) == {"dx", "dW_q", "dW_k", "dW_v"} and max(diffs.values()) < 1e-12, diffs


def test_the_command_traces_the_flash_backward(capsys):
    explain.main(["--integers", "--tiled", "--backward", "--block-size", "1"])
    out = capsys.readouterr().out
    for words in ("delta = rowsum(dO * O)", "lse (base 2)", "keys 0..0, queries 1..1", "p = exp2(s - lse)",
                  "keys 1..1, queries 0..0: every key here comes after every query here", "dQ = its sum * scale"):
        assert words in out, words
    check = next(line for line in out.splitlines() if line.startswith("check: tiled and untiled backward agree"))
    assert max(float(d.split()[-1]) for d in check.split("difference ")[1].split(", ")) < 1e-12, check


def test_the_command_fails_when_the_backward_disagrees_with_autograd(monkeypatch, capsys):
    right = explain.autograd_gradients
    monkeypatch.setattr(explain, "autograd_gradients", lambda *a: {n: g + 1e-9 for n, g in right(*a).items()})
    with pytest.raises(SystemExit) as failed:
        explain.main(["--backward"])
    assert "disagrees with autograd" in str(failed.value.code)


def test_png_is_written_and_not_blank(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    path = tmp_path / "pictures" / "attention.png"  # a folder that does not exist yet
    explain.main(["-T", "4", "-C", "6", "--heads", "2", "--backward", "--png", str(path)])  # forward and backward
    pixels = image.imread(path)
    assert pixels.shape[0] > 1000 and pixels.shape[1] > 1000
    assert pixels[..., :3].std() > 0.1  # drawn panels, not an empty canvas


def test_heads_must_divide_the_width(capsys):
    with pytest.raises(SystemExit):
        explain.main(["-C", "3", "--heads", "2"])
    assert "--heads 2 does not divide C=3" in capsys.readouterr().err


def embedded(path):
    """The data a page written by --html carries, as its script reads it."""
    with open(path, encoding="utf-8") as f:
        html = f.read()
    found = re.findall(r'<script id="data" type="application/json">(.*?)</script>', html, flags=re.DOTALL)
    assert len(found) == 1, "the page holds its data once, inline"
    return html, json.loads(found[0])


def test_html_is_one_self_contained_page_of_the_trace(tmp_path):
    path = tmp_path / "pages" / "attention.html"  # a folder that does not exist yet
    explain.main(["-T", "5", "-C", "6", "--heads", "2", "-B", "2", "--block-size", "2", "--html", str(path)])
    html, data = embedded(path)
    # nothing to fetch: no address, no file beside it, no script or style from elsewhere
    assert not re.search(r"https?:|<link|<img|<iframe|\bsrc=|@import|url\(", html), "the page reaches outside itself"
    # the numbers are the trace's own, exactly: every matrix, in order, -inf as null
    x, w = explain.make_inputs(2, 5, 6, seed=0)
    forward, *_ = explain.trace(x, *w, 2)
    steps = forward + explain.trace_backward(forward, explain.make_upstream(2, 5, 6, seed=0))
    matrices = {m["key"]: m for m in data["matrices"]}
    assert [s["title"] for s in data["steps"]] == [s.title for s in steps]
    for n, step in enumerate(steps, 1):
        for name, t in step.tensors.items():
            m = matrices[f"{n}:{name}"]
            assert m["shape"] == list(t.shape) and m["values"] == explain_html.flat(t), f"{n}:{name}"
    # the arithmetic embedded for each sum: each product is its two cells' (to the 4 decimals shown)
    values = [v for m in data["matrices"] for v in m["values"]]
    for m in data["matrices"]:
        if m["how"]["kind"] != "sum":
            continue
        for cell, own in zip(m["cells"], m["values"]):
            total = 0.0
            for a0, a_step, b0, b_step, products in cell["terms"]:
                for k, p in enumerate(products):
                    a, b = values[a0 + k * a_step], values[b0 + k * b_step]
                    assert abs(p - a * b) <= 0.5e-4 + 1e-12, (m["key"], p, a * b)
                    total += a * b
            assert abs(cell["sum"] - total) <= 0.5e-4 + 1e-12 and abs(own - total * m["how"].get("factor", 1)) < 1e-12
    # seeded: the same command writes the same bytes
    again = tmp_path / "again.html"
    explain.main(["-T", "5", "-C", "6", "--heads", "2", "-B", "2", "--block-size", "2", "--html", str(again)])
    assert again.read_bytes() == path.read_bytes()


def test_the_docs_example_page_is_what_the_command_writes(tmp_path):
    """docs/explain-T8-C16.html, committed, is the page its command writes today (numbers to
    1e-12: another CPU's BLAS may round a last bit differently)."""
    docs = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "explain-T8-C16.html")
    fresh = tmp_path / "fresh.html"
    explain_html.write_page(str(fresh), T=8, C=16, n_head=4, block_size=2)
    (html, data), (fresh_html, fresh_data) = embedded(docs), embedded(fresh)
    strip = lambda h: re.sub(r'(<script id="data" type="application/json">).*?(</script>)', r"\1\2", h, flags=re.DOTALL)
    assert strip(html) == strip(fresh_html), ("docs/explain-T8-C16.html is out of date: python -m "
                                              f"attention_kernels.reference.explain {data['command'].split('explain ')[1]}")

    def same(a, b, where):
        if isinstance(a, float) or isinstance(b, float):
            assert abs(a - b) <= 1e-12 * max(1, abs(b)), f"{where}: {a} != {b}"
        elif isinstance(a, (list, dict)):
            assert type(a) is type(b) and len(a) == len(b), where
            for k in (a if isinstance(a, dict) else range(len(a))):
                same(a[k], b[k], f"{where}/{k}")
        else:
            assert a == b, f"{where}: {a!r} != {b!r}"
    same(data, fresh_data, "data")
