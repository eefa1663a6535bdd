"""The one place for what the tests run: shapes, dtypes, layouts and the tolerance rule's numbers."""

from dataclasses import dataclass

import torch

from kernels import flash_attention, fused_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@dataclass(frozen=True)
class Shape:
    B: int
    Hq: int
    Hkv: int
    Tq: int
    Tk: int
    D: int

    def __str__(self):
        return f"B{self.B}-H{self.Hq}:{self.Hkv}-T{self.Tq}x{self.Tk}-D{self.D}"


# Run under the interpreter on every machine. Lengths miss every block size; Tq > Tk leaves the
# first causal rows with no key; Hq:Hkv covers multi-head (equal), grouped 4:1 and multi-query.
CPU_SHAPES = [
    Shape(1, 1, 1, 1, 1, 16),       # a single token
    Shape(2, 2, 2, 2, 2, 32),
    Shape(2, 4, 1, 17, 17, 64),     # multi-query
    Shape(1, 4, 4, 64, 64, 80),
    Shape(1, 8, 2, 97, 97, 96),     # grouped-query 4:1
    Shape(1, 2, 2, 128, 128, 128),
    Shape(1, 4, 1, 255, 255, 32),
    Shape(1, 2, 2, 97, 40, 64),     # Tq > Tk: 57 causal rows see no key
    Shape(1, 4, 2, 17, 128, 80),    # Tq < Tk: new queries after a cached prefix
    Shape(2, 4, 4, 1, 97, 16),      # one new token
    Shape(1, 4, 1, 255, 64, 96),
    Shape(1, 2, 2, 8, 8, 4),        # the seed example's head: C = 16 over 4 heads
]

# Too slow for the interpreter, or bf16 without its workaround: on a GPU only.
GPU_SHAPES = [
    Shape(2, 4, 2, 1025, 1024, 64),
    Shape(1, 8, 1, 1024, 1024, 16),
    Shape(2, 4, 4, 255, 256, 256),
    Shape(1, 2, 2, 512, 512, 128),
    Shape(64, 16, 16, 128, 128, 64),  # many programs at once: shakes out races
    Shape(1100, 64, 8, 3, 3, 16),     # B * H > 65 535 programs along one grid axis
    Shape(3, 4, 4, 2000, 400, 96),
    Shape(3, 4, 1, 1, 1, 64),         # T = 1: Triton specialises sizes equal to 1
    Shape(2, 8, 2, 1, 4097, 128),     # decoding one token against a long cache
]

# Every public kernel with the signature kernel(q, k, v, causal=True, scale=None, return_lse=False).
KERNELS = [fused_attention, flash_attention]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# "contiguous": (B, H, T, D); "bthd": a (B, T, H, D) tensor transposed (strided, no copy);
# "d-strided": D is not the unit-stride dimension (the input check copies it).
LAYOUTS = ["contiguous", "bthd", "d-strided"]

# The rule: max |kernel - truth| <= FACTOR * max |low-precision reference - truth|
#                                    + FLOOR * max(1, max |truth|),
# truth being the reference in float64 on the same (rounded) inputs. The floor matters on tiny
# tensors, where the reference's max error can be far below a rounding unit by luck: for fp16 and
# bf16 it is about one unit in the last place at the tensor's scale. For fp32 it is 1e-5: exp2 with
# the scale folded in moves a logit by a few ulps of |s| (not of the output), which the backward's
# dP - delta cancellation amplifies; that is still 100x below what a tf32 dot would cost.
FACTOR = 2.0
GRAD_FACTOR = 3.0
FLOOR = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}
