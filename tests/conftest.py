"""Make a bare `pytest` work anywhere: without a CUDA GPU the kernels run under Triton's
interpreter (which must be on before `attention_kernels.kernels` is imported), and `gpu` tests are skipped."""

import os

import pytest
import torch

from interpret import patch_lang_once_per_launch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


patch_lang_once_per_launch()


if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)  # `pytest -n 2` on 2 cores: one thread per worker, not two fighting per core

# The tests of the kernels themselves (`pytest -m kernels`): what CI runs a second time under
# Triton 3.6, the GPU machine's version, beside the newest Triton that runs the whole suite. The
# second run takes their bf16 cases and those without a dtype: what differs between Triton versions
# (the interpreter, the compiler) shows there, and the whole suite's 15 minutes on 2 cores hold it.
KERNEL_TESTS = {"test_kernels.py", "test_flash.py", "test_fused.py", "test_varlen.py", "test_window.py",
                "test_decode.py", "test_paged.py", "test_tiles.py", "test_compiles.py", "test_gpu_check.py",
                "test_variants.py", "test_dropout.py", "test_masks.py", "test_mods.py", "test_value_dims.py",
                "test_mla.py", "test_cascade.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in KERNEL_TESTS and not any(d in item.name.replace("bfloat16", "") for d in ("float16",
                                                                                                      "float32")):
            item.add_marker(pytest.mark.kernels)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def poison():
    """Every float tensor that torch.empty / torch.empty_like hand out is full of NaN, so an output
    element a kernel forgets to write fails the comparison instead of passing by luck."""
    from attention_kernels.testing import poisoned  # after the interpreter is on: it imports the kernels
    with poisoned():
        yield
