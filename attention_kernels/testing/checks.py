"""The checks that the tests and the GPU command share, one per entry point whose inputs take
more than a shape to make: a packed batch, a KV cache, a paged pool. Each makes seeded inputs for
one case of `cases`, runs the kernel and holds it to the rule (`rule.hold_to_rule`); a failure
raises AssertionError naming the tensor and the worst element."""

import contextlib

import torch

from attention_kernels import reference
from attention_kernels.kernels import decode_attention, flash_attention_varlen, paged_attention
from attention_kernels.kernels.checks import INTERPRET
from attention_kernels.reference.naive import FP8_MAX, quantize
from attention_kernels.testing.cases import DEVICE, Shape
from attention_kernels.testing.rule import hold_to_rule, make_packed, make_qkv, seed_of

I32 = dict(dtype=torch.int32, device=DEVICE)
UNUSED = 1 << 20  # block-table entries past a sequence's pages: no position below its length maps there


# ----------------------------------------------------------------------------- packed batches


def check_varlen(lengths_q, lengths_k, Hq, Hkv, D, causal, window, dtype, strided=False, use_lse=False, scale=None):
    """flash_attention_varlen on a packed batch, forward and backward (with `use_lse`, through its
    log-sum-exp too), held to the rule; `strided`: rows not adjacent in memory."""
    q, k, v, do, cu_q, cu_k = make_packed(lengths_q, lengths_k, Hq, Hkv, D, dtype,
                                          seed_of("varlen", lengths_q, lengths_k, Hq, D, dtype, scale), strided)
    o, lse = flash_attention_varlen(q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), causal, scale=scale,
                                    return_lse=True, window=window)
    w = {} if window is None else {"window": window}
    spec = lambda q, k, v, upcast=True: reference.varlen_attention(q, k, v, cu_q, cu_k, causal, scale, upcast, **w)
    spec_lse = lambda q, k: reference.varlen_logsumexp(q, k, cu_q, cu_k, causal, scale, **w)
    dlse = torch.randn(lse.shape, generator=torch.Generator(q.device).manual_seed(3), device=q.device) if use_lse else None
    hold_to_rule(o, lse, (q, k, v), do, spec, spec_lse, dlse)


# ----------------------------------------------------------------------------- decoding against a cache


def decode_inputs(B, Hq, Hkv, Tq, Tmax, D, lengths, dtype, seed):
    q, k_cache, v_cache, _ = make_qkv(Shape(B, Hq, Hkv, Tq, Tmax, D), dtype, "bthd", seed)
    lengths = torch.tensor(lengths, dtype=torch.int32, device=DEVICE)
    return q.detach(), k_cache.detach(), v_cache.detach(), lengths


def hold_decode(o, lse, q, k_cache, v_cache, seqlens, window=None, **kw):
    """decode_attention's output and log-sum-exp held to the rule against `reference.decode_attention`
    with the same keywords (causal, the serving masks, softcap, ...)."""
    kw["window"] = window or (-1, -1)
    spec = lambda q, k, v, upcast=True: reference.decode_attention(q, k, v, seqlens, upcast=upcast, **kw)
    spec_lse = lambda q, k: reference.decode_attention(q, k, k, seqlens, return_lse=True, **kw)[1]
    hold_to_rule(o, lse, (q, k_cache, v_cache), None, spec, spec_lse)


def check_decode(case, dtype):
    """decode_attention on a DECODE_CASES case, forward, held to the rule."""
    *sizes, lengths, num_splits, window = case
    q, k_cache, v_cache, seqlens = decode_inputs(*sizes, lengths, dtype, seed_of("decode", case, dtype))
    o, lse = decode_attention(q, k_cache, v_cache, seqlens, num_splits=num_splits, window=window, return_lse=True)
    hold_decode(o, lse, q, k_cache, v_cache, seqlens, window)


# ----------------------------------------------------------------------------- serving masks


def draft_tree(n, generator, roots=0.2):
    """A speculative decoding draft tree of n new tokens as its mask (n, n) bool: token i's parent
    is a random earlier token, or with probability `roots` none (it hangs from the cache alone),
    and token i sees itself and its ancestors, never a later token or a sibling's branch."""
    parents = [-1 if i == 0 or torch.rand((), generator=generator, device=DEVICE) < roots else
               int(torch.randint(0, i, (), generator=generator, device=DEVICE)) for i in range(n)]
    tree = torch.eye(n, dtype=torch.bool, device=DEVICE)
    for i, parent in enumerate(parents):
        if parent >= 0:
            tree[i] |= tree[parent]                                        # the parent's ancestors, and the parent
    return tree                                                            # (n, n)


def draft_trees(new, generator):
    """One draft tree per sequence, padded to (B, T, T), T = max(new): sequence b's in the top-left
    (new[b], new[b]) corner, random bits around it (the kernels must not read them)."""
    T = max(new)
    trees = torch.rand(len(new), T, T, generator=generator, device=DEVICE) < 0.5  # (B, T, T) the padding
    for b, n in enumerate(new):
        trees[b, :n, :n] = draft_tree(n, generator)
    return trees


def random_ranges(lengths, R, generator):
    """(B, R, 2) int32 [start, end) ranges inside each sequence's positions (some empty), for
    `bidirectional`: random starts and widths, so they overlap, cross key blocks and pages, and
    reach past the new tokens' block or into it."""
    starts = torch.stack([torch.randint(0, max(L, 1), (R,), generator=generator, device=DEVICE) for L in lengths])
    widths = torch.randint(0, 24, (len(lengths), R), generator=generator, device=DEVICE)
    return torch.stack([starts, starts + widths], dim=-1).to(torch.int32)   # (B, R, 2)


# ----------------------------------------------------------------------------- a paged cache


def offsets(lengths):
    return torch.tensor([0, *lengths], device=DEVICE).cumsum(0).to(torch.int32)


def paged_inputs(new, lengths, Hq, Hkv, D, page_size, dtype, seed, share=True, spare=3):
    """q (total_q, Hq, D) and a shuffled pool (num_pages, page_size, Hkv, D) holding `lengths[b]`
    keys of sequence b, with its block table and lengths; with `share`, sequences 0 and 1 read
    the same first page (a shared prompt) when both fill one."""
    g = torch.Generator(DEVICE).manual_seed(seed)
    need = [-(-L // page_size) for L in lengths]
    num_pages = sum(need) + spare
    order = torch.randperm(num_pages, generator=g, device=DEVICE).tolist()  # pages in no particular order
    table = torch.full((len(lengths), max(need) + 1), UNUSED, **I32)
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(order[:n], **I32)
        order = order[n:]
    if share and len(lengths) > 1 and min(lengths[:2]) >= page_size:
        table[1, 0] = table[0, 0]
    randn = lambda *shape: torch.randn(shape, generator=g, device=DEVICE, dtype=dtype)
    q = randn(sum(new), Hq, D)
    return q, randn(num_pages, page_size, Hkv, D), randn(num_pages, page_size, Hkv, D), table, \
        torch.tensor(lengths, **I32), offsets(new)


def hold_paged(o, lse, q, k_cache, v_cache, table, lengths, cu_q, window=None, causal=True, **mods):
    """paged_attention's output and log-sum-exp held to the rule against `reference.paged_attention`
    with the same keywords (the serving masks, softcap, ...); lengths: the keys after any append."""
    w = window or (-1, -1)
    spec = lambda q, k, v, upcast=True: reference.paged_attention(q, k, v, table, lengths, cu_q, upcast=upcast,
                                                                  window=w, causal=causal, **mods)
    spec_lse = lambda q, k: reference.paged_attention(q, k, k, table, lengths, cu_q, window=w, causal=causal,
                                                      return_lse=True, **mods)[1]
    hold_to_rule(o, lse, (q, k_cache, v_cache), None, spec, spec_lse)


def check_paged(case, dtype):
    """paged_attention on a PAGED_CASES case (a shuffled pool, a shared page), forward, held to the rule."""
    new, lengths, Hq, Hkv, D, page_size, num_splits, window = case
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, Hq, Hkv, D, page_size, dtype,
                                                           seed_of("paged", case, dtype))
    o, lse = paged_attention(q, k_cache, v_cache, table, seqlens, cu, max(new), num_splits=num_splits, window=window,
                             return_lse=True)
    hold_paged(o, lse, q, k_cache, v_cache, table, seqlens, cu, window)


# ----------------------------------------------------------------------------- fp8 caches


@contextlib.contextmanager
def torch_fp8_casts():
    """Within, under Triton's interpreter: its conversions to and from fp8 (float8e4nv, float8e5)
    go through torch's, which round to nearest even, as a GPU's cvt.rn does. The interpreter's own
    (triton-lang/triton#8322, open) rounds ties up, drops the carry when rounding overflows the
    mantissa (1.97 into e4m3 gives 1.0, about a third of all values come out wrong), wraps past
    the largest finite value, and flushes e5m2's three smallest subnormals read into fp16. Only the
    conversions are replaced: the kernels' loads, stores, scaling and saturation run as they are.
    Nothing changes without the interpreter."""
    if not INTERPRET:
        yield
        return
    from triton.runtime import interpreter

    convert = interpreter._convert_float
    dtypes = dict(fp8e4nv=torch.float8_e4m3fn, fp8e5=torch.float8_e5m2, fp32=torch.float32, fp16=torch.float16,
                  bf16=torch.bfloat16)
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32}  # how the interpreter holds each width

    def through_torch(data, from_dtype, to_dtype, rounding_mode):
        a, b = dtypes.get(from_dtype.name), dtypes.get(to_dtype.name)
        if a is None or b is None or not {a, b} & set(FP8_MAX) or rounding_mode not in (
                None, interpreter._ir.ROUNDING_MODE.RTNE):
            return convert(data, from_dtype, to_dtype, rounding_mode)
        x = torch.frombuffer(bytearray(data.tobytes()), dtype=torch.uint8).view(a)
        out = x.to(b).view(bits[b.itemsize]).numpy()
        return out.view(f"uint{8 * b.itemsize}").reshape(data.shape)

    interpreter._convert_float = through_torch
    try:
        yield
    finally:
        interpreter._convert_float = convert


def fp8_scales(x, fmt, per_head, heads_dim, headroom=1.0):
    """Scales that map x's largest magnitude (per k/v head along `heads_dim`, or over the tensor)
    to the format's largest finite value divided by `headroom` (below 1: the largest values
    saturate), as a calibration would: an fp32 tensor (Hkv,) or (1,)."""
    dims = [d for d in range(x.dim()) if d != heads_dim % x.dim()]
    amax = x.float().abs().amax(dim=dims) if per_head else x.float().abs().max().reshape(1)
    return (amax * headroom / FP8_MAX[fmt]).clamp(min=1e-12).contiguous()   # (Hkv,) or (1,)


def fp8_cache(k_cache, v_cache, fmt, per_head, heads_dim):
    """A cache quantized as vLLM stores it: (k_fp8, v_fp8, k_scale, v_scale)."""
    k_scale, v_scale = (fp8_scales(x, fmt, per_head, heads_dim) for x in (k_cache, v_cache))
    return quantize(k_cache, k_scale, fmt, heads_dim), quantize(v_cache, v_scale, fmt, heads_dim), k_scale, v_scale


def check_decode_fp8(case, dtype, fmt, per_head):
    """decode_attention on a DECODE_CASES case with its cache quantized to `fmt`, held to the rule
    against the reference over the dequantized cache."""
    *sizes, lengths, num_splits, window = case
    q, k_cache, v_cache, seqlens = decode_inputs(*sizes, lengths, dtype, seed_of("decode fp8", case, dtype, fmt))
    k8, v8, k_scale, v_scale = fp8_cache(k_cache, v_cache, fmt, per_head, heads_dim=1)
    with torch_fp8_casts():
        o, lse = decode_attention(q, k8, v8, seqlens, num_splits=num_splits, window=window, return_lse=True,
                                  k_scale=k_scale, v_scale=v_scale)
    hold_decode(o, lse, q, k8, v8, seqlens, window, k_scale=k_scale, v_scale=v_scale)


def check_paged_fp8(case, dtype, fmt, per_head):
    """paged_attention on a PAGED_CASES case with its pool quantized to `fmt`, held to the rule
    against the reference over the dequantized pool."""
    new, lengths, Hq, Hkv, D, page_size, num_splits, window = case
    q, k_cache, v_cache, table, seqlens, cu = paged_inputs(new, lengths, Hq, Hkv, D, page_size, dtype,
                                                           seed_of("paged fp8", case, dtype, fmt))
    k8, v8, k_scale, v_scale = fp8_cache(k_cache, v_cache, fmt, per_head, heads_dim=2)
    with torch_fp8_casts():
        o, lse = paged_attention(q, k8, v8, table, seqlens, cu, max(new), num_splits=num_splits, window=window,
                                 return_lse=True, k_scale=k_scale, v_scale=v_scale)
    hold_paged(o, lse, q, k8, v8, table, seqlens, cu, window, k_scale=k_scale, v_scale=v_scale)
