"""
How the benchmarks measure: time, work, memory, and the device's two ceilings.

- Time: on a GPU, CUDA events through `triton.testing.do_bench` (warm-up, then repeats for about
  100 ms with the L2 cache flushed before each; the 20th, 50th and 80th percentiles). On the CPU
  (Triton's interpreter) the wall clock over a few calls, which says nothing about GPU speed.
- Work: FLOPs counted the standard way (FlashAttention papers, Triton's tutorial): the forward's
  two matmuls are 4 * B * H * Tq * Tk * D, halved when causal; the backward is 2.5x the forward
  (five matmuls instead of two). Bytes are the traffic of an ideal kernel, each tensor read or
  written once: forward q, k, v, o; backward q, k, v, o, dO, dq, dk, dv.
- Memory: the peak allocated during one call beyond what existed before it (inputs, and for
  `bwd` the saved forward). On a GPU `torch.cuda.max_memory_allocated`; on the CPU the peak of
  tensor storage that torch ops allocate and that is still alive (`LiveBytes`).
- Ceilings: a large bf16 matmul's TFLOP/s and a large device copy's GB/s, measured now (fp32
  and smaller on the CPU).
"""

import time
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .impls import DEVICE

QUANTILES = (0.2, 0.5, 0.8)
CPU_REPEATS = 3
MODES = ("fwd", "bwd", "fwd+bwd")


def flops(B, H, Tq, Tk, D, causal, mode):
    forward = 4 * B * H * Tq * Tk * D * (0.5 if causal else 1.0)
    return forward * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]


def min_bytes(B, H, Tq, Tk, D, itemsize, mode):
    q, kv = B * H * Tq * D * itemsize, B * H * Tk * D * itemsize  # one q-sized, one k-sized tensor
    forward = 2 * q + 2 * kv                                      # read q, k, v; write o
    backward = 4 * q + 4 * kv                                     # read q, k, v, o, dO; write dq, dk, dv
    return {"fwd": forward, "bwd": backward, "fwd+bwd": forward + backward}[mode]


def time_ms(fn):
    """(p20, p50, p80) milliseconds of fn()."""
    if DEVICE == "cuda":
        import triton.testing
        return tuple(triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES)))
    fn()  # warm-up
    times = []
    for _ in range(CPU_REPEATS):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return quantiles(times)


def quantiles(times):
    """(p20, p50, p80) of a list of times, in their unit."""
    return tuple(torch.tensor(times, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64)).tolist())


class LiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storage allocated by torch ops inside the mode and alive at once. An
    op's output allocates unless it shares storage with one of the op's inputs (a view, an
    in-place op); its bytes count until the storage is freed."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.tracked = set()

    def _free(self, ptr, nbytes):
        self.tracked.discard(ptr)
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {x.untyped_storage().data_ptr() if isinstance(x, torch.Tensor) else x.data_ptr()
                  for x in tree_leaves((args, kwargs)) if isinstance(x, (torch.Tensor, torch.UntypedStorage))}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if nbytes == 0 or ptr in inputs or ptr in self.tracked:
                continue
            self.tracked.add(ptr)
            self.live += nbytes
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._free, ptr, nbytes)  # fires when the storage is freed
        return out


def peak_mib(fn):
    """Peak MiB allocated during one call of fn beyond what was allocated before it."""
    if DEVICE == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    with LiveBytes() as mode:
        fn()
    return mode.peak / 2**20


def ceilings():
    """(matmul TFLOP/s, copy GB/s, what was measured) on this device, now."""
    if DEVICE == "cuda":
        n, dtype, copy_bytes = 8192, torch.bfloat16, 2**30
    else:
        n, dtype, copy_bytes = 1024, torch.float32, 2**26
    a, b = (torch.randn(n, n, device=DEVICE, dtype=dtype) for _ in range(2))
    matmul_ms = time_ms(lambda: a @ b)[1]
    src = torch.randn(copy_bytes // 4, device=DEVICE)
    dst = torch.empty_like(src)
    copy_ms = time_ms(lambda: dst.copy_(src))[1]
    what = f"{str(dtype)[6:]} matmul {n}x{n}x{n}, copy of {copy_bytes // 2**20} MiB"
    return 2 * n**3 / matmul_ms * 1e-9, 2 * copy_bytes / copy_ms * 1e-6, what
