"""
The inference-time kernels against torch's `scaled_dot_product_attention`, in one run: decoding
against a KV cache, packed variable-length batches, and sliding windows.

    python -m attention_kernels.benchmarks.inference                      # `gpu` preset on a GPU, `tiny` on the CPU
    python -m attention_kernels.benchmarks.inference --part decode        # one part (or two)
    python -m attention_kernels.benchmarks.inference --preset tiny --out runs/inference-smoke

Parts:
    decode  `kernels.decode_attention`: one new token per sequence against a cache of length L
            (all B lengths equal to the cache's Tmax, so SDPA takes the cache as it is, with
            is_causal=False: one query sees every valid key; grouped heads with enable_gqa, or,
            for a backend that refuses that, k/v expanded to Hq heads once outside the timing,
            impl sdpa-<backend>-expanded). num_splits=None, plus fixed splits at one shape.
            Memory-bound, so its measure is GB/s: bytes read (the valid K and V, q) and written
            (o), over time, and that against a device-to-device copy measured in the same run
            (GB/s = 2 * bytes / time). Timed with check_seqlens=False, as a decode loop in a
            CUDA graph runs it: the default check reads cache_seqlens on the host every call,
            a synchronization SDPA does not make (its cost is the host's launch latency, which
            at short caches can be most of the time).
    paged   `kernels.paged_attention`: the decode part's one new token per sequence, its cache in
            a shuffled pool of pages (page sizes 16, 64, 256), against the contiguous cache in
            `decode_attention` and SDPA, as GB/s of the same bytes (timed with check=False).
    varlen  `kernels.flash_attention_varlen` on B packed sequences of seeded random lengths,
            against the same sequences right-padded to the longest, (B, H, max_len, D), causal
            (right padding keeps causal attention exact on the valid rows), in SDPA and in
            `flash_attention`. Padding is done once, outside the timing. FLOPs count only the
            valid tokens, so TFLOP/s compare; useful_frac = tokens / (B * max_len).
    window  `kernels.flash_attention` with window=(left, 0) over growing T, against full causal
            flash and causal SDPA: a window's cost grows like T, a full causal one like T^2, so
            us_per_token flattens for the window.

Presets:
    gpu     bf16, D = 128. decode: L 1k..64k, B 1, 8, 32, Hq 32 over Hkv 8 and over Hkv 32;
            num_splits 1, 4, 16, 64 at B 1, Hkv 8, L 16k. paged: L 4k and 32k, B 1 and 32, Hq 32
            over Hkv 8, pages of 16, 64, 256. varlen: B 16 lengths in [1, 4096] and
            B 64 in [1, 1024], H 16. window: B 1, H 16, T 1k..32k, left 255 and 1023.
    tiny    the same code at sizes the CPU interpreter runs in seconds: bf16, D 16; decode B 2,
            Hq 4 over Hkv 1 and 4, L 32 and 128; paged B 2, Hq 4 over Hkv 1, L 100; varlen B 3 lengths in [1, 40], H 1; window
            B 1, H 1, T 32 to 128, left 15.

Timing is `benchmarks.measure.time_ms`: on a GPU `triton.testing.do_bench` (warm-up, ~100 ms of
repeats, the L2 cache flushed before each, p20/p50/p80); on the CPU a few wall-clock calls of the
interpreter, which say nothing about GPU speed. A part whose kernel is not in `kernels` yet is
skipped with a note. Shapes an implementation refuses are recorded as unsupported, out of memory
as oom, and the run goes on; it exits 1 if an implementation failed in any other way.

Writes into --out (default runs/inference-<time>/): inference.csv, one long-format row per part x
impl x shape x mode (schema in CSV_FIELDS), log.txt (everything printed, with the environment
and the command), and decode.png and paged.png (GB/s against L) and window.png (us per token
against T), made from the CSV.
"""

import argparse
import csv
import datetime
import importlib.util
import os
import shlex
import sys
import time
from collections import defaultdict

import torch

from .impls import DEVICE, SDPA_BACKENDS, is_sdpa, refusal  # first: sets up the interpreter on a CPU

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from attention_kernels import kernels  # noqa: E402
from .measure import ceilings, flops, min_bytes, time_ms  # noqa: E402
from .plots import line_styles  # noqa: E402
from .sweep import DTYPES, environment, fmt, run_log  # noqa: E402

PARTS = ("decode", "paged", "varlen", "window")
MODES = ("fwd", "fwd+bwd")
PRESETS = {
    "gpu": dict(
        dtype=torch.bfloat16, D=128,
        decode=dict(lengths=[1024 * 2**i for i in range(7)], batches=[1, 8, 32], heads=[(32, 8), (32, 32)],
                    splits=[1, 4, 16, 64], splits_at=(1, 32, 8, 16384)),       # (B, Hq, Hkv, L)
        paged=dict(lengths=[4096, 32768], batches=[1, 32], heads=[(32, 8)], pages=[16, 64, 256]),
        varlen=dict(batches=[(16, 4096), (64, 1024)], H=16),                   # (B, longest allowed)
        window=dict(lengths=[1024 * 2**i for i in range(6)], B=1, H=16, lefts=[255, 1023]),
    ),
    "tiny": dict(
        dtype=torch.bfloat16, D=16,
        decode=dict(lengths=[32, 128], batches=[2], heads=[(4, 1), (4, 4)],
                    splits=[1, 8], splits_at=(2, 4, 1, 128)),
        paged=dict(lengths=[100], batches=[2], heads=[(4, 1)], pages=[16, 64, 256]),
        varlen=dict(batches=[(3, 40)], H=1),
        window=dict(lengths=[32, 64, 128], B=1, H=1, lefts=[15]),
    ),
}
CSV_FIELDS = ["part", "impl", "mode", "B", "H", "Hkv", "Tq", "Tk", "D", "dtype", "window_left",
              "num_splits", "splits_used", "tokens", "useful_frac", "status",
              "ms_p20", "ms_p50", "ms_p80", "us_per_token", "tflops", "gbps", "copy_gbps",
              "frac_copy_ceiling", "frac_matmul_ceiling", "vs_best_sdpa",
              "device", "torch", "triton", "commit", "timestamp"]
CPU_NOTE = ("NOTE: no CUDA GPU, so the kernels run under Triton's CPU interpreter (numpy) at tiny sizes. "
            "These timings say nothing about GPU speed; they show the benchmark's flow end to end.")


# ----------------------------------------------------------------------------- one row


def randn(*shape, dtype, g):
    return torch.randn(*shape, generator=g, device=DEVICE, dtype=dtype)


def in_mode(fn, inputs, mode, g):
    """A no-argument function that runs fn(*inputs) once in `mode`: "fwd" on the inputs as they
    are; "fwd+bwd" on leaf copies that require grad, backward from a fixed random upstream
    gradient shaped like the first input (the query), gradients cleared every call."""
    if mode == "fwd":
        return lambda: fn(*inputs)
    leaves = [x.detach().requires_grad_() for x in inputs]
    do = randn(*inputs[0].shape, dtype=inputs[0].dtype, g=g)

    def call():
        for x in leaves:
            x.grad = None
        fn(*leaves).backward(do)
    return call


def measure(make):
    """(status, (p20, p50, p80) ms) of the call that make() builds; a refusal, out-of-memory or
    error is recorded as the sweep records it, and the run goes on."""
    call = None
    try:
        call = make()
        return "ok", time_ms(call)  # on a GPU the autotuning happens in its warm-up
    except Exception as e:  # noqa: BLE001  recorded, and the run goes on
        if DEVICE == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
            return "oom", None
        first_line = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". ")[0]
        if refusal(e):
            return f"unsupported: {first_line}", None
        return f"error: {type(e).__name__}: {first_line}", None
    finally:
        call = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def sdpa(backend, causal):
    """torch's SDPA with one backend forced, grouped-query heads read in place (enable_gqa)."""
    def run(q, k, v):
        with sdpa_kernel(SDPA_BACKENDS[backend]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])
    return run


# ----------------------------------------------------------------------------- the parts
# Each part yields groups of rows: the rows of one group share shape and mode, so each is
# compared with the group's fastest SDPA backend. A row is (fields, make), make() building the
# no-argument call to time; `work` and `traffic` give TFLOP/s and GB/s, `tokens` us_per_token.
# The inputs are bound into each make, and dropped by both sides before the next shape's are
# made, so that only one shape's inputs (at most 34 GB of cache) are alive at a time.


def decode_shapes(part, p, dtype, D, seed):
    """For each (L, B, Hq, Hkv) of a decoding part: one new token per sequence against full caches
    of L keys, (q (B, Hq, 1, D), k_cache, v_cache (B, Hkv, L, D), cache_seqlens, the rows' shared
    fields), its bytes those of q, the valid K and V, and o."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    for L in p["lengths"]:
        for B in p["batches"]:
            for Hq, Hkv in p["heads"]:
                q = randn(B, Hq, 1, D, dtype=dtype, g=g)                                 # (B, Hq, 1, D)
                k_cache, v_cache = (randn(B, Hkv, L, D, dtype=dtype, g=g) for _ in range(2))  # (B, Hkv, L, D)
                seqlens = torch.full((B,), L, device=DEVICE, dtype=torch.int32)
                shape = dict(part=part, mode="fwd", B=B, H=Hq, Hkv=Hkv, Tq=1, Tk=L, D=D, tokens=B,
                             work=flops(B, Hq, 1, L, D, False, "fwd"),
                             traffic=(2 * B * Hkv * L * D + 2 * B * Hq * D) * q.element_size())
                yield (q, k_cache, v_cache), seqlens, shape
                q = k_cache = v_cache = None


def sdpa_rows(shape, inputs):
    rows = []
    for backend in SDPA_BACKENDS:
        fields = dict(shape, impl=f"sdpa-{backend}")
        rows.append((fields, lambda b=backend, f=fields, x=inputs: sdpa_decode(b, *x, f)))
    return rows


def decode_groups(p, dtype, D, seed):
    for inputs, seqlens, shape in decode_shapes("decode", p, dtype, D, seed):
        B, Hq, Hkv, L = shape["B"], shape["H"], shape["Hkv"], shape["Tk"]
        splits = [None] + (p["splits"] if (B, Hq, Hkv, L) == p["splits_at"] else [])
        rows = []
        for n in splits:
            fields = dict(shape, impl="decode", num_splits="auto" if n is None else n,
                          splits_used=auto_splits(B, Hq, Hkv, L, D, inputs[0]) if n is None else n)
            rows.append((fields, lambda n=n, x=inputs, s=seqlens:
                         lambda: kernels.decode_attention(*x, s, num_splits=n, check_seqlens=False)))
        yield rows + sdpa_rows(shape, inputs)
        rows = inputs = None


def paged_groups(p, dtype, D, seed):
    for inputs, seqlens, shape in decode_shapes("paged", p, dtype, D, seed):
        cu = torch.arange(shape["B"] + 1, device=DEVICE, dtype=torch.int32)             # one new token each
        rows = [(dict(shape, impl="decode"), lambda x=inputs, s=seqlens:
                 lambda: kernels.decode_attention(*x, s, check_seqlens=False))]
        rows += [(dict(shape, impl=f"paged-{size}"), lambda size=size, x=inputs, s=seqlens, cu=cu:
                  paged_call(*x, s, size, cu)) for size in p["pages"]]
        yield rows + sdpa_rows(shape, inputs)
        rows = inputs = None


def paged_call(q, k_cache, v_cache, seqlens, page_size, cu):
    """The contiguous cache copied into a pool of pages of `page_size` in shuffled order (made
    here, outside the timing), and the paged call on it."""
    B, Hkv, L, D = k_cache.shape
    per_seq = -(-L // page_size)
    order = torch.randperm(B * per_seq, generator=torch.Generator().manual_seed(page_size)).to(DEVICE)
    table = order.view(B, per_seq).to(torch.int32)                                        # (B, pages)
    pools = []
    for cache in (k_cache, v_cache):
        pool = cache.new_zeros(B * per_seq, page_size, Hkv, D)                            # (pages, size, Hkv, D)
        padded = torch.nn.functional.pad(cache, (0, 0, 0, per_seq * page_size - L))       # (B, Hkv, pages*size, D)
        pool[table.long().flatten()] = padded.view(B, Hkv, per_seq, page_size, D).permute(0, 2, 3, 1, 4).flatten(0, 1)
        pools.append(pool)
    q = q[:, :, 0].contiguous()                                                           # (B, Hq, D): one token each
    call = lambda: kernels.paged_attention(q, *pools, table, seqlens, cu, 1, check=False)
    want = kernels.decode_attention(q[:, :, None], k_cache, v_cache, seqlens)[:, :, 0]   # (B, Hq, D)
    err = (call().float() - want.float()).abs().max().item()
    if err > 0.02 * max(1.0, want.abs().max().item()):  # the same kernel, other splits: rounding only
        raise AssertionError(f"paged-{page_size} differs from decode_attention by {err:.3g}: the pool is wrong")
    return call


def auto_splits(B, Hq, Hkv, L, D, q):
    """How many splits num_splits=None picks here (`kernels.decode.default_num_splits`: one new
    token is one query block per sequence and k/v head), or None if that rule has changed."""
    try:
        return kernels.decode.default_num_splits(B, Hkv, 1, L, q.device)
    except (AttributeError, TypeError):
        return None


def sdpa_decode(backend, q, k_cache, v_cache, fields):
    """SDPA of one new token over the whole cache. A backend that refuses grouped heads in place
    gets them expanded to Hq, once, outside the timing (so it reads Hq / Hkv times the bytes),
    and its row's impl says so: sdpa-<backend>-expanded."""
    run = sdpa(backend, causal=False)
    try:
        run(q, k_cache, v_cache)
        return lambda: run(q, k_cache, v_cache)
    except RuntimeError as e:
        if not refusal(e) or q.shape[1] == k_cache.shape[1]:
            raise
    group = q.shape[1] // k_cache.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k_cache, v_cache))           # (B, Hq, L, D)
    run(q, k, v)
    fields["impl"] += "-expanded"
    return lambda: run(q, k, v)


def varlen_lengths(B, longest, seed):
    return torch.randint(1, longest + 1, (B,), generator=torch.Generator().manual_seed(seed)).tolist()


def pad(x, lengths, T, g):
    """Packed (total, H, D) -> right-padded (B, H, T, D); the padding is random, never read by a
    valid row under a causal mask."""
    out = torch.randn(len(lengths), x.shape[1], T, x.shape[2], generator=g, device=DEVICE, dtype=x.dtype)
    start = 0
    for b, L in enumerate(lengths):
        out[b, :, :L] = x[start:start + L].transpose(0, 1)                                # (H, L, D)
        start += L
    return out


def varlen_groups(p, dtype, D, seed):
    g = torch.Generator(DEVICE).manual_seed(seed)
    H = p["H"]
    for B, longest in p["batches"]:
        lengths = varlen_lengths(B, longest, seed)
        total, T = sum(lengths), max(lengths)
        cu = torch.tensor([0] + lengths, device=DEVICE, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # (B + 1,)
        q, k, v = (randn(total, H, D, dtype=dtype, g=g) for _ in range(3))           # (total, H, D)
        qp, kp, vp = (pad(x, lengths, T, g) for x in (q, k, v))                       # (B, H, T, D)
        varlen = lambda q, k, v: kernels.flash_attention_varlen(q, k, v, cu, cu, T, T, causal=True)
        flash = lambda q, k, v: kernels.flash_attention(q, k, v, causal=True)
        for mode in MODES:
            shape = dict(part="varlen", mode=mode, B=B, H=H, Hkv=H, Tq=T, Tk=T, D=D, tokens=total,
                         useful_frac=total / (B * T),
                         work=sum(flops(1, H, L, L, D, True, mode) for L in lengths),
                         traffic=min_bytes(1, H, total, total, D, q.element_size(), mode))
            packed, padded = (q, k, v), (qp, kp, vp)
            rows = [(dict(shape, impl="varlen"), lambda m=mode, x=packed: in_mode(varlen, x, m, g)),
                    (dict(shape, impl="flash-padded"), lambda m=mode, x=padded: in_mode(flash, x, m, g))]
            rows += [(dict(shape, impl=f"sdpa-{b}"), lambda b=b, m=mode, x=padded: in_mode(sdpa(b, True), x, m, g))
                     for b in SDPA_BACKENDS]
            yield rows
            rows = packed = padded = None
        q = k = v = qp = kp = vp = None


def window_pairs(T, left):
    """(query, key) pairs a causal window (left, 0) lets through: row i sees min(i, left) + 1
    keys. Without a window, T^2 / 2, the standard count (`measure.flops`)."""
    if left is None:
        return T * T / 2
    if T <= left:
        return T * (T + 1) / 2
    return (left + 1) * T - left * (left + 1) / 2  # rows below left see i + 1 keys, the rest left + 1


def window_groups(p, dtype, D, seed):
    g = torch.Generator(DEVICE).manual_seed(seed)
    B, H = p["B"], p["H"]
    for T in p["lengths"]:
        inputs = tuple(randn(B, H, T, D, dtype=dtype, g=g) for _ in range(3))          # q, k, v (B, H, T, D)
        for mode in MODES:
            shape = dict(part="window", mode=mode, B=B, H=H, Hkv=H, Tq=T, Tk=T, D=D, tokens=B * T,
                         traffic=min_bytes(B, H, T, T, D, dtype.itemsize, mode))
            per_pair = flops(B, H, 1, 1, D, False, mode)                               # FLOPs of one (query, key) pair
            rows = []
            for left in [*p["lefts"], None]:
                window = None if left is None else (left, 0)
                fn = lambda q, k, v, w=window: kernels.flash_attention(q, k, v, causal=True, window=w)
                rows.append((dict(shape, impl="flash", window_left=left, work=per_pair * window_pairs(T, left)),
                             lambda fn=fn, m=mode, x=inputs: in_mode(fn, x, m, g)))
            rows += [(dict(shape, impl=f"sdpa-{b}", work=per_pair * window_pairs(T, None)),
                      lambda b=b, m=mode, x=inputs: in_mode(sdpa(b, True), x, m, g)) for b in SDPA_BACKENDS]
            yield rows
            rows = None
        inputs = None


GROUPS = {"decode": decode_groups, "paged": paged_groups, "varlen": varlen_groups, "window": window_groups}


# ----------------------------------------------------------------------------- the run


def measure_row(fields, make, ceiling):
    """One CSV row (without dtype and environment): the row's fields, its status and times, and
    what they give: TFLOP/s and GB/s from its `work` and `traffic`, their fractions of the
    ceilings, microseconds per token."""
    tflops_ceiling, gbps_ceiling, _ = ceiling
    work, traffic = fields.pop("work"), fields.pop("traffic")
    status, ms = measure(make)
    row = dict(fields, status=status, copy_gbps=gbps_ceiling)
    if ms:
        tflops, gbps = work / ms[1] * 1e-9, traffic / ms[1] * 1e-6
        row.update(ms_p20=ms[0], ms_p50=ms[1], ms_p80=ms[2], us_per_token=ms[1] * 1e3 / row["tokens"],
                   tflops=tflops, gbps=gbps, frac_copy_ceiling=gbps / gbps_ceiling,
                   frac_matmul_ceiling=tflops / tflops_ceiling)
    return row


def run(preset, parts, out_dir, command, plots=True, seed=0):
    """Run the parts of a preset, write out_dir/inference.csv, log.txt and the plots; return
    (rows, failed)."""
    say = run_log(out_dir)
    env = environment()
    say(f"inference benchmark on {env['device']}: torch {env['torch']}, triton {env['triton']}, commit {env['commit']}")
    say(f"command: {command}")
    say(f"python {sys.version.split()[0]}, cwd {os.getcwd()}"
        + (f", CUDA {torch.version.cuda}, {torch.cuda.get_device_properties(0).multi_processor_count} SMs"
           if DEVICE == "cuda" else ""))
    if DEVICE == "cpu":
        say(CPU_NOTE)
    p = PRESETS[preset]
    dtype, D = p["dtype"], p["D"]
    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    say(f"preset {preset}: {dtype_name}, D = {D}; " + "; ".join(f"{part} {p[part]}" for part in parts))
    ceiling = tflops_ceiling, gbps_ceiling, what = ceilings()
    say(f"ceilings: {tflops_ceiling:.3g} TFLOP/s, copy {gbps_ceiling:.0f} GB/s (2 x bytes / time; {what})")

    csv_path = os.path.join(out_dir, "inference.csv")
    csv_file = open(csv_path, "w", newline="")
    writer = csv.DictWriter(csv_file, fieldnames=CSV_FIELDS)
    writer.writeheader()
    rows, failed, start = [], False, time.perf_counter()
    for part in parts:
        say(f"{part} ...")
        for group in GROUPS[part](p[part], dtype, D, seed):
            done = [measure_row(fields, make, ceiling) for fields, make in group]
            group = None  # this shape's inputs are freed before the next shape's are made
            one = done[0]  # progress, a line per shape and mode, on stderr: the log keeps to the tables
            print(f"  {part} {one['mode']} B={one['B']} H={one['H']} Hkv={one['Hkv']} Tq={one['Tq']} Tk={one['Tk']}: "
                  f"{sum(x['status'] == 'ok' for x in done)} of {len(done)} ran, "
                  f"{time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)
            # each row's speed against the fastest SDPA backend of the same shape and mode
            best = min((r["ms_p50"] for r in done if is_sdpa(r["impl"]) and r.get("ms_p50")), default=None)
            for row in done:
                row.update(dtype=dtype_name, **env)
                if best and row.get("ms_p50"):
                    row["vs_best_sdpa"] = best / row["ms_p50"]
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
                failed |= row["status"].startswith("error")
            csv_file.flush()
            rows += done
    csv_file.close()

    for part in parts:
        table(say, [r for r in rows if r["part"] == part], part)
    say("x SDPA: the fastest SDPA backend's time on the same shape and mode divided by this row's (above 1 is faster); "
        f"frac copy: GB/s over the copy's {gbps_ceiling:.0f} GB/s")
    if DEVICE == "cpu":
        say(CPU_NOTE)
    if plots and rows:
        for path in plot(csv_path, out_dir):
            say(f"wrote {path}")
    say(f"wrote {csv_path} ({len(rows)} rows) and {os.path.join(out_dir, 'log.txt')}")
    say.close()
    return rows, failed


TABLE = {  # part: the columns that mean something for it, (header, key, format)
    "decode": [("Hkv", "Hkv", "5"), ("L", "Tk", "7"), ("splits", "num_splits", "7"), ("used", "splits_used", "5"),
               ("ms p50", "ms_p50", "10.4g"), ("GB/s", "gbps", "9.4g"), ("frac copy", "frac_copy_ceiling", "10.3g")],
    "paged": [("Hkv", "Hkv", "5"), ("L", "Tk", "7"), ("ms p50", "ms_p50", "10.4g"), ("GB/s", "gbps", "9.4g"),
              ("frac copy", "frac_copy_ceiling", "10.3g")],
    "varlen": [("maxT", "Tq", "7"), ("tokens", "tokens", "8"), ("useful", "useful_frac", "8.3g"),
               ("ms p50", "ms_p50", "10.4g"), ("TFLOP/s", "tflops", "9.3g")],
    "window": [("T", "Tq", "7"), ("left", "window_left", "6"), ("ms p50", "ms_p50", "10.4g"),
               ("us/token", "us_per_token", "10.4g"), ("TFLOP/s", "tflops", "9.3g")],
}


def table(say, rows, part):
    if not rows:
        return
    columns = TABLE[part]
    say()
    say(f"{part}: {'mode':8}{'B':>4}{'H':>4}" + "".join(f"{h:>{int(f.split('.')[0])}}" for h, _, f in columns)
        + f"{'x SDPA':>8}  impl / status")
    for r in rows:
        cells = "".join(fmt(r.get(key), f) if "." in f else f"{'' if r.get(key) is None else r[key]:>{f}}"
                        for _, key, f in columns)
        say(f"{'':{len(part) + 2}}{r['mode']:8}{r['B']:>4}{r['H']:>4}{cells}{fmt(r.get('vs_best_sdpa'), '8.3g')}  "
            f"{r['impl']}" + ("" if r["status"] == "ok" else f": {r['status']}"))


# ----------------------------------------------------------------------------- plots (from the CSV)


def plot(csv_path, out_dir):
    """decode.png and paged.png (GB/s against L, one panel per B and heads, the copy's GB/s as a
    line) and window.png (us per token against T, one panel per mode); return the paths written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(csv_path, newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "ok"]
    figures = {
        "decode": ("gbps", "GB/s (bytes of q, valid K and V, o)", "cache length L",
                   lambda r: f"B={r['B']}, Hq={r['H']}, Hkv={r['Hkv']}", lambda r: r["num_splits"] in ("", "auto")),
        "paged": ("gbps", "GB/s (bytes of q, valid K and V, o)", "cache length L",
                  lambda r: f"B={r['B']}, Hq={r['H']}, Hkv={r['Hkv']}", lambda r: True),
        "window": ("us_per_token", "us per token", "sequence length T",
                   lambda r: f"{r['mode']}, B={r['B']}, H={r['H']}, D={r['D']}", lambda r: True),
    }
    paths = []
    for part, (value, ylabel, xlabel, panel_of, keep) in figures.items():
        panels = defaultdict(lambda: defaultdict(list))
        for r in rows:
            if r["part"] == part and keep(r):
                line = r["impl"] + (f" window {r['window_left']}" if r["window_left"] else "")
                panels[panel_of(r)][line].append((int(r["Tk"]), float(r[value])))
        if not panels:
            continue
        cols = min(len(panels), 3)
        nrows = -(-len(panels) // cols)
        fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
        for ax, (title, lines) in zip(axes.flat, panels.items()):  # in the CSV's order
            for line, style in line_styles(lines).items():  # each line visible where lines coincide
                xs, ys = zip(*sorted(lines[line]))
                ax.plot(xs, ys, label=line, **style)
            if part in ("decode", "paged"):
                ax.axhline(float(rows[0]["copy_gbps"]), color="gray", linewidth=1, label="device copy")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_title(title, fontsize=10)
            ax.set_xlabel(xlabel)
            ax.set_ylabel(ylabel)
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(panels):]:
            ax.set_visible(False)
        fig.suptitle(f"{part}, {rows[0]['dtype']}, {rows[0]['device']}")
        fig.tight_layout()
        path = os.path.join(out_dir, f"{part}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=list(PRESETS), help="default: gpu on a GPU, tiny on the CPU")
    p.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--out", help="output folder (default: runs/inference-<time>)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    if not args.no_plots and importlib.util.find_spec("matplotlib") is None:  # before the run, not after it
        p.error("the plots need matplotlib: pip install -e '.[bench]' (or pass --no-plots)")

    preset = args.preset or ("gpu" if DEVICE == "cuda" else "tiny")
    if DEVICE == "cpu" and preset == "gpu":
        raise SystemExit("the gpu preset needs a GPU (caches of 64k keys under the CPU interpreter would take "
                         "hours); on the CPU use --preset tiny")
    out = args.out or os.path.join("runs", "inference-" + datetime.datetime.now().strftime("%Y%m%d-%H%M%S"))
    command = shlex.join(["python", "-m", "attention_kernels.benchmarks.inference", *argv])
    threads = torch.get_num_threads()
    if DEVICE == "cpu":  # tensors of a few KB: handing ops to a second OpenMP thread costs more than the op
        torch.set_num_threads(1)
    try:
        _, failed = run(preset, [part for part in PARTS if part in args.part], out, command,
                        plots=not args.no_plots, seed=args.seed)
    finally:
        torch.set_num_threads(threads)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()
