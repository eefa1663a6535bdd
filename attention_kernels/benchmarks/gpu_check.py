"""
The one prepared command for a short window on a GPU (an H200 lent for minutes): every kernel's
correctness first, then the flash kernels' tiles tuned, then timings against each backend of
torch's SDPA and FlexAttention, everything written to one folder as it happens.

    PYTHONPATH=. PYTHONUNBUFFERED=1 python -m attention_kernels.benchmarks.gpu_check --out $OUT   # on the GPU, <= 8 min
    python -m attention_kernels.benchmarks.gpu_check --out runs/gpu-check-cpu     # no GPU: tiny sizes, interpreter, ~1 min
    python -m attention_kernels.benchmarks.gpu_check --out DIR --quick            # fewer checks and shapes: a rerun

Phases, in order. Each runs in child processes (`--worker`, `gpu_check_child.py`),
every row within a time limit, so that a hang or an illegal memory access costs that row, not the
run: a child that dies, hangs or loses its CUDA context is killed, its row recorded as such, and
the rest run in a fresh child.
  0. ceilings     `measure.ceilings()`: bf16 8192^3 matmul TFLOP/s, device copy GB/s.
  1. correctness  each kernel at a few shapes against the reference under the project's rule
                  (`attention_kernels.testing`): flash bf16/fp16, D 64/128, causal and full, Tq != Tk, GQA,
                  a (B, T, H, D) layout, TMA on and off, forward and backward; packed batches; a
                  window; fused; decoding; a paged cache; bitwise-reproducible gradients; and a "peaky softmax"
                  case through flash (a check like the others) and SDPA's flash and efficient backends
                  (for comparison: their error / tolerance is reported, not counted). Outputs poisoned
                  with NaN. One tile per shape class (ATTENTION_KERNELS_AUTOTUNE=0). Several
                  children at once: they mostly compile.
  2. tuning       the shape classes the timings use (bf16, B*T = 16k tokens, H*D = 2048, T 2k to
                  16k, D 128 and 64, causal and full, the forward with and without TMA): every
                  candidate tile precompiled on all cores into Triton's cache, then each class
                  autotuned once (ATTENTION_KERNELS_AUTOTUNE=1) and its choice read back.
  3. timing       the rest of the budget, T = 8k first (the target): flash forward, backward and
                  both, with fused where its rows fit, then SDPA's cuDNN, flash and efficient
                  backends, each in its own child, the tuned tiles installed (`kernels.tuning.use`);
                  then flash with a soft-cap, with sinks and with dropout 0.1 on the target shape, beside plain
                  flash; then decoding (B 16, Hq 32 over Hkv 8, D 128, caches of 4k to 64k keys) against
                  SDPA, in GB/s, and at 16k keys through pools of pages of 16 and 256 beside it;
                  FlexAttention last (torch.compile, once per shape).
Without CUDA the same phases run at tiny sizes under Triton's interpreter, against SDPA math and
FlexAttention's eager forward; nothing is tuned (tuned.json is {}) but one candidate is
precompiled for sm_90, to prove that path; the log, the summary and each timing row's device say
that the timings mean nothing.

Budget: --budget seconds (480) for everything. The phases end by 8%, 33%, 68% and 100% of it
(less a few seconds for the summary), so time one leaves goes to the next; the precompile gets at
most 18%; each timing child a share of what is left in proportion to its expected cost. When time
runs out, a phase stops, its unfinished rows are recorded as skipped, and the run goes on to
write its files. It exits 0 when it got to the end (failed checks are in the files and the
summary), 2 on bad arguments.

Writes into --out (flat, as it goes): log.txt (everything printed), env.json (command, host,
device, versions, SMs, ceilings, phase times, the tuning's compile and cache figures),
correctness.csv (one row per check), timing.csv (one long-format row per implementation x shape
x mode, the sweep's columns plus the speed against each SDPA backend and FlexAttention on the same
row), tuned.json (the measured tiles, for `python -m attention_kernels.kernels.tuning merge DIR/tuned.json`) and
summary.md (the targets, measured / target / met, and the tables, ready for a results README). It
ends by printing the summary.
"""

import argparse
import collections
import concurrent.futures
import datetime
import json
import os
import platform
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import zlib

from .gpu_check_report import CPU_NOTE, Results, summarize

# The folder that holds this attention_kernels (a checkout, or site-packages): the children import the same one
HOME = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MODES = ("fwd", "bwd", "fwd+bwd")
MIN_START = 3.0  # seconds: a child started with less time than this before its deadline would only import
ENDS = {"ceilings": 0.08, "correctness": 0.33, "tuning": 0.68, "timing": 1.0}  # each phase's end, in budgets
TOKENS, WIDTH = 16384, 2048  # B * T and H * D of every timed shape on a GPU


# ----------------------------------------------------------------------------- the plan


def seed_of(*parts):
    """An explicit seed from a row's identity: every check and shape draws its own inputs, and
    every implementation timed on a shape draws the same ones."""
    return zlib.crc32(repr(parts).encode())


def plan(cuda, quick):
    """What each phase runs: the GPU's shapes, or tiny ones for the interpreter."""
    if cuda:
        # B * T = 16k tokens, H * D = 2048: the FlashAttention papers' shapes; T = 8k first (the target)
        order = [(8192, True), (8192, False), (2048, True), (4096, True), (16384, True)]
        shapes = [(TOKENS // T, WIDTH // D, T, D, causal)
                  for D in ((128,) if quick else (128, 64)) for T, causal in order]
        more_classes = [(T, D, False) for D in (128, 64) for T in (2048, 4096, 16384)]  # tuned for the table only
        return dict(cuda=True, dtype="bfloat16", shapes=shapes, lanes=max(1, min(8, (os.cpu_count() or 2) // 2)),
                    impls=["flash", "sdpa-cudnn", "sdpa-flash", "sdpa-efficient"], flex_shapes=shapes[:5],
                    decode=dict(B=16, Hq=32, Hkv=8, D=128, lengths=[4096, 16384, 65536]),
                    classes=[(T, D, c) for _, _, T, D, c in shapes] + ([] if quick else more_classes),
                    max_jobs=None, checks=correctness_checks(True, quick))
    shapes = [(2, 2, 32, 16, True)]
    return dict(cuda=False, dtype="bfloat16", shapes=shapes, lanes=2, impls=["flash", "sdpa-math"],
                flex_shapes=shapes[:1], decode=dict(B=2, Hq=4, Hkv=1, D=16, lengths=[32, 64]),
                classes=[(8192, 128, True)], max_jobs=1, checks=correctness_checks(False, quick))


def check_spec(cuda, kind, dtype, impl="flash", shape=None, causal=True, layout="contiguous", window=None, tma=None,
               label=None, tag="", **more):
    """One correctness check as a spec for the child; shape (B, Hq, Hkv, Tq, Tk, D), or a label
    for checks shaped otherwise."""
    mask = ("causal" if causal else "full") + (f" window{tuple(window)}" if window else "")
    dims = "B{}-H{}:{}-T{}x{}-D{}".format(*shape) if shape else label
    env = f"ATTENTION_KERNELS_TMA={tma}" if tma else ""
    ident = " ".join(filter(None, [kind, impl, dtype, dims, mask, layout, tag, env]))
    row = dict(table="correctness", check=ident, impl=impl, dtype=dtype, shape=dims, layout=layout, causal=causal,
               window=window or "", seed=seed_of(ident))
    return dict(id=ident, check=kind, impl=impl, dtype=dtype, shape=shape, causal=causal, layout=layout, window=window,
                tma=tma, seed=row["seed"], row=row, limit=150 if cuda else 60, **more)


def correctness_checks(cuda, quick):
    """The checks of phase 1, most important first."""
    def check(*args, **kwargs):
        return check_spec(cuda, *args, **kwargs)

    if cuda:
        low, D2, T, sizes = ("bfloat16", "float16"), (128, 64), 1027, (2, 8, 8)
        grid = [check("rule", dt, shape=[*sizes, T, T, D], causal=c) for dt in low for D in D2 for c in (True, False)]
        shapes = [check("rule", "bfloat16", shape=[1, 8, 8, 1000, 1500, 128]),
                  check("rule", "bfloat16", shape=[1, 8, 8, 1500, 1000, 128]),   # the first 500 rows see no key
                  check("rule", "bfloat16", shape=[2, 16, 4, 777, 777, 128]),    # grouped-query 4:1
                  check("rule", "bfloat16", shape=[2, 8, 8, T, T, 64], layout="bthd"),
                  check("rule", "float16", shape=[1, 4, 4, 1500, 1500, 64], window=[255, 0]),
                  check("rule", "bfloat16", shape=[2, 8, 8, T, T, 128], tma="0"),
                  check("rule", "bfloat16", shape=[2, 8, 8, T, T, 128], causal=False, tma="0")]
        others = [check("varlen", "bfloat16", "flash-varlen", lengths=[37, 1001, 513], heads=[8, 2], D=128,
                        label="lengths(37,1001,513)-H8:2-D128"),
                  check("rule", "bfloat16", "fused", shape=[2, 8, 8, 200, 200, 64]),
                  check("rule", "float16", "fused", shape=[2, 8, 2, 129, 129, 32], causal=False),
                  *[check("decode", "bfloat16", "decode", case=[3, 16, 4, Tq, 3000, 128, [3000, 1234, 17], None, None],
                          label=f"B3-H16:4-Tq{Tq}-cache3000(3000,1234,17)-D128") for Tq in (1, 4)],
                  check("paged", "bfloat16", "paged", case=[[1, 1, 300, 4], [3000, 1234, 300, 17], 16, 4, 128, 16,
                                                            None, None],
                        label="new(1,1,300,4)-keys(3000,1234,300,17)-H16:4-D128-page16"),
                  check("determinism", "bfloat16", shape=[2, 16, 4, 2048, 2048, 128])]
        seeds = range(2 if quick else 5)
    else:  # the interpreter: T <= 64, D 16 and 32, fp32 and fp16 (and bf16, which it runs upcast)
        low, D2, T = ("float32", "float16"), (16, 32), 37
        grid = [check("rule", dt, shape=[1, 2, 2, T, T, D], causal=c) for dt in low for D in D2 for c in (True, False)]
        shapes = [check("rule", "bfloat16", shape=[1, 2, 2, 40, 64, 32]),
                  check("rule", "bfloat16", shape=[1, 2, 2, 64, 40, 32]),
                  check("rule", "bfloat16", shape=[1, 4, 1, 33, 33, 16]),
                  check("rule", "bfloat16", shape=[1, 2, 2, T, T, 16], layout="bthd"),
                  check("rule", "float32", shape=[1, 2, 2, 64, 64, 16], window=[8, 0]),
                  check("rule", "float32", shape=[1, 2, 2, T, T, 32], tma="1"),  # the TMA path, under the interpreter
                  check("rule", "float32", shape=[1, 2, 2, T, T, 32], causal=False, tma="1")]
        others = [check("varlen", "float32", "flash-varlen", lengths=[5, 1, 33], heads=[4, 2], D=16,
                        label="lengths(5,1,33)-H4:2-D16"),
                  check("rule", "float32", "fused", shape=[1, 2, 2, 33, 33, 16]),
                  check("rule", "bfloat16", "fused", shape=[1, 2, 2, 33, 33, 16], causal=False),
                  *[check("decode", "float32", "decode", case=[2, 4, 1, Tq, 64, 16, [64, 17], None, None],
                          label=f"B2-H4:1-Tq{Tq}-cache64(64,17)-D16") for Tq in (1, 4)],
                  check("paged", "float32", "paged", case=[[1, 5, 2], [40, 16, 2], 4, 2, 16, 4, None, None],
                        label="new(1,5,2)-keys(40,16,2)-H4:2-D16-page4"),
                  check("determinism", "float32", shape=[1, 4, 2, 64, 64, 16])]
        seeds = range(1 if quick else 3)
    # bf16 scores ~16 (scale 2, D 64): the softmax puts nearly all weight on one key; does SDPA
    # share the gradient error the kernels have there?
    peaky = [check("peaky", "bfloat16", impl, shape=[1, 3, 1, 2, 2, 64], causal=False, scale=2.0, tag=f"seed {s}")
             for s in seeds for impl in ("flash", "sdpa-flash", "sdpa-efficient")]
    if quick:
        grid, shapes, others = grid[:2], shapes[2:3] + shapes[5:6], others[:2] + others[3:4] + others[-1:]
    return grid + shapes + others + peaky


def timing_units(p, tuned_path):
    """The timing phase's children, in order: one per implementation (flash also runs fused and,
    on the target shape, the determinism check), then decoding, then FlexAttention. Each spec is
    one row; `weight` is the child's expected seconds, which sets its share of the phase."""
    limit = 90 if p["cuda"] else 60

    def row_spec(impl, shape, mode, cost):
        B, H, T, D, causal = shape
        ident = f"{impl} {mode} B{B} H{H} T{T} D{D} {'causal' if causal else 'full'}"
        row = dict(table="timing", part="attention", impl=impl, B=B, H=H, Hkv=H, T=T, D=D, C=H * D, dtype=p["dtype"],
                   causal=causal, mode=mode)
        return dict(id=ident, kind="attention", impl=impl, B=B, H=H, T=T, D=D, dtype=p["dtype"], causal=causal,
                    mode=mode, seed=seed_of(B, H, T, D, causal, mode), tuned=tuned_path, row=row, shape_key=shape,
                    limit=cost if impl == "flex" else limit, cost=cost)

    units = []
    for impl in p["impls"]:
        specs = []
        for i, shape in enumerate(p["shapes"]):
            specs += [row_spec(impl, shape, mode, 1.0 if impl == "flash" else 0.5) for mode in MODES]
            if impl == "flash":
                specs += [row_spec("fused", shape, mode, 0.3) for mode in MODES]
                if i == 0:  # the target's backward must be reproducible bit for bit, with its tuned tiles
                    B, H, T, D, causal = shape
                    specs.append(dict(check_spec(p["cuda"], "determinism", p["dtype"], shape=[B, H, H, T, T, D],
                                                 causal=causal, tag="target"), kind="determinism", tuned=tuned_path,
                                      limit=limit, cost=1.0))
        units.append(dict(name=impl, kind="timing", specs=specs, weight=4 + sum(s["cost"] for s in specs)))
    # what models add, beside plain flash, on the first (target) shape: forward, and both
    mods = [row_spec(impl, p["shapes"][0], mode, 1.0) for impl in ("flash-softcap", "flash-sinks", "flash-dropout")
            for mode in ("fwd", "fwd+bwd")]
    units.append(dict(name="flash variants", kind="timing", specs=mods, weight=4 + sum(s["cost"] for s in mods)))
    d = p["decode"]
    decode = [dict(id=f"decode L{L}", kind="decode", L=L, dtype=p["dtype"], seed=seed_of("decode", L), limit=limit,
                   cost=2.0, row=dict(table="timing", part="decode", impl="decode", B=d["B"], H=d["Hq"], Hkv=d["Hkv"],
                                      T=L, D=d["D"], C=d["Hq"] * d["D"], dtype=p["dtype"], causal=True, mode="fwd"),
                   **d) for L in d["lengths"]]
    # the same decoding through a paged pool (pages of 16 and 256), at the middle length
    L = d["lengths"][len(d["lengths"]) // 2]
    decode.append(dict(decode[0], id=f"paged L{L}", kind="paged", L=L, pages=[16, 256], seed=seed_of("paged", L),
                       cost=3.0, row=dict(decode[0]["row"], part="paged", T=L)))
    units.append(dict(name="decode", kind="timing", specs=decode, weight=4 + sum(s["cost"] for s in decode)))
    # FlexAttention last: torch.compile takes tens of seconds per shape and mode. Its weight counts
    # the target's rows only (the others, like everyone's D = 64 rows, get what is left at the end),
    # or it would starve the children before it.
    flex = [row_spec("flex", shape, mode, 150 if p["cuda"] else 60) for shape in p["flex_shapes"] for mode in MODES]
    units.append(dict(name="flex", kind="timing", specs=flex, weight=4 + 40.0 * len(MODES)))
    return units


# ----------------------------------------------------------------------------- children


class Child:
    """One `--worker` process in its own process group (killing the group kills what it started:
    compile workers, torch.compile's), the specs on its stdin as JSON, its output read by a thread."""

    def __init__(self, kind, specs, env):
        self.proc = subprocess.Popen([sys.executable, "-m", "attention_kernels.benchmarks.gpu_check", "--worker", kind],
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, errors="replace", start_new_session=True)
        self.lines = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.proc.stdin.write(json.dumps(specs))
            self.proc.stdin.close()
        except BrokenPipeError:  # it died at start; its output says why
            pass

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def line(self, timeout):
        """The next line, "" if none came within `timeout` seconds, None once the child has exited."""
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            return ""

    def stop(self):
        """Kill the child's process group, whatever in it still runs (a child that exited stays a
        zombie, its id taken, until the wait), and return its exit code."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return self.proc.wait()


def unfinished(spec, status):
    """The row of a spec that did not finish, as the parent records it."""
    row = dict(spec["row"], status=status)
    if row["table"] == "correctness":
        row["passed"] = ""
    return row


def run_unit(unit, deadline, results, env):
    """Run a unit's specs in children until done or `deadline`: each spec within its own limit.
    A child that dies, hangs, or loses its CUDA context costs the spec it was on; the rest run in
    a fresh child."""
    pending = list(unit["specs"])
    by_id = {s["id"]: s for s in pending}
    while pending and time.time() < deadline - MIN_START:
        child = Child(unit["kind"], pending, env)
        current, started, ran, finished = None, 0.0, False, None
        tail = collections.deque(maxlen=3)
        while True:
            line, now = child.line(0.25), time.time()
            if line is None:
                break
            if line.startswith("@@start "):
                current, started, ran = by_id[line[8:]], now, True
            elif line.startswith("@@row "):
                results.add(json.loads(line[6:]))
            elif line.startswith("@@done "):
                pending.remove(by_id[line[7:]])
                current, finished = None, now if len(pending) == 0 else None
            elif line:
                results.say(f"    [{unit['name']}] {line}")
                tail.append(line.strip())
            if current is not None and now - started > current["limit"]:
                results.say(f"    [{unit['name']}] {current['id']}: past its {current['limit']} s limit, stopped")
                child.stop()
                results.add(unfinished(current, f"timeout: ran past its {current['limit']} s limit"))
                pending.remove(current)
                same_shape = [s for s in pending if s.get("shape_key") and s["shape_key"] == current.get("shape_key")]
                for spec in same_shape:
                    results.add(unfinished(spec, "skipped: an earlier row of this shape timed out"))
                    pending.remove(spec)
                current = None
                break
            if now >= deadline or (finished and now - finished > 10):  # out of time, or done but not exiting
                break
        code = child.stop()
        if current is not None:  # it died, or time ran out, during this spec
            why = ("stopped: its share of the budget ran out during this row" if time.time() >= deadline else
                   f"crashed: the child exited with code {code} during this row ({tail[-1] if tail else 'no output'})")
            results.add(unfinished(current, why))
            pending.remove(current)
        elif pending and not ran and time.time() < deadline - MIN_START:  # it died before running anything: stop
            for spec in pending:
                results.add(unfinished(spec, f"error: the child exited with code {code} before this ran "
                                             f"({' / '.join(tail) or 'no output'})"))
            return
    for spec in pending:
        results.add(unfinished(spec, "skipped: no time left in the budget"))


def run_units(units, deadline, results, env, lanes=1):
    """Run units `lanes` at a time until `deadline`. One lane: one after another, each given a
    share of the time left in proportion to its weight (its expected seconds), so a slow child
    cannot starve the ones after it; what one leaves goes to the next."""
    def run(unit, until):
        try:
            run_unit(unit, until, results, env)
        except Exception:  # noqa: BLE001  a bug here must not cost the rest of the window
            results.say(f"gpu_check: unit {unit['name']} failed in the parent:\n{traceback.format_exc()}")

    if lanes > 1:
        with concurrent.futures.ThreadPoolExecutor(lanes) as pool:
            list(pool.map(lambda unit: run(unit, deadline), units))
        return
    for i, unit in enumerate(units):
        left = max(0.0, deadline - time.time())
        run(unit, min(deadline, time.time() + left * unit["weight"] / sum(u["weight"] for u in units[i:])))


def child_env(**changes):
    """The environment of the children: this one, this attention_kernels importable, output unbuffered,
    the kernels' switches at their defaults unless `changes` set them."""
    env = {k: v for k, v in os.environ.items() if k not in ("ATTENTION_KERNELS_AUTOTUNE", "ATTENTION_KERNELS_TMA")}
    env.update(PYTHONUNBUFFERED="1", PYTHONPATH=os.pathsep.join(filter(None, [HOME, os.environ.get("PYTHONPATH")])))
    env.update(changes)
    return env


# ----------------------------------------------------------------------------- main


def environment(argv, budget):
    import torch
    import triton
    return dict(command=" ".join(["python", "-m", "attention_kernels.benchmarks.gpu_check", *argv]),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                hostname=socket.gethostname(), python=platform.python_version(), torch=torch.__version__,
                triton=triton.__version__, cuda=torch.cuda.is_available(), budget_s=budget,
                device=None if torch.cuda.is_available() else "CPU (Triton interpreter)", phases={})


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="output folder (default runs/gpu-check-<time>)")
    parser.add_argument("--budget", type=float, default=480.0, help="seconds for the whole run (default 480)")
    parser.add_argument("--quick", action="store_true", help="fewer checks, D = 128 only: a short rerun")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a child: the phase it runs, specs on stdin
    args = parser.parse_args(argv)
    if args.worker:
        from .gpu_check_child import worker  # heavy imports, children only
        return worker(args.worker)
    if args.budget <= 0:
        parser.error(f"--budget must be > 0 seconds, got {args.budget}")

    started = time.time()
    end = started + args.budget - min(10.0, max(1.0, 0.02 * args.budget))  # the rest writes the summary
    out = args.out or os.path.join("runs", "gpu-check-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    env = environment(argv, args.budget)
    results = Results(out, env)
    p = plan(env["cuda"], args.quick)
    results.say(f"gpu_check: {env['command']}")
    results.say(f"python {env['python']}, torch {env['torch']}, triton {env['triton']}, {env['hostname']}; "
                f"budget {args.budget:.0f} s; out {out}")
    if not p["cuda"]:
        results.say(CPU_NOTE)
    tuned_path = os.path.abspath(results.path("tuned.json"))

    def phase(name, units, lanes=1, **changes):
        start = time.time()
        deadline = min(end, started + ENDS[name] * args.budget)
        results.say(f"\n== {name} (until +{deadline - started:.0f} s) ==")
        try:
            run_units(units, deadline, results, child_env(**changes), lanes)
        except Exception:  # noqa: BLE001  a bug here must not cost the phases after it
            results.say(f"gpu_check: phase {name} failed in the parent:\n{traceback.format_exc()}")
        env["phases"][name] = dict(seconds=round(time.time() - start, 1), until_s=round(deadline - started, 1))
        results.write_json("env.json", env)

    ceilings = dict(id="ceilings", limit=120, row=dict(table="env"))
    phase("ceilings", [dict(name="ceilings", kind="ceilings", specs=[ceilings], weight=1)])
    checks = p["checks"]
    units = [dict(name=f"correctness {i + 1}", kind="correctness", specs=checks[i::p["lanes"]], weight=1)
             for i in range(min(p["lanes"], len(checks)))]
    phase("correctness", units, lanes=len(units), ATTENTION_KERNELS_AUTOTUNE="0")
    pre_seconds = 0.18 * args.budget  # the precompile's part of the tuning phase
    tune = [dict(id="precompile", kind="precompile", classes=p["classes"], max_jobs=p["max_jobs"], tokens=TOKENS,
                 width=WIDTH, seconds=pre_seconds,
                 limit=pre_seconds + 60, row=dict(table="tuning", step="precompile"))]
    tune += [dict(id=f"tune T{T} D{D} {'causal' if c else 'full'}", kind="tune", T=T, D=D, causal=c, B=TOKENS // T,
                  H=WIDTH // D, seed=seed_of("tune", T, D, c), limit=120,
                  row=dict(table="tuning", step="tune", what=f"T{T} D{D} {'causal' if c else 'full'}"))
             for T, D, c in (p["classes"] if p["cuda"] else p["classes"][:1])]
    phase("tuning", [dict(name="tuning", kind="tuning", specs=tune, weight=1)], ATTENTION_KERNELS_AUTOTUNE="1")
    phase("timing", timing_units(p, tuned_path))

    try:
        lines, md = summarize(p, results, started, args.budget)
    except Exception:  # noqa: BLE001  the files are written; say why the summary is not
        lines = md = f"gpu_check: the summary failed:\n{traceback.format_exc()}"
        lines = [lines]
    with open(results.path("summary.md"), "w") as f:
        f.write(md)
    results.say("\n== summary ==")
    for line in lines:
        results.say(line)
    results.log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
