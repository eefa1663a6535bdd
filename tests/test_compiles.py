"""What the GPU will run, checked without one: every kernel compiled for sm_90 (H100, H200) the
way Triton's JIT compiles a real launch (`python -m attention_kernels.benchmarks.onchip`), through Triton's own
ptxas. The interpreter is lenient (it never lowers to the GPU); these tests are not. A change
that drops a flash kernel off wgmma, makes it spill registers, stops its loads from being
pipelined, or needs more shared memory than a block has, fails here."""

import json
import os
import subprocess
import sys

import pytest
import torch
import triton

GPU_TRITON = "3.6."  # the version Hopper machines run with torch 2.11
ON_GPU_TRITON = triton.__version__.startswith(GPU_TRITON)

pytestmark = [
    pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the GPU tests compile for real"),
    pytest.mark.skipif(sys.platform != "linux", reason="Triton's CUDA backend ships for Linux"),
    # What the GPU runs is what its Triton builds: CI compiles under that version (`-m kernels` with
    # Triton 3.6 first on PYTHONPATH, the README's test command), and compiling is minutes of CPU.
    pytest.mark.skipif(not ON_GPU_TRITON, reason=f"compiled under the GPU machine's Triton {GPU_TRITON} only"),
]

ONCHIP_LIMIT = 227 * 1024


def onchip(*args):
    """Run `python -m attention_kernels.benchmarks.onchip --json` with these arguments; its binaries as dicts."""
    pytest.importorskip("triton.backends.nvidia", reason="Triton's CUDA backend is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"  # the default; set to silence Triton 3.9's notice
    cmd = [sys.executable, "-m", "attention_kernels.benchmarks.onchip", "--json", "--jobs", "2", *args]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, f"{' '.join(cmd)} failed:\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}"
    binaries = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
    errors = [b for b in binaries if "error" in b]
    assert not errors, f"these did not compile: {errors}"
    return binaries


def tile(b):
    m, n = b["tile"].split()[0].split("x")
    return int(m), int(n)


def show(bad):
    return "\n".join(f"  {b['kernel']} {b['dtype']} D={b['D']} {b['tile']} {b['variant']}: {b['registers']} regs, "
                     f"{b['spilled']} B spilled, {b['mma']}, loops pipelined {b['loops']}" for b in bad)



@pytest.fixture(scope="module")
def hopper_binaries():
    """The flash kernels' autotuning candidates for a causal (2, 16, 4096, D) call, bf16, D 64
    and 128: what a GPU's autotuner would time for a long sequence; the forward also with TMA.
    (fp16 shares bf16's tables and compiles to the same instructions: `python -m attention_kernels.benchmarks.onchip
    --dtype float16` shows it.)"""
    every = ["--dtype", "bfloat16"]
    binaries = onchip("--kernel", "flash-fwd", "flash-dq", "flash-dkdv", *every, "--head-dims", "64", "128",
                      "--seq", "4096")
    return binaries + onchip("--kernel", "flash-fwd", "--dtype", "bfloat16", "--head-dims", "64", "128", "--seq",
                             "4096", "--tma")


def test_long_sequences_run_every_flash_candidate_on_wgmma_pipelined(hopper_binaries):
    bad = [b for b in hopper_binaries if b["mma"] != "HGMMA" or not b["pipelined"]]
    assert not bad, "candidates for long sequences that are not on HGMMA or not pipelined:\n" + show(bad)


def test_no_candidate_spills_on_the_gpu_machines_triton(hopper_binaries):
    # Register allocation differs between Triton versions (3.9 spills 160 B in dk/dv 64 x 128 at
    # D = 128, where 3.6 needs 246 registers and spills none); the candidates are chosen from the
    # binaries the GPU machine's Triton builds.
    bad = [b for b in hopper_binaries if b["spilled"]]
    assert not bad, f"candidates that spill registers under Triton {triton.__version__}:\n" + show(bad)


def test_tiles_are_hopper_sized(hopper_binaries):
    # forward and dq: a 128-row tile among the candidates, dk/dv: 128 keys resident, and that
    # large tile spilling nothing; every tile at least 64 x 64 in area
    for dtype in ("bfloat16",):
        for D in (64, 128):
            mine = [b for b in hopper_binaries if (b["dtype"], b["D"]) == (dtype, D) and not b["variant"]]
            for kernel, resident in (("flash-fwd", 0), ("flash-dq", 0), ("flash-dkdv", 1)):
                tiles = [tile(b) for b in mine if b["kernel"] == kernel]
                assert tiles and all(m * n >= 64 * 64 and min(m, n) >= 32 for m, n in tiles), (kernel, dtype, D, tiles)
                clean_large = [b for b in mine if b["kernel"] == kernel and tile(b)[resident] == 128 and not b["spilled"]]
                assert clean_large, f"{kernel} {dtype} D={D}: no 128-wide tile without spills:\n" + show(
                    [b for b in mine if b["kernel"] == kernel])


def test_the_forward_loads_through_tma_when_asked(hopper_binaries):
    tma = [b for b in hopper_binaries if b["variant"] == "tma"]
    assert tma and all("UTMALDG" in b["loads"] and "LDGSTS" not in b["loads"] for b in tma), show(tma)
    plain = [b for b in hopper_binaries if b["kernel"] == "flash-fwd" and not b["variant"]]
    assert all("LDGSTS" in b["loads"] for b in plain), show(plain)  # cp.async: the pipelined pointer loads


@pytest.mark.parametrize("variant", ["--mods", "--dropout"])
def test_what_models_add_stays_on_wgmma_and_costs_the_plain_kernels_nothing(hopper_binaries, variant):
    # A soft-cap, sinks and ALiBi together, or attention dropout (bf16, D = 128): every kernel on
    # HGMMA and pipelined, each with a 128-wide tile that spills nothing; and the plain kernels'
    # steady state is shorter than the modified one's, so the modifications are compiled out of
    # them (constexprs)
    mods = onchip("--kernel", "flash-fwd", "flash-dq", "flash-dkdv", "--dtype", "bfloat16", "--head-dims", "128",
                  "--seq", "4096", variant)
    bad = [b for b in mods if b["mma"] != "HGMMA" or not b["pipelined"]]
    assert not bad, "modified kernels off HGMMA or not pipelined:\n" + show(bad)
    for kernel, resident in (("flash-fwd", 0), ("flash-dq", 0), ("flash-dkdv", 1)):
        mine = [b for b in mods if b["kernel"] == kernel]
        assert any(tile(b)[resident] == 128 and not b["spilled"] for b in mine), show(mine)
        plain = {b["tile"]: b for b in hopper_binaries
                 if (b["kernel"], b["dtype"], b["D"], b["variant"]) == (kernel, "bfloat16", 128, "")}
        for b in mine:
            assert plain[b["tile"]]["main_loop"] < b["main_loop"], (kernel, b["tile"])


@pytest.mark.parametrize("variant", [[], ["--varlen"], ["--window", "100"], ["--gqa", "4", "--full"]],
                         ids=["dense", "varlen", "window", "gqa-full"])
def test_every_kernel_fits_on_chip(variant):
    # every kernel (flash, and for dense calls fused and decode too), an odd head dim, 16-bit and
    # (dense) 32-bit: it compiles, and within the shared memory a block may have
    dtypes = ["bfloat16"] + (["float32"] if not variant else [])
    binaries = onchip("--dtype", *dtypes, "--head-dims", "80", "--seq", "300", "--limit", "1", *variant)
    kernels = {b["kernel"] for b in binaries}
    dense = variant in ([], ["--gqa", "4", "--full"])
    expected = {"flash-fwd", "flash-dq", "flash-dkdv", "flash-delta"} | (
        {"fused-fwd", "fused-dq", "decode-split", "decode-merge"} if dense else set()) | (
        {"paged-split", "paged-split-tiles", "paged-append", "decode-merge"} if variant == ["--varlen"] else set())
    assert kernels == expected, kernels
    over = [b for b in binaries if b["shared"] > ONCHIP_LIMIT]
    assert not over, f"over the shared-memory limit: {over}"
