"""The README's main command runs end to end (on small shapes here)."""

from attention_kernels.benchmarks import demo


def test_demo_prints_every_kernel_shape_and_dtype(monkeypatch, capsys):
    monkeypatch.setattr(demo, "SHAPES", [(4, 4, 8, 4), (1, 1, 255, 128)])
    demo.main([])
    lines = capsys.readouterr().out.splitlines()
    fused = [line for line in lines if line.startswith("fused ")]
    flash = [line for line in lines if line.startswith("flash ")]
    assert len(fused) == len(flash) == 6
    assert "refused: with head dim 128 and float32 it takes at most 128 keys" in fused[3]
    for row in fused[:3] + fused[4:] + flash:
        out_err, ref_err = (float(x) for x in row.split()[-5:-3])
        assert out_err <= 2 * ref_err + 0.02
