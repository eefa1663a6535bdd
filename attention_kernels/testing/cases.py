"""The one place for what the tests run: shapes, dtypes, layouts and the tolerance rule's numbers."""

from dataclasses import dataclass

import torch

from attention_kernels.kernels import flash_attention, fused_attention

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

# Sliding windows (left, right) on flash_attention, run under the interpreter: (shape, causal, window).
# Narrower than a block, wider than T, width 0 (the diagonal alone), one side unbounded, Tq != Tk.
WINDOW_CASES = [
    (Shape(1, 2, 1, 97, 40, 32), True, (8, 0)),       # Tq > Tk: the first rows see nothing
    (Shape(1, 4, 2, 40, 97, 80), True, (16, -1)),     # right -1 under causal is right 0
    (Shape(1, 2, 2, 113, 203, 64), True, (0, 0)),     # width 0: each query sees one key
    (Shape(1, 2, 2, 100, 100, 16), False, (7, 3)),    # looks ahead too
    (Shape(1, 2, 2, 70, 70, 16), False, (500, 500)),  # wider than T: no mask at all
    (Shape(1, 2, 2, 70, 70, 16), True, (500, 0)),     # wider than T: plain causal
    (Shape(1, 2, 2, 64, 130, 96), False, (-1, 5)),    # right only
    (Shape(2, 4, 1, 1, 97, 16), True, (10, 0)),       # one new token, a window into its cache
]

# Packed variable-length batches: (lengths of q's sequences, of k's, Hq, Hkv, D, causal, window).
# Lengths 0 and 1, Tq != Tk per sequence, lengths that miss every block, grouped heads.
VARLEN_CASES = [
    ((5, 0, 1, 70, 33), (5, 0, 1, 70, 33), 4, 2, 16, True, None),
    ((3, 17, 0, 40), (10, 17, 5, 33), 2, 2, 32, True, None),    # a sequence with keys, no queries
    ((3, 17, 0, 40), (10, 17, 5, 33), 2, 1, 32, False, None),
    ((64, 1, 97), (64, 1, 97), 8, 2, 80, True, (8, 0)),
    ((1, 1, 1, 1), (1, 1, 1, 1), 2, 2, 16, True, None),
    ((129,), (129,), 2, 2, 96, False, (3, 7)),
    ((20, 30), (0, 30), 2, 2, 16, True, None),                   # a sequence with queries, no keys
]

# Decoding against a cache: (B, Hq, Hkv, Tq new tokens, Tmax, D, cache lengths, num_splits, window).
# Lengths that are not block multiples, 0, shorter than Tq; split counts that do not divide them,
# more splits than key blocks, None (the rule); more query rows than one block holds.
DECODE_CASES = [
    (3, 4, 2, 1, 100, 16, (0, 37, 100), 3, None),
    (2, 8, 2, 5, 70, 80, (5, 70), 4, (10, 0)),
    (2, 2, 2, 3, 40, 32, (2, 40), None, (0, 0)),      # sequence 0 holds fewer keys than new tokens
    (1, 1, 1, 1, 1, 16, (1,), 7, None),               # 7 splits of one key
    (2, 4, 1, 16, 130, 96, (130, 77), 5, None),       # 16 new tokens, multi-query: 64 rows a program
    (1, 16, 1, 8, 64, 64, (50,), 2, None),            # 128 rows: two row blocks
    (2, 4, 4, 1, 300, 16, (300, 299), None, (-1, 0)),
]

# A paged cache: (new tokens per sequence, keys per sequence (theirs included), Hq, Hkv, D, page
# size, num_splits, window). Decoding (1) and prefill chunks in one batch; lengths 0, 1, exactly a
# page, not a page multiple, fewer keys than new tokens; pages of 1 to 256, one page shared by two
# sequences (the tests shuffle the pool); grouped and multi-query heads; head dims 80 and 96.
PAGED_CASES = [
    ((1, 5, 0, 1, 17, 0), (9, 16, 3, 1, 40, 0), 4, 2, 16, 4, None, None),
    ((1, 1, 1), (16, 1, 33), 4, 1, 32, 16, 3, None),                 # exactly a page; multi-query
    ((7, 2), (7, 70), 2, 2, 80, 1, None, (5, 0)),                     # pages of one key; a window
    ((3, 1), (2, 300), 8, 2, 96, 256, 4, None),                       # fewer keys than new tokens
    ((40,), (97,), 2, 1, 16, 7, None, (-1, 0)),                       # a prefill chunk alone
    ((2, 1), (70, 200), 4, 2, 32, 64, 3, (40, 0)),                    # tiles within a page; a window
]

# Peaky softmax: short rows at large scales, where one key takes nearly all of a row's weight and
# dS = P * (dP - delta) is a small difference of large terms: (shape, causal, window, scale).
# With one visible key (Tk = 1, or a (0, 0) window) the true dq and dk are exactly 0.
PEAKY_CASES = [
    (Shape(1, 3, 1, 2, 2, 64), False, None, 2.0),       # grouped heads over two keys
    (Shape(2, 1, 1, 48, 5, 32), False, None, 2.0),      # many queries, few keys
    (Shape(1, 2, 1, 5, 1, 64), False, None, 10.0),      # one key
    (Shape(1, 2, 2, 40, 40, 64), True, (0, 0), 10.0),   # one key each, through a window (flash only)
    (Shape(1, 4, 2, 17, 9, 32), True, None, 5.0),       # Tq > Tk: the first rows see no key
    (Shape(1, 2, 2, 3, 7, 80), False, None, 8.0),
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

# The yardstick's limit, in units of eps(dtype) * max(1, max |truth|): where the low-precision
# reference is farther off than CAP units (a bf16 softmax of scores in the hundreds is O(1) wrong:
# 48 to 1250 units in tests/test_kernels.py's large-score tests), its error counts as CAP units,
# or as rounding alone's (the reference in fp32, rounded to the dtype) where that is more; where it
# overflows, as rounding alone's. Tolerances there: 2 x 2 + 1 = 5 units for outputs, 3 x 2 + 1 =
# 7 for gradients (the floor is about one unit in 16 bits), against kernels measured at 1.54 units
# at most (fp16 and bf16, flash and fused, every comparison of tests/test_kernels.py: 628) and
# rounding alone at 0.55: halving an output is 64 units off, a gradient 1.1x too large 12.8
# (in bf16), and both fail. fp32's yardstick is already fp32: the cap never binds it.
CAP = 2.0

# Ring attention across processes (tests/test_distributed.py): (world, shape, causal, window, layout, dtype), the
# whole sequence's shape (Tq = Tk: self-attention). Lengths 2W does not divide (the first chunks a row
# longer), grouped heads, a window that leaves ring steps out, both layouts, causal and not, one bf16.
RING_CASES = [
    (2, Shape(1, 4, 2, 23, 23, 16), True, None, "zigzag", torch.float32),        # GQA 2:1, 23 = 6+6+6+5
    (2, Shape(1, 2, 2, 21, 21, 16), False, None, "contiguous", torch.float32),
    (2, Shape(1, 2, 1, 30, 30, 16), True, (6, 0), "contiguous", torch.float32),  # rank 1 reaches 6 keys back
    (2, Shape(1, 2, 2, 26, 26, 16), True, None, "zigzag", torch.bfloat16),
    (4, Shape(1, 2, 1, 37, 37, 16), True, None, "zigzag", torch.float32),        # 37 = 5+5+5+5+5+4+4+4
    (4, Shape(1, 2, 2, 29, 29, 16), False, (3, 5), "zigzag", torch.float32),     # a band across chunk edges
    (4, Shape(1, 2, 2, 18, 18, 16), True, (4, 0), "contiguous", torch.float32),  # 2 of 4 ring steps
]

# Packed batches through the ring (ring_attention_varlen): (world, lengths, Hq, Hkv, D, causal, window, layout,
# dtype). Each sequence is split on its own: one of length 1 lives on one rank, ones shorter than 2W leave
# chunks empty, and no sequence sees another.
RING_VARLEN_CASES = [
    (2, (9, 1, 14, 3), 4, 2, 16, True, None, "zigzag", torch.float32),
    (2, (13, 6, 20), 2, 1, 16, False, (4, 2), "contiguous", torch.float32),
]

# A ring over a subgroup of the processes (`group=`: ranks 1 and 3 of 4, so messages go to global ranks that are
# not the group's): (global ranks, world of all processes, shape, causal, window, layout, dtype).
RING_SUBGROUP_CASES = [((1, 3), 4, Shape(1, 2, 1, 12, 12, 16), True, None, "zigzag", torch.float32)]
