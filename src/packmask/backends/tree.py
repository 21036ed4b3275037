"""Tree layouts decomposed for the fast kernels (no kernel here: :mod:`.varlen` and :mod:`.flex` run them).

**Varlen pieces.** Every segment of a :class:`~packmask.layout_tree.TreeLayout` becomes one
varlen "sequence": its queries (contiguous in the flattened batch, so never gathered) attend to
the visible cache, then its ancestor segments, then itself — keys gathered by index, causal and
bottom-right aligned (``cu_seqlens_q != cu_seqlens_k``). The gathered keys of a segment are exactly
the root-to-segment path, in position order, so a sliding window is the kernel's own window. The
backward of ``index_select`` sums the gradients of a key gathered by several segments back into it.

Worked example — prompt ``p`` (3 tokens), chosen ``c`` (2), rejected ``r`` (2) in one row::

    segment   queries (flat)   keys (flat index)        cu_seqlens_q  cu_seqlens_k
    p         0 1 2            0 1 2                    0             0
    c         3 4              0 1 2 3 4                3             3
    r         5 6              0 1 2 5 6                5             8
                                                        7             13

>>> from packmask.masks import tree_mask_from_segments
>>> from packmask.layout import analyse_mask
>>> mask, _ = tree_mask_from_segments([[(0, 3, -1), (3, 2, 0), (5, 2, 0)]], seq_len=7)
>>> p = tree_pieces(analyse_mask(mask))
>>> p.cu_seqlens_q.tolist(), p.cu_seqlens_k.tolist(), p.key_index.tolist()
([0, 3, 5, 7], [0, 3, 8, 13], [0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 5, 6])

The kernel that runs any such pieces is :func:`packmask.backends.varlen.varlen_pieces_attention`
(context parallelism hands it its own pieces). :func:`cache_split_pieces` is the second
decomposition varlen uses without gradients: the cache once per row, the tree part without it.

**Intervals.** :func:`tree_intervals` gives every segment the key-column intervals it sees; flex
builds its BlockMask from them (:func:`packmask.backends.flex.tree_block_mask`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..layout_pieces import KeyPieces
from ..layout_tree import TreeLayout
from ..segments import cu_seqlens_from_lengths, span_indices

__all__ = ["TreePieces", "tree_pieces", "tree_intervals", "CacheSplitPieces", "cache_split_pieces"]


#: the varlen decomposition of a tree: the same pieces type as every pieces layout
TreePieces = KeyPieces


def tree_intervals(layout: TreeLayout, kv_len: int | None, include_own: bool):
    """Per segment, the key-column intervals it sees, in path order: ``(lo, hi)`` ``[S, D + 2]`` in
    frame columns of its row (cache first, then ancestors root-first, then itself if ``include_own``),
    and the layer's ``kv_len``."""
    offset, kv = layout.frame(kv_len)
    seg = layout.segments()
    N, past = layout.seq_len, layout.past
    S, D1 = seg["ancestors"].shape
    anc = seg["ancestors"]
    local_start = seg["start"] - seg["row"] * N
    a = anc.clamp(min=0)
    lo_anc = past + local_start[a] - offset
    hi_anc = lo_anc + seg["length"][a]
    valid = anc >= 0
    if not include_own:
        valid = valid & (torch.arange(D1, device=anc.device)[None] < seg["depth"][:, None])
    lo_anc = torch.where(valid, lo_anc, torch.zeros_like(lo_anc))
    hi_anc = torch.where(valid, hi_anc, torch.zeros_like(hi_anc))
    cache_lo = (layout.cache_start[seg["row"]] - offset).clamp(min=0)
    cache_hi = torch.full_like(cache_lo, past - offset).clamp(min=0)
    cache_hi = torch.maximum(cache_hi, cache_lo)
    lo = torch.cat([cache_lo[:, None], lo_anc], 1)
    hi = torch.cat([cache_hi[:, None], hi_anc], 1)
    return lo, hi, kv


def tree_pieces(layout: TreeLayout, kv_len: int | None = None) -> TreePieces:
    """The varlen decomposition of ``layout`` (cached on it per ``kv_len``; one host sync)."""
    key = ("pieces", kv_len)
    if key in layout._memo:
        return layout._memo[key]
    seg = layout.segments()
    lo, hi, kv = tree_intervals(layout, kv_len, include_own=True)
    row_base = (seg["row"] * kv)[:, None]
    key_index = span_indices((lo + row_base).reshape(-1), (hi - lo).reshape(-1))
    per_piece = (hi - lo).sum(1)
    cu_k = cu_seqlens_from_lengths(per_piece)
    pieces = TreePieces(seg["cu_seqlens"], cu_k, key_index, int(seg["length"].max()), int(per_piece.max()))
    layout._memo[key] = pieces
    return pieces




@dataclass(frozen=True)
class CacheSplitPieces:
    """The two varlen calls of a tree over a cache without gradients: every query of a row against
    the row's visible cache (one non-causal piece per row: ``cache_*``; ``no_cache`` marks the flat
    queries of rows that see none), and every segment against its tree ancestors and itself, the
    cache left out (causal pieces: ``tree``)."""

    cache_key_index: torch.Tensor
    cache_cu_seqlens_q: torch.Tensor
    cache_cu_seqlens_k: torch.Tensor
    cache_max_k: int
    no_cache: torch.Tensor
    tree: TreePieces

    def to(self, device) -> "CacheSplitPieces":
        return CacheSplitPieces(self.cache_key_index.to(device), self.cache_cu_seqlens_q.to(device),
                                self.cache_cu_seqlens_k.to(device), self.cache_max_k, self.no_cache.to(device),
                                self.tree.to(device))


def cache_split_pieces(layout: TreeLayout, kv_len: int) -> CacheSplitPieces:
    """The cache-split decomposition of ``layout`` for a layer with ``kv_len`` keys (cached on it)."""
    memo_key = ("split", kv_len)
    if memo_key in layout._memo:
        return layout._memo[memo_key]
    B, N = layout.batch_size, layout.seq_len
    offset, _ = layout.frame(kv_len)
    lo = (layout.cache_start - offset).clamp(min=0)
    hi = torch.full_like(lo, layout.past - offset).clamp(min=0)
    lengths = (hi - lo).clamp(min=0)
    rows = torch.arange(B, device=lo.device)
    cache_index = span_indices(rows * kv_len + lo, lengths)
    cu_k = cu_seqlens_from_lengths(lengths)
    cu_q = cu_seqlens_from_lengths(torch.full((B,), N, dtype=torch.long, device=lo.device))
    no_cache = torch.repeat_interleave(lengths == 0, N)
    seg = layout.segments()
    lo_t, hi_t, _ = tree_intervals(layout, kv_len, include_own=True)
    lo_t, hi_t = lo_t[:, 1:], hi_t[:, 1:]  # drop the cache interval
    t_idx = span_indices((lo_t + (seg["row"] * kv_len)[:, None]).reshape(-1), (hi_t - lo_t).reshape(-1))
    per = (hi_t - lo_t).sum(1)
    tree = TreePieces(seg["cu_seqlens"], cu_seqlens_from_lengths(per), t_idx, int(seg["length"].max()),
                      int(per.max()))
    split = CacheSplitPieces(cache_index, cu_q, cu_k, int(lengths.max()), no_cache, tree)
    layout._memo[memo_key] = split
    return split
