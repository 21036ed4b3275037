"""Splitting packed rows across context-parallel (CP) ranks: document-aware and cost-balanced.

Every rank receives the same number of tokens of every row (``N / cp``), so each rank's batch is
an ordinary ``[B, N / cp]`` tensor. Which tokens go where is decided per document:

* **long documents** are cut into ``2 * cp`` chunks and rank ``r`` gets chunks ``r`` and
  ``2 * cp - 1 - r`` (the zig-zag split): under causal attention a late chunk costs more than an
  early one, so pairing the first with the last gives every rank the same work;
* **short documents** stay whole and go, most expensive first, to the rank with the least
  attention work that still has room; when no rank has room for a whole one, it is cut across the
  ranks with the most room (so every rank ends with exactly ``N / cp`` tokens).

Attention work is counted in (query, key) pairs: a query at position ``p`` of its document sees
``p + 1`` keys (``min(p + 1, window)`` with a sliding window).

Worked example: one row of 16 tokens, documents ``a`` (8 tokens), ``b`` (4) and ``c`` (4),
``cp = 2``, documents of 8 tokens or more zig-zagged: ``a`` is cut into 2 * cp = 4 chunks of 2;
rank 0 gets chunks 0 and 3, rank 1 chunks 1 and 2, then ``b`` and ``c`` go whole to one rank each::

    tokens    a0 a1 a2 a3 a4 a5 a6 a7 b0 b1 b2 b3 c0 c1 c2 c3
    chunk of a [ 0 ] [ 1 ] [ 2 ] [ 3 ]
    rank       0  0  1  1  1  1  0  0  0  0  0  0  1  1  1  1
    keys seen  1  2  3  4  5  6  7  8  1  2  3  4  1  2  3  4     (causal: position + 1)
    work       rank 0: 1+2 + 7+8 + 1+2+3+4 = 28      rank 1: 3+4 + 5+6 + 1+2+3+4 = 28

A prefix split (rank 0 = tokens 0-7) gives rank 0 all of ``a``, its late tokens included: 36 vs 20.

>>> from packmask.layout import DocumentLayout
>>> plan = plan_context_parallel(DocumentLayout.from_seq_lengths([[8, 4, 4]], 16), cp=2, split_threshold=8)
>>> print(plan.draw(0))
token     0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5
document  0 0 0 0 0 0 0 0 1 1 1 1 2 2 2 2
position  0 1 2 3 4 5 6 7 0 1 2 3 0 1 2 3
rank      0 0 1 1 1 1 0 0 0 0 0 0 1 1 1 1
>>> plan.index[:, 0].tolist()                   # row positions each rank holds, ascending
[[0, 1, 6, 7, 8, 9, 10, 11], [2, 3, 4, 5, 12, 13, 14, 15]]
>>> plan.rank_costs().tolist()                  # (query, key) pairs per row and rank
[[28, 28]]
>>> plan_context_parallel(DocumentLayout.from_seq_lengths([[8, 4, 4]], 16), cp=2, strategy="prefix").rank_costs().tolist()
[[36, 20]]
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PackmaskError
from ..layout import DocumentLayout
from ..segments import (cu_seqlens_from_lengths, doc_bounds_from_starts, doc_ids_from_starts, lengths_from_starts,
                        span_indices, starts_from_cu_seqlens, starts_from_ids)

__all__ = ["ShardPlan", "plan_context_parallel", "attention_cost", "token_costs", "STRATEGIES"]

STRATEGIES = ("balanced", "zigzag", "prefix")


def attention_cost(first_pos: int, length: int, window: int | None = None, doc_length: int | None = None,
                   causal: bool = True) -> int:
    """(query, key) pairs of ``length`` queries at positions ``first_pos ..`` of one document.

    >>> attention_cost(0, 4)            # 1 + 2 + 3 + 4
    10
    >>> attention_cost(2, 4, window=3)  # min(p + 1, 3) for p = 2..5
    12
    """
    if not causal:
        return length * int(doc_length if doc_length is not None else first_pos + length)
    if window is None:
        return length * first_pos + length * (length + 1) // 2
    below = max(0, min(first_pos + length - 1, window - 2) - first_pos + 1)  # queries with p + 1 < window
    return below * first_pos + below * (below + 1) // 2 + (length - below) * window


def token_costs(doc_ids: torch.Tensor, position_ids: torch.Tensor, window: int | None = None,
                causal: bool = True) -> torch.Tensor:
    """``[B, N]`` keys each query attends to: ``position + 1`` (capped by the window), or the
    document's length for bidirectional attention."""
    if not causal:
        first, end = doc_bounds_from_starts(starts_from_ids(doc_ids))
        return end - first
    keys = position_ids.to(torch.long) + 1
    return keys.clamp(max=window) if window is not None else keys


@dataclass(eq=False)
class ShardPlan:
    """Which tokens of every packed row each CP rank holds.

    Attributes:
        cp: number of context-parallel ranks.
        index: ``[cp, B, N // cp]`` long: the row positions of rank r's tokens, ascending.
        doc_ids: ``[B, N]`` document of every token (numbered per row from 0; row padding is a
            document of its own).
        position_ids: ``[B, N]`` position of every token inside its document.
        chunks: per row, ``(rank, start, length)`` of every contiguous piece handed to a rank.
        causal, window: the attention the costs were counted for.
    """

    cp: int
    index: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    chunks: list
    causal: bool = True
    window: int | None = None

    @property
    def batch_size(self) -> int:
        return self.doc_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.doc_ids.shape[1]

    @property
    def local_len(self) -> int:
        return self.index.shape[-1]

    def local(self, rank: int, tensor: torch.Tensor) -> torch.Tensor:
        """Rank ``rank``'s part of a ``[B, N, ...]`` tensor: ``[B, N // cp, ...]``."""
        if tensor.shape[:2] != (self.batch_size, self.seq_len):
            raise PackmaskError(f"expected a [{self.batch_size}, {self.seq_len}, ...] tensor to shard, got "
                                f"{tuple(tensor.shape)}.")
        idx = self.index[rank].to(tensor.device)
        idx = idx.reshape(idx.shape + (1,) * (tensor.dim() - 2)).expand((-1, -1) + tuple(tensor.shape[2:]))
        return torch.gather(tensor, 1, idx)

    def unshard(self, gathered: torch.Tensor) -> torch.Tensor:
        """``[cp, B, N // cp, ...]`` (every rank's part, rank-major) -> ``[B, N, ...]`` in row order."""
        cp, B, n = gathered.shape[:3]
        rest = tuple(gathered.shape[3:])
        flat = gathered.transpose(0, 1).reshape((B, cp * n) + rest)
        dest = self.index.to(gathered.device).transpose(0, 1).reshape(B, cp * n)
        dest = dest.reshape(dest.shape + (1,) * len(rest)).expand((-1, -1) + rest)
        return torch.empty_like(flat).scatter(1, dest, flat)

    def rank_costs(self) -> torch.Tensor:
        """``[B, cp]`` attention (query, key) pairs per row and rank."""
        return token_costs(self.doc_ids, self.position_ids, self.window, self.causal)[None].expand(
            self.cp, -1, -1).gather(2, self.index).sum(-1).T

    def doc_lengths(self) -> list[list[int]]:
        return [torch.bincount(d).tolist() for d in self.doc_ids]

    def draw(self, row: int = 0) -> str:
        """The row drawn out: document, position and rank of every token (last digit of each)."""
        owner = torch.empty(self.seq_len, dtype=torch.long)
        for r in range(self.cp):
            owner[self.index[r, row]] = r
        lines = [("token", torch.arange(self.seq_len)), ("document", self.doc_ids[row]),
                 ("position", self.position_ids[row]), ("rank", owner)]
        return "\n".join(f"{name:<9} " + " ".join(str(int(v) % 10) for v in values) for name, values in lines)


def _row_lengths(layout: DocumentLayout) -> list[list[int]]:
    return lengths_from_starts(starts_from_cu_seqlens(layout.cu_seqlens.cpu(), layout.batch_size, layout.seq_len))


def _plan_row(lengths: list[int], cp: int, n: int, threshold: int | None, window, causal, strategy):
    """``(rank, start, length)`` chunks of one row; every rank ends with exactly ``n`` tokens."""
    starts = cu_seqlens_from_lengths(torch.tensor(lengths, dtype=torch.long))[:-1].tolist()  # each document's first token
    if strategy == "prefix":  # contiguous slices of the row: the unbalanced baseline
        return [(r, r * n, n) for r in range(cp)]
    costs = [attention_cost(0, L, window, L, causal) for L in lengths]
    if threshold is None:  # automatic: zig-zag any document that would weigh much in one rank's work
        threshold_cost = sum(costs) / (8 * cp)
        split = [L >= 2 * cp and c > threshold_cost for L, c in zip(lengths, costs)]
    else:
        split = [L >= max(threshold, 2 * cp) for L in lengths]
    if strategy == "zigzag":
        split = [L >= 2 * cp for L in lengths]
    count, cost, chunks = [0] * cp, [0] * cp, []

    def give(rank, start, length, first_pos, doc_len):
        if length > 0:
            chunks.append((rank, start, length))
            count[rank] += length
            cost[rank] += attention_cost(first_pos, length, window, doc_len, causal)

    for d in sorted((d for d in range(len(lengths)) if split[d]), key=lambda d: -lengths[d]):
        L = lengths[d]
        base, extra = divmod(L, cp)
        least_filled = sorted(range(cp), key=lambda r: (count[r], r))[:extra]  # keeps counts within 1
        share = [base + (r in least_filled) for r in range(cp)]
        sizes = [0] * (2 * cp)
        for r in range(cp):
            sizes[r] = share[r] // 2
            sizes[2 * cp - 1 - r] = share[r] - sizes[r]
        pos = 0
        for k, size in enumerate(sizes):
            give(k if k < cp else 2 * cp - 1 - k, starts[d] + pos, size, pos, L)
            pos += size
    for d in sorted((d for d in range(len(lengths)) if not split[d]), key=lambda d: (-costs[d], d)):
        L = lengths[d]
        fits = [r for r in range(cp) if n - count[r] >= L]
        if fits:
            give(min(fits, key=lambda r: (cost[r], r)), starts[d], L, 0, L)
            continue
        pos = 0  # no rank has room for all of it: cut it over the ranks with the most room
        for r in sorted(range(cp), key=lambda r: (count[r], r)):
            take = min(n - count[r], L - pos)
            give(r, starts[d] + pos, take, pos, L)
            pos += take
            if pos == L:
                break
    return chunks


def _index_of(chunks, cp: int, n: int) -> torch.Tensor:
    """``[cp, n]`` ascending row positions of each rank's chunks (vectorised over tokens)."""
    out = torch.empty(cp, n, dtype=torch.long)
    for r in range(cp):
        mine = sorted((s, L) for rank, s, L in chunks if rank == r)
        starts = torch.tensor([s for s, _ in mine], dtype=torch.long)
        lens = torch.tensor([L for _, L in mine], dtype=torch.long)
        out[r] = span_indices(starts, lens)
    return out


def plan_context_parallel(layout: DocumentLayout, cp: int, *, split_threshold: int | None = None,
                          window: int | None = None, strategy: str = "balanced") -> ShardPlan:
    """Plan how to split every row of ``layout`` over ``cp`` ranks (see the module docstring).

    Args:
        layout: the batch's :class:`~packmask.layout.DocumentLayout` (``[B, N]``, ``N % cp == 0``).
        cp: context-parallel ranks.
        split_threshold: documents of at least this many tokens are zig-zagged over all ranks,
            shorter ones stay whole on one rank (unless no rank has room left). ``None``: zig-zag
            every document whose attention work exceeds 1/8 of one rank's share of the row.
        window: sliding window the work is counted with (only changes the balance, never results).
        strategy: ``"balanced"`` (above), ``"zigzag"`` (zig-zag every document of ``>= 2 * cp``
            tokens) or ``"prefix"`` (contiguous slices of the row, unbalanced: for comparison).
    """
    if strategy not in STRATEGIES:
        raise PackmaskError(f"strategy must be one of {STRATEGIES}, got {strategy!r}.")
    if not isinstance(layout, DocumentLayout):
        raise PackmaskError(
            f"context parallelism splits block-diagonal (document) layouts; this batch has a {type(layout).__name__} "
            f"(prefix-LM, tree or other mask). Pass packed documents (seq_lengths, cu_seq_lens, position_ids or a "
            f"block-diagonal mask), or train these rows without context parallelism.")
    cp = int(cp)
    N = layout.seq_len
    if cp < 1 or N % cp:
        pad = -N % cp
        raise PackmaskError(
            f"a packed row of {N} tokens cannot be split evenly over {cp} context-parallel ranks: pad every row to a "
            f"multiple of {cp} ({N + pad} tokens; the padding becomes a document of its own with label -100), e.g. "
            f"PackedCollator(pad_to_multiple_of={cp}) or pack with max_length a multiple of {cp}.")
    n = N // cp
    rows = _row_lengths(layout)
    chunks = [_plan_row(lengths, cp, n, split_threshold, window, layout.causal, strategy) for lengths in rows]
    index = torch.stack([_index_of(c, cp, n) for c in chunks], 1) if rows else torch.empty(cp, 0, n, dtype=torch.long)
    starts = starts_from_cu_seqlens(layout.cu_seqlens.cpu(), layout.batch_size, N)
    return ShardPlan(cp, index, doc_ids_from_starts(starts, local=True), layout.position_ids.cpu(), chunks,
                     layout.causal, window)
