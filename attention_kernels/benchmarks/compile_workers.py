"""The GPU command's compile workers: they compile the flash binaries the autotuner will time into
Triton's on-disk cache, in the tuning child's spawned process pool, so that autotuning times
kernels rather than compiles. A module of its own that imports nothing heavy at the top: each
spawned worker imports it."""

import time


def precompile_jobs(classes, max_jobs, tokens, width):
    """Every flash binary the autotuner will time for these (T, D, causal) classes, at
    B = tokens // T and H = width // D: (Call, launch index, tile, overrides), one per binary. Neither T nor the mask changes the binary here (both
    are runtime integers, multiples of 16 and never 1: Triton 3.6's binder gives causal and full,
    T 2k and 16k, the same specialization), so they are compiled once; should that change, the
    autotuner compiles the rest and the tuning rows count them as cache misses."""
    import torch
    from . import onchip
    jobs, seen = [], set()
    for T, D, causal in classes:
        call = onchip.Call(torch.bfloat16, D, T, tokens // T, width // D, width // D, causal)
        flash_kernels = ["flash-fwd", "flash-dq", "flash-dkdv"]
        for index, launch, config, overrides in onchip.jobs_for(call, flash_kernels, tma=True):
            described = onchip.describe(call, launch, config, overrides)
            binary = tuple(v for k, v in described.items() if k not in ("T", "mask"))
            if binary not in seen:
                seen.add(binary)
                jobs.append((call, index, config, overrides))
    return jobs[:max_jobs]


def precompile_one(job, target):
    """Compile one binary into Triton's on-disk cache, as the JIT will for this GPU; (error or
    None, seconds)."""
    import inspect
    from . import onchip
    call, index, config, overrides = job
    start = time.perf_counter()
    try:
        launch = onchip.launches_of(call)[index]
        if target is not None and "target" in inspect.signature(onchip.compile_like_jit).parameters:
            overrides = dict(overrides, target=target)
        elif target is not None:  # compile_like_jit reads its module's SM90 at each call
            onchip.SM90 = target
        onchip.compile_like_jit(launch, config, **overrides)
        return None, time.perf_counter() - start
    except Exception as e:  # noqa: BLE001  the autotuner compiles what this could not
        return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:160]}", time.perf_counter() - start
