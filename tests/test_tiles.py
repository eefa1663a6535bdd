"""How the flash kernels choose their tiles and loads on a GPU, checked where it can be without
one: the forward through TMA descriptors (the interpreter runs them when ATTENTION_KERNELS_TMA=1),
the candidate tables, and the measured table the launchers read first."""

import json

import pytest
import torch

from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.kernels import flash, flash_attention, flash_attention_varlen, tuning
from attention_kernels.kernels.checks import INTERPRET
from attention_kernels.testing.rule import check_against_reference, make_packed, make_qkv, seed_of

# ----------------------------------------------------------------------------- TMA


@pytest.mark.skipif(not INTERPRET, reason="on a GPU, TMA follows the device (see the gpu test)")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("shape", [Shape(1, 2, 1, 97, 40, 32), Shape(1, 4, 2, 40, 97, 80)], ids=str)
def test_tma_loads_give_the_pointer_loads_answer(poison, monkeypatch, shape, dtype, causal):
    # The copy engine zero-fills rows past T and columns past D where pointer loads mask them:
    # the same numbers, held to the rule, in the (B, T, H, D) layout with D = 80 and Tq != Tk
    q, k, v, do = make_qkv(shape, dtype, "bthd", seed_of("tma", shape, dtype, causal))
    monkeypatch.setenv(flash.TMA_ENV, "1")
    assert flash.use_tma(q, k, v)
    check_against_reference(flash_attention, q, k, v, do, causal, window=(5, 0) if causal else None)
    with_tma = flash_attention(q, k, v, causal=causal)
    monkeypatch.setenv(flash.TMA_ENV, "0")
    assert not flash.use_tma(q, k, v)
    assert torch.equal(with_tma, flash_attention(q, k, v, causal=causal))


@pytest.mark.skipif(not INTERPRET, reason="under the interpreter TMA is asked for with ATTENTION_KERNELS_TMA=1")
def test_tma_on_a_packed_batch(poison, monkeypatch):
    # each sequence's descriptor starts at its first row: the next sequence's rows are out of bounds
    monkeypatch.setenv(flash.TMA_ENV, "1")
    q, k, v, do, cu_q, cu_k = make_packed((5, 0, 38), (9, 3, 38), 4, 2, 32, torch.float32, seed_of("tma varlen"))
    with_tma = flash_attention_varlen(q, k, v, cu_q, cu_k, 38, 38)
    monkeypatch.setenv(flash.TMA_ENV, "0")
    assert torch.equal(with_tma, flash_attention_varlen(q, k, v, cu_q, cu_k, 38, 38))


def test_tma_only_where_the_copy_engine_can_address_every_tile(monkeypatch):
    monkeypatch.setenv(flash.TMA_ENV, "1")
    q, k, v, _ = make_qkv(Shape(1, 2, 2, 8, 8, 16), torch.float16, seed=1)
    if DEVICE == "cpu":
        assert flash.use_tma(q, k, v)
    shifted = torch.randn(1 * 2 * 8 * 16 + 1, dtype=torch.float16, device=DEVICE)[1:].view(1, 2, 8, 16)
    assert not flash.use_tma(shifted, k, v)  # base 2 bytes past a 16-byte boundary
    odd_rows = torch.randn(1, 2, 8, 20, dtype=torch.float16, device=DEVICE)[..., :16]
    assert not flash.use_tma(odd_rows, k, v)  # rows 40 bytes apart
    monkeypatch.setenv(flash.TMA_ENV, "0")
    assert not flash.use_tma(q, k, v)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [64, 80, 128])
def test_tma_loads_give_the_pointer_loads_answer_gpu(poison, monkeypatch, D):
    q, k, v, do = make_qkv(Shape(2, 8, 2, 1000, 1537, D), torch.bfloat16, "bthd", seed_of("tma gpu", D))
    tma = flash.use_tma(q, k, v)
    assert tma == (torch.cuda.get_device_capability()[0] >= 9)
    check_against_reference(flash_attention, q, k, v, do, causal=True)
    out = flash_attention(q, k, v)
    monkeypatch.setenv(flash.TMA_ENV, "0")
    assert torch.equal(out, flash_attention(q, k, v))


# ----------------------------------------------------------------------------- candidates


@pytest.mark.parametrize("kernel", ["fwd", "dq", "dkdv"])
def test_candidates_follow_the_shape(kernel):
    for itemsize in (2, 4):
        for block_d in (16, 128, 256):
            every = tuning.CANDIDATES[kernel][(itemsize, max(64, block_d))]
            long = tuning.candidates(kernel, itemsize, block_d, 8192, 8192)
            assert long and set(long) <= set(every)
            if itemsize == 2 and block_d <= 128:  # 16-bit: only Hopper-sized tiles for long sequences
                assert all(m * n >= 64 * 64 for m, n, _, _ in long), long
            # one new token after a short cache: tiles no longer than the sequences
            short = tuning.candidates(kernel, itemsize, block_d, 16, 32)
            assert short and all(m <= 16 and n <= 32 for m, n, _, _ in short), short


def test_the_autotuner_times_a_class_candidates_or_its_measured_tile(monkeypatch):
    # The pruner the GPU's autotuner calls: the class's candidates, or the one measured tile
    args = dict(Q=torch.empty(0, dtype=torch.bfloat16), BLOCK_D=128, q_bucket=8192, k_bucket=8192)
    prune = flash._prune("dq")
    as_tuples = lambda kept: [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in kept]
    assert as_tuples(prune([], args)) == tuning.candidates("dq", 2, 128, 8192, 8192)
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "0")
    assert as_tuples(prune([], args)) == tuning.candidates("dq", 2, 128, 8192, 8192)[:1]
    monkeypatch.setattr(tuning, "lookup", lambda kernel, args: (64, 64, 4, 2))
    assert as_tuples(prune([], args)) == [(64, 64, 4, 2)]


# ----------------------------------------------------------------------------- the measured table


def launch_args(**overrides):
    args = dict(Q=torch.empty(0, dtype=torch.bfloat16), BLOCK_D=128, q_bucket=8192, k_bucket=8192, Tq=8000,
                Tk=8000, left=16000, right=0, GROUP=1, VARLEN=False, TMA=True)
    return {**args, **overrides}


def test_shape_classes_name_what_changes_the_best_tile():
    name = tuning.shape_class("fwd", launch_args())
    assert name == "fwd bfloat16 d128 q8192 k8192 causal g1 dense tma"
    assert "full" in tuning.shape_class("fwd", launch_args(right=16000))
    assert "window" in tuning.shape_class("fwd", launch_args(left=100))
    assert tuning.shape_class("dkdv", launch_args(GROUP=4, VARLEN=True, TMA=None)).endswith("g4 varlen")


def test_a_gpu_run_merges_into_the_table_and_the_launchers_read_it(tmp_path, monkeypatch):
    table = tmp_path / "tuned.json"
    monkeypatch.setattr(tuning, "TUNED_FILE", str(table))
    tuning.measured.cache_clear()
    run = tmp_path / "run.json"
    cls = tuning.shape_class("fwd", launch_args())
    run.write_text(json.dumps({"NVIDIA H200": {cls: {"config": [128, 64, 8, 3], "ms": 1.5, "run": "h200-test"}}}))
    assert tuning.merge(str(run), into=str(table)) == 1
    assert json.loads(table.read_text())["NVIDIA H200"][cls]["config"] == [128, 64, 8, 3]

    class FakeCuda(torch.Tensor):  # what lookup reads of a GPU tensor: is_cuda, device, dtype
        is_cuda = True
    q = torch.empty(0, dtype=torch.bfloat16).as_subclass(FakeCuda)
    monkeypatch.setattr(tuning, "device_name", lambda index: "NVIDIA H200")
    assert tuning.lookup("fwd", launch_args(Q=q)) == (128, 64, 8, 3)
    assert tuning.lookup("fwd", launch_args(Q=q, TMA=False)) is None   # another class
    monkeypatch.setattr(tuning, "device_name", lambda index: "NVIDIA A100")
    assert tuning.lookup("fwd", launch_args(Q=q)) is None              # another GPU
    monkeypatch.setattr(tuning, "device_name", lambda index: "NVIDIA H200")
    monkeypatch.setenv(tuning.AUTOTUNE_ENV, "1")
    assert tuning.lookup("fwd", launch_args(Q=q)) is None              # asked to time the candidates
    tuning.measured.cache_clear()


def test_merge_refuses_an_entry_without_a_tile(tmp_path):
    run = tmp_path / "run.json"
    run.write_text(json.dumps({"NVIDIA H200": {"fwd x": {"ms": 1.0}}}))
    with pytest.raises(ValueError, match="config"):
        tuning.merge(str(run), into=str(tmp_path / "tuned.json"))


def test_the_committed_table_is_well_formed():
    for gpu, entries in tuning.measured().items():
        for cls, entry in entries.items():
            kernel, dtype = cls.split()[:2]
            m, n, w, s = entry["config"]
            assert kernel in tuning.CANDIDATES and dtype in ("float16", "bfloat16", "float32"), cls
            assert m in (16, 32, 64, 128) and n in (16, 32, 64, 128) and w in (4, 8) and s in (1, 2, 3, 4), cls
