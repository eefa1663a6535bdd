"""The interpreter is lenient (it never lowers to the GPU): make sure, without a GPU, that every
kernel also compiles for an H100 within its shared memory, through Triton's own ptxas."""

import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests compile for real")


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence Triton 3.9's notice
    # one configuration per kernel (the first autotuning candidate for flash, also packed), 16- and 32-bit
    cmd = [sys.executable, "-m", "benchmarks.onchip", "--dtype", "bfloat16", "float32",
           "--head-dims", "80", "--rows", "128", "--limit", "1", "--varlen", "--window"]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout}\n{run.stderr[-3000:]}"
    lines = [line for line in run.stdout.splitlines() if "KiB shared" in line]
    # fused fwd and dq; flash fwd and dq dense, packed and windowed, dk/dv dense and packed; decode
    # split and merge; two dtypes
    assert len(lines) == 2 * (2 + 2 * 3 + 2 + 2), run.stdout
