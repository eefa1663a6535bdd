"""
The implementations the sweep and the profiler run, by name, each as f(q, k, v, causal) -> out:
the reference (eager PyTorch), the fused and flash kernels, and torch's own
`scaled_dot_product_attention` with one backend forced through `torch.nn.attention.sdpa_kernel`.

Importing this module turns Triton's interpreter on when there is no CUDA GPU, so that the
kernels run on the CPU; it must come before anything else imports `attention_kernels.kernels`.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import torch.nn.functional as F  # noqa: E402
from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402

from attention_kernels import reference  # noqa: E402
from attention_kernels.kernels import flash_attention, fused_attention  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SDPA_BACKENDS = {"math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _sdpa(backend):
    def run(q, k, v, causal):
        # Tq == Tk in the sweep, where SDPA's top-left causal alignment equals our bottom-right one
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return run


IMPLS = {
    "reference": lambda q, k, v, causal: reference.attention(q, k, v, causal=causal),
    "fused": lambda q, k, v, causal: fused_attention(q, k, v, causal=causal),
    "flash": lambda q, k, v, causal: flash_attention(q, k, v, causal=causal),
    **{f"sdpa-{name}": _sdpa(backend) for name, backend in SDPA_BACKENDS.items()},
}


def is_sdpa(name):
    return name.startswith("sdpa-")


def refusal(error):
    """Whether an exception means "this implementation does not take this shape" (recorded as
    unsupported) rather than a bug: SDPA's "No available kernel" (a backend that does not run
    this shape, dtype or device), the fused kernel's row limit."""
    message = str(error)
    if isinstance(error, NotImplementedError):  # an operator with no kernel for this device (a RuntimeError too)
        return True
    if isinstance(error, RuntimeError):
        return "No available kernel" in message or "No viable backend" in message
    return isinstance(error, ValueError) and "keeps whole rows on chip" in message


def make_call(impl, B, H, T, D, dtype, causal, mode, seed):
    """A no-argument function that runs `impl` once in `mode` ("fwd", "bwd" or "fwd+bwd") on
    fresh random (B, H, T, D) inputs (never zeros). For "bwd" the forward runs here, once, and
    each call runs the backward only; each call starts from cleared gradients."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    q, k, v, do = (torch.randn(B, H, T, D, generator=g, device=DEVICE, dtype=dtype) for _ in range(4))
    fn = IMPLS[impl]
    if mode == "fwd":
        return lambda: fn(q, k, v, causal)
    for x in (q, k, v):
        x.requires_grad_()
    out = fn(q, k, v, causal) if mode == "bwd" else None

    def call():  # gradients cleared every call, warm-ups included, so none accumulate
        for x in (q, k, v):
            x.grad = None
        if mode == "bwd":
            out.backward(do, retain_graph=True)
        else:
            fn(q, k, v, causal).backward(do)
    return call
