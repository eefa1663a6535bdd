"""
Ring attention across processes (`kernels.distributed`): how long each ring step computes and
how long it then waits for its messages, and a tiny GPT trained with its sequence split across
ranks against the same GPT in one process.

    python -m attention_kernels.benchmarks.ring                         # the CPU: 2 gloo processes on loopback, interpreter
    python -m attention_kernels.benchmarks.ring --world 4 -T 96 --layout contiguous
    python -m attention_kernels.benchmarks.ring --train                 # the tiny GPT on 2 ranks, and in one process
    torchrun --nproc-per-node 8 -m attention_kernels.benchmarks.ring -B 1 -H 32 --kv-heads 8 -D 128 -T 131072 --dtype bf16

Without torchrun it starts --world processes itself, meeting through a file: gloo on CPU tensors
under Triton's interpreter, on the loopback interface, without a GPU; NCCL, one GPU each, with
GPUs. Under torchrun (RANK and WORLD_SIZE set) each process is one rank: NCCL on
its GPU (LOCAL_RANK), gloo on the CPU.

Timing: every rank shards nothing, it draws its own (B, H, T/W, D) q and (B, Hkv, T/W, D) k, v,
then runs the forward ring and the backward ring --repeat times after one warm-up, and reads the
clock at each step (on a GPU after synchronizing the compute stream, not NCCL's): compute_ms, the
step's kernels (and merge), and wait_ms, the time after them until the step's messages are done,
which is the communication compute did not hide. Whole calls are timed on --repeat more runs
without the step clock. Apart from attention it times a ring exchange alone (each rank sends a K/V
block to the next, receives one from the previous; then the backward's fp32 dK/dV block): what a
step would cost if nothing overlapped. The model in docs/distributed.md: a step takes max(compute,
transfer) once both overlap, so communication is free while a step's compute outlasts moving a
block. Printed on rank 0, and written to --out (default runs/ring-<time>/): ring.csv (schema in
CSV_FIELDS: one row per mode x rank x step, and the exchanges and whole calls) and log.txt.

Training (--train): `benchmarks.tinygpt`'s GPT, its attention swapped for `ring_attention` (the
same weights), every batch's sequence split with `shard_sequence` (zigzag) and position ids with
`shard_positions`; each rank's loss sums its own tokens over all B * T, the gradients are summed
across ranks (all_reduce), so every rank takes the same AdamW step as one process would. Rank 0
then trains the same model from the same weights on the same batches in one process (flash, and
the reference, tinygpt's baseline) and compares the losses at every step: it exits 1 if the ring
leaves the reference by more than tinygpt's TOLERANCE (1e-3 nats in fp32).
"""

import argparse
import csv
import datetime
import math
import os
import shlex
import shutil
import socket
import sys
import tempfile
import time
import traceback

import torch

from .impls import DEVICE  # first: sets up the interpreter on a CPU

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from attention_kernels.kernels.distributed import (_agree, ring_attention, ring_backward, ring_forward,  # noqa: E402
                                                   shard_positions, shard_segments, shard_sequence)
from attention_kernels.kernels.module import CausalSelfAttention  # noqa: E402
from .measure import quantiles  # noqa: E402
from .sweep import DTYPES, environment, positive, run_log  # noqa: E402

CSV_FIELDS = ["mode", "backend", "world", "rank", "step", "layout", "causal", "window_left", "B", "H", "Hkv", "T", "D",
              "dtype", "pieces", "bytes", "ms_p20", "ms_p50", "ms_p80", "wait_ms_p50", "device", "torch", "triton",
              "commit", "timestamp"]
CPU_NOTE = ("NOTE: no CUDA GPU: gloo between processes on this machine's loopback, the kernels under Triton's CPU "
            "interpreter (numpy, a program at a time) and the link in memory, so these figures show the ring's flow "
            "and its balance, not GPU speed.")

# ----------------------------------------------------------------------------- processes


def loopback():
    """The loopback interface's name (lo on Linux, lo0 on macOS): gloo binds there, so spawned
    ranks talk to nothing outside this machine."""
    names = [name for _, name in socket.if_nameindex()]
    return next((n for n in ("lo", "lo0") if n in names), names[0])


def _child(fn, rank, world, rendezvous, backend, timeout_s, args):
    os.environ["GLOO_SOCKET_IFNAME"] = loopback()
    if backend == "nccl":
        torch.cuda.set_device(rank)
    else:  # one process per core at most: OpenMP threads fighting over shared cores only cost time
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    out = os.path.join(rendezvous, f"result-{rank}.pt")
    try:
        dist.init_process_group(backend, init_method=f"file://{os.path.join(rendezvous, 'store')}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
        result = fn(rank, world, *args)
        torch.save({"result": result}, out)
        dist.barrier()  # no rank tears its connections down while another may still use them
    except BaseException:
        torch.save({"error": traceback.format_exc()}, out)
        sys.stdout.flush()
        os._exit(1)  # a peer may still wait in a collective: do not wait for it at exit
    dist.destroy_process_group()


class Spawned:
    """`world` processes, each running fn(rank, world, *args) in a process group of its own
    (`backend`, collectives timing out after timeout_s), started at once; `join` waits for them
    at most `deadline_s` and returns what fn returned on each rank, or raises with every failed
    rank's traceback. Nothing outlives the deadline, or a rank's failure: the rest are killed."""

    def __init__(self, fn, world, args=(), backend="gloo", timeout_s=60):
        self.dir = tempfile.mkdtemp(prefix="ring-")
        ctx = mp.get_context("spawn")
        self.procs = [ctx.Process(target=_child, args=(fn, r, world, self.dir, backend, timeout_s, args))
                      for r in range(world)]
        for p in self.procs:
            p.start()

    def join(self, deadline_s=None):
        end = math.inf if deadline_s is None else time.monotonic() + deadline_s
        try:
            # a rank that failed leaves the others waiting in a collective until their timeout:
            # stop them at once instead
            while any(p.is_alive() for p in self.procs) and time.monotonic() < end:
                if any(p.exitcode not in (None, 0) for p in self.procs):
                    break
                time.sleep(0.05)
            late = [r for r, p in enumerate(self.procs) if p.is_alive()]
            timed_out = bool(late) and time.monotonic() >= end
            for p in self.procs:
                if p.is_alive():
                    p.kill()
                    p.join()
            results, errors = [], []
            for r, p in enumerate(self.procs):
                path = os.path.join(self.dir, f"result-{r}.pt")
                saved = torch.load(path, weights_only=False) if os.path.exists(path) else {}
                if "error" in saved:
                    errors.append(f"rank {r}:\n{saved['error']}")
                elif "result" not in saved:
                    errors.append(f"rank {r}: " + ("stopped" if r in late else f"exit code {p.exitcode}, no result"))
                results.append(saved.get("result"))
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
        if errors:
            deadline = f" (ranks {late} were still running at the {deadline_s} s deadline)" if timed_out else ""
            raise RuntimeError(f"{len(errors)} of {len(self.procs)} ranks failed{deadline}:\n" + "\n".join(errors))
        return results


def run_ranks(fn, world, args=(), timeout_s=600):
    """fn(rank, world, *args) on every rank: in this process under torchrun, else in `world`
    spawned ones. Returns rank 0's result (None on other torchrun ranks)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun: this process is one rank
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
        try:
            return fn(dist.get_rank(), dist.get_world_size(), *args)
        finally:
            dist.destroy_process_group()
    if torch.cuda.is_available() and torch.cuda.device_count() < world:
        raise SystemExit(f"--world {world} starts one process per GPU, and there are {torch.cuda.device_count()}: "
                         "pass a smaller --world (or run under torchrun)")
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    return Spawned(fn, world, args, backend, timeout_s).join()[0]


def _device():
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


# ----------------------------------------------------------------------------- timing


def _quantiles(times):
    """(p20, p50, p80) milliseconds of times in seconds."""
    return quantiles([t * 1e3 for t in times])


def _now(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench(rank, world, opts):
    """One rank's timings: a list of row dicts (see CSV_FIELDS), gathered to every rank."""
    device = _device()
    dtype = DTYPES[opts["dtype"]]
    g = torch.Generator(device).manual_seed(1000 + rank)
    T_local = sum(z - a for a, z in shard_segments(opts["T"], world, rank, opts["layout"]))
    B, H, Hkv, D = opts["B"], opts["H"], opts["Hkv"], opts["D"]
    q = torch.randn(B, H, T_local, D, generator=g, device=device, dtype=dtype)
    k, v = (torch.randn(B, Hkv, T_local, D, generator=g, device=device, dtype=dtype) for _ in range(2))
    do = torch.randn(q.shape, generator=g, device=device, dtype=dtype)
    window = None if opts["window"] is None else (opts["window"], 0 if opts["causal"] else opts["window"])
    q, k, v, scale, ring = _agree(q, k, v, None, opts["causal"], window, opts["layout"], None)

    steps = {}  # (mode, step) -> [(compute_s, wait_s)]
    record = lambda mode: (lambda s, c, w: steps.setdefault((mode, s), []).append((c, w)))
    calls = {"fwd-call": [], "bwd-call": []}
    # the first rep is a warm-up (compiles on a GPU); then --repeat reps read the clock at every step,
    # and --repeat more time whole calls without it (on a GPU the step clock synchronizes 3 times a step)
    for rep in range(2 * opts["repeat"] + 1):
        stepped = 1 <= rep <= opts["repeat"]
        dist.barrier()
        t0 = _now(device)
        out, lse, res = ring_forward(q, k, v, ring, scale, on_step=record("fwd") if stepped else None)
        t1 = _now(device)
        ring_backward(do, None, q, k, v, out, res, lse, ring, scale, on_step=record("bwd") if stepped else None)
        t2 = _now(device)
        if rep > opts["repeat"]:
            calls["fwd-call"].append(t1 - t0)
            calls["bwd-call"].append(t2 - t1)

    exchanges = {}  # a ring step's messages alone: the next K/V block, and the backward's fp32 dK/dV sums
    if world > 1:
        kv = torch.stack([k, v])
        for mode, block in (("send-kv", kv), ("send-dkv", kv.float())):
            arriving = block.new_empty(2, B, Hkv, ring.lengths[ring.source(1)], D)
            times = []
            for rep in range(opts["repeat"] + 1):
                dist.barrier()
                t0 = _now(device)
                for work in ring.start(sends=[(block, 1, 0)], recvs=[(arriving, -1, 0)]):
                    work.wait()
                if rep:
                    times.append(_now(device) - t0)
            exchanges[mode] = (times, block.numel() * block.element_size())

    base = dict(backend=dist.get_backend(), world=world, rank=rank, layout=opts["layout"], causal=opts["causal"],
                window_left=opts["window"], B=B, H=H, Hkv=Hkv, T=opts["T"], D=D, dtype=opts["dtype"])
    rows = []
    for (mode, s), times in sorted(steps.items()):
        p20, p50, p80 = _quantiles([c for c, _ in times])
        rows.append(dict(base, mode=mode, step=s, pieces=len(ring.plan[s]), ms_p20=p20, ms_p50=p50, ms_p80=p80,
                         wait_ms_p50=_quantiles([w for _, w in times])[1]))
    for mode, times in calls.items():
        rows.append(dict(base, mode=mode, **dict(zip(("ms_p20", "ms_p50", "ms_p80"), _quantiles(times)))))
    for mode, (times, size) in exchanges.items():
        rows.append(dict(base, mode=mode, bytes=size, **dict(zip(("ms_p20", "ms_p50", "ms_p80"), _quantiles(times)))))
    everyone = [None] * world
    dist.all_gather_object(everyone, rows)
    return [row for rank_rows in everyone for row in rank_rows]


def report(rows, opts, out_dir, command):
    """Rank 0: the table of steps, the exchanges and the calls; ring.csv and log.txt."""
    say = run_log(out_dir)
    env = environment()
    if DEVICE == "cuda":
        env["device"] = f"{torch.cuda.get_device_name()} x {rows[0]['world']}"
    say(f"ring benchmark on {env['device']}, {rows[0]['backend']}: torch {env['torch']}, triton {env['triton']}, "
        f"commit {env['commit']}")
    say(f"command: {command}")
    o = opts
    window = "" if o["window"] is None else f", window {o['window']}"
    say(f"world {rows[0]['world']}, layout {o['layout']}, {'causal' if o['causal'] else 'full'}{window}: B={o['B']} "
        f"H={o['H']} Hkv={o['Hkv']} T={o['T']} D={o['D']} {o['dtype']}, {o['repeat']} repeats after a warm-up")
    if DEVICE == "cpu":
        say(CPU_NOTE)
    world = rows[0]["world"]
    say()
    say(f"{'mode':6}{'step':>5}{'pieces':>8}  {'compute ms, rank 0 .. W-1':>{12 * world}}{'wait ms, max':>14}")
    for mode in ("fwd", "bwd"):
        steps = sorted({r["step"] for r in rows if r["mode"] == mode})
        for s in steps:
            here = sorted((r for r in rows if r["mode"] == mode and r["step"] == s), key=lambda r: r["rank"])
            say(f"{mode:6}{s:>5}{max(r['pieces'] for r in here):>8}  "
                + "".join(f"{r['ms_p50']:>12.4g}" for r in here)
                + f"{max(r['wait_ms_p50'] for r in here):>14.4g}")
        per_rank = [sum(r["ms_p50"] for r in rows if r["mode"] == mode and r["rank"] == k) for k in range(world)]
        say(f"{mode:6}{'sum':>5}{'':>8}  " + "".join(f"{x:>12.4g}" for x in per_rank)
            + f"   (max/min {max(per_rank) / max(min(per_rank), 1e-12):.2f})")
    say()
    for mode in ("fwd-call", "bwd-call", "send-kv", "send-dkv"):
        here = [r for r in rows if r["mode"] == mode]
        if not here:
            continue
        worst = max(here, key=lambda r: r["ms_p50"])
        size = f", {worst['bytes'] / 1e6:.3g} MB a block, {worst['bytes'] / worst['ms_p50'] / 1e3:.3g} MB/s" \
            if worst.get("bytes") else ""
        say(f"{mode:9} {worst['ms_p50']:10.4g} ms p50 (slowest rank {worst['rank']}){size}")
    if DEVICE == "cpu":
        say(CPU_NOTE)
    path = os.path.join(out_dir, "ring.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in {**row, **env}.items()
                             if k in CSV_FIELDS})
    say(f"wrote {path} ({len(rows)} rows) and {os.path.join(out_dir, 'log.txt')}")
    say.close()


def bench_rank(rank, world, opts, out_dir, command):
    rows = bench(rank, world, opts)
    if rank == 0:
        report(rows, opts, out_dir, command)
    return rows


# ----------------------------------------------------------------------------- training


class RingSelfAttention(CausalSelfAttention):
    """nanoGPT's attention module (the same parameters), its attention step `ring_attention` over
    the sequence's shards: x is this rank's (B, T_local, C) rows, in the layout's order."""

    def __init__(self, *args, layout="zigzag", group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.layout, self.group = layout, group

    def forward(self, x, cache=None):  # a TinyGPT block passes its cache along
        if cache is not None:
            raise ValueError("RingSelfAttention is for training: it has no KV cache for generation")
        return super().forward(x)

    def attend(self, q, k, v):
        return ring_attention(q, k, v, group=self.group, layout=self.layout)  # (B, H, T_local, D)


def ring_model(model, cfg, layout="zigzag", group=None):
    """A TinyGPT's attention modules swapped for RingSelfAttention with the same weights, in place."""
    for block in model.h:
        ring = RingSelfAttention(cfg.C, cfg.heads, bias=False, layout=layout, group=group)
        ring.load_state_dict(block.attn.state_dict())
        block.attn = ring
    return model


def sharded_loss(model, idx, targets, positions, tokens):
    """TinyGPT's forward on this rank's rows: idx, targets (B, T_local) at global `positions`;
    the cross-entropy summed over them, divided by the whole batch's `tokens`, so that the
    ranks' losses (and gradients) add up to the one-process mean."""
    logits, _ = model(idx, positions=positions)                           # (B, T_local, vocab)
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="sum") / tokens


def train_ring(rank, world, cfg, seed, layout="zigzag"):
    """Train tinygpt's model with every sequence split across the ranks; the losses per step
    (the whole batch's mean, the same on every rank)."""
    from . import tinygpt
    text, alphabet = tinygpt.load_text()
    data = tinygpt.encode(text, alphabet)
    torch.manual_seed(seed)
    model = tinygpt.TinyGPT(len(alphabet), cfg, "reference")               # the weights tinygpt starts from
    offsets = tinygpt.batch_offsets(len(data), cfg, seed)
    model = ring_model(model, cfg, layout).to(DEVICE)
    optimizer = tinygpt.adamw(model, cfg)
    positions = shard_positions(cfg.T, layout=layout, device=DEVICE)       # (T_local,)
    losses = []
    for i in range(cfg.steps):
        tinygpt.set_lr(optimizer, cfg, i)
        x, y = tinygpt.get_batch(data, offsets[i], cfg.T)                  # (B, T) each, the whole sequences
        x, y = shard_sequence(x, layout=layout), shard_sequence(y, layout=layout)  # (B, T_local)
        loss = sharded_loss(model, x, y, positions, cfg.B * cfg.T)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        for p in model.parameters():  # the whole sequence's gradient: the sum of its shards'
            dist.all_reduce(p.grad)
        optimizer.step()
        total = loss.detach().clone()
        dist.all_reduce(total)                                             # the whole batch's mean
        losses.append(total.item())
    return losses


def train_single(cfg, seed, impls=("flash", "reference")):
    """The same training in one process (tinygpt.train): {impl: losses per step}."""
    from . import tinygpt
    text, alphabet = tinygpt.load_text()
    data = tinygpt.encode(text, alphabet)
    torch.manual_seed(seed)
    init = tinygpt.TinyGPT(len(alphabet), cfg, "reference").state_dict()
    offsets = tinygpt.batch_offsets(len(data), cfg, seed)
    return {impl: tinygpt.train(impl, cfg, len(alphabet), init, data, offsets)[1] for impl in impls}


def train_rank(rank, world, cfg, seed, out_dir, command):
    start = time.perf_counter()
    losses = train_ring(rank, world, cfg, seed)
    ring_s = time.perf_counter() - start
    if rank != 0:
        return None
    from .tinygpt import TOLERANCE, max_deviation
    single = train_single(cfg, seed)
    say = run_log(out_dir)
    say(f"command: {command}")
    say(f"tiny GPT, B={cfg.B} T={cfg.T} C={cfg.C} heads={cfg.heads} layers={cfg.layers} steps={cfg.steps} "
        f"lr={cfg.lr} fp32 seed={seed}: the sequence split over {world} ranks (zigzag, {dist.get_backend()}) "
        f"in {ring_s:.1f} s, against one process")
    say(f"{'step':>5}{'ring':>12}{'flash':>12}{'reference':>12}{'|ring - flash|':>16}{'|ring - ref|':>14}")
    for i, (a, b, c) in enumerate(zip(losses, single["flash"], single["reference"])):
        say(f"{i:>5}{a:>12.6f}{b:>12.6f}{c:>12.6f}{abs(a - b):>16.2e}{abs(a - c):>14.2e}")
    worst = {impl: max_deviation(losses, single[impl]) for impl in single}
    ok = worst["reference"] <= TOLERANCE["fp32"]
    say(f"max |ring - flash| {worst['flash']:.2e}, max |ring - reference| {worst['reference']:.2e} nats over "
        f"{cfg.steps} steps: {'within' if ok else 'OUTSIDE'} tinygpt's fp32 tolerance {TOLERANCE['fp32']:g}")
    say.close()
    return ok


# ----------------------------------------------------------------------------- command line


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", type=positive(int), default=2, help="processes to start (not under torchrun)")
    p.add_argument("--train", action="store_true", help="train the tiny GPT instead of timing")
    p.add_argument("-B", "--batch", type=positive(int), help="sequences (default 1; --train 2)")
    p.add_argument("-H", "--heads", type=positive(int), help="query heads (default 2; --train 1)")
    p.add_argument("--kv-heads", type=positive(int), help="k/v heads (default: --heads)")
    p.add_argument("-T", "--seqlen", type=positive(int), help="the whole sequence (default 64; --train 32)")
    p.add_argument("-D", "--head-dim", type=positive(int), default=16)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32", help="timing only (--train is fp32)")
    p.add_argument("--layout", choices=["zigzag", "contiguous"], default="zigzag")
    p.add_argument("--full", action="store_true", help="full attention instead of causal")
    p.add_argument("--window", type=positive(int), help="a sliding window of this many keys back (and ahead, --full)")
    p.add_argument("--repeat", type=positive(int), default=3, help="timed runs after a warm-up")
    p.add_argument("--layers", type=positive(int), default=2, help="--train: transformer blocks")
    p.add_argument("--steps", type=positive(int), default=10, help="--train: training steps")
    p.add_argument("--seed", type=int, default=0, help="--train: initial weights and batches")
    p.add_argument("--timeout", type=positive(int), default=600, help="seconds a collective may wait")
    p.add_argument("--out", help="output folder (default: runs/ring-<time>)")
    args = p.parse_args(argv)
    heads = args.heads or (1 if args.train else 2)
    kv_heads = args.kv_heads or heads
    if heads % kv_heads:
        p.error(f"--kv-heads {kv_heads} must divide --heads {heads} (grouped-query attention)")
    T = args.seqlen or (32 if args.train else 64)
    world = int(os.environ.get("WORLD_SIZE", args.world))
    if T < world:  # either layout gives every rank a row from T = W on (zigzag's second chunk may be empty)
        p.error(f"-T {T} is too short for {world} ranks: each needs at least one row")
    out = args.out or os.path.join("runs", "ring-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    command = shlex.join(["python", "-m", "attention_kernels.benchmarks.ring", *argv])
    if args.train:
        from .tinygpt import WARMUP, Config
        if args.steps <= WARMUP:
            p.error(f"--steps must be more than tinygpt's {WARMUP} warm-up steps, got {args.steps}")
        if kv_heads != heads:
            p.error("--train: tinygpt's model has no grouped heads; leave --kv-heads out")
        cfg = Config(B=args.batch or 2, T=T, C=heads * args.head_dim, heads=heads, layers=args.layers,
                     steps=args.steps, lr=1e-3)
        ok = run_ranks(train_rank, world, (cfg, args.seed, out, command), args.timeout)
        raise SystemExit(0 if ok in (True, None) else 1)
    opts = dict(B=args.batch or 1, H=heads, Hkv=kv_heads, T=T, D=args.head_dim, dtype=args.dtype,
                layout=args.layout, causal=not args.full, window=args.window, repeat=args.repeat)
    run_ranks(bench_rank, world, (opts, out, command), args.timeout)


if __name__ == "__main__":
    main()
