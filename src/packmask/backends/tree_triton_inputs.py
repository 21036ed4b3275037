"""The layout as the tree kernel reads it: preorder ranks, per key column the rank range of the
queries that see it, and the (query block, key block) tiles to visit. Built once per forward outside
any compiled graph, cached on the layout (:mod:`packmask.backends.tree_triton` launches the kernel).

Worked example — prompt ``p`` (3 tokens), chosen ``c`` (2), rejected ``r`` (2) in one row::

    tokens        p0 p1 p2 c0 c1 r0 r1
    rank           0  1  2  3  4  5  6        (depth-first already: rank == index)
    sees [lo, hi)  [0,7) [1,7) [2,7) [3,5) [4,5) [5,7) [6,7)   (queries whose rank is in the range)

>>> from packmask.layout_tree import TreeLayout
>>> a = tree_kernel_inputs(TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 2, 3, 2, 5]])), block_m=16, block_n=16)
>>> a.qrank.tolist(), a.klo.tolist(), a.khi.tolist()
([[0, 1, 2, 3, 4, 5, 6]], [[0, 1, 2, 3, 4, 5, 6]], [[7, 7, 7, 5, 5, 7, 7]])
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from ..layout_tree import TreeLayout
from ..segments import cu_seqlens_from_lengths

__all__ = ["TreeKernelInputs", "tree_kernel_inputs", "tree_ranks"]


def tree_ranks(layout: TreeLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rank, end)`` ``[B, N]``: every token's preorder rank in its row and the rank one past its
    subtree (a token ``j`` is an ancestor-or-self of ``q`` iff ``rank[j] <= rank[q] < end[j]``).

    Vectorised over segments (chains of single children): segments are sorted lexicographically by
    their root-to-segment path of segment ids (one stable sort per segment depth), which is preorder.

    >>> from packmask.layout_tree import TreeLayout
    >>> rank, end = tree_ranks(TreeLayout.from_parents(torch.tensor([[-1, -1, 0, 0, 1]])))  # breadth-first
    >>> rank.tolist(), end.tolist()
    ([[0, 3, 1, 2, 4]], [[3, 5, 2, 3, 5]])
    """
    if "tree_ranks" in layout._memo:
        return layout._memo["tree_ranks"]
    seg = layout.segments()
    anc, length, row, start = seg["ancestors"], seg["length"], seg["row"], seg["start"]
    S = length.shape[0]
    B, N = layout.batch_size, layout.seq_len
    dev = length.device
    order = torch.arange(S, device=dev)
    for col in reversed(range(anc.shape[1])):  # lexicographic: the root segment id decides first
        order = order[torch.argsort(anc[order, col], stable=True)]
    first_in_order = cu_seqlens_from_lengths(length[order])[:-1].to(length.dtype)  # each segment's first rank
    seg_rank = torch.empty_like(length)
    seg_rank[order] = first_in_order
    seg_rank = seg_rank - row * N  # rows hold N tokens each and sort as blocks (root ids increase by row)
    valid = anc >= 0
    size = torch.zeros_like(length).index_add_(0, anc[valid], length[:, None].expand_as(anc)[valid])
    s_of = seg["of_token"]
    offset_in_seg = torch.arange(B * N, device=dev).view(B, N) - start[s_of]
    rank = seg_rank[s_of] + offset_in_seg
    end = seg_rank[s_of] + size[s_of]
    layout._memo["tree_ranks"] = (rank, end)
    return rank, end


class TreeKernelInputs(NamedTuple):
    """What the kernel reads for one layer's keys (tensors only: built outside a compiled graph,
    the same shapes for every tree of the same ``[B, N]`` and ``kv_len``, so no recompiles)."""

    qrank: torch.Tensor   # [B, N] int32
    klo: torch.Tensor     # [B, kv] int32: queries with rank in [klo, khi) see the column
    khi: torch.Tensor
    qpos: torch.Tensor    # [B, N] int32 positions (sliding window; else = qrank, unused)
    kpos: torch.Tensor    # [B, kv] int32
    q_count: torch.Tensor   # [B, nqb] int32 key blocks per query block (forward, dq)
    q_index: torch.Tensor   # [B, nqb, nkb] int32
    k_count: torch.Tensor   # [B, nkb] query blocks per key block (dk, dv)
    k_index: torch.Tensor   # [B, nkb, nqb]
    block_m: int
    block_n: int


def _block_min_max(x: torch.Tensor, valid: torch.Tensor, block: int, big: int):
    """Per block of ``block`` columns: min and max of ``x`` over valid entries (empty: big, -big)."""
    B, L = x.shape
    nb = -(-L // block)
    pad = nb * block - L
    lo = torch.where(valid, x, torch.full_like(x, big))
    hi = torch.where(valid, x, torch.full_like(x, -big))
    if pad:
        lo = torch.cat([lo, lo.new_full((B, pad), big)], 1)
        hi = torch.cat([hi, hi.new_full((B, pad), -big)], 1)
    return lo.view(B, nb, block).amin(-1), hi.view(B, nb, block).amax(-1)


def _tile_lists(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    counts = tiles.sum(-1, dtype=torch.int32)
    index = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts.contiguous(), index.contiguous()


def tree_kernel_inputs(layout: TreeLayout, kv_len: int | None = None, sliding_window: int | None = None,
                       block_m: int = 64, block_n: int = 64, device=None) -> TreeKernelInputs:
    """The kernel's view of ``layout`` for a layer with ``kv_len`` keys (cached on the layout).

    O(B·(N + kv) + tiles) tensor ops, no host sync, no N×K mask. A tile (query block, key block) is
    visited when the key block's query-rank range overlaps the query block's ranks (and, with a
    window, when some pair of the two blocks lies inside the window).
    """
    key = ("tree_kernel_inputs", kv_len, sliding_window, block_m, block_n, str(device))
    if key in layout._memo:
        return layout._memo[key]
    L = layout if device is None else layout.to(device)
    offset, kv = L.frame(kv_len)
    B, N, past = L.batch_size, L.seq_len, L.past
    dev = L.parent.device
    rank, end = tree_ranks(L)
    col = torch.arange(offset, offset + kv, device=dev)[None].expand(B, kv)
    t = (col - past).clamp(0, N - 1)
    in_tree = (col >= past) & (col < L.key_len)
    in_cache = (col < past) & (col >= L.cache_start[:, None])
    zero = torch.zeros_like(col)
    klo = torch.where(in_tree, torch.gather(rank, 1, t), zero)
    khi = torch.where(in_tree, torch.gather(end, 1, t), torch.where(in_cache, torch.full_like(col, N), zero))
    seen = khi > klo
    qpos, kpos = rank, klo
    big = 1 << 40
    q_min, q_max = _block_min_max(rank, torch.ones_like(rank, dtype=torch.bool), block_m, big)
    k_min, _ = _block_min_max(klo, seen, block_n, big)
    _, k_max = _block_min_max(khi, seen, block_n, big)
    tiles = (k_min[:, None, :] <= q_max[:, :, None]) & (q_min[:, :, None] < k_max[:, None, :])
    if sliding_window is not None:
        qpos = L.position_ids
        kpos = L.key_position_ids(kv_len)
        qp_min, _ = _block_min_max(qpos, torch.ones_like(seen[:, :N]), block_m, big)
        _, kp_max = _block_min_max(kpos, seen, block_n, big)
        tiles = tiles & ((qp_min[:, :, None] - kp_max[:, None, :]) < sliding_window)
    q_count, q_index = _tile_lists(tiles)
    k_count, k_index = _tile_lists(tiles.transpose(1, 2))
    i32 = lambda x: x.to(torch.int32).contiguous()  # noqa: E731
    out = TreeKernelInputs(i32(rank), i32(klo), i32(khi), i32(qpos), i32(kpos.clamp(-(1 << 30), 1 << 30)),
                           q_count, q_index, k_count, k_index, block_m, block_n)
    layout._memo[key] = out
    return out
