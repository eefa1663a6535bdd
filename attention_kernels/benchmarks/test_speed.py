"""
Timings to compare two commits with pytest-benchmark; separate from the correctness tests
(`tests/`) and not run by CI:

    python -m pytest attention_kernels/benchmarks/test_speed.py --benchmark-autosave      # on the first commit
    python -m pytest attention_kernels/benchmarks/test_speed.py --benchmark-compare       # on the second: against the last save

Each implementation at a few fixed shapes, fwd and fwd+bwd, bf16, causal. On a GPU every timed
call ends with torch.cuda.synchronize(), so it times the kernels and not only their launch; the
first call (autotuning, compilation) is not timed. Without a GPU it runs under Triton's
interpreter at one tiny shape: a check that the suite works, not a speed measurement.
"""

import pytest
import torch

from .impls import DEVICE, make_call, refusal  # first: sets up the interpreter on a CPU

if DEVICE == "cuda":
    SHAPES = [(4, 16, 1024, 64), (4, 16, 4096, 128), (1, 16, 8192, 128)]  # (B, H, T, D)
    IMPLS = ["reference", "fused", "flash", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient"]
else:
    SHAPES = [(1, 2, 64, 32)]
    IMPLS = ["reference", "fused", "flash", "sdpa-math"]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-H{}-T{}-D{}".format(*s))
@pytest.mark.parametrize("impl", IMPLS)
def test_speed(benchmark, impl, shape, mode):
    B, H, T, D = shape
    benchmark.group = f"{mode} B={B} H={H} T={T} D={D}"
    try:
        call = make_call(impl, B, H, T, D, torch.bfloat16, True, mode, seed=0)
        call()  # untimed: compiles, autotunes, and tells whether the impl takes this shape
    except Exception as e:
        if refusal(e) or (DEVICE == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError)):
            pytest.skip(f"{impl} does not run this shape: {str(e).splitlines()[0]}")
        raise

    def timed():
        call()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark(timed)
