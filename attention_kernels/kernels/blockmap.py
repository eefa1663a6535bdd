"""
The block map: which key blocks each query block visits, made once from a mask, so that the
flash kernels skip what the mask hides (FlexAttention's BlockMask, FlashAttention-4's block
sparsity).

The scores (Tq, Tk) are cut into blocks of block_m x block_n. Each block is

    hidden   no query sees a key of it (the mask, causal and the window together): never visited
    full     every query sees every key, with nothing to add: visited with no mask work at all
             (no mask tile read, no compare, no select; a float mask's entries are all 0)
    partial  anything else: visited, the mask read or the mask function evaluated

and for each (batch, head, query block) the map lists the partial key blocks, then the full ones
(`kv_counts` (B', H', nM, 2): how many of each; `kv_index` (B', H', nM, nN): their indices, the
rest unused), and the same transposed for the dk/dv kernel (`q_counts`, `q_index`: per key
block, the query blocks). B' and H' are 1 where the mask does not depend on them (the kernels
read the map through stride 0). A document mask of 8 equal documents at T = 1024 visits about an
eighth of causal attention's blocks.

Built on the device, with no host read: a tensor mask's blocks by a reduction in PyTorch, a mask
function's by a Triton kernel that evaluates it tile by tile (`_mod_blocks`); causal and the
window by their bounds, never a (Tq, Tk) tensor. A map records what it was made from, and a call
given a map made for another mask, window or length is refused, so a map can never drop a block
the call needs. The kernels' tiles must divide the map's blocks (they are powers of two; the
launchers choose tiles no larger than the map's blocks).
"""

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

import collections

from .checks import INTERPRET, check_attn_mask
from .common import LOG2E, on_device
from .mods import MaskMod, check_mods

# The kernels' largest tile on a GPU (the interpreter's tiles are at most 64): smaller blocks skip
# more, larger ones cost less to list and leave the autotuner every tile.
DEFAULT_BLOCK = 64 if INTERPRET else 128


class BlockMap(NamedTuple):
    """See the module's docstring. Made by `block_map`; pass it to `flash_attention(block_map=)`
    with the same mask (or mask function), causal/window and lengths it was made for."""
    kv_counts: Tensor     # (B', H', nM, 2) int32: partial, full key blocks per query block
    kv_index: Tensor      # (B', H', nM, nN) int32: partial ones first, then full, ascending
    q_counts: Tensor      # (B', H', nN, 2) int32: the transpose, per key block
    q_index: Tensor       # (B', H', nN, nM) int32
    block_m: int
    block_n: int
    Tq: int
    Tk: int
    left: int             # the window it was made with, -1 unbounded (causal: right = 0)
    right: int
    source: object        # the attn_mask tensor, or the MaskMod, it was made from
    version: int          # the mask tensor's version counter when made (an in-place change invalidates)

    def kernel_tensors(self):
        """What the flash ops take: (kv_counts, kv_index, q_counts, q_index, block_m, block_n)."""
        return (self.kv_counts, self.kv_index, self.q_counts, self.q_index, self.block_m, self.block_n)

    def visits(self):
        """Blocks visited over the whole map (partial + full): a tensor, read it with .item()."""
        return self.kv_counts.sum()


def _block_size(block_size):
    bm, bn = (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)
    for b in (bm, bn):
        if isinstance(b, bool) or not isinstance(b, int) or b < 16 or b & (b - 1):
            raise ValueError(f"block_size must be a power of two of at least 16 (or a pair of them), got {block_size!r}")
    return bm, bn


def _window_blocks(Tq, Tk, left, right, bm, bn, device):
    """(any, full) (nM, nN) bool: whether some query of a block sees some key of it under the
    window (-1 unbounded), and whether every query sees every key of a whole block. Query i sees
    key j when i + off - left <= j <= i + off + right (off = Tk - Tq): a block's rows together
    see one contiguous range, so its bounds decide."""
    L = left if left >= 0 else Tq + Tk
    R = right if right >= 0 else Tq + Tk
    off = Tk - Tq
    r0 = torch.arange(0, Tq, bm, device=device)[:, None]                 # (nM, 1) first row
    r1 = torch.clamp(r0 + bm, max=Tq)                                     # one past the last row
    c0 = torch.arange(0, Tk, bn, device=device)[None, :]                 # (1, nN) first key
    c1 = torch.clamp(c0 + bn, max=Tk)
    any_ = (c0 <= r1 - 1 + off + R) & (c1 - 1 >= r0 + off - L)           # (nM, nN)
    full = (r1 - 1 + off - L <= c0) & (c1 - 1 <= r0 + off + R) & (r1 - r0 == bm) & (c1 - c0 == bn)
    return any_, full


def _tiles(x, bm, bn, reduce):
    """Reduce a (b, h, Tq or 1, Tk or 1) bool tensor over blocks: (b, h, nM or 1, nN or 1); the
    edges padded with False (a position past the end is hidden)."""
    b, h, tq, tk = x.shape
    if tq > 1:
        nm = triton.cdiv(tq, bm)
        x = torch.nn.functional.pad(x, (0, 0, 0, nm * bm - tq))
        x = reduce(x.view(b, h, nm, bm, x.shape[-1]), 3)
    if tk > 1:
        nn = triton.cdiv(tk, bn)
        x = torch.nn.functional.pad(x, (0, nn * bn - tk))
        x = reduce(x.view(*x.shape[:3], nn, bn), 4)
    return x


def _tensor_blocks(mask, bm, bn):
    """(any, free) of a mask tensor at its own broadcast shape: some entry of a block lets a key
    through; every entry lets it through with nothing to add (bool True, float 0). A float entry
    hides where the kernels' base-2 logit becomes -inf (x * log2(e) = -inf, below -2.4e38);
    NaN and +inf count as seen (they give NaN, as without a map)."""
    m = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))            # (b, h, tq, tk), 1 where broadcast
    if m.dtype == torch.bool:
        seen, free = m, m
    else:
        seen = (m.float() * LOG2E) != float("-inf")
        free = m == 0
    return _tiles(seen, bm, bn, torch.any), _tiles(free, bm, bn, torch.all)


@triton.jit
def _mod_blocks(
    STATE, Tq, Tk, H, nM, nN,
    MASK_MOD: tl.constexpr, mask_args, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    # One program per (b, h, query block, key block): the mask function on the whole block, in
    # tiles of at most 64 x 64; STATE gets bit 0: some pair seen, bit 1: every pair seen.
    pid = tl.program_id(0)
    n = pid % nN
    m = pid // nN % nM
    bh = pid // (nN * nM)
    b = bh // H
    h = bh % H
    TM: tl.constexpr = 64 if BLOCK_M > 64 else BLOCK_M
    TN: tl.constexpr = 64 if BLOCK_N > 64 else BLOCK_N
    seen = 0
    every = 1
    for i in range(0, BLOCK_M, TM):
        rows = m * BLOCK_M + i + tl.arange(0, TM)
        for j in range(0, BLOCK_N, TN):
            cols = n * BLOCK_N + j + tl.arange(0, TN)
            inside = (rows < Tq)[:, None] & (cols < Tk)[None, :]
            ok = MASK_MOD(b, h, tl.minimum(rows, Tq - 1)[:, None], tl.minimum(cols, Tk - 1)[None, :], *mask_args)
            ok = ok & inside
            seen = tl.maximum(seen, tl.max(ok.to(tl.int32)))
            every = tl.minimum(every, tl.min(ok.to(tl.int32)))
    tl.store(STATE + pid, (seen + 2 * every).to(tl.int8))


def _function_blocks(mask_mod, B, H, Tq, Tk, bm, bn, device):
    nM, nN = triton.cdiv(Tq, bm), triton.cdiv(Tk, bn)
    state = torch.empty(B, H, nM, nN, dtype=torch.int8, device=device)
    with on_device(state):
        _mod_blocks[(B * H * nM * nN,)](STATE=state, Tq=Tq, Tk=Tk, H=H, nM=nM, nN=nN, MASK_MOD=mask_mod.fn,
                                        mask_args=tuple(mask_mod.args), BLOCK_M=bm, BLOCK_N=bn)
    return (state & 1) != 0, (state & 2) != 0


def _lists(state):
    """(counts (..., n_rows, 2), index (..., n_rows, n)) int32 of a (..., n_rows, n) state
    (0 hidden, 1 partial, 2 full): partial blocks first, then full, each ascending. A sort on
    the device: no host read."""
    n = state.shape[-1]
    j = torch.arange(n, device=state.device)
    key = torch.where(state == 1, j, torch.where(state == 2, n + j, 2 * n + j))
    index = (key.sort(dim=-1).values % n).to(torch.int32)
    counts = torch.stack([(state == 1).sum(-1), (state == 2).sum(-1)], dim=-1).to(torch.int32)
    return counts.contiguous(), index.contiguous()


def block_map(mask, Tq, Tk, causal=True, window=None, block_size=DEFAULT_BLOCK, B=None, H=None, device=None):
    """The block map of a mask for queries of length Tq and keys of length Tk.

    mask: an attn_mask tensor (bool or float, broadcastable to (B, Hq, Tq, Tk); its batch and
    head dimensions, 1 or full, are the map's) or a mask function (a `@triton.jit` function or a
    `MaskMod`; B and H: how many batches and heads it depends on, None for one: a mask that
    differs by batch or head needs them). causal, window as `flash_attention` takes them: the map
    skips what they hide too, and a call must give the same. block_size: an int or (block_m,
    block_n), powers of two, at least 16. device: a mask function's (default: its args', or
    q's when called from `flash_attention`)."""
    from .checks import window_bounds
    left, right = window_bounds(window, causal)
    bm, bn = _block_size(block_size)
    for name, n in (("Tq", Tq), ("Tk", Tk)):
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"{name} must be a positive int, got {n!r}")
    if isinstance(mask, Tensor):
        shape = tuple(mask.shape)
        b, h = (((1,) * 4 + shape)[-4:])[:2]
        check_attn_mask(mask, _Like(mask.device, b, h, Tq), _Like(mask.device, b, h, Tk))
        device = mask.device
        m_any, m_all = _tensor_blocks(mask, bm, bn)
        source, version = mask, mask._version
    else:
        mod, _ = check_mods(mask, None, _Like(_first_device(mask, device), 1, 1, Tq))
        device = _first_device(mod, device)
        for name, n in (("B", B), ("H", H)):
            if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
                raise ValueError(f"{name} must be None or a positive int, got {n!r}")
        m_any, m_all = _function_blocks(mod, B or 1, H or 1, Tq, Tk, bm, bn, device)
        source, version = mod, 0
    w_any, w_full = _window_blocks(Tq, Tk, left, right, bm, bn, device)
    state = torch.where(m_any & w_any, torch.where(m_all & w_full, 2, 1), 0).to(torch.int8)  # (B', H', nM, nN)
    kv_counts, kv_index = _lists(state)
    q_counts, q_index = _lists(state.transpose(-1, -2))
    return BlockMap(kv_counts, kv_index, q_counts, q_index, bm, bn, Tq, Tk, left, right, source, version)


class _Like(NamedTuple):
    """Stands for q or k in the shared checks where only a device and shape matter."""
    device: torch.device
    b: int
    h: int
    t: int

    @property
    def shape(self):
        return (self.b, self.h, self.t, 0)


def _first_device(mod, device):
    if device is not None:
        return torch.device(device)
    args = mod.args if isinstance(mod, MaskMod) else ()
    return args[0].device if args else torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_block_map(block_map, q, k, left, right, attn_mask, mask_mod):
    """Refuse a map made for another call: another mask (tensor or function), window or length,
    batch or heads it does not broadcast to, another device. Returns it as given (None stays None)."""
    if block_map is None:
        return None
    if not isinstance(block_map, BlockMap):
        raise TypeError(f"block_map must be a BlockMap from attention_kernels.kernels.block_map, or None; got "
                        f"{type(block_map).__name__}")
    B, Hq, Tq = q.shape[:3]
    Tk = k.shape[2]
    made = f"made for Tq={block_map.Tq}, Tk={block_map.Tk}, window=({block_map.left}, {block_map.right})"
    if (block_map.Tq, block_map.Tk, block_map.left, block_map.right) != (Tq, Tk, left, right):
        raise ValueError(f"block_map was {made}; this call has Tq={Tq}, Tk={Tk}, window=({left}, {right}): make it "
                         "with the call's lengths, causal and window")
    src = block_map.source
    if isinstance(src, Tensor):
        if attn_mask is not src or attn_mask._version != block_map.version:
            raise ValueError("block_map was made from another attn_mask (or the mask changed in place since): pass "
                             "the mask it was made from, unchanged, or make a new map")
    elif mask_mod is None or mask_mod.fn is not src.fn or len(mask_mod.args) != len(src.args) or any(
            a is not b for a, b in zip(mask_mod.args, src.args)):
        raise ValueError("block_map was made from another mask_mod (or other captured tensors): pass the same "
                         "MaskMod, or make a new map")
    kb, kh = block_map.kv_counts.shape[:2]
    if kb not in (1, B) or kh not in (1, Hq):
        raise ValueError(f"block_map covers {kb} batches and {kh} heads; this call has B={B}, Hq={Hq}")
    if block_map.kv_counts.device != q.device:
        raise ValueError(f"block_map is on {block_map.kv_counts.device}, q on {q.device}")
    return block_map


_MADE = collections.OrderedDict()  # (id, version, Tq, Tk, left, right) -> (mask, map): the last few


def mask_block_map(attn_mask, Tq, Tk, left, right):
    """The map `flash_attention` makes for an attn_mask given without one, kept for the last few
    masks by identity and version (a model hands every layer the same mask: one map a forward).
    Under torch.compile's tracing, made every time (it is part of the graph)."""
    window = (left, right)
    if torch.compiler.is_compiling():
        return block_map(attn_mask, Tq, Tk, causal=False, window=window)
    key = (id(attn_mask), attn_mask._version, Tq, Tk, left, right)
    hit = _MADE.get(key)
    if hit is not None and hit[0] is attn_mask:
        _MADE.move_to_end(key)
        return hit[1]
    made = block_map(attn_mask, Tq, Tk, causal=False, window=window)
    _MADE[key] = (attn_mask, made)
    while len(_MADE) > 4:
        _MADE.popitem(last=False)
    return made

