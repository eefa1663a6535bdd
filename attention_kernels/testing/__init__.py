"""The correctness rule the kernels are held to, for the tests, the GPU command and your own kernels.

    from attention_kernels.testing import Shape, check_against_reference, make_qkv

    q, k, v, do = make_qkv(Shape(B=2, Hq=4, Hkv=2, Tq=97, Tk=97, D=64), torch.bfloat16, seed=0)
    check_against_reference(my_attention, q, k, v, do)   # forward, log-sum-exp and gradients

The truth is the reference (`attention_kernels.reference`) in float64 on the same rounded inputs;
the yardstick is the same reference run in the inputs' own precision. A result passes when its
max error is at most FACTOR (GRAD_FACTOR for gradients) times the yardstick's, plus FLOOR[dtype]
times the largest value of the truth (at least 1).

    rule     seed_of, randn, make_qkv, make_packed; assert_close, margins, measure, recorded;
             check_against_reference, hold_to_rule; poisoned (outputs full of NaN, so an unwritten
             element fails)
    cases    the shapes, dtypes, layouts and cases the tests run, and the rule's numbers
    checks   check_varlen, check_decode, check_paged: the entry points whose inputs are more than a shape
"""

from attention_kernels.testing.cases import CAP, DEVICE, DTYPES, FACTOR, FLOOR, GRAD_FACTOR, LAYOUTS, Shape
from attention_kernels.testing.rule import (assert_close, check_against_reference, hold_to_rule, make_packed,
                                            make_qkv, margins, measure, poisoned, randn, recorded, seed_of)

__all__ = ["CAP", "DEVICE", "DTYPES", "FACTOR", "FLOOR", "GRAD_FACTOR", "LAYOUTS", "Shape", "assert_close",
           "check_against_reference", "hold_to_rule", "make_packed", "make_qkv", "margins", "measure", "poisoned",
           "randn", "recorded", "seed_of"]
