"""
A first look: run each kernel on a few shapes, forward and backward, and print how far it is
from the float64 reference next to how far the reference itself lands in the same precision.

    python -m attention_kernels.benchmarks.demo

Without a CUDA GPU it turns Triton's interpreter on and runs on the CPU at small sizes; those
timings say nothing about GPU speed.
"""

import argparse
import os
import time

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before `attention_kernels.kernels` is imported

from attention_kernels import reference  # noqa: E402
from attention_kernels.kernels import flash_attention, fused_attention  # noqa: E402

KERNELS = {"fused": fused_attention, "flash": flash_attention}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (B, H, T, D): the project's founding example (C = 16 over 4 heads), then model-like heads
SHAPES = [(4, 4, 8, 4), (2, 4, 97, 64), (1, 8, 255, 128)]
if DEVICE == "cuda":
    SHAPES += [(8, 16, 1024, 64), (4, 16, 512, 128)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def max_error(got, truth):
    return (got.double() - truth).abs().max().item()


def inputs(shape, dtype):
    """q, k, v (leaves that want gradients) and the upstream gradient do, (B, H, T, D), seeded."""
    B, H, T, D = shape
    g = torch.Generator(DEVICE).manual_seed(0)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(4))
    return (*(x.requires_grad_() for x in (q, k, v)), do)


def run(kernel, shape, dtype):
    """(max error of the output, of the reference in dtype, of the gradients (dq, dk, dv
    together), of the reference's gradients, milliseconds), each error against float64."""
    q, k, v, do = inputs(shape, dtype)

    start = time.perf_counter()
    out = kernel(q, k, v, causal=True)
    out.backward(do)
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    ms = (time.perf_counter() - start) * 1e3

    truth64 = [x.detach().double().requires_grad_() for x in (q, k, v)]
    low = [x.detach().clone().requires_grad_() for x in (q, k, v)]
    truth = reference.attention(*truth64)
    truth.backward(do.double())
    ref = reference.attention(*low, upcast=False)
    ref.backward(do)
    grad_err = max(max_error(x.grad, t.grad) for x, t in zip((q, k, v), truth64))
    ref_grad_err = max(max_error(x.grad, t.grad) for x, t in zip(low, truth64))
    return max_error(out, truth), max_error(ref, truth), grad_err, ref_grad_err, ms


def main(argv=None):
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), epilog=__doc__.split("\n\n", 1)[1],
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)  # --help; no options
    where = "CUDA: " + torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU, Triton interpreter"
    print(f"causal attention, kernels against the float64 reference ({where})")
    if DEVICE == "cpu":
        print("note: interpreter timings measure numpy on the CPU and say nothing about GPU speed")
    print(f"{'kernel':7} {'B, H, T, D':16} {'dtype':9} {'out err':>9} {'ref err':>9} "
          f"{'grad err':>9} {'ref grad':>9} {'fwd+bwd ms':>11}")
    for name, kernel in KERNELS.items():
        for shape in SHAPES:
            for dtype in DTYPES:
                row = f"{name:7} {str(shape):16} {str(dtype)[6:]:9} "
                try:
                    errs = run(kernel, shape, dtype)
                except ValueError as e:  # beyond what the kernel takes, e.g. the fused kernel's row limit
                    print(row + "refused: " + str(e).split(": ", 1)[-1])
                    continue
                print(row + " ".join(f"{e:9.2e}" for e in errs[:4]) + f" {errs[4]:11.1f}")
    print("ref err: the reference computed in the same precision; the tests demand kernel <= 2x it "
          "(3x for gradients) plus a small floor")


if __name__ == "__main__":
    main()
