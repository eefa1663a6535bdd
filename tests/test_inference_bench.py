"""The inference benchmark runs end to end on its tiny preset (under the interpreter without a
GPU): one CSV row per part x impl x shape x mode with the sweep's columns, the log with the
command, the plots; a kernel that fails is recorded and fails the run."""

import csv

import pytest
import torch

from attention_kernels.benchmarks import inference
from attention_kernels.benchmarks.measure import flops, min_bytes
from attention_kernels.reference.naive import window_mask

TINY = inference.PRESETS["tiny"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(exit code, CSV rows, log text, output folder) of one run of the tiny preset (~15 s)."""
    out = tmp_path_factory.mktemp("inference")
    with pytest.raises(SystemExit) as done:
        inference.main(["--preset", "tiny", "--out", str(out)])
    rows = list(csv.DictReader(open(out / "inference.csv")))
    return done.value.code, rows, (out / "log.txt").read_text(), out


def ok(rows, **match):
    """The rows whose columns equal `match` (as CSV strings), each checked to have run."""
    found = [r for r in rows if all(r[k] == str(v) for k, v in match.items())]
    assert found, f"no row with {match}"
    for r in found:
        assert r["status"] == "ok", r
        assert 0 < float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"]), r
        assert float(r["us_per_token"]) == pytest.approx(float(r["ms_p50"]) * 1e3 / int(r["tokens"]), rel=1e-4)
    return found


def test_the_run_succeeds_and_writes_the_csv_log_and_plots(tiny_run):
    code, rows, log, out = tiny_run
    assert code == 0
    assert list(rows[0]) == inference.CSV_FIELDS
    assert {r["part"] for r in rows} == set(inference.PARTS)
    assert not [r for r in rows if r["status"].startswith("error")]
    for r in rows:
        assert r["dtype"] == "bf16" and float(r["copy_gbps"]) > 0 and r["device"] and r["commit"]
    assert f"command: python -m attention_kernels.benchmarks.inference --preset tiny --out {out}" in log
    assert "ceilings:" in log and "copy" in log and "x SDPA" in log
    if inference.DEVICE == "cpu":
        assert "say nothing about GPU speed" in log
    for name in ("decode", "paged", "window"):
        if any(r["part"] == name for r in rows):
            image = pytest.importorskip("matplotlib.image").imread(out / f"{name}.png")
            assert image.shape[0] > 200 and image.std() > 0.01  # drawn, not blank


def test_decode_rows_report_bandwidth_against_the_copy(tiny_run):
    _, rows, _, _ = tiny_run
    p = TINY["decode"]
    B, D = p["batches"][0], TINY["D"]
    for L in p["lengths"]:
        for Hq, Hkv in p["heads"]:
            shape = dict(part="decode", B=B, H=Hq, Hkv=Hkv, Tq=1, Tk=L, D=D)
            (kernel,) = ok(rows, impl="decode", num_splits="auto", **shape)
            ok(rows, impl="sdpa-math", **shape)
            ms, item = float(kernel["ms_p50"]), 2  # bf16
            traffic = (2 * B * Hkv * L * D + 2 * B * Hq * D) * item  # valid K and V, q, o
            assert float(kernel["gbps"]) == pytest.approx(traffic / ms * 1e-6, rel=1e-4)
            assert float(kernel["frac_copy_ceiling"]) == pytest.approx(
                float(kernel["gbps"]) / float(kernel["copy_gbps"]), rel=1e-4)
            assert kernel["splits_used"], "inference.auto_splits no longer reads kernels.decode's rule"
            assert int(kernel["splits_used"]) >= 1 and float(kernel["vs_best_sdpa"]) > 0
    B, Hq, Hkv, L = p["splits_at"]
    for n in p["splits"]:
        (fixed,) = ok(rows, part="decode", impl="decode", num_splits=n, B=B, H=Hq, Hkv=Hkv, Tk=L)
        assert fixed["splits_used"] == str(n)


def test_paged_rows_beside_the_contiguous_cache(tiny_run):
    # each page size, the contiguous decode and SDPA on one shape, GB/s of the same bytes
    _, rows, _, _ = tiny_run
    p, D = TINY["paged"], TINY["D"]
    (Hq, Hkv), B, L = p["heads"][0], p["batches"][0], p["lengths"][0]
    shape = dict(part="paged", B=B, H=Hq, Hkv=Hkv, Tq=1, Tk=L, D=D)
    dense = ok(rows, impl="decode", **shape)[0]
    for size in p["pages"]:
        (paged,) = ok(rows, impl=f"paged-{size}", **shape)
        assert float(paged["gbps"]) * float(paged["ms_p50"]) == pytest.approx(
            float(dense["gbps"]) * float(dense["ms_p50"]), rel=1e-4)  # the same bytes counted
        assert float(paged["vs_best_sdpa"]) > 0
    ok(rows, impl="sdpa-math", **shape)


def test_varlen_rows_compare_packed_with_padded(tiny_run):
    _, rows, _, _ = tiny_run
    (B, longest), H, D = TINY["varlen"]["batches"][0], TINY["varlen"]["H"], TINY["D"]
    lengths = inference.varlen_lengths(B, longest, seed=0)
    for mode in inference.MODES:
        shape = dict(part="varlen", mode=mode, B=B, H=H, Tq=max(lengths), D=D, tokens=sum(lengths))
        for impl in ("varlen", "flash-padded", "sdpa-math"):
            (r,) = ok(rows, impl=impl, **shape)
            assert float(r["useful_frac"]) == pytest.approx(sum(lengths) / (B * max(lengths)), rel=1e-4)
            work = sum(flops(1, H, L, L, D, True, mode) for L in lengths)  # the valid tokens' FLOPs only
            assert float(r["tflops"]) == pytest.approx(work / float(r["ms_p50"]) * 1e-9, rel=1e-4)
        assert float(ok(rows, impl="varlen", **shape)[0]["vs_best_sdpa"]) > 0


def test_window_rows_cover_every_length_windowed_and_full(tiny_run):
    _, rows, _, _ = tiny_run
    p = TINY["window"]
    for T in p["lengths"]:
        for mode in inference.MODES:
            shape = dict(part="window", mode=mode, B=p["B"], H=p["H"], Tq=T, Tk=T)
            for left in p["lefts"]:
                (r,) = ok(rows, impl="flash", window_left=left, **shape)
                assert float(r["gbps"]) == pytest.approx(
                    min_bytes(p["B"], p["H"], T, T, TINY["D"], 2, mode) / float(r["ms_p50"]) * 1e-6, rel=1e-4)
            ok(rows, impl="flash", window_left="", **shape)  # full causal
            ok(rows, impl="sdpa-math", **shape)


@pytest.mark.parametrize("T, left", [(1, 0), (7, 0), (16, 15), (16, 16), (40, 15), (100, 3), (64, None)])
def test_window_pairs_counts_the_visible_pairs(T, left):
    if left is None:  # no window: the standard T^2 / 2 of the FLOP count, as in the sweep
        assert inference.window_pairs(T, None) == T * T / 2
    else:
        assert inference.window_pairs(T, left) == window_mask(T, T, left, 0).sum().item()


def test_a_failing_kernel_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("illegal memory access")
    monkeypatch.setattr(inference.kernels, "decode_attention", broken)
    one_shape = dict(TINY["decode"], lengths=[32], heads=[(4, 1)])
    monkeypatch.setitem(inference.PRESETS, "tiny", dict(TINY, decode=one_shape))
    with pytest.raises(SystemExit) as done:
        inference.main(["--part", "decode", "--preset", "tiny", "--out", str(tmp_path), "--no-plots"])
    assert done.value.code == 1
    rows = list(csv.DictReader(open(tmp_path / "inference.csv")))
    assert {r["status"] for r in rows if r["impl"] == "decode"} == {"error: RuntimeError: illegal memory access"}
    assert [r["status"] for r in rows if r["impl"] == "sdpa-math"] == ["ok"]


def test_progress_goes_to_stderr_a_line_per_shape(tmp_path, monkeypatch, capsys):
    two_shapes = dict(TINY["decode"], lengths=[32], heads=[(4, 1), (4, 4)])
    monkeypatch.setitem(inference.PRESETS, "tiny", dict(TINY, decode=two_shapes))
    with pytest.raises(SystemExit):
        inference.main(["--part", "decode", "--preset", "tiny", "--out", str(tmp_path), "--no-plots"])
    printed = capsys.readouterr()
    lines = printed.err.splitlines()
    assert len(lines) == 2 and lines[0].startswith("  decode fwd B=2 H=4 Hkv=1 Tq=1 Tk=32: "), lines
    assert lines[1].startswith("  decode fwd B=2 H=4 Hkv=4 Tq=1 Tk=32: ") and lines[1].endswith(" s"), lines
    assert printed.err not in printed.out and (tmp_path / "log.txt").read_text() == printed.out  # the log as it was


@pytest.mark.skipif(torch.cuda.is_available(), reason="the gpu preset runs on a GPU")
def test_the_gpu_preset_is_refused_on_the_cpu(tmp_path):
    with pytest.raises(SystemExit, match="the gpu preset needs a GPU"):
        inference.main(["--preset", "gpu", "--out", str(tmp_path)])
