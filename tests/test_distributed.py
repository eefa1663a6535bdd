"""Ring attention across processes (`kernels.distributed`): gloo between processes this test
spawns, on the loopback interface, the kernels under Triton's interpreter.

Every rank's output, log-sum-exp and gradients, put back in sequence order, are held to the rule
against the reference on the whole sequence (float64 truth, the low-precision yardstick) and
against single-process `flash_attention` on it. Processes are few and started once per world
size (each group runs all its cases), and bounded in time twice: the process group's timeout on
every collective, and a deadline on the whole group, after which it is killed. The plan (which
piece of which step each rank computes, with which kernel window) is checked exhaustively here,
without processes, against the masks it must reproduce.
"""

import datetime
import random
import time

import pytest
import torch
import torch.distributed as dist

from attention_kernels import reference
from attention_kernels.kernels import flash_attention
from attention_kernels.kernels.distributed import (Ring, _pieces, gather_sequence, ring_attention, shard_positions,
                                                   shard_segments, shard_sequence)
from benchmarks.ring import Spawned, train_ring, train_single
from cases import FACTOR, FLOOR, GRAD_FACTOR, RING_CASES
from rule import assert_close, seed_of

PG_TIMEOUT_S = 60   # what one collective may wait: the backstop, far above any step here
DEADLINE_S = 300    # a spawn group's whole run, under `pytest -n 2` on 2 loaded cores (~25 s alone)


# ----------------------------------------------------------------------------- the plan, no processes


def _visible(P, K, causal, window):
    """The spec's mask between global query positions P and key positions K (Tq = Tk)."""
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    d = K[None, :] - P[:, None]                                            # (len(P), len(K))
    ok = torch.ones_like(d, dtype=torch.bool)
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return ok


def _positions(segments):
    return torch.cat([torch.arange(a, z) for a, z in segments])


PLAN_CASES = [(T, W, layout, causal, window) for T, W in ((1, 1), (7, 2), (8, 2), (23, 2), (9, 4), (37, 4), (64, 4),
                                                          (50, 3), (16, 8))
              for layout in ("zigzag", "contiguous")
              for causal, window in ((True, None), (False, None), (True, (0, 0)), (True, (5, 0)), (False, (3, 5)),
                                     (False, (-1, 2)), (False, (11, -1)))]


@pytest.mark.parametrize("T, W, layout, causal, window", PLAN_CASES, ids=str)
def test_the_plan_computes_every_visible_pair_once(T, W, layout, causal, window):
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    segments = [shard_segments(T, W, r, layout) for r in range(W)]
    assert sorted(p for segs in segments for a, z in segs for p in range(a, z)) == list(range(T))
    last_needed = 0
    for r in range(W):
        P = _positions(segments[r])
        for s in range(W):
            K = _positions(segments[(r - s) % W])
            want = _visible(P, K, causal, window)                          # (T_r, T_src)
            got = torch.zeros_like(want, dtype=torch.int)
            for q0, q1, k0, k1, kl, kr in _pieces(segments[r], segments[(r - s) % W], left, right):
                assert 0 <= q0 < q1 <= len(P) and 0 <= k0 < k1 <= len(K) and kl >= -1 and kr >= -1
                got[q0:q1, k0:k1] += reference.window_mask(q1 - q0, k1 - k0, kl, kr).int()  # the kernel's mask
            assert got.max() <= 1, f"rank {r} step {s}: a pair computed twice"
            assert torch.equal(got.bool(), want), f"rank {r} step {s}: {(got.bool() != want).sum()} pairs differ"
            if want.any():
                last_needed = max(last_needed, s)
    assert Ring(None, 0, W, T, layout, left, right).steps == last_needed + 1  # no step nobody needs


@pytest.mark.parametrize("W", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(W):
    # Causal pairs per rank: equal in zigzag when 2W divides T; contiguous gives the last rank
    # about 2W - 1 times the first's
    T = 2 * W * 5
    work = {layout: [int(_visible(_positions(shard_segments(T, W, r, layout)), torch.arange(T), True, None).sum())
                     for r in range(W)] for layout in ("zigzag", "contiguous")}
    assert len(set(work["zigzag"])) == 1, work
    assert work["contiguous"][-1] / work["contiguous"][0] == pytest.approx(2 * W - 1, rel=0.2), work


# ----------------------------------------------------------------------------- on the ranks


def _inputs(shape, dtype, seed):
    """The whole sequence's q, k, v, the upstream gradients of the output and the log-sum-exp."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(shape.B, shape.Hq, shape.Tq, shape.D, generator=g, dtype=dtype)
    k, v = (torch.randn(shape.B, shape.Hkv, shape.Tk, shape.D, generator=g, dtype=dtype) for _ in range(2))
    do = torch.randn(q.shape, generator=g, dtype=dtype)
    dlse = torch.randn(q.shape[:3], generator=g)
    return q, k, v, do, dlse


def _ring_run(q, k, v, do, dlse, causal, window, layout):
    """This rank's (out, lse, dq, dk, dv) of the whole-sequence inputs, through ring_attention."""
    shard = lambda x: shard_sequence(x, layout=layout, dim=2)
    q, k, v = (shard(x).requires_grad_() for x in (q, k, v))
    out, lse = ring_attention(q, k, v, causal=causal, window=window, layout=layout, return_lse=True)
    torch.autograd.backward([out, lse], [shard(do), shard(dlse[..., None])[..., 0]])
    return [x.detach() for x in (out, lse, q.grad, k.grad, v.grad)]


def _errors(rank, world):
    """What each rank raises for a bad input on one rank, or a mismatch between ranks: {case: message}."""
    x = torch.randn(1, 2, 5, 16)
    bad = {  # case: this rank's (q, k, v, keyword arguments); only some ranks differ
        "head dim": (x, x[..., :8] if rank == 1 else x, x[..., :8] if rank == 1 else x, {}),
        "causal": (x, x, x, dict(causal=rank != 0)),
        "dtype": (x.bfloat16() if rank == 0 else x, x.bfloat16() if rank == 0 else x,
                  x.bfloat16() if rank == 0 else x, {}),
        "rows": (x[:, :, :2] if rank == 1 else x, x[:, :, :2] if rank == 1 else x, x[:, :, :2] if rank == 1 else x, {}),
        "layout": (x, x, x, dict(layout="zigzag" if rank == 0 else "contiguous")),
    }
    said = {}
    for case, (q, k, v, kwargs) in bad.items():
        try:
            ring_attention(q, k, v, **kwargs)
            said[case] = "nothing raised"
        except (ValueError, TypeError) as e:
            said[case] = f"{type(e).__name__}: {e}"
    return said


def _abandoned(rank, world):
    """Rank 0 calls ring_attention on a group whose other ranks never do: it must fail within the
    group's timeout, not wait forever. Returns rank 0's (error, seconds)."""
    group = dist.new_group(timeout=datetime.timedelta(seconds=3))
    result = None
    if rank == 0:
        start = time.monotonic()
        try:
            x = torch.randn(1, 1, 4, 16)
            ring_attention(x, x, x, group=group)
            result = ("nothing raised", time.monotonic() - start)
        except Exception as e:  # gloo's timeout is a RuntimeError (DistBackendError)
            result = (f"{type(e).__name__}: {str(e)[:200]}", time.monotonic() - start)
    dist.barrier()  # the others stay alive meanwhile, so that it is the timeout that ends the wait
    return result


def _on_ranks(rank, world, cases, extras):
    results = {"cases": [_ring_run(*inputs, causal, window, layout) for inputs, causal, window, layout in cases]}
    if "deterministic" in extras:  # the first case again: the same bits
        again = _ring_run(*cases[0][0], *cases[0][1:])
        results["deterministic"] = all(torch.equal(a, b) for a, b in zip(again, results["cases"][0]))
    if "helpers" in extras:
        whole = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(7))  # (B, T, C)
        mine = shard_sequence(whole)
        results["helpers"] = (torch.equal(gather_sequence(mine), whole),
                              torch.equal(shard_positions(11), shard_sequence(torch.arange(11)[None])[0]),
                              torch.equal(gather_sequence(shard_sequence(whole, layout="contiguous"), layout="contiguous"),
                                          whole))
    if "errors" in extras:
        results["errors"] = _errors(rank, world)
    if "abandoned" in extras:
        results["abandoned"] = _abandoned(rank, world)
    return results


def _spec(q, k, v, do, dlse, causal, window):
    """(truth, low) for out, lse, dq, dk, dv: the reference in float64, and in the inputs' precision
    (upcast=False, the yardstick), as `rule.hold_to_rule` makes them."""
    w = {} if window is None else {"window": window}
    results = []
    for dt, upcast in ((torch.float64, True), (q.dtype, False)):
        leaves = [x.detach().to(dt).clone().requires_grad_() for x in (q, k, v)]
        out = reference.attention(*leaves, causal, None, upcast, **w)
        if not upcast and not torch.isfinite(out).all():
            out = reference.attention(*leaves, causal, None, True, **w)
        lse = reference.logsumexp(*leaves[:2], causal, None, **w)
        torch.autograd.backward([out, lse], [do.to(dt), dlse.to(lse.dtype)])
        results.append([out, lse, *(x.grad for x in leaves)])
    return results


def _flash(q, k, v, do, dlse, causal, window):
    leaves = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    out, lse = flash_attention(*leaves, causal=causal, window=window, return_lse=True)
    torch.autograd.backward([out, lse], [do, dlse])
    return [out, lse, *(x.grad for x in leaves)]


def _whole(parts, layout):
    """Each rank's rows, (B, H, T_r, ...) in its order, back into one (B, H, T, ...) tensor."""
    T, world = sum(p.shape[2] for p in parts), len(parts)
    out = torch.empty(*parts[0].shape[:2], T, *parts[0].shape[3:], dtype=parts[0].dtype)
    for r, part in enumerate(parts):
        rows = _positions(shard_segments(T, world, r, layout))
        out[:, :, rows] = part
    return out


def _hold(name, got, truth, low, factor, floor, layout, world):
    try:
        assert_close(name, got, truth, low, factor, floor)
    except AssertionError as e:  # say which rank's rows are wrong, as ring-flash-attention's tests do
        T = got.shape[2]
        per_rank = []
        for r in range(world):
            rows = _positions(shard_segments(T, world, r, layout))
            err = (got[:, :, rows].double() - truth[:, :, rows].double()).abs().nan_to_num(float("inf"))
            per_rank.append(f"rank {r}: max {err.max().item():.3g}, mean {err.mean().item():.3g}")
        raise AssertionError(f"{e}\n  per rank: " + "; ".join(per_rank)) from None


def check_cases(world, extras):
    cases = [case for case in RING_CASES if case[0] == world]
    runs = [(_inputs(shape, dtype, seed_of("ring", world, shape, causal, window, layout, dtype)), causal, window, layout)
            for _, shape, causal, window, layout, dtype in cases]
    group = Spawned(_on_ranks, world, (runs, extras), timeout_s=PG_TIMEOUT_S)
    # the single-process answers meanwhile, in this process
    expected = [(_spec(*inputs, causal, window), _flash(*inputs, causal, window)) for inputs, causal, window, _ in runs]
    results = group.join(DEADLINE_S)
    for i, ((_, shape, causal, window, layout, dtype), ((truth, low), flash)) in enumerate(zip(cases, expected)):
        got = [_whole([results[r]["cases"][i][j] for r in range(world)], layout) for j in range(5)]
        where = f"{world} ranks, {shape}, {'causal' if causal else 'full'}, window {window}, {layout}, {dtype}"
        for name, g, t, lo, f, fl in zip(("out", "lse", "dq", "dk", "dv"), got, truth, low, flash,
                                         (FLOOR[dtype], FLOOR[torch.float32]) + (FLOOR[dtype],) * 3):
            factor = FACTOR if name in ("out", "lse") else GRAD_FACTOR
            assert g.dtype == (torch.float32 if name == "lse" else dtype), f"{where}: {name} is {g.dtype}"
            _hold(f"{where}: {name} against the reference", g, t, lo, factor, fl, layout, world)
            _hold(f"{where}: {name} against flash_attention on the whole sequence", g, f, lo, factor, fl, layout,
                  world)
    return results


def test_ring_attention_on_2_ranks():
    results = check_cases(2, ("deterministic", "helpers", "errors", "abandoned"))
    assert all(r["deterministic"] for r in results), "a second run gave other bits"
    assert all(all(r["helpers"]) for r in results), [r["helpers"] for r in results]
    expected = {"head dim": "ValueError: ring_attention: rank 1 of 2: q and k must have the same head dim",
                "causal": "ValueError: ring_attention: every rank must pass the same causal, got rank 0: False, "
                          "rank 1: True",
                "dtype": "ValueError: ring_attention: every rank must pass the same dtype, got rank 0: 'bfloat16'",
                "rows": "ValueError: ring_attention: rank 0 of 2 holds 5 rows, but the 'zigzag' layout splits a "
                        "sequence of T=7 into 3, 4 rows per rank (as shard_sequence does; the ranks hold 5, 2)",
                "layout": "ValueError: ring_attention: every rank must pass the same layout"}
    for case, start in expected.items():
        said = [r["errors"][case] for r in results]
        assert said[0] == said[1], f"{case}: the ranks raised different errors: {said}"
        assert said[0].startswith(start), f"{case}: {said[0]}"
    error, seconds = results[0]["abandoned"]
    assert error != "nothing raised" and seconds < PG_TIMEOUT_S, (error, seconds)


def test_ring_attention_on_4_ranks():
    check_cases(4, ())


def test_training_split_over_2_ranks_matches_one_process():
    # The tiny GPT, its sequences split over 2 ranks (zigzag), against the same training in one
    # process: equal losses at every step, within tinygpt's rule
    from benchmarks.tinygpt import TOLERANCE, Config
    cfg = Config(B=1, T=16, C=16, heads=1, layers=1, steps=6, lr=1e-3)  # 1 program a kernel call: fast
    group = Spawned(train_ring, 2, (cfg, 0), timeout_s=PG_TIMEOUT_S)
    single = train_single(cfg, 0)
    ring = group.join(DEADLINE_S)
    assert ring[0] == ring[1], "the ranks saw different losses"
    for impl, losses in single.items():
        worst = max(abs(a - b) for a, b in zip(ring[0], losses))
        assert worst <= TOLERANCE["fp32"], f"ring vs one process ({impl}): {worst:.3g} nats apart, {ring[0]} vs {losses}"
