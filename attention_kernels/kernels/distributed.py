"""
Ring attention: one sequence split across processes (context parallelism), forward and
backward, on torch.distributed point-to-point messages and the flash kernels.

Each rank holds a shard of the sequence's rows of q, k and v, (B, H, T_local, D). The K/V
blocks travel around a ring of ranks (Liu et al., "Ring Attention with Blockwise Transformers",
2023; the zigzag layout of ring-flash-attention):

    forward, on rank r of W, step s = 0 .. S-1 (S <= W: the last step any rank can see):
        post: send the K/V block held to rank r+1, receive the next from rank r-1
        for each piece of (local q, block of rank r-s) some query sees:
            o_s, lse_s = flash forward, the mask placed by the global positions of both
            merge into (O, LSE), fp32 (`merge_attention_states`): LSE' = log(e^LSE + e^lse_s),
            O' = (e^LSE O + e^lse_s o_s) / e^LSE'
        wait for the block
    backward, the same ring again, with the global O and LSE (the flash backward takes them, so
    each piece's P = exp2(S c - LSE) is already the global softmax's):
        dQ accumulates locally in fp32; each block's dK, dV accumulator (fp32) travels with the
        block, every rank adding its piece, and goes home after the last step.

Why a ring of point-to-point messages rather than an all-gather of K/V: a rank holds one block
beside its own at any time (memory per rank O(T/W), not O(T)), and the next block's transfer
runs while this step computes, so communication hides behind compute when a step's attention
takes longer than moving a block (see the README's scaling model). An all-gather is simpler and
can be faster on a fast link for short shards, but holds all of K/V at once, and gradients need
a reduce-scatter at the end that cannot overlap anything.

Layouts (`shard_segments`): "contiguous" gives rank r the r-th of W equal slices; "zigzag" cuts
the sequence into 2W chunks and gives rank r chunks r and 2W-1-r, so under a causal mask every
rank does the same work (with contiguous slices the last rank does W times the first's). A
piece of a step is then seen whole (no mask), not at all (skipped, no kernel call) or in part
(the kernel's window placed by the two segments' positions, `_piece`). Lengths need not divide
by W or 2W: the first chunks are one row longer. Windows: ring steps past the last one any
rank's queries can reach are not run at all, compute or messages (use "contiguous" with a
causal or left-only window: it is balanced already, and only the ranks within the window's
reach exchange blocks). Blocks travel one way, to rank r+1, so a window that looks ahead
(right > 0) needs the next rank's block, which arrives only at the last step: its blocks go all
the way round, the steps between carrying messages with nothing to compute (correct, not cheap;
a second ring the other way would fix it). Packed batches
(`ring_attention_varlen`): each sequence is split across the ranks on its own, a rank's rows are
its share of every sequence, and pieces pair rows of one sequence only; the same code runs them
as a batch of one.

What models add (softcap, sinks, alibi_slopes; `_piece_variant`): the soft-cap is per score, in
every piece. ALiBi is the kernels' own on a piece that is a chunk against itself; any other piece
lies on one side of the diagonal, where the bias splits into one per key (a float attn_mask row)
and one per row (a shift of the piece's log-sum-exp), so no pieces are joined. The sinks join
once, as a last merge of a term with no value; their gradient sums each rank's rows, then the
ranks'. Dropout is refused: the kernels draw it by positions within a call, and a piece's are
not the sequence's.

Checks: before the ring starts, every rank's arguments and shapes are gathered (one small
all_gather_object), so a bad input on one rank raises the same ValueError (naming that rank) on
every rank instead of leaving the others waiting; what cannot be checked (a rank that dies, or
never calls) ends with the process group's timeout. Deterministic for a fixed world size: every
sum runs in a fixed order. Not a torch op: torch.compile breaks the graph around it.
"""

import functools
import math
import time

import torch
import torch.distributed as dist

from .checks import _dtype_name, autocast_inputs, check_causal, check_inputs, check_mods, window_bounds
from .cascade import merge_attention_states
from .common import LOG2E, Variant
from .dropout import check_dropout, draw_seed
from .flash import LN2, sink_gradient, user_op_args

LAYOUTS = ("zigzag", "contiguous")

# ----------------------------------------------------------------------------- layouts


def chunk_bounds(T, n):
    """Bounds of n chunks of T rows, as equal as can be: the first T % n chunks one row longer."""
    base, extra = divmod(T, n)
    bounds = [0]
    for c in range(n):
        bounds.append(bounds[-1] + base + (c < extra))
    return bounds


def _check_layout(layout):
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(map(repr, LAYOUTS))}, got {layout!r}")


def _lengths(cu_seqlens):
    """A packed batch's sequence lengths from its offsets (a list, or an int tensor read on the host)."""
    offsets = cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else list(cu_seqlens)
    return [z - a for a, z in zip(offsets, offsets[1:])]


def _segments(lengths, world, rank, layout):
    """The rows rank `rank` holds of sequences of these lengths packed one after another:
    (sequence, start, stop) ranges of packed rows, in the order the rank holds them. Each
    sequence is split on its own: contiguous, the rank-th of W slices; zigzag, chunks rank and
    2W-1-rank of 2W. Empty ranges (sequences shorter than 2W) are left out."""
    _check_layout(layout)
    out, first = [], 0
    for b, T in enumerate(lengths):
        if layout == "contiguous":
            bounds = chunk_bounds(T, world)
            chunks = [rank]
        else:
            bounds = chunk_bounds(T, 2 * world)
            chunks = [rank, 2 * world - 1 - rank]
        out += [(b, first + bounds[c], first + bounds[c + 1]) for c in chunks if bounds[c + 1] > bounds[c]]
        first += T
    return out


def shard_segments(T, world, rank, layout="zigzag", cu_seqlens=None):
    """The rows rank `rank` of `world` holds of a sequence of T: (start, stop) ranges, in the
    order its rows hold them. Contiguous: the rank-th of W slices; zigzag: chunks rank and
    2W-1-rank of 2W (the second empty when T < 2W). With cu_seqlens, T rows hold a packed batch
    (sequence b is rows cu_seqlens[b]:cu_seqlens[b + 1]), and each sequence is split on its own."""
    lengths = [T] if cu_seqlens is None else _lengths(cu_seqlens)
    if sum(lengths) != T:
        raise ValueError(f"cu_seqlens must end at the packed length {T}, got sequences of {lengths}")
    return [(a, z) for _, a, z in _segments(lengths, world, rank, layout)]


def _rank_world(group):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("torch.distributed is not initialized: call torch.distributed.init_process_group first")
    return dist.get_rank(group), dist.get_world_size(group)


def shard_sequence(x, group=None, layout="zigzag", dim=1, cu_seqlens=None):
    """This rank's rows of a whole tensor, (B, T, ...) by default (`dim` says where T is: 2 for
    (B, H, T, D), 0 for a packed (total, H, D) batch with `cu_seqlens`, its offsets): the rows of
    `shard_segments` in their order. Every rank passes the same x."""
    rank, world = _rank_world(group)
    T = x.shape[dim]
    if cu_seqlens is None and T < world:
        raise ValueError(f"a sequence of T={T} rows cannot be split over {world} ranks: each needs at least one")
    rows = shard_segments(T, world, rank, layout, cu_seqlens)
    return torch.cat([x.narrow(dim, a, z - a) for a, z in rows], dim=dim) if rows else x.narrow(dim, 0, 0)


def shard_positions(T, group=None, layout="zigzag", device=None, cu_seqlens=None):
    """The position ids (int64, (T_local,)) of this rank's rows, in their sequence: what a model's
    position embedding or rotary table must see in place of arange(T_local). With cu_seqlens, T
    is the packed length and positions count from each sequence's start."""
    rank, world = _rank_world(group)
    lengths = [T] if cu_seqlens is None else _lengths(cu_seqlens)
    starts = [sum(lengths[:b]) for b in range(len(lengths))]
    ranges = [torch.arange(a - starts[b], z - starts[b], device=device)
              for b, a, z in _segments(lengths, world, rank, layout)]
    return torch.cat(ranges) if ranges else torch.zeros(0, dtype=torch.long, device=device)


def gather_sequence(x, group=None, layout="zigzag", dim=1, cu_seqlens=None):
    """The whole tensor, on every rank, from each rank's shard (the inverse of `shard_sequence`,
    with the same dim and cu_seqlens): an all-gather padded to the longest shard. Not
    differentiable: for outputs and evaluation."""
    rank, world = _rank_world(group)
    n = torch.tensor([x.shape[dim]], device=x.device)
    lengths = [torch.zeros_like(n) for _ in range(world)]
    dist.all_gather(lengths, n, group=group)
    lengths = [int(t) for t in lengths]
    T, longest = sum(lengths), max(lengths)
    pad = list(x.shape)
    pad[dim] = longest - x.shape[dim]
    padded = torch.cat([x, x.new_zeros(pad)], dim=dim).contiguous()        # (.., longest, ..)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded, group=group)
    whole = list(x.shape)
    whole[dim] = T
    out = x.new_empty(whole)                                               # (.., T, ..)
    for r, part in enumerate(parts):
        at = 0
        for a, z in shard_segments(T, world, r, layout, cu_seqlens):
            out.narrow(dim, a, z - a).copy_(part.narrow(dim, at, z - a))
            at += z - a
    return out


# ----------------------------------------------------------------------------- the plan


def _piece(q_segment, k_segment, q_row, k_row, left, right):
    """What queries at global positions q_segment = (sequence, start, stop), held from local row
    q_row on, do with keys at k_segment, from local row k_row: None when no query sees any key
    (always, between two sequences of a packed batch); else the
    local rows (q0, q1, k0, k1) worth computing and the flash kernel's window (kernel_left,
    kernel_right), (-1, -1) when every query sees every key.

    Query P sees key K when P - left <= K <= P + right (a side -1: unbounded; causal: right 0).
    The kernel aligns bottom-right: its row i and key j are window-visible when
    -kernel_left <= (k_start + j) - (q_start + i) - (k_stop - q_stop) <= kernel_right, so
    kernel_left = left + k_stop - q_stop and kernel_right = right + q_stop - k_stop. First the
    rows no pair can use are cut off (keys past the last query's reach, queries past the last
    key's, and at the starts likewise), which also keeps both kernel bounds >= 0."""
    if q_segment[0] != k_segment[0]:
        return None
    q_segment, k_segment = q_segment[1:], k_segment[1:]  # positions in the packed rows: their differences count
    L = math.inf if left < 0 else left
    R = math.inf if right < 0 else right
    (qs, qe), (ks, ke) = q_segment, k_segment
    ke = min(ke, qe - 1 + R + 1)      # keys no query reaches
    ks = max(ks, qs - L)
    qe = min(qe, ke - 1 + L + 1)      # queries that reach no key
    qs = max(qs, ks - R)
    if qs >= qe or ks >= ke:
        return None
    nearest, farthest = ks - (qe - 1), (ke - 1) - qs  # the range of K - P over the rectangle
    if farthest < -L or nearest > R:
        return None
    if nearest >= -L and farthest <= R:
        kernel_left = kernel_right = -1
    else:
        kernel_left = -1 if left < 0 else int(left + ke - qe)
        kernel_right = -1 if right < 0 else int(right + qe - ke)
    rows = (q_row + qs - q_segment[0], q_row + qe - q_segment[0], k_row + ks - k_segment[0], k_row + ke - k_segment[0])
    return (*(int(x) for x in rows), kernel_left, kernel_right)


def _merge(pieces):
    """Fewer kernel calls for the same work: join pieces seen whole (window (-1, -1)) whose rows
    are adjacent on one side and equal on the other (with zigzag, a step's two half-shards against
    one block); and a causal square [a, b), the whole block of rows [b, c) against keys [a, b)
    and the causal square [b, c) into one causal square [a, c) (with zigzag, step 0: local row i
    sees local key j <= i, whatever the chunks' lengths)."""
    pieces = list(pieces)
    while True:
        for a in pieces:
            for b in pieces:
                if a is b:
                    continue
                if a[4:] == b[4:] == (-1, -1) and a[2:4] == b[2:4] and a[1] == b[0]:   # same keys, queries adjacent
                    joined, gone = (a[0], b[1], *a[2:]), [a, b]
                elif a[4:] == b[4:] == (-1, -1) and a[0:2] == b[0:2] and a[3] == b[2]:  # same queries, keys adjacent
                    joined, gone = (*a[0:3], b[3], -1, -1), [a, b]
                elif a[4:] == (-1, 0) and a[0:2] == a[2:4] and (a[1], b[1], a[1], b[1], -1, 0) == b \
                        and (a[1], b[1], a[0], a[1], -1, -1) in pieces:
                    joined, gone = (a[0], b[1], a[0], b[1], -1, 0), [a, b, (a[1], b[1], a[0], a[1], -1, -1)]
                else:
                    continue
                pieces = [p for p in pieces if p not in gone] + [joined]
                break
            else:
                continue
            break
        else:
            return sorted(pieces)


def _pieces(q_segments, k_segments, left, right, merge=True):
    """The kernel calls of one (query shard, K/V block) pair: (q0, q1, k0, k1, left, right) each,
    local rows and the kernel's window; empty when no query sees any key. Only segments of one
    sequence can pair, and only their pieces can join: a packed batch of n sequences costs O(n).
    merge=False keeps every piece within one segment of each side, so that its rows are
    consecutive positions of the sequence (what ALiBi's distances need, `_piece_variant`)."""
    k_rows, row = {}, 0
    for kseg in k_segments:  # each sequence's key segments, with their first local row
        k_rows.setdefault(kseg[0], []).append((kseg, row))
        row += kseg[2] - kseg[1]
    by_sequence, q_row = {}, 0
    for qseg in q_segments:
        for kseg, k_row in k_rows.get(qseg[0], ()):
            piece = _piece(qseg, kseg, q_row, k_row, left, right)
            if piece is not None:
                by_sequence.setdefault(qseg[0], []).append(piece)
        q_row += qseg[2] - qseg[1]
    return sorted(p for pieces in by_sequence.values() for p in (_merge(pieces) if merge else pieces))


@functools.lru_cache(maxsize=64)
def _plan(lengths, world, layout, left, right, merge=True):
    """Every rank's segments and rows, how many ring steps run, and every (rank, step)'s pieces:
    a pure function of the call's shape, computed once per shape (a model calls it per layer)."""
    segments = [_segments(list(lengths), world, r, layout) for r in range(world)]
    rows = [sum(z - a for _, a, z in segs) for segs in segments]
    plans = [[_pieces(segments[r], segments[(r - s) % world], left, right, merge) for s in range(world)]
             for r in range(world)]
    steps = 1 + max(s for r in range(world) for s in range(world) if s == 0 or plans[r][s])
    return segments, rows, steps, plans


class Ring:
    """Who talks to whom, and what each step computes: rank r's step s runs its queries against
    the block of rank (r - s) mod W. `steps` is 1 + the last step at which any rank's queries
    see their block (W for causal or full attention; fewer with a window). `variant` holds what
    the call adds to attention: softcap and alibi_slopes, which every piece adds (`_piece_variant`),
    and sinks, which join once, after the last step (`ring_forward`). `packed`: (B, Hq) slopes are
    per sequence of a packed batch, not per batch row."""

    def __init__(self, group, rank, world, lengths, layout, left, right, variant=Variant(), packed=False):
        """lengths: the sequences' lengths, [T] for one (B, H, T, D) batch, more for a packed one."""
        self.group, self.rank, self.world = group, rank, world
        self.variant, self.packed = variant, packed
        # ALiBi and dropout need each piece's positions: no joined pieces
        merge = variant.alibi_slopes is None and variant.dropout_p == 0
        self.Hq = 0  # query heads, for dropout's head numbering of a packed batch's sequences (set by _agree)
        self.segments, self.lengths, self.steps, plans = _plan(tuple(lengths), world, layout, left, right, merge)
        self.plan = plans[rank][:self.steps]
        self.starts = [sum(lengths[:b]) for b in range(len(lengths))]  # each sequence's first packed row

    def where(self, step, q_row, k_row):
        """(sequence, position of local query row q_row in it, position of row k_row of the block
        held at `step`): positions count from the sequence's start, as in one process."""
        def position(segments, row):
            for b, a, z in segments:
                if row < z - a:
                    return b, a + row - self.starts[b]
                row -= z - a
            raise IndexError(f"row {row} past the rank's rows")
        b, p = position(self.segments[self.rank], q_row)
        return b, p, position(self.segments[self.source(step)], k_row)[1]

    def source(self, step):
        """The rank whose block this rank holds at `step`."""
        return (self.rank - step) % self.world

    def peer(self, offset):
        """The global rank of the group's rank (this + offset) mod W (what P2P messages take)."""
        r = (self.rank + offset) % self.world
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def start(self, sends=(), recvs=()):
        """Post messages: sends and recvs are (tensor, offset to the peer, tag). Returns the work."""
        ops = [dist.P2POp(dist.isend, t, self.peer(o), self.group, tag) for t, o, tag in sends]
        ops += [dist.P2POp(dist.irecv, t, self.peer(o), self.group, tag) for t, o, tag in recvs]
        return dist.batch_isend_irecv(ops) if ops else []


def _wait(works):
    for w in works:
        w.wait()


# ----------------------------------------------------------------------------- forward and backward


def _piece_variant(ring, step, piece):
    """What one piece's flash call adds to attention, as a Variant (its window, the soft-cap, ALiBi),
    and what the kernel's logits of each row lack, base 2, to add to its log-sum-exp: None, or
    (B or 1, Hq, rows) fp32.

    ALiBi's bias is -slope * |K - P| between query position P and key position K. The kernel
    computes it from its own rows, about the diagonal key i + Tk - Tq, which is the piece's only
    when the piece is a square on the diagonal (step 0, a chunk against itself: exact). Every other
    piece lies on one side of the diagonal (its key chunk wholly before or after its query chunk),
    where, with N the key nearest the queries, |K - P| = |K - N| + |N - P|: a bias per key, passed
    as a float attn_mask broadcast over the rows, (B or 1, Hq, 1, keys), and one per row, which
    shifts the whole piece's logits of that row alike and so only its log-sum-exp (the forward adds
    it, the backward subtracts it from the LSE it passes, so P = exp2(S - LSE) comes out right)."""
    q0, q1, k0, k1, left, right = piece
    variant = Variant(left=left, right=right, softcap=ring.variant.softcap, dropout_p=ring.variant.dropout_p,
                      seed=ring.variant.seed)
    if variant.dropout_p > 0:  # each weight's draw keyed by its sequence, positions and head, as in one process
        b, P0, K0 = ring.where(step, q0, k0)
        variant = variant._replace(dropout_offsets=(P0, K0, b * ring.Hq if ring.packed else 0))
    slopes = ring.variant.alibi_slopes
    if slopes is None:
        return variant, None
    b, P0, K0 = ring.where(step, q0, k0)
    if ring.packed and slopes.dim() == 2:
        slopes = slopes[b]                                                  # (Hq,) sequence b's
    if (P0, q1 - q0) == (K0, k1 - k0):
        return variant._replace(alibi_slopes=slopes), None
    nearest = K0 + (k1 - k0) - 1 if K0 < P0 else K0
    per_head = (slopes if slopes.dim() == 2 else slopes[None])[:, :, None]  # (B or 1, Hq, 1)
    arange = lambda a, n: torch.arange(a, a + n, device=slopes.device, dtype=torch.float32)
    keys = -per_head * (arange(K0, k1 - k0) - nearest).abs()                # (B or 1, Hq, keys)
    shift = -per_head * (arange(P0, q1 - q0) - nearest).abs() * LOG2E      # (B or 1, Hq, rows) base 2
    return variant._replace(attn_mask=keys[:, :, None, :]), shift          # mask (B or 1, Hq, 1, keys)


def _flash_forward(q, k, v, variant, scale, residual):
    """One piece's flash forward: (o, base-2 lse, o's rounding residual)."""
    return torch.ops.attention_kernels.flash_forward(q, k, v, scale=scale, residual=residual,
                                                     attn_mask=variant.attn_mask, **variant.op_args(),
                                                     **user_op_args(variant, block_map=False))


def _flash_backward(q, k, v, o, res, lse, do, dlse, variant, scale):
    """One piece's flash backward: (dq, dk, dv)."""
    dq, dk, dv, *_ = torch.ops.attention_kernels.flash_backward(q, k, v, o, res, lse, do, dlse, scale=scale,
                                                                attn_mask=variant.attn_mask, **variant.op_args(),
                                                                **user_op_args(variant, block_map=False))
    return dq, dk, dv


def _sum_over_ranks(x, ring):
    """The sum of every rank's x, the same bits on every rank: gathered, then added in rank order."""
    parts = [torch.empty_like(x) for _ in range(ring.world)]
    dist.all_gather(parts, x.contiguous(), group=ring.group)
    return functools.reduce(torch.add, parts)


def ring_forward(q, k, v, ring, scale, on_step=None, sinks=None):
    """The forward ring: (out like q, base-2 lse (B, Hq, T_local) fp32, out's rounding residual
    like q, or None for fp32). `on_step(step, compute_s, wait_s)` is told each step's times
    (benchmarks.ring); None: no clock is read. sinks (Hq,) fp32 join each row's softmax once,
    after the last step: a log-sum-exp term with no value."""
    B, Hq, T, D = q.shape
    acc = q.new_zeros(B, Hq, T, D, dtype=torch.float32)                   # (B, Hq, T, D) the merged output
    lse = q.new_full((B, Hq, T), -math.inf, dtype=torch.float32)          # (B, Hq, T) natural log, base 2 at the end
    sixteen = q.dtype != torch.float32  # 16-bit steps hand over their fp32 output as o + residual
    kv = torch.stack([k, v])                                               # (2, B, Hkv, T, D): one message a step
    for s in range(ring.steps):
        clock = _Clock(on_step, q)
        pending, arriving = [], None
        if s + 1 < ring.steps:  # the next block travels while this one computes
            arriving = kv.new_empty(2, *k.shape[:2], ring.lengths[ring.source(s + 1)], D)
            pending = ring.start(sends=[(kv, 1, 2 * s)], recvs=[(arriving, -1, 2 * s)])
        for piece in ring.plan[s]:
            q0, q1, k0, k1 = piece[:4]
            variant, shift = _piece_variant(ring, s, piece)
            o, lse2, res = _flash_forward(q[:, :, q0:q1], kv[0, :, :, k0:k1], kv[1, :, :, k0:k1], variant, scale,
                                          sixteen)
            acc[:, :, q0:q1], lse[:, :, q0:q1] = merge_attention_states(
                acc[:, :, q0:q1], lse[:, :, q0:q1], o.float() + res.float() if sixteen else o,
                (lse2 if shift is None else lse2 + shift) * LN2)  # the kernels' base 2, in natural log
        clock.computed()
        _wait(pending)
        clock.waited(s)
        kv = arriving
    if sinks is not None:  # a term of value 0 and log-sum-exp sinks[h] in every row of head h
        acc, lse = merge_attention_states(acc, lse, torch.zeros_like(acc), sinks[:, None].expand(lse.shape))
    lse = lse * LOG2E                                                      # (B, Hq, T) base 2, as the kernels'
    out = acc.to(q.dtype)
    res = (acc - out.float()).to(q.dtype) if sixteen else None             # what rounding out dropped
    return out, lse, res


def ring_backward(do, dlse, q, k, v, out, res, lse, ring, scale, on_step=None, sinks=None):
    """The backward ring: (dq, dk, dv) like q, k, v, and the sinks' gradient (Hq,) fp32, the same
    on every rank (None without sinks). do like out; dlse, the gradient of the base-2 lse, or
    None. Every piece runs the flash backward with the global out and lse (the sinks in it); dq
    sums locally and each block's dk, dv sum (fp32) as they travel with it, then go home."""
    B, Hkv, T, D = k.shape
    dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device)        # (B, Hq, T, D)
    kv = torch.stack([k, v])                                               # (2, B, Hkv, T, D)
    last = ring.steps - 1
    outgoing = []  # the previous step's sum on its way to rank r+1
    for s in range(ring.steps):
        clock = _Clock(on_step, q)
        src_T = ring.lengths[ring.source(s)]
        # from rank r-1, in the order it sends them: its sum for this step's block (sent after its
        # compute of step s-1), then the next block (sent as its step s began)
        incoming = kv.new_empty(2, B, Hkv, src_T, D, dtype=torch.float32) if s > 0 else None
        arriving = kv.new_empty(2, B, Hkv, ring.lengths[ring.source(s + 1)], D) if s < last else None
        pending = ring.start(sends=[(kv, 1, 2 * s)] if s < last else [],
                             recvs=([(incoming, -1, 2 * s - 1)] if s > 0 else [])
                             + ([(arriving, -1, 2 * s)] if s < last else []))
        mine = torch.zeros(2, B, Hkv, src_T, D, dtype=torch.float32, device=q.device)  # this rank's part
        for piece in ring.plan[s]:
            q0, q1, k0, k1 = piece[:4]
            variant, shift = _piece_variant(ring, s, piece)
            rows = lambda x: x[:, :, q0:q1]
            piece_lse = rows(lse) if shift is None else rows(lse) - shift  # what the kernel's logits are relative to
            dq_p, dk_p, dv_p = _flash_backward(
                rows(q), kv[0, :, :, k0:k1], kv[1, :, :, k0:k1], rows(out), None if res is None else rows(res),
                piece_lse.contiguous(), rows(do), None if dlse is None else rows(dlse).contiguous(), variant, scale)
            dq[:, :, q0:q1] += dq_p.float()
            mine[0, :, :, k0:k1] += dk_p.float()
            mine[1, :, :, k0:k1] += dv_p.float()
        clock.computed()
        _wait(pending)
        total = mine if s == 0 else incoming.add_(mine)  # block b sums ranks b, b+1, ... in that order
        _wait(outgoing)
        if s < last:
            outgoing, sending = ring.start(sends=[(total, 1, 2 * s + 1)]), total  # held until sent
        elif last > 0:  # home: the block held last is rank r-last's; this rank's comes from r+last
            home = torch.empty(2, B, Hkv, T, D, dtype=torch.float32, device=q.device)
            _wait(ring.start(sends=[(total, -last, 2 * s + 1)], recvs=[(home, last, 2 * s + 1)]))
            total = home
        clock.waited(s)
        kv = arriving
    dsinks = None
    if sinks is not None:  # -sum over rows of P_sink * delta (`flash.sink_gradient`), each rank its rows, then all
        o32 = out.float() if res is None else out.float() + res.float()   # the fp32 output the forward merged
        delta = (do.float() * o32).sum(-1)                                 # (B, Hq, T)
        if dlse is not None:
            delta = delta - dlse * LOG2E                                   # natural units, as the kernels' delta
        dsinks = _sum_over_ranks(sink_gradient(sinks, lse, delta), ring)   # (Hq,)
    return dq.to(q.dtype), total[0].to(k.dtype), total[1].to(v.dtype), dsinks


class _Clock:
    """Times a step's compute and its wait for messages, for benchmarks.ring; reads no clock when
    nobody listens. On a GPU it synchronizes the compute stream first, so the times are the work's,
    not the launches'; only that stream, not the device: NCCL moves the step's messages on a stream
    of its own, which a device-wide synchronize would wait for inside "compute", leaving the wait 0.
    After `_wait`, the compute stream waits on NCCL's, so the second read includes the transfer."""

    def __init__(self, on_step, q):
        self.on_step, self.cuda = on_step, q.is_cuda
        if on_step:
            self.stream = torch.cuda.current_stream(q.device) if self.cuda else None
            self.start = self._now()

    def _now(self):
        if self.cuda:
            self.stream.synchronize()
        return time.perf_counter()

    def computed(self):
        if self.on_step:
            self.compute_end = self._now()

    def waited(self, step):
        if self.on_step:
            end = self._now()
            self.on_step(step, self.compute_end - self.start, end - self.compute_end)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sinks, ring, scale):
        out, lse, res = ring_forward(q, k, v, ring, scale, sinks=sinks)
        ctx.save_for_backward(q, k, v, out, res, lse, sinks)
        ctx.ring, ctx.scale = ring, scale
        ctx.set_materialize_grads(False)
        return out, lse * LN2                                              # natural log, as flash_attention's

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, res, lse, sinks = ctx.saved_tensors
        do = torch.zeros_like(out) if do is None else do
        dlse2 = None if dlse is None else dlse * LN2                       # d/d(lse2) = d/d(lse) * ln 2
        dq, dk, dv, dsinks = ring_backward(do, dlse2, q, k, v, out, res, lse, ctx.ring, ctx.scale, sinks=sinks)
        return dq, dk, dv, dsinks, None, None


# ----------------------------------------------------------------------------- checks


def _check_packed(q, k, v, cu_seqlens):
    """A packed batch's rows as a batch of one, (1, H, total_local, D) views, and its sequences'
    lengths from cu_seqlens (the whole batch's offsets, read on the host)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ValueError(f"{name} must be a 3-dimensional tensor (total_local, H, D), this rank's rows of the "
                             f"packed batch, got {tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype != torch.int32 or cu_seqlens.dim() != 1 \
            or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor of B + 1 >= 2 offsets (the whole batch's, the same on "
                         f"every rank), got {cu_seqlens!r}")
    offsets = cu_seqlens.tolist()
    if offsets[0] != 0 or any(b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"cu_seqlens must start at 0 and never decrease, got {offsets[:8]}")
    as_batch = lambda t: t.transpose(0, 1)[None]                           # (1, H, total_local, D)
    return as_batch(q), as_batch(k), as_batch(v), _lengths(offsets)


def _check_dense_split(held, split, world, layout):
    """The ranks' rows of one sequence, `held`, must be `split([T])` for some T. When they are not,
    name a rank that differs from the split of a T that the most ranks agree with, a rank short of
    rows before one with too many (the sum of the rows is the wrong T to compare with: a short
    rank makes it short too, and the message blamed a rank that held the right rows)."""
    T = sum(held)
    if split([T]) == held:
        return
    wrong = lambda T: [r for r in range(world) if split([T])[r] != held[r]]
    candidates = range(max(world, T - 2 * world), T + 2 * world + 1)
    fewest = min(len(wrong(t)) for t in candidates)
    best = [t for t in candidates if len(wrong(t)) == fewest]
    short = [t for t in best if all(held[r] < split([t])[r] for r in wrong(t))]  # the likelier slip: rows missing
    r = wrong((short or best)[0])[0]
    best = [t for t in (short or best) if wrong(t)[0] == r]
    gives = " or ".join(str(n) for n in sorted({split([t])[r] for t in best}))
    raise ValueError(f"ring_attention: rank {r} of {world} holds {held[r]} rows, but the {layout!r} layout gives "
                     f"it {gives} of a sequence of T={' or '.join(map(str, best))}, the split the other ranks' rows "
                     f"fit (as shard_sequence does; the ranks hold {', '.join(map(str, held))})")


def _values(t):
    """A small tensor's shape and values, to compare the ranks' arguments (NaN equal to NaN), or None."""
    if t is None:
        return None
    return tuple(t.shape), tuple("nan" if math.isnan(x) else x for x in t.detach().flatten().tolist())


def _agree(q, k, v, scale, causal, window, layout, group, cu_seqlens=None, softcap=None, sinks=None,
           alibi_slopes=None, dropout_p=0.0, dropout_seed=None, entry="ring_attention"):
    """Check the arguments on this rank, then gather every rank's verdict and metadata, so that
    all ranks raise the same error, or none does. Returns (q, k, v, scale, ring), q, k and v as
    (B, H, T_local, D) (a packed batch, with cu_seqlens: a batch of one), what models add in
    `ring.variant` (softcap, sinks and alibi_slopes as the kernels take them)."""
    rank, world = _rank_world(group)
    problem, meta = None, None
    try:
        lengths = None
        if cu_seqlens is not None:
            q, k, v, lengths = _check_packed(q, k, v, cu_seqlens)
            if q.shape[2] == 0:
                raise ValueError(f"this rank holds no rows: {layout!r} splits each sequence (lengths "
                                 f"{lengths[:8]}{' ...' if len(lengths) > 8 else ''}) over {world} ranks, and none "
                                 "is long enough to give it one; every rank must hold a row")
        q, k, v, scale = check_inputs(q, k, v, scale)
        check_causal(causal)
        left, right = window_bounds(window, causal)
        _check_layout(layout)
        if k.shape[2] != q.shape[2]:
            raise ValueError(f"q and k must hold the same rows of one sequence (self-attention, sharded), got "
                             f"q T_local={q.shape[2]}, k T_local={k.shape[2]}")
        B, Hq, T, D = q.shape
        sequences = B if lengths is None else len(lengths)  # (B, Hq) slopes: per batch row, or per packed sequence
        softcap, sinks, slopes = check_mods(q, softcap, sinks, alibi_slopes, batch=sequences)
        dropout_p, seed = check_dropout(dropout_p, 0 if dropout_seed is None else dropout_seed)  # draws no seed
        drawn = draw_seed() if dropout_p > 0 and dropout_seed is None else seed  # rank 0's is the call's
        meta = dict(dropout=(dropout_p, None if dropout_seed is None else seed),  # a seed given: the same everywhere
                    T_local=T, B=B, Hq=Hq, Hkv=k.shape[1], D=D, dtype=_dtype_name(q.dtype),
                    device=q.device.type, scale=scale, causal=causal, window=(left, right), layout=layout,
                    sequences=lengths, softcap=softcap, sinks=_values(sinks), alibi_slopes=_values(slopes),
                    gradients=torch.is_grad_enabled()  # a backward runs the ring again: all ranks or none
                    and any(t is not None and t.requires_grad for t in (q, k, v, sinks)), drawn_seed=drawn)
    except (TypeError, ValueError) as e:
        problem = (type(e).__name__, str(e))
    gathered = [None] * world
    dist.all_gather_object(gathered, (problem, meta), group=group)
    for r, (p, _) in enumerate(gathered):
        if p is not None:
            raise (TypeError if p[0] == "TypeError" else ValueError)(f"ring_attention: rank {r} of {world}: {p[1]}")
    metas = [m for _, m in gathered]
    for name in metas[0]:
        if name not in ("T_local", "drawn_seed") and any(m[name] != metas[0][name] for m in metas):
            values = ", ".join(f"rank {r}: {m[name]!r}" for r, m in enumerate(metas))
            raise ValueError(f"ring_attention: every rank must pass the same {name}, got {values}")
    held = [m["T_local"] for m in metas]
    split = lambda lengths: [sum(z - a for _, a, z in _segments(lengths, world, r, layout)) for r in range(world)]
    if lengths is None:  # T is not passed: the ranks' rows add up to it, unless some rank is short or long
        _check_dense_split(held, split, world, layout)
        lengths = [sum(held)]
    expected = split(lengths)
    for r in range(world):
        if held[r] != expected[r]:
            raise ValueError(f"ring_attention: rank {r} of {world} holds {held[r]} rows, but the {layout!r} layout "
                             f"splits sequences of {lengths} into {', '.join(map(str, expected))} rows per rank (as "
                             f"shard_sequence does; the ranks hold {', '.join(map(str, held))})")
    variant = Variant(softcap=softcap, sinks=sinks, alibi_slopes=slopes, dropout_p=dropout_p,
                      seed=metas[0]["drawn_seed"])  # every rank drops with rank 0's seed
    ring = Ring(group, rank, world, lengths, layout, left, right, variant, cu_seqlens is not None)
    ring.Hq = q.shape[1]
    return q, k, v, scale, ring


# ----------------------------------------------------------------------------- public


def ring_attention(q, k, v, group=None, causal=True, scale=None, window=None, layout="zigzag", return_lse=False,
                   softcap=None, sinks=None, alibi_slopes=None, dropout_p=0.0, dropout_seed=None):
    """Attention over one sequence whose rows are split across the ranks of `group` (context
    parallelism), forward and backward: each rank passes its shard, q (B, Hq, T_local, D) and k, v
    (B, Hkv, T_local, D), as `shard_sequence(x, layout=layout, dim=2)` cuts them, and gets its
    rows of the output (and with `return_lse` their log-sum-exp, (B, Hq, T_local) fp32, natural
    log, differentiable): what `flash_attention` gives those rows of the whole sequence, to
    rounding (the tests hold both to the same rule).

    causal, scale, window: as in `flash_attention`, over global positions (Tq = Tk, so causal is
    query i seeing keys j <= i). softcap, sinks (Hq,) and alibi_slopes (Hq,) or (B, Hq): as in
    `flash_attention`, ALiBi's distances between global positions; the sinks' gradient is the
    whole sequence's, the same on every rank, and the log-sum-exp includes the sink. dropout_p,
    dropout_seed: as in `flash_attention`, the same weights dropped as one process drops for the
    seed (each piece's draws keyed by global positions); without a seed, rank 0's draw from
    torch's generator serves every rank. layout: "zigzag"
    (rank r holds chunks r and 2W-1-r of 2W: causal work is balanced) or "contiguous" (rank r
    the r-th of W slices: for full attention, or a window). Every rank must call it with the
    same arguments (sinks and slopes of the same values); a mismatch or a bad input on one rank
    raises a ValueError naming the rank on all of them. GQA: Hq a multiple of Hkv. Runs on any
    backend with point-to-point messages: gloo on CPU tensors (under Triton's interpreter), NCCL
    on GPUs.
    """
    q, k, v = autocast_inputs(q, k, v)
    q, k, v, scale, ring = _agree(q, k, v, scale, causal, window, layout, group, None, softcap, sinks, alibi_slopes,
                                  dropout_p, dropout_seed)
    out, lse = _RingAttention.apply(q, k, v, ring.variant.sinks, ring, scale)
    return (out, lse) if return_lse else out


def ring_attention_varlen(q, k, v, cu_seqlens, group=None, causal=True, scale=None, window=None, layout="zigzag",
                          return_lse=False, softcap=None, sinks=None, alibi_slopes=None, dropout_p=0.0,
                          dropout_seed=None):
    """`ring_attention` over a packed batch of sequences of different lengths, none seeing another
    (`flash_attention_varlen`'s layout), each sequence split across the ranks on its own: q
    (total_local, Hq, D) and k, v (total_local, Hkv, D) are this rank's rows of every sequence,
    as `shard_sequence(x, dim=0, cu_seqlens=cu_seqlens, layout=layout)` cuts them; cu_seqlens
    is the whole batch's offsets (int32 (B + 1,), the same on every rank; read on the host).
    Returns this rank's rows of the output, (total_local, Hq, D), and with `return_lse` their
    log-sum-exp, (Hq, total_local). Every rank must hold at least one row. softcap, sinks,
    alibi_slopes ((Hq,), or (B, Hq): per sequence), dropout_p, dropout_seed: as in
    `ring_attention`. A kernel call per sequence and piece: for many short sequences, launches
    add up.
    """
    q, k, v = autocast_inputs(q, k, v)
    q, k, v, scale, ring = _agree(q, k, v, scale, causal, window, layout, group, cu_seqlens, softcap, sinks,
                                  alibi_slopes, dropout_p, dropout_seed, entry="ring_attention_varlen")
    out, lse = _RingAttention.apply(q, k, v, ring.variant.sinks, ring, scale)  # (1, Hq, total_local, D), (1, Hq, ..)
    out = out[0].transpose(0, 1)                                           # (total_local, Hq, D)
    return (out, lse[0]) if return_lse else out
