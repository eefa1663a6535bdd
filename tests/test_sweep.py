"""The benchmark sweep and the profiler run end to end on tiny shapes (under the interpreter
without a GPU): CSV, table, plots, memory growth, refusals."""

import argparse
import csv
import json

import pytest

from attention_kernels.benchmarks import plots, profile, sweep
from attention_kernels.benchmarks.measure import flops, min_bytes


def run(tmp_path, *argv):
    with pytest.raises(SystemExit) as done:
        sweep.main(["--out", str(tmp_path), *argv])
    rows = list(csv.DictReader(open(tmp_path / "sweep.csv")))
    return done.value.code, rows


def test_seed_preset_writes_csv_table_and_plots(tmp_path, capsys):
    code, rows = run(tmp_path, "--preset", "seed", "--causal", "yes", "--mode", "fwd+bwd")
    assert code == 0
    assert list(rows[0]) == sweep.CSV_FIELDS
    by_impl = {r["impl"]: r for r in rows}
    assert set(by_impl) == set(sweep.IMPLS)
    for impl in ("reference", "fused", "flash", "sdpa-math"):
        r = by_impl[impl]
        assert r["status"] == "ok", r
        assert (r["B"], r["T"], r["C"], r["H"], r["D"]) == ("4", "8", "16", "4", "4")
        assert float(r["ms_p20"]) <= float(r["ms_p50"]) <= float(r["ms_p80"])
        ms = float(r["ms_p50"])
        assert float(r["tflops"]) == pytest.approx(flops(4, 4, 8, 8, 4, True, "fwd+bwd") / ms * 1e-9, rel=1e-4)
        assert float(r["gbps"]) == pytest.approx(min_bytes(4, 4, 8, 8, 4, 2, "fwd+bwd") / ms * 1e-6, rel=1e-4)
        assert float(r["peak_mib"]) > 0 and float(r["vs_best_sdpa"]) > 0
    assert by_impl["sdpa-cudnn"]["status"].startswith("unsupported") or by_impl["sdpa-cudnn"]["status"] == "ok"
    out = capsys.readouterr().out
    assert "x SDPA" in out and "flash" in out
    if sweep.DEVICE == "cpu":
        assert "say nothing about GPU speed" in out
    for png in ("tflops.png", "time.png", "memory.png"):
        image = pytest.importorskip("matplotlib.image").imread(tmp_path / png)
        assert image.shape[0] > 200 and image.std() > 0.01  # drawn, not blank
    assert (tmp_path / "log.txt").read_text().count("\n") > len(rows)


def test_memory_grows_quadratically_for_the_reference_and_linearly_for_flash(tmp_path):
    code, rows = run(tmp_path, "-B", "1", "-T", "128", "256", "-C", "32", "-H", "2", "--impl", "reference", "flash",
                     "--mode", "fwd", "--causal", "yes", "--no-plots")
    assert code == 0
    peak = {(r["impl"], int(r["T"])): float(r["peak_mib"]) for r in rows}
    assert peak["reference", 256] / peak["reference", 128] > 3.5      # T^2
    assert peak["flash", 256] / peak["flash", 128] == pytest.approx(2, rel=0.05)  # T


def test_a_shape_an_impl_refuses_is_recorded_and_the_sweep_goes_on(tmp_path):
    code, rows = run(tmp_path, "-T", "2000", "-C", "64", "-H", "2", "--impl", "fused", "--mode", "fwd",
                     "--causal", "yes", "--no-plots")
    assert code == 0
    assert rows[0]["status"].startswith("unsupported: fused_attention keeps whole rows on chip")


@pytest.mark.parametrize("argv, words", [
    (["-C", "16", "-H", "3"], r"H=3 does not divide C=16.*one of \[1, 2, 4, 8, 16\]"),
    (["-C", "1024", "-H", "2"], "head dim D=512; the kernels take D up to 256"),
    (["--tokens", "64", "-B", "2"], "either -B/--batch or --tokens"),
    (["--preset", "seed", "-T", "64"], "either --preset or shape flags"),
])
def test_bad_shapes_are_refused_clearly(tmp_path, argv, words):
    with pytest.raises(SystemExit, match=words):
        sweep.main(["--out", str(tmp_path), *argv])


@pytest.mark.skipif(sweep.DEVICE == "cuda", reason="the CPU's default")
def test_the_cpu_default_shows_growth_in_T():
    no_flags = argparse.Namespace(preset=None, batch=None, seqlen=None, width=None, heads=None, tokens=None)
    assert sweep.shapes_from(no_flags) == sweep.CPU_SCALING
    assert [T for B, T, C, H in sweep.CPU_SCALING] == [16, 32, 64, 128, 256]


@pytest.mark.parametrize("argv", [["-T", "0"], ["-B", "-1"], ["--tokens", "0", "-T", "8"], ["-C", "x"]])
def test_bad_values_get_argparse_errors(tmp_path, argv, capsys):
    with pytest.raises(SystemExit) as done:
        sweep.main(["--out", str(tmp_path), *argv])
    assert done.value.code == 2
    assert "usage: " in capsys.readouterr().err


def write_csv(path, values):
    """A sweep CSV of one panel: values {impl: [(T, value), ...]} as every plotted column."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=sweep.CSV_FIELDS)
        writer.writeheader()
        for impl, points in values.items():
            for T, y in points:
                writer.writerow(dict(impl=impl, B=1, H=2, T=T, D=16, C=32, dtype="bf16", causal=True, mode="fwd",
                                     status="ok", ms_p50=y, tflops=y, peak_mib=y, device="test"))


def test_plots_keep_coinciding_lines_visible(tmp_path):
    image = pytest.importorskip("matplotlib.image")
    to_rgb = pytest.importorskip("matplotlib.colors").to_rgb
    same = [(16, 1.0), (32, 2.0), (64, 4.0), (128, 8.0)]  # fused's and flash's memory often lie like this
    write_csv(tmp_path / "sweep.csv", {"reference": [(T, y * y) for T, y in same], "fused": same, "flash": same})
    paths = plots.plot(tmp_path / "sweep.csv", tmp_path / "new" / "folder")  # --out may not exist yet
    styles = plots.line_styles(["reference", "fused", "flash"])
    assert len({(s["marker"], str(s["linestyle"]), s["color"]) for s in styles.values()}) == 3
    assert list(styles) == ["reference", "fused", "flash"]  # drawn in this order, each marker smaller
    assert styles["reference"]["markersize"] > styles["fused"]["markersize"] > styles["flash"]["markersize"]
    for path in paths:
        pixels = image.imread(path)[..., :3]
        for impl in ("fused", "flash"):  # the one drawn first shows around the one drawn over it
            near = (abs(pixels - to_rgb(styles[impl]["color"])).max(axis=-1) < 0.1).sum()
            assert near > 300, f"{impl}'s line is hidden in {path}: {near} pixels of its colour"  # legend: ~110


def test_plots_command_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        plots.main([str(tmp_path / "missing.csv")])
    assert done.value.code == 2 and "no such file" in capsys.readouterr().err


def test_flop_count_is_the_standard_one():
    assert flops(2, 3, 5, 7, 11, False, "fwd") == 4 * 2 * 3 * 5 * 7 * 11
    assert flops(2, 3, 5, 7, 11, True, "fwd") == 2 * 2 * 3 * 5 * 7 * 11
    assert flops(2, 3, 5, 7, 11, True, "bwd") == 2.5 * flops(2, 3, 5, 7, 11, True, "fwd")
    assert flops(2, 3, 5, 7, 11, True, "fwd+bwd") == 3.5 * flops(2, 3, 5, 7, 11, True, "fwd")


def test_profile_writes_a_chrome_trace_and_a_summary(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    profile.main(["--impl", "flash", "--mode", "fwd+bwd", "-B", "1", "-T", "32", "-C", "32", "-H", "2",
                  "--warmup", "1", "--iters", "2", "--out", str(trace)])
    events = json.loads(trace.read_text())["traceEvents"]
    assert sum(e.get("name") == "flash/fwd+bwd" for e in events) == 2  # one range per iteration
    assert "flash/fwd+bwd" in capsys.readouterr().out


def test_profile_prints_the_ncu_command(capsys):
    profile.main(["--impl", "flash", "--mode", "bwd", "-T", "512", "--ncu"])
    line = capsys.readouterr().out.strip()
    assert line.startswith("ncu --nvtx --nvtx-include profiled/ -k regex:_flash_bwd_dkdv --launch-count 1")
    assert "-m attention_kernels.benchmarks.profile --impl flash --mode bwd" in line and "-T 512" in line and "--no-trace" in line


def test_a_failing_impl_is_recorded_and_fails_the_run(tmp_path, monkeypatch):
    def broken(q, k, v, causal):
        raise RuntimeError("illegal memory access")
    monkeypatch.setitem(sweep.IMPLS, "flash", broken)
    code, rows = run(tmp_path, "--preset", "seed", "--impl", "flash", "sdpa-math", "--mode", "fwd",
                     "--causal", "yes", "--no-plots")
    assert code == 1
    assert [r["status"] for r in rows] == ["error: RuntimeError: illegal memory access", "ok"]
