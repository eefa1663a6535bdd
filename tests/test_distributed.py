"""Ring attention across processes (`kernels.distributed`): gloo between processes this test
spawns, on the loopback interface, the kernels under Triton's interpreter.

Every rank's output, log-sum-exp and gradients, put back in sequence order, are held to the rule
against the reference on the whole sequence (float64 truth, the low-precision yardstick) and
against single-process `flash_attention` on it (`flash_attention_varlen` for packed batches). Processes are few and started once per world
size (each group runs all its cases), and bounded in time twice: the process group's timeout on
every collective, and a deadline on the whole group, after which it is killed. The plan (which
piece of which step each rank computes, with which kernel window) is checked exhaustively here,
without processes, against the masks it must reproduce.
"""

import datetime
import time

import pytest
import torch
import torch.distributed as dist

from attention_kernels import reference
from attention_kernels.kernels import dropout_mask, flash_attention, flash_attention_varlen
from attention_kernels.kernels.common import Variant
from attention_kernels.kernels.distributed import (Ring, _pieces, _segments, gather_sequence, ring_attention,
                                                   ring_attention_varlen, shard_positions, shard_segments,
                                                   shard_sequence)
from attention_kernels.benchmarks.ring import Spawned, train_ring, train_single
from attention_kernels.testing.cases import FACTOR, FLOOR, GRAD_FACTOR, RING_CASES, RING_SUBGROUP_CASES, RING_VARLEN_CASES, Shape
from interpret import patch_lang_once_per_launch
from attention_kernels.testing.rule import assert_close, seed_of

patch_lang_once_per_launch()  # the ranks, spawned, import this module but not conftest

PG_TIMEOUT_S = 60   # what one collective may wait: the backstop, far above any step here
DEADLINE_S = 300    # a spawn group's whole run, under `pytest -n 2` on 2 loaded cores (~25 s alone)

# What models add, through the ring: (world, shape, causal, window, layout, dtype, lengths, mods), mods as Case
# takes them. ALiBi's off-diagonal pieces on both sides (full attention, a band), (B, Hq) slopes per batch row
# and per packed sequence, sinks with their gradient, a soft-cap that bites (scores ~ N(0, 1)), GQA, bf16.
RING_MOD_CASES = [
    (2, Shape(1, 4, 2, 23, 23, 16), True, None, "zigzag", torch.float32, None,
     dict(softcap=1.5, sinks=True, alibi="heads")),
    (2, Shape(2, 2, 2, 21, 21, 16), False, None, "contiguous", torch.float32, None, dict(sinks=True, alibi="rows")),
    (2, Shape(1, 2, 1, 26, 26, 16), True, None, "zigzag", torch.bfloat16, None, dict(softcap=1.5, alibi="heads")),
    (2, Shape(1, 4, 2, 27, 27, 16), True, None, "zigzag", torch.float32, (9, 1, 14, 3),
     dict(softcap=2.0, sinks=True, alibi="rows")),
    (4, Shape(1, 2, 2, 29, 29, 16), False, (3, 5), "zigzag", torch.float32, None,
     dict(softcap=1.5, sinks=True, alibi="heads")),
    # dropout: every weight's draw keyed by its global positions, so the ranks drop what one process drops
    (2, Shape(2, 4, 2, 25, 25, 16), True, None, "zigzag", torch.float32, None, dict(dropout=0.3)),
    (2, Shape(1, 2, 1, 22, 22, 16), False, None, "contiguous", torch.bfloat16, None,
     dict(dropout=0.5, softcap=2.0, sinks=True)),
    (2, Shape(1, 4, 2, 27, 27, 16), True, None, "zigzag", torch.float32, (9, 1, 14, 3), dict(dropout=0.2)),
    (4, Shape(1, 2, 1, 31, 31, 16), True, (6, 0), "zigzag", torch.float32, None, dict(dropout=0.4, alibi="heads")),
]


# ----------------------------------------------------------------------------- the plan, no processes


def _visible(P, K, causal, window):
    """The spec's mask between query rows P and key rows K, (sequence, position) pairs each
    ((n, 2) tensors): the same sequence, and the window (causal: right 0) between positions."""
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    d = K[None, :, 1] - P[:, None, 1]                                      # (len(P), len(K))
    ok = K[None, :, 0] == P[:, None, 0]
    if left >= 0:
        ok &= d >= -left
    if right >= 0:
        ok &= d <= right
    return ok


def _positions(segments):
    """(sequence, packed row) of each row a rank holds: packed rows differ as positions do."""
    return torch.cat([torch.stack([torch.full((z - a,), b), torch.arange(a, z)], dim=1) for b, a, z in segments])


PLAN_CASES = [(lengths, W, layout, causal, window)
              for lengths, W in (((1,), 1), ((7,), 2), ((8,), 2), ((23,), 2), ((9,), 4), ((37,), 4), ((64,), 4),
                                 ((50,), 3), ((16,), 8), ((5, 1, 12, 0, 9), 2), ((3, 40, 2), 4))
              for layout in ("zigzag", "contiguous")
              for causal, window in ((True, None), (False, None), (True, (0, 0)), (True, (5, 0)), (False, (3, 5)),
                                     (False, (-1, 2)), (False, (11, -1)))]


@pytest.mark.parametrize("lengths, W, layout, causal, window", PLAN_CASES, ids=str)
def test_the_plan_computes_every_visible_pair_once(lengths, W, layout, causal, window):
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    segments = [_segments(lengths, W, r, layout) for r in range(W)]
    assert sorted(p for segs in segments for _, a, z in segs for p in range(a, z)) == list(range(sum(lengths)))
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
    assert Ring(None, 0, W, lengths, layout, left, right).steps == last_needed + 1  # no step nobody needs


@pytest.mark.parametrize("lengths, W, layout, causal, window", PLAN_CASES[::3], ids=str)
def test_unjoined_pieces_know_their_positions(lengths, W, layout, causal, window):
    # With ALiBi the ring joins no pieces, so that each lies within one chunk of each side, and
    # `Ring.where` places its first query and key in their sequence: every row of the piece must
    # be the next position, and the pieces must still cover every visible pair once
    left, right = window if window is not None else (-1, -1)
    right = 0 if causal else right
    segments = [_segments(lengths, W, r, layout) for r in range(W)]
    starts = torch.tensor([0, *lengths]).cumsum(0)
    for r in range(W):
        ring = Ring(None, r, W, lengths, layout, left, right, Variant(alibi_slopes=torch.ones(1)))
        P = _positions(segments[r])
        for s in range(ring.steps):
            K = _positions(segments[ring.source(s)])
            got = torch.zeros(len(P), len(K), dtype=torch.int)
            for q0, q1, k0, k1, kl, kr in ring.plan[s]:
                b, p, k = ring.where(s, q0, k0)
                for rows, first in ((P[q0:q1], p), (K[k0:k1], k)):
                    assert torch.equal(rows[:, 0], torch.full((len(rows),), b)), f"rank {r} step {s}: two sequences"
                    assert torch.equal(rows[:, 1] - starts[b], torch.arange(first, first + len(rows))), \
                        f"rank {r} step {s}: piece {(q0, q1, k0, k1)} is not consecutive positions from {first}"
                got[q0:q1, k0:k1] += reference.window_mask(q1 - q0, k1 - k0, kl, kr).int()
            assert got.max() <= 1 and torch.equal(got.bool(), _visible(P, K, causal, window)), f"rank {r} step {s}"


@pytest.mark.parametrize("W", [2, 3, 4, 8])
def test_zigzag_balances_causal_work(W):
    # Causal pairs per rank: equal in zigzag when 2W divides T; contiguous gives the last rank
    # about 2W - 1 times the first's
    T = 2 * W * 5
    everything = _positions([(0, 0, T)])
    work = {layout: [int(_visible(_positions(_segments([T], W, r, layout)), everything, True, None).sum())
                     for r in range(W)] for layout in ("zigzag", "contiguous")}
    assert len(set(work["zigzag"])) == 1, work
    assert work["contiguous"][-1] / work["contiguous"][0] == pytest.approx(2 * W - 1, rel=0.2), work


# ----------------------------------------------------------------------------- on the ranks


class Case:
    """One ring run: the whole sequence's (or packed batch's) inputs and the call's arguments.
    q (B, Hq, T, D), k, v (B, Hkv, T, D), dlse (B, Hq, T); packed (cu_seqlens given): q (total,
    Hq, D), k, v (total, Hkv, D), dlse (Hq, total). What models add: `softcap`, `sinks` (True:
    (Hq,) fp32 drawn, their gradient checked too) and `alibi` ("heads": the standard (Hq,) slopes;
    "rows": (B, Hq) drawn, per batch row or per packed sequence)."""

    def __init__(self, world, shape, causal, window, layout, dtype, lengths=None, ranks=None, softcap=None,
                 sinks=False, alibi=None, dropout=None):
        g = torch.Generator().manual_seed(seed_of("ring", world, shape, causal, window, layout, dtype, lengths, ranks,
                                                  *([softcap, sinks, alibi] if softcap or sinks or alibi else []),
                                                  *([dropout] if dropout else [])))
        self.dropout = dropout  # a probability (dense batches: the reference takes the kernels' draws)
        self.dropout_seed = int(torch.randint(0, 2 ** 62, (), generator=g)) if dropout else None
        self.ranks = ranks  # the global ranks of its group, in order; None: every process
        B, Hq, Hkv, T, D = shape.B, shape.Hq, shape.Hkv, shape.Tq, shape.D
        if lengths is None:
            self.q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
            self.k, self.v = (torch.randn(B, Hkv, T, D, generator=g, dtype=dtype) for _ in range(2))
            self.cu = None
        else:
            self.q = torch.randn(T, Hq, D, generator=g, dtype=dtype)
            self.k, self.v = (torch.randn(T, Hkv, D, generator=g, dtype=dtype) for _ in range(2))
            self.cu = torch.tensor([0, *lengths]).cumsum(0).to(torch.int32)
        self.do = torch.randn(self.q.shape, generator=g, dtype=dtype)
        self.dlse = torch.randn(self.q.shape[:3] if lengths is None else (Hq, T), generator=g)
        self.world, self.causal, self.window, self.layout, self.dtype = world, causal, window, layout, dtype
        self.softcap = softcap
        self.sinks = 2 * torch.randn(Hq, generator=g) if sinks else None   # about as large as the row's logits
        rows = B if lengths is None else len(lengths)
        self.slopes = {None: None, "heads": reference.alibi_slopes(Hq),
                       "rows": 0.3 * torch.rand(rows, Hq, generator=g)}[alibi]
        self.name = (f"{f'{world} ranks' if ranks is None else f'the group of ranks {ranks}'}, "
                     f"{shape if lengths is None else f'sequences {lengths}'}, "
                     f"{'causal' if causal else 'full'}, window {window}, {layout}, {dtype}"
                     + "".join(f", {name} {value}" for name, value in (("softcap", softcap), ("sinks", sinks or None),
                                                                       ("alibi", alibi), ("dropout", dropout))
                               if value is not None))
        # where each result's rows are: out, lse, dq, dk, dv
        self.row_dims = (2, 2, 2, 2, 2) if lengths is None else (0, 1, 0, 0, 0)

    def rows(self, rank):
        """The rows rank `rank` holds, in its order."""
        T = self.q.shape[2 if self.cu is None else 0]
        return torch.cat([torch.arange(a, z) for a, z in shard_segments(T, self.world, rank, self.layout, self.cu)])

    def mods(self, sinks=None):
        """The call's keyword arguments for what models add; `sinks` the leaf to pass, if any."""
        drop = dict(dropout_p=self.dropout, dropout_seed=self.dropout_seed) if self.dropout else {}
        return dict(softcap=self.softcap, sinks=sinks, alibi_slopes=self.slopes, **drop)

    def run_ring(self, group=None):
        """This rank's (out, lse, dq, dk, dv), and dsinks with sinks, through ring_attention or
        ring_attention_varlen."""
        shard = lambda x, dim: shard_sequence(x, group, layout=self.layout, dim=dim, cu_seqlens=self.cu)
        q, k, v = (shard(x, self.row_dims[2]).requires_grad_() for x in (self.q, self.k, self.v))
        sinks = None if self.sinks is None else self.sinks.clone().requires_grad_()
        kwargs = dict(group=group, causal=self.causal, window=self.window, layout=self.layout, return_lse=True,
                      **self.mods(sinks))
        if self.cu is None:
            out, lse = ring_attention(q, k, v, **kwargs)
        else:
            out, lse = ring_attention_varlen(q, k, v, self.cu, **kwargs)
        torch.autograd.backward([out, lse], [shard(self.do, self.row_dims[0]), shard(self.dlse, self.row_dims[1])])
        return [x.detach() for x in (out, lse, q.grad, k.grad, v.grad)] + ([] if sinks is None else [sinks.grad])

    def spec(self):
        """(truth, low) for out, lse, dq, dk, dv (and dsinks): the reference in float64, and in the
        inputs' precision (upcast=False, the yardstick), as `rule.hold_to_rule` makes them; the
        sinks and slopes fp32 in the yardstick, as the kernels take them."""
        w = {} if self.window is None else {"window": self.window}
        if self.cu is None:
            attend = lambda q, k, v, upcast, **m: reference.attention(q, k, v, self.causal, None, upcast, **w, **m)
            lse_of = lambda q, k, **m: reference.logsumexp(q, k, self.causal, None, **w, **m)
        else:
            attend = lambda q, k, v, upcast, **m: reference.varlen_attention(q, k, v, self.cu, self.cu, self.causal,
                                                                             None, upcast, **w, **m)
            lse_of = lambda q, k, **m: reference.varlen_logsumexp(q, k, self.cu, self.cu, self.causal, None, **w, **m)
        results = []
        for dt, upcast in ((torch.float64, True), (self.dtype, False)):
            leaves = [x.detach().to(dt).clone().requires_grad_() for x in (self.q, self.k, self.v)]
            mod_dt = torch.float64 if upcast else torch.float32
            sinks = None if self.sinks is None else self.sinks.to(mod_dt).clone().requires_grad_()
            mods = dict(self.mods(sinks), alibi_slopes=None if self.slopes is None else self.slopes.to(mod_dt))
            drop = {}
            if mods.pop("dropout_p", 0):  # the weights the kernels keep for this seed, written out
                if self.cu is None:
                    B, Hq, T = self.q.shape[:3]
                else:  # packed: sequence b is head block b, its positions from 0
                    B, Hq, T = len(self.cu) - 1, self.q.shape[1], int((self.cu[1:] - self.cu[:-1]).max())
                drop = dict(dropout_p=self.dropout, dropout_mask=dropout_mask(B, Hq, T, T, self.dropout,
                                                                              mods.pop("dropout_seed"), "cpu").bool())
            out = attend(*leaves, upcast, **mods, **drop)
            if not upcast and not torch.isfinite(out).all():
                out = attend(*leaves, True, **mods, **drop)
            lse = lse_of(*leaves[:2], **mods)
            torch.autograd.backward([out, lse], [self.do.to(dt), self.dlse.to(lse.dtype)])
            results.append([out, lse, *(x.grad for x in leaves)] + ([] if sinks is None else [sinks.grad]))
        return results

    def flash(self):
        """The same from single-process flash_attention (flash_attention_varlen) on the whole."""
        leaves = [x.detach().clone().requires_grad_() for x in (self.q, self.k, self.v)]
        sinks = None if self.sinks is None else self.sinks.clone().requires_grad_()
        kwargs = dict(causal=self.causal, window=self.window, return_lse=True, **self.mods(sinks))
        if self.cu is None:
            out, lse = flash_attention(*leaves, **kwargs)
        else:
            longest = int((self.cu[1:] - self.cu[:-1]).max())
            out, lse = flash_attention_varlen(*leaves, self.cu, self.cu, longest, longest, **kwargs)
        torch.autograd.backward([out, lse], [self.do, self.dlse])
        return [out, lse, *(x.grad for x in leaves)] + ([] if sinks is None else [sinks.grad])

    def whole(self, parts, j):
        """Result j of every rank (in its rows' order) back in sequence order."""
        dim = self.row_dims[j]
        out = torch.empty(*parts[0].shape[:dim], sum(p.shape[dim] for p in parts), *parts[0].shape[dim + 1:],
                          dtype=parts[0].dtype)
        for r, part in enumerate(parts):
            out.index_copy_(dim, self.rows(r), part)
        return out

    def hold(self, name, got, truth, low, factor, floor, j):
        try:
            assert_close(f"{self.name}: {name}", got, truth, low, factor, floor)
        except AssertionError as e:  # say which rank's rows are wrong, as ring-flash-attention's tests do
            per_rank = []
            for r in range(self.world):
                rows = self.rows(r)
                err = (got.index_select(self.row_dims[j], rows).double()
                       - truth.index_select(self.row_dims[j], rows).double()).abs().nan_to_num(float("inf"))
                per_rank.append(f"rank {r}: max {err.max().item():.3g}, mean {err.mean().item():.3g}")
            raise AssertionError(f"{e}\n  per rank: " + "; ".join(per_rank)) from None


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
        "gradients": (x.clone().requires_grad_(rank == 1), x, x, {}),    # a backward on one rank only would hang
        "sinks": (x, x, x, dict(sinks=torch.tensor([0.5, 1.0 + rank]))),
        "dropout": (x, x, x, dict(dropout_p=0.1, dropout_seed=1 + rank)),  # each rank its own seed
        "dropout_seed": (x, x, x, dict(dropout_seed=-1)),
    }
    packed = torch.randn(5, 2, 16)                                         # 5 rows of sequences of 6 and 4 each
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    bad_packed = {
        "cu_seqlens dtype": (cu.long() if rank == 1 else cu),
        "sequences": (torch.tensor([0, 5, 10], dtype=torch.int32) if rank == 1 else cu),
        "no rows": torch.tensor([0, 1, 2], dtype=torch.int32),            # sequences of 1: rank 1 holds nothing
    }
    said = {}
    calls = [(case, lambda q=q, k=k, v=v, kw=kwargs: ring_attention(q, k, v, **kw))
             for case, (q, k, v, kwargs) in bad.items()]
    rows = lambda c: packed[:sum(z - a for a, z in shard_segments(int(c[-1]), world, rank, cu_seqlens=c))]  # its share
    calls += [(case, lambda c=c, case=case: ring_attention_varlen(*(rows(c),) * 3, c) if case == "no rows" else
               ring_attention_varlen(packed, packed, packed, c))
              for case, c in bad_packed.items()]
    for case, call in calls:
        try:
            call()
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
    # every process makes every subgroup, in the same order (new_group is collective); only its members use it
    groups = {case.ranks: dist.new_group(list(case.ranks)) for case in cases if case.ranks is not None}
    results = {"cases": [case.run_ring(groups.get(case.ranks)) if case.ranks is None or rank in case.ranks else None
                         for case in cases]}
    if "deterministic" in extras:  # the first case again: the same bits
        again = cases[0].run_ring()
        results["deterministic"] = all(torch.equal(a, b) for a, b in zip(again, results["cases"][0]))
    if "helpers" in extras:
        whole = torch.randn(2, 11, 3, generator=torch.Generator().manual_seed(7))  # (B, T, C)
        cu = torch.tensor([0, 4, 5, 11], dtype=torch.int32)                      # a packed batch of 3 along T
        results["helpers"] = [
            torch.equal(gather_sequence(shard_sequence(whole)), whole),
            torch.equal(gather_sequence(shard_sequence(whole, layout="contiguous"), layout="contiguous"), whole),
            torch.equal(gather_sequence(shard_sequence(whole, cu_seqlens=cu), cu_seqlens=cu), whole),
            torch.equal(shard_positions(11), shard_sequence(torch.arange(11)[None])[0]),
            torch.equal(shard_positions(11, cu_seqlens=cu),
                        shard_sequence(torch.tensor([[0, 1, 2, 3, 0, 0, 1, 2, 3, 4, 5]]), cu_seqlens=cu)[0])]
    if "errors" in extras:
        results["errors"] = _errors(rank, world)
    if "abandoned" in extras:
        results["abandoned"] = _abandoned(rank, world)
    return results


def check_cases(world, extras):
    cases = [Case(*case) for case in RING_CASES if case[0] == world]
    cases += [Case(w, Shape(1, Hq, Hkv, sum(lengths), sum(lengths), D), causal, window, layout, dtype, lengths)
              for w, lengths, Hq, Hkv, D, causal, window, layout, dtype in RING_VARLEN_CASES if w == world]
    cases += [Case(len(ranks), shape, causal, window, layout, dtype, ranks=ranks)
              for ranks, w, shape, causal, window, layout, dtype in RING_SUBGROUP_CASES if w == world]
    cases += [Case(w, shape, causal, window, layout, dtype, lengths, **mods)
              for w, shape, causal, window, layout, dtype, lengths, mods in RING_MOD_CASES if w == world]
    return run_cases(world, cases, extras)


def run_cases(world, cases, extras=()):
    """Run `cases` on `world` spawned ranks, hold every result to the rule, and return what the
    ranks returned (tests/test_fuzz.py draws its cases and runs them here too)."""
    group = Spawned(_on_ranks, world, (cases, extras), timeout_s=PG_TIMEOUT_S)
    expected = [(case.spec(), case.flash()) for case in cases]  # the single-process answers, meanwhile, here
    results = group.join(DEADLINE_S)
    for i, (case, ((truth, low), flash)) in enumerate(zip(cases, expected)):
        for j, name in enumerate(("out", "lse", "dq", "dk", "dv")):
            got = case.whole([results[r]["cases"][i][j] for r in (case.ranks or range(world))], j)
            factor = FACTOR if name in ("out", "lse") else GRAD_FACTOR
            floor = FLOOR[torch.float32 if name == "lse" else case.dtype]
            assert got.dtype == (torch.float32 if name == "lse" else case.dtype), f"{case.name}: {name} is {got.dtype}"
            case.hold(f"{name} against the reference", got, truth[j], low[j], factor, floor, j)
            case.hold(f"{name} against single-process flash", got, flash[j], low[j], factor, floor, j)
        if case.sinks is not None:  # the whole sequence's gradient, on every rank: the same bits
            dsinks = [results[r]["cases"][i][5] for r in (case.ranks or range(world))]
            assert all(torch.equal(d, dsinks[0]) for d in dsinks), f"{case.name}: the ranks' dsinks differ: {dsinks}"
            for against, want in (("the reference", truth[5]), ("single-process flash", flash[5])):
                assert_close(f"{case.name}: dsinks against {against}", dsinks[0], want, low[5], GRAD_FACTOR,
                             FLOOR[torch.float32])
    return results


def test_ring_attention_on_2_ranks():
    results = check_cases(2, ("deterministic", "helpers", "errors", "abandoned"))
    assert all(r["deterministic"] for r in results), "a second run gave other bits"
    assert all(all(r["helpers"]) for r in results), [r["helpers"] for r in results]  # shard, gather, positions
    expected = {"head dim": "ValueError: ring_attention: rank 1 of 2: q and k must have the same head dim",
                "causal": "ValueError: ring_attention: every rank must pass the same causal, got rank 0: False, "
                          "rank 1: True",
                "dtype": "ValueError: ring_attention: every rank must pass the same dtype, got rank 0: 'bfloat16'",
                # rank 1 is short (2 rows of 5): it is named, not rank 0, whose 5 rows fit T = 9 to 11
                "rows": "ValueError: ring_attention: rank 1 of 2 holds 2 rows, but the 'zigzag' layout gives it 4 or "
                        "5 or 6 of a sequence of T=9 or 10 or 11, the split the other ranks' rows fit (as "
                        "shard_sequence does; the ranks hold 5, 2)",
                "layout": "ValueError: ring_attention: every rank must pass the same layout",
                "cu_seqlens dtype": "ValueError: ring_attention: rank 1 of 2: cu_seqlens must be a 1-D int32 tensor",
                "sequences": "ValueError: ring_attention: every rank must pass the same sequences, got rank 0: [6, 4], "
                             "rank 1: [5, 5]",
                "gradients": "ValueError: ring_attention: every rank must pass the same gradients, got rank 0: False, "
                             "rank 1: True",
                "no rows": "ValueError: ring_attention: rank 1 of 2: this rank holds no rows: 'zigzag' splits each "
                           "sequence (lengths [1, 1]) over 2 ranks",
                "sinks": "ValueError: ring_attention: every rank must pass the same sinks, got rank 0: ((2,), (0.5, "
                         "1.0)), rank 1: ((2,), (0.5, 2.0))",
                "dropout": "ValueError: ring_attention: every rank must pass the same dropout, got rank 0: (0.1, 1), "
                           "rank 1: (0.1, 2)",
                "dropout_seed": "ValueError: ring_attention: rank 0 of 2: dropout_seed must be an int in [0, 2**63)"}
    for case, start in expected.items():
        said = [r["errors"][case] for r in results]
        assert said[0] == said[1], f"{case}: the ranks raised different errors: {said}"
        assert said[0].startswith(start), f"{case}: {said[0]}"
    error, seconds = results[0]["abandoned"]  # the group's 3 s, not the world's 60 s
    assert "timed out" in error.lower() and seconds < PG_TIMEOUT_S / 2, (error, seconds)


def test_ring_attention_on_4_ranks():
    check_cases(4, ())


def test_training_split_over_2_ranks_matches_one_process():
    # The tiny GPT, its sequences split over 2 ranks (zigzag), against the same training in one
    # process: equal losses at every step, within tinygpt's rule
    from attention_kernels.benchmarks.tinygpt import TOLERANCE, Config
    cfg = Config(B=1, T=16, C=16, heads=1, layers=1, steps=6, lr=1e-3)  # 1 program a kernel call: fast
    group = Spawned(train_ring, 2, (cfg, 0), timeout_s=PG_TIMEOUT_S)
    single = train_single(cfg, 0)
    ring = group.join(DEADLINE_S)
    assert ring[0] == ring[1], "the ranks saw different losses"
    for impl, losses in single.items():
        worst = max(abs(a - b) for a, b in zip(ring[0], losses))
        assert worst <= TOLERANCE["fp32"], f"ring vs one process ({impl}): {worst:.3g} nats apart: {ring[0]}, {losses}"
