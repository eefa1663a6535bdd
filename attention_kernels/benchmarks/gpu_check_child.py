"""
What runs inside `benchmarks.gpu_check`'s child processes: one function per kind of spec, each
taking a spec (a JSON dict from the parent) and returning rows (JSON dicts) for the parent's files.

    python -m attention_kernels.benchmarks.gpu_check --worker correctness < specs.json   # how the parent starts one

On stdout: "@@start <id>" before each spec, "@@row <json>" per row, "@@done <id>" after it;
anything else is log. After an error that leaves CUDA unusable (an illegal memory access poisons
the context for every later call) the child exits with STICKY_EXIT, and the parent runs the
remaining specs in a fresh child.
"""

import contextlib
import datetime
import json
import math
import multiprocessing
import os
import re
import sys
import time

from .impls import DEVICE, IMPLS, SDPA_BACKENDS, make_call, refusal  # first: the interpreter on, without CUDA

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import sdpa_kernel  # noqa: E402

from attention_kernels import reference  # noqa: E402
from . import compile_workers, inference, measure, sweep  # noqa: E402
from attention_kernels.kernels import flash, flash_attention, fused_attention, tuning  # noqa: E402

from attention_kernels.testing import cases, checks, rule  # noqa: E402  the correctness rule, as the tests run it

STICKY_EXIT = 3
STICKY = re.compile(r"CUDA error|illegal memory access|unspecified launch failure|AcceleratorError|device-side assert")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
FLASH_TUNERS = ("fwd", "_fwd_kernel"), ("dq", "_dq_kernel"), ("dkdv", "_dkdv_kernel")


def first_line(e):
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------- correctness


@contextlib.contextmanager
def tma_setting(value):
    """ATTENTION_KERNELS_TMA for the calls inside (`flash.use_tma` reads it at every launch)."""
    saved = os.environ.get(flash.TMA_ENV)
    if value is not None:
        os.environ[flash.TMA_ENV] = value
    try:
        yield
    finally:
        os.environ.pop(flash.TMA_ENV, None)
        if saved is not None:
            os.environ[flash.TMA_ENV] = saved


@contextlib.contextmanager
def rule_report(found):
    """Within: the rule's comparisons (`attention_kernels.testing.rule.recorded`) append (quantity,
    error, tolerance, the yardstick used, failure message) to `found` and go on, so that one row
    reports every quantity, not only the first failure."""
    with rule.recorded() as records:
        try:
            yield found
        finally:
            found.extend(records)


def check_rule(spec, dtype):
    """A kernel against the reference, forward and backward (the rule's check_against_reference)."""
    kernel = {"flash": flash_attention, "fused": fused_attention}[spec["impl"]]
    q, k, v, do = rule.make_qkv(cases.Shape(*spec["shape"]), dtype, spec["layout"], spec["seed"])
    window = tuple(spec["window"]) if spec["window"] else None
    rule.check_against_reference(kernel, q, k, v, do, spec["causal"], window=window)
    return dict(tma=flash.use_tma(q, k, v, torch.empty_like(q)) if spec["impl"] == "flash" else "")


def check_varlen(spec, dtype):
    """The packed-batch check the tests run: forward and backward."""
    lengths = spec["lengths"]
    checks.check_varlen(lengths, lengths, *spec["heads"], spec["D"], spec["causal"], spec["window"], dtype)
    return dict(seed="seed_of in attention_kernels.testing.checks")


def check_decode(spec, dtype):
    """The decode check the tests run."""
    *sizes, lengths, splits, window = spec["case"]
    checks.check_decode((*sizes, tuple(lengths), splits, window), dtype)
    return dict(seed="seed_of in attention_kernels.testing.checks")


def check_paged(spec, dtype):
    """The paged check the tests run: prefill chunks and decoding over a shuffled, shared pool."""
    new, lengths, *rest = spec["case"]
    checks.check_paged((tuple(new), tuple(lengths), *rest), dtype)
    return dict(seed="seed_of in attention_kernels.testing.checks")


def check_determinism(spec, dtype):
    """The backward twice on the same inputs: every gradient bitwise equal (each program writes
    only its own rows, no atomics), the forward too."""
    q, k, v, do = rule.make_qkv(cases.Shape(*spec["shape"]), dtype, seed=spec["seed"])
    runs = []
    for _ in range(2):
        for x in (q, k, v):
            x.grad = None
        o = flash_attention(q, k, v, causal=spec["causal"])
        o.backward(do)
        runs.append([o.detach().clone()] + [x.grad.clone() for x in (q, k, v)])
    sync()
    for name, a, b in zip(("out", "dq", "dk", "dv"), *runs):
        same = torch.equal(a, b)  # NaN (an unwritten element) is never equal
        diff = 0.0 if same else (a.double() - b.double()).abs().nan_to_num(math.inf).max().item()
        spec["found"].append(dict(quantity=name, err=diff, ref_err=0.0, tol=0.0,
                                  message="" if same else f"{name} differs between two runs by up to {diff:.3g}"))
    return dict(tma=flash.use_tma(q, k, v, q))


def check_peaky(spec, dtype):
    """Scores of standard deviation 16 (scale 2, D 64, bf16): one key takes nearly all of each
    row's weight. The implementation's output and gradients against the float64 truth, held to the
    rule, so that flash and SDPA's backends can be compared on the same inputs."""
    g = torch.Generator(DEVICE).manual_seed(spec["seed"])
    B, Hq, Hkv, Tq, Tk, D = spec["shape"]
    q, do = (torch.randn(B, Hq, Tq, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(2))  # (1, 3, 2, 64)
    k, v = (torch.randn(B, Hkv, Tk, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(2))  # (1, 1, 2, 64)
    scale = spec["scale"]
    truth_leaves = [x.double().requires_grad_() for x in (q, k, v)]
    low_leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    truth = reference.attention(*truth_leaves, False, scale)
    truth.backward(do.double())
    low = reference.attention(*low_leaves, False, scale, upcast=False)
    low.backward(do)
    rounded_leaves = [x.clone().requires_grad_() for x in (q, k, v)]  # rounding alone: fp32, rounded
    rounded = reference.attention(*rounded_leaves, False, scale, upcast=True)
    rounded.backward(do)
    leaves = [x.clone().requires_grad_() for x in (q, k, v)]
    if spec["impl"] == "flash":
        o = flash_attention(*leaves, causal=False, scale=scale)
    else:  # SDPA on k, v repeated for every query head: gradients still reach the Hkv heads
        qq, kk, vv = leaves[0], *(x.repeat_interleave(Hq // Hkv, dim=1) for x in leaves[1:])
        with sdpa_kernel(SDPA_BACKENDS[spec["impl"].removeprefix("sdpa-")]):
            o = F.scaled_dot_product_attention(qq, kk, vv, scale=scale)
    o.backward(do)
    rule.assert_close("out", o, truth, low, cases.FACTOR, cases.FLOOR[dtype], rounded)
    for name, x, x64, xl, xr in zip(("dq", "dk", "dv"), leaves, truth_leaves, low_leaves, rounded_leaves):
        rule.assert_close(name, x.grad, x64.grad, xl.grad, cases.GRAD_FACTOR, cases.FLOOR[dtype], xr.grad)
    return {}


CHECKS = {"rule": check_rule, "varlen": check_varlen, "decode": check_decode, "paged": check_paged,
          "determinism": check_determinism, "peaky": check_peaky}


def yardstick_note(f):
    """" (cap)" or " (rounded)" where the rule measured by other than the low-precision reference."""
    return f" ({f['yardstick']})" if f.get("yardstick", "low") != "low" else ""


def correctness(spec):
    """One check's row: passed, the worst quantity (largest error over its tolerance), every
    quantity's error / tolerance, and the first failure's message (what, by how much, where)."""
    row, found = dict(spec["row"]), []
    spec = dict(spec, found=found)
    start = time.perf_counter()
    try:
        with tma_setting(spec.get("tma")), rule.poisoned(), rule_report(found):
            row.update(CHECKS[spec["check"]](spec, DTYPES[spec["dtype"]]))
        sync()
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001  recorded; the next check runs
        row["status"] = f"unsupported: {first_line(e)}" if refusal(e) else f"error: {first_line(e)}"
    row["seconds"] = round(time.perf_counter() - start, 2)
    ratio = lambda f: f["err"] / f["tol"] if f["tol"] else (0.0 if f["err"] == 0 else math.inf)
    nan_first = lambda x: (math.isnan(x), x)  # NaN (an unwritten or overflowed element) is the worst
    if found:
        worst = max(found, key=lambda f: nan_first(ratio(f)))
        grads = [ratio(f) for f in found if f["quantity"] in ("dq", "dk", "dv")]
        row.update(worst=worst["quantity"], max_err=worst["err"], ref_err=worst["ref_err"], tol=worst["tol"],
                   ratio=ratio(worst), grad_ratio=max(grads, key=nan_first) if grads else "",
                   details="; ".join(f"{f['quantity']} {f['err']:.3g}/{f['tol']:.3g}" + yardstick_note(f) for f in found),
                   message=next((f["message"] for f in found if f["message"]), "")[:500])
    # not run ("") when the implementation refuses the shape; an error in a kernel fails the check
    row["passed"] = "" if row["status"].startswith("unsupported") else \
        row["status"] == "ok" and bool(found) and not any(f["message"] for f in found)
    if row["status"] != "ok":
        row["message"] = row["status"]
    return [row]


# ----------------------------------------------------------------------------- ceilings


def ceilings(spec):
    """The device, its versions and its two ceilings, for env.json."""
    env = sweep.environment()
    tflops, gbps, what = measure.ceilings()
    row = dict(spec["row"], device=env["device"], commit=env["commit"], ceilings_status="ok",
               ceilings=dict(matmul_tflops=tflops, copy_gbps=gbps, what=what))
    if DEVICE == "cuda":
        props = torch.cuda.get_device_properties(0)
        row.update(sm_count=props.multi_processor_count, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), cuda_version=torch.version.cuda)
    import triton
    try:
        row["triton_cache_dir"] = triton.knobs.cache.dir
    except AttributeError:  # an older Triton
        row["triton_cache_dir"] = os.environ.get("TRITON_CACHE_DIR", "~/.triton/cache")
    return [row]


# ----------------------------------------------------------------------------- tuning


@contextlib.contextmanager
def compile_env():
    """The environment spawned compile workers inherit: Triton compiling (not interpreting), and
    no GPU visible, so that none of them creates a CUDA context."""
    saved = {k: os.environ.get(k) for k in ("TRITON_INTERPRET", "CUDA_VISIBLE_DEVICES")}
    os.environ.update(TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
    try:
        yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def precompile(spec):
    """Compile every candidate tile of the classes to come, in parallel, into Triton's on-disk
    cache, so that the autotuner loads them instead of compiling one by one."""
    import concurrent.futures as cf
    import triton
    target = triton.runtime.driver.active.get_current_target() if DEVICE == "cuda" else None  # else sm_90
    workers = max(1, min(16, os.cpu_count() or 1))
    start = time.perf_counter()
    with compile_env():  # spawned workers take the environment as it is when each starts: at submit
        pool = cf.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
        jobs = pool.submit(compile_workers.precompile_jobs, spec["classes"], spec["max_jobs"], spec["tokens"],
                           spec["width"]).result(timeout=spec["seconds"])
        futures = [pool.submit(compile_workers.precompile_one, job, target) for job in jobs]
    done, late = cf.wait(futures, timeout=max(1.0, spec["seconds"] - (time.perf_counter() - start)))
    if late:  # out of time: stop the compiles still running (the autotuner compiles what is missing)
        for f in late:
            f.cancel()
        for process in multiprocessing.active_children():  # this child's only children: the pool's workers
            process.terminate()
    pool.shutdown(wait=not late, cancel_futures=True)
    outcomes = [f.result() if not f.exception() else (first_line(f.exception()), 0.0) for f in done]
    errors = [error for error, _ in outcomes if error]
    return [dict(spec["row"], status="ok" if not late else f"stopped after {spec['seconds']:.0f} s", jobs=len(jobs),
                 compiled=len(outcomes) - len(errors), errors=errors[:5], workers=workers,
                 target=str(target or "sm_90"),
                 seconds=round(time.perf_counter() - start, 1),
                 compile_seconds=round(sum(seconds for _, seconds in outcomes), 1))]


@contextlib.contextmanager
def capturing(found):
    """Within: each shape class a flash autotuner times for the first time is appended to `found`
    as (kernel, class, the chosen triton.Config, {Config: timings}): each Autotuner's `run` is
    wrapped, its arguments named as `kernels.tuning.shape_class` wants them."""
    tuners = [(kernel, getattr(flash, name)) for kernel, name in FLASH_TUNERS]
    for kernel, tuner in tuners:
        def run(*args, _kernel=kernel, _tuner=tuner, _run=tuner.run, **kwargs):
            known = set(_tuner.cache)
            out = _run(*args, **kwargs)
            for key in [key for key in _tuner.cache if key not in known]:
                named = {**dict(zip(_tuner.arg_names, args)), **kwargs}
                timings = dict(getattr(_tuner, "configs_timings", None) or {})
                found.append((_kernel, tuning.shape_class(_kernel, named), _tuner.cache[key], timings))
            return out
        tuner.run = run  # KernelInterface's kernel[grid](...) calls self.run
    try:
        yield found
    finally:
        for _, tuner in tuners:
            vars(tuner).pop("run", None)


@contextlib.contextmanager
def counting_compiles():
    """Within: how many binaries Triton compiled and how many it found in its cache (its
    compilation listener), and the names of the first compiled."""
    import triton
    counts = dict(hit=0, missed=0, names=[])
    compilation = getattr(getattr(triton, "knobs", None), "compilation", None)
    if compilation is None or not hasattr(compilation, "listener"):
        yield counts
        return

    def listener(**kw):
        counts["hit" if kw.get("cache_hit") else "missed"] += 1
        if not kw.get("cache_hit") and len(counts["names"]) < 8:
            counts["names"].append(getattr(kw.get("src"), "name", "?"))

    previous, compilation.listener = compilation.listener, listener
    try:
        yield counts
    finally:
        compilation.listener = previous


def tile(config):
    """A triton.Config as the table writes it: [BLOCK_M, BLOCK_N, num_warps, num_stages]."""
    return [config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps, config.num_stages]


def tuned_entry(config, timings, run):
    """One class's entry of tuned.json, from the autotuner's choice and its timings (per config
    [p50, p20, p80] ms, inf for a config that did not compile or launch)."""
    median = lambda t: float(t[0] if isinstance(t, (list, tuple)) else t)
    ms = {"{}x{} w{} s{}".format(*tile(c)): (median(t) if math.isfinite(median(t)) else None)
          for c, t in timings.items()}
    best = median(timings[config]) if config in timings else None
    return dict(config=tile(config), ms=best if best is not None and math.isfinite(best) else None, run=run, timings=ms)


def tune(spec):
    """Autotune one (T, D, causal) class: flash forward and backward (ATTENTION_KERNELS_AUTOTUNE=1
    is set for this child), then the forward again without TMA; rows for tuned.json."""
    if DEVICE != "cuda":
        return [dict(spec["row"], status="skipped: no GPU (the interpreter runs one fixed tile, no autotuner)")]
    gpu = torch.cuda.get_device_name()
    run = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") + "-" + datetime.date.today().isoformat()
    g = torch.Generator(DEVICE).manual_seed(spec["seed"])
    B, H, T, D = spec["B"], spec["H"], spec["T"], spec["D"]
    q, k, v, do = (torch.randn(B, H, T, D, generator=g, device=DEVICE, dtype=torch.bfloat16) for _ in range(4))
    q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
    found = []
    start = time.perf_counter()
    with capturing(found), counting_compiles() as compiles:
        o = flash_attention(q, k, v, causal=spec["causal"])
        o.backward(do)
        with tma_setting("0"), torch.no_grad():  # the forward's other class: pointer loads, no TMA
            flash_attention(q, k, v, causal=spec["causal"])
        sync()
    rows = [dict(table="tuned", gpu=gpu, **{"class": cls}, entry=tuned_entry(config, timings, run))
            for _, cls, config, timings in found]
    rows.append(dict(spec["row"], status="ok", seconds=round(time.perf_counter() - start, 1),
                     classes=[r["class"] for r in rows], tma=flash.use_tma(q, k, v, o),
                     compiles_hit=compiles["hit"], compiles_missed=compiles["missed"], missed=compiles["names"]))
    return rows


# ----------------------------------------------------------------------------- timing


def flex_attention_impl():
    """FlexAttention as f(q, k, v, causal): compiled once per shape on a GPU (dynamic=False), with
    a causal block mask made once per length; eager on the CPU, where it has no backward."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    run = torch.compile(flex_attention, dynamic=False) if DEVICE == "cuda" else flex_attention
    masks = {}

    def attend(q, k, v, causal):
        lengths = (q.shape[-2], k.shape[-2])
        if causal and lengths not in masks:  # Tq == Tk here: top-left and bottom-right agree
            masks[lengths] = create_block_mask(lambda b, h, i, j: i >= j, None, None, *lengths, device=q.device)
        return run(q, k, v, block_mask=masks[lengths] if causal else None)
    return attend


_installed = []


def install_tuned(path):
    """The tiles the tuning phase measured, for this process (`kernels.tuning.use`), once."""
    if _installed or not path or not os.path.exists(path):
        return
    with open(path) as f:
        table = json.load(f)
    tuning.use(table)
    _installed.append(sum(len(entries) for entries in table.values()))
    print(f"installed {_installed[0]} tuned classes from {path}")


def tiles():
    """The tiles the flash autotuners used last, e.g. "fwd 128x128 w8 s2"."""
    used = []
    for kernel, name in FLASH_TUNERS:
        config = getattr(getattr(flash, name), "best_config", None)
        if config is not None:
            used.append("{} {}x{} w{} s{}".format(kernel, *tile(config)))
    return "; ".join(used)


def timed(make):
    """(status, (p20, p50, p80) ms, peak MiB) of the call make() builds, recorded as
    `benchmarks.sweep.run_row` does, with two differences: a NotImplementedError (an operator with
    no kernel for this device) is a refusal (`impls.refusal` tests RuntimeError first, of which it
    is a subclass), and a peak that cannot be measured (FlexAttention's operator under the CPU's
    LiveBytes mode) leaves the timing standing."""
    call = None
    try:
        call = make()
        ms = measure.time_ms(call)  # first: a GPU's autotuning, and torch.compile, happen in its warm-up
        try:
            peak = measure.peak_mib(call)
        except Exception:  # noqa: BLE001  a column left empty
            peak = None
        return "ok", ms, peak
    except Exception as e:  # noqa: BLE001  recorded, and the next row runs
        if DEVICE == "cuda" and isinstance(e, torch.cuda.OutOfMemoryError):
            return "oom", None, None
        refused = refusal(e) or isinstance(e, NotImplementedError)
        return ("unsupported: " if refused else "error: ") + first_line(e), None, None
    finally:
        call = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()


def modified_flash(name):
    """flash_attention with what models add, as f(q, k, v, causal): Gemma 2's soft-cap of 50,
    GPT-OSS-style sinks (one per head, seeded), or attention dropout 0.1 (a fixed seed), to time
    beside plain flash."""
    def attend(q, k, v, causal):
        if name == "flash-softcap":
            return flash_attention(q, k, v, causal=causal, softcap=50.0)
        if name == "flash-dropout":
            return flash_attention(q, k, v, causal=causal, dropout_p=0.1, dropout_seed=1)
        sinks = torch.randn(q.shape[1], generator=torch.Generator(q.device).manual_seed(0), device=q.device)
        return flash_attention(q, k, v, causal=causal, sinks=sinks.requires_grad_(q.requires_grad))
    return attend


def attention_row(spec):
    """One implementation, shape and mode timed (`benchmarks.impls.make_call`, then `timed`)."""
    install_tuned(spec.get("tuned"))
    if spec["impl"] == "flex" and "flex" not in IMPLS:
        IMPLS["flex"] = flex_attention_impl()  # so that impls.make_call builds its calls as for the others
    if spec["impl"] in ("flash-softcap", "flash-sinks", "flash-dropout") and spec["impl"] not in IMPLS:
        IMPLS[spec["impl"]] = modified_flash(spec["impl"])
    B, H, T, D, causal, mode = (spec[k] for k in ("B", "H", "T", "D", "causal", "mode"))
    dtype = DTYPES[spec["dtype"]]
    status, ms, peak = timed(lambda: make_call(spec["impl"], B, H, T, D, dtype, causal, mode, spec["seed"]))
    row = dict(spec["row"], status=status, peak_mib=peak)
    if ms:
        row.update(ms_p20=ms[0], ms_p50=ms[1], ms_p80=ms[2],
                   tflops=measure.flops(B, H, T, T, D, causal, mode) / ms[1] * 1e-9,
                   gbps=measure.min_bytes(B, H, T, T, D, dtype.itemsize, mode) / ms[1] * 1e-6)
    if spec["impl"] == "flash":
        row["tiles"] = tiles()
    if spec["impl"] == "flex":
        row["note"] = ("torch.compile, dynamic=False" if DEVICE == "cuda" else
                       "eager: no compile, no backward on the CPU")
    return [row]


def decode_rows(spec):
    """decode_attention, one new token against caches of L keys, and SDPA on the same cache
    (`benchmarks.inference`'s decode part at one shape), in GB/s; kind "paged": its paged part,
    the same cache also in pools of pages of spec["pages"]."""
    shape = dict(lengths=[spec["L"]], batches=[spec["B"]], heads=[(spec["Hq"], spec["Hkv"])])
    if spec["kind"] == "paged":
        groups = inference.paged_groups(dict(shape, pages=spec["pages"]), DTYPES[spec["dtype"]], spec["D"], spec["seed"])
    else:
        groups = inference.decode_groups(dict(shape, splits=[], splits_at=None), DTYPES[spec["dtype"]], spec["D"],
                                         spec["seed"])
    rows = []
    for group in groups:
        for fields, make in group:
            r = inference.measure_row(fields, make, (math.nan, math.nan, ""))
            rows.append(dict(spec["row"], impl=r["impl"], status=r["status"], ms_p20=r.get("ms_p20"),
                             ms_p50=r.get("ms_p50"), ms_p80=r.get("ms_p80"), tflops=r.get("tflops"), gbps=r.get("gbps"),
                             note=f"num_splits {r.get('num_splits')} ({r.get('splits_used')})"
                             if r["impl"] == "decode" and spec["kind"] == "decode" else ""))
    return rows


def timing(spec):
    if spec.get("check"):  # the determinism check on the target shape, with the tuned tiles
        install_tuned(spec.get("tuned"))
        return correctness(spec)
    return decode_rows(spec) if spec["kind"] in ("decode", "paged") else attention_row(spec)


# ----------------------------------------------------------------------------- the loop


def worker(kind):
    """Run the specs on stdin, one after another, reporting on stdout (see the module docstring)."""
    specs = json.load(sys.stdin)
    run = {"ceilings": ceilings, "correctness": correctness, "timing": timing,
           "tuning": lambda spec: precompile(spec) if spec["kind"] == "precompile" else tune(spec)}[kind]
    if DEVICE == "cpu":  # tiny tensors: a second OpenMP thread costs more than it gives, and lanes share the cores
        torch.set_num_threads(1)
    for spec in specs:
        print(f"@@start {spec['id']}", flush=True)
        try:
            rows = run(spec)
        except Exception as e:  # noqa: BLE001  a bug in this harness, or CUDA gone: the row says which
            rows = [dict(spec["row"], status=f"error: {first_line(e)}")]
        for row in rows:
            print("@@row " + json.dumps(row, default=str), flush=True)
        print(f"@@done {spec['id']}", flush=True)
        if any(STICKY.search(str(row.get("status", "")) + str(row.get("message", ""))) for row in rows):
            print("CUDA is unusable in this process after that error: the rest run in a new child", flush=True)
            sys.exit(STICKY_EXIT)
    return 0
