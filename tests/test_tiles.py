"""How the flash kernels choose their tiles and loads on a GPU, checked where it can be without
one: the forward through TMA descriptors (the interpreter runs them when ATTENTION_KERNELS_TMA=1),
the candidate tables, and the measured table the launchers read first."""

import json
import math
import os
import re

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


# What tuning.lookup reads: {GPU name: {shape class: entry}}, a class as tuning.shape_class writes
# it, an entry's config one of the tiles the autotuner may time for its class (the only tiles a
# GPU run can measure: `tuning.choose`), its time in ms (None: no finite timing) and the run's name.
CLASS = re.compile(r"(?P<kernel>fwd|dq|dkdv) (?P<dtype>float16|bfloat16|float32) d(?P<d>\d+) q(?P<q>\d+) "
                   r"k(?P<k>\d+) (?:causal|full|window(?P<span>\d+)) g(?P<g>\d+) (?:dense|varlen)(?P<tma> tma)?")
ITEMSIZE = {"float16": 2, "bfloat16": 2, "float32": 4}


def problems(table):
    """What is wrong with a measured table, one line each: [] for a well-formed one."""
    if not isinstance(table, dict):
        return [f"the table is a {type(table).__name__}, not {{GPU name: {{shape class: entry}}}}"]
    found = []
    for gpu, entries in table.items():
        if not (isinstance(gpu, str) and gpu.strip()) or not isinstance(entries, dict):
            found.append(f"{gpu!r}: not a GPU name with a {{shape class: entry}} dict")
            continue
        for cls, entry in entries.items():
            where = f"{gpu} / {cls}"
            m = CLASS.fullmatch(cls)
            if m is None:
                found.append(f"{where}: not a shape class as tuning.shape_class writes one")
                continue
            d, q, k = int(m["d"]), int(m["q"]), int(m["k"])
            if d not in (16, 32, 64, 128, 256) or tuning.t_bucket(q) != q or tuning.t_bucket(k) != k:
                found.append(f"{where}: head dim or lengths not rounded as the kernels round them")
                continue
            if (m["span"] and int(m["span"]) != tuning.window_key(int(m["span"]) - 1, 0, 1 << 30)) or int(m["g"]) < 1:
                found.append(f"{where}: window span or group not as the kernels key them")
            if m["tma"] and m["kernel"] != "fwd":
                found.append(f"{where}: only the forward loads through TMA")
            if not isinstance(entry, dict):
                found.append(f"{where}: the entry is not a dict")
                continue
            config = entry.get("config")
            allowed = tuning.candidates(m["kernel"], ITEMSIZE[m["dtype"]], d, q, k)
            if not (isinstance(config, list) and tuple(config) in allowed):
                found.append(f"{where}: config {config!r} is not one of the class's candidates {allowed}")
            ms = entry.get("ms")
            if ms is not None and not (isinstance(ms, (int, float)) and math.isfinite(ms) and ms > 0):
                found.append(f"{where}: ms {ms!r} is not a positive time")
            if not isinstance(entry.get("run"), str):
                found.append(f"{where}: no run name")
    return found


def good_table():
    """Entries as a GPU run writes them, for classes tuning.shape_class names, of several kinds."""
    classes = [("fwd", launch_args()), ("fwd", launch_args(right=16000, TMA=False)),
               ("dq", launch_args(left=5, BLOCK_D=64, q_bucket=16, k_bucket=32, Tq=9, Tk=30, TMA=None)),
               ("dkdv", launch_args(Q=torch.empty(0, dtype=torch.float32), GROUP=4, VARLEN=True, TMA=None))]
    entries = {}
    for kernel, args in classes:
        tiles = tuning.candidates(kernel, args["Q"].element_size(), args["BLOCK_D"], args["q_bucket"], args["k_bucket"])
        entries[tuning.shape_class(kernel, args)] = dict(config=list(tiles[-1]), ms=0.25, run="h100-test", timings={})
    return {"NVIDIA H100 80GB HBM3": entries, "NVIDIA GH200 480GB": dict(list(entries.items())[:1])}


def test_the_table_check_takes_what_a_gpu_run_writes(tmp_path):
    table = good_table()
    assert problems(table) == [] and problems({}) == []
    run, into = tmp_path / "run.json", tmp_path / "tuned.json"
    run.write_text(json.dumps(table))
    assert tuning.merge(str(run), into=str(into)) == 5
    assert problems(json.loads(into.read_text())) == []
    tuning.measured.cache_clear()


FWD = "fwd bfloat16 d128 q8192 k8192 causal g1 dense tma"


@pytest.mark.parametrize("table, words", [
    ([], "not {GPU name"),
    ({"": {}}, "not a GPU name"),
    ({"NVIDIA H200": [[128, 64, 8, 3]]}, "not a GPU name"),
    ({"NVIDIA H200": {"fwd bf16 d128 q8192 k8192 causal g1 dense": {}}}, "not a shape class"),
    ({"NVIDIA H200": {"bwd bfloat16 d128 q8192 k8192 causal g1 dense": {}}}, "not a shape class"),
    ({"NVIDIA H200": {FWD.replace("q8192", "q8000"): {}}}, "not rounded"),
    ({"NVIDIA H200": {FWD.replace("d128", "d80"): {}}}, "not rounded"),
    ({"NVIDIA H200": {FWD.replace("causal", "window100"): dict(config=[128, 64, 8, 3], run="r")}}, "window span"),
    ({"NVIDIA H200": {"dq bfloat16 d128 q8192 k8192 causal g1 dense tma": dict(config=[128, 64, 8, 2], run="r")}},
     "only the forward"),
    ({"NVIDIA H200": {FWD: [128, 64, 8, 3]}}, "not a dict"),
    ({"NVIDIA H200": {FWD: dict(ms=1.0, run="r")}}, "config None"),
    ({"NVIDIA H200": {FWD: dict(config=[128, 64, 8], ms=1.0, run="r")}}, "not one of the class's candidates"),
    ({"NVIDIA H200": {FWD: dict(config=[16, 32, 4, 2], ms=1.0, run="r")}}, "not one of the class's candidates"),
    ({"NVIDIA H200": {FWD: dict(config=[64, 64, 4, 3], ms=1.0, run="r")}}, "not one of the class's candidates"),
    ({"NVIDIA H200": {FWD: dict(config=[128, 64, 8, 3], ms=-1.0, run="r")}}, "not a positive time"),
    ({"NVIDIA H200": {FWD: dict(config=[128, 64, 8, 3], ms="1.5", run="r")}}, "not a positive time"),
    ({"NVIDIA H200": {FWD: dict(config=[128, 64, 8, 3], ms=1.5)}}, "no run name"),
], ids=lambda x: "" if isinstance(x, (dict, list)) else x.replace(" ", "-"))
def test_the_table_check_refuses_a_bad_entry(table, words):
    # [16, 32, 4, 2] is a candidate of the class's kernel and dtype but too small for 8192 x 8192
    # (tuning.candidates leaves it out there); [64, 64, 4, 3] is fwd's for d64, not for d128
    found = problems(table)
    assert len(found) == 1 and words in found[0], found
    good = good_table()
    assert problems({**good, **table} if isinstance(table, dict) else table) == found  # among good entries too
    assert not set(good) & set(table)


def test_the_committed_table_is_well_formed():
    """kernels/tuned.json as `tuning merge` writes it (sorted, indented, never edited by hand),
    every entry well-formed; empty ({}) until a GPU run's measurements are merged."""
    path = os.path.join(os.path.dirname(tuning.__file__), "tuned.json")
    with open(path) as f:
        text = f.read()
    table = json.loads(text)
    assert problems(table) == []
    written = json.dumps({gpu: dict(sorted(e.items())) for gpu, e in sorted(table.items())}, indent=1) + "\n"
    assert text == written, f"{path} is not as `python -m attention_kernels.kernels.tuning merge` writes it"
