"""Tree layouts: shared-prefix rows and speculative-decoding draft trees, one type for both.

A :class:`TreeLayout` describes, per row, a forest of new tokens over an optional KV cache. Every
token has a *parent* (an earlier token of its row, or -1 for a child of the cache / a root); a token
attends to the visible cache columns, to every ancestor and to itself. Chains of tokens with a
single child form *segments*: a segment's queries attend causally to themselves (bottom-right
aligned) and fully to the keys of their ancestor segments and the cache, which is what the varlen
and flex kernels are given (:meth:`TreeLayout.pieces`, :meth:`TreeLayout.visible`).

Worked example — a 3-level draft tree of 5 tokens over a cache of 2 tokens ``x0 x1``; ``a`` and
``b`` are alternatives for the next token, ``a`` has two children ``c`` and ``d``, ``b`` one child
``e``::

    parents     a:-1  b:-1  c:0  d:0  e:1            (index of the parent, -1 = the cache)
    depth        0     0    1    1    1
    positions    2     2    3    3    3              (past_length + depth)
    mask [N=5, K = past 2 + 5]
           x0 x1  a  b  c  d  e
    a       1  1  1  .  .  .  .
    b       1  1  .  1  .  .  .
    c       1  1  1  .  1  .  .
    d       1  1  1  .  .  1  .
    e       1  1  .  1  .  .  1

>>> layout = TreeLayout.from_parents(torch.tensor([[-1, -1, 0, 0, 1]]), past_length=2)
>>> layout.position_ids.tolist()
[[2, 2, 3, 3, 3]]
>>> layout.dense_mask()[0, 0].int().tolist()[4]
[1, 1, 0, 1, 0, 0, 1]

Without a cache (``past_length=0``) the same type holds the shared-prefix training rows of the
preference pipeline (prompt | chosen | rejected): see :func:`packmask.masks.tree_mask_from_segments`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .errors import PackmaskError
from .segments import (cu_seqlens_from_lengths, cu_seqlens_from_starts, doc_ids_from_starts, lengths_from_cu_seqlens,
                       span_indices, starts_from_ids)

__all__ = ["TreeLayout", "tree_depths", "analyse_tree_mask"]


def _pointer_jump(parent: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sum of ``weight`` over every strict ancestor chain link, by pointer jumping (log-depth steps).

    ``parent[..., i]`` < i or -1. Returns ``acc[..., i] = sum of weight[j]`` over the links
    ``i -> parent(i) -> ...`` (``weight[i]`` counted for each node that has a parent).
    """
    n = parent.shape[-1]
    lead = parent.shape[:-1]
    flat_parent = parent.reshape(-1, n)
    sentinel = n  # a node that points at itself with weight 0
    ptr = torch.where(flat_parent >= 0, flat_parent, torch.full_like(flat_parent, sentinel))
    ptr = torch.cat([ptr, torch.full_like(ptr[:, :1], sentinel)], -1)
    acc = torch.cat([torch.where(flat_parent >= 0, weight.reshape(-1, n), torch.zeros_like(flat_parent)),
                     torch.zeros_like(flat_parent[:, :1])], -1)
    for _ in range(max(1, int(n).bit_length())):
        acc = acc + torch.gather(acc, 1, ptr)
        ptr = torch.gather(ptr, 1, ptr)
    return acc[:, :n].reshape(*lead, n)


def tree_depths(parents: torch.Tensor) -> torch.Tensor:
    """Depth of every token of a parent array (roots: 0), vectorised (no loop per token).

    >>> tree_depths(torch.tensor([-1, 0, 1, 0, -1])).tolist()
    [0, 1, 2, 1, 0]
    """
    return _pointer_jump(parents, torch.ones_like(parents))


def _check_parents(parents: torch.Tensor, where: str = "parents") -> None:
    n = parents.shape[-1]
    idx = torch.arange(n, device=parents.device)
    bad = (parents >= idx) | (parents < -1)
    if bool(bad.any()):
        pos = torch.nonzero(bad)[0].tolist()
        i = pos[-1]
        raise PackmaskError(
            f"{where}{pos[:-1] if len(pos) > 1 else ''}[{i}] = {int(parents.reshape(-1, n)[pos[0] if len(pos) > 1 else 0, i])}: "
            f"a tree token's parent must be an earlier token (index < {i}) or -1 (a child of the cache / a root); "
            f"a token may never see a later token. Order the draft tree parents-first (e.g. breadth-first).")


def _check_segments(row, start, length, parent, N: int) -> None:
    def fail(k, why):
        raise PackmaskError(f"segment {k} (row {int(row[k])}, start {int(start[k])}, length {int(length[k])}, parent "
                            f"{int(parent[k])}): {why}")
    bad = torch.nonzero((length < 1) | (start < 0) | (start + length > N)).reshape(-1)
    if len(bad):
        fail(int(bad[0]), f"a segment needs length >= 1 and must lie inside the row's {N} tokens.")
    gp = parent.clamp(min=0, max=max(len(row) - 1, 0))
    bad = torch.nonzero((parent >= len(row)) | (parent < -1)
                        | ((parent >= 0) & ((row[gp] != row) | (start[gp] + length[gp] > start)))).reshape(-1)
    if len(bad):
        fail(int(bad[0]), "its parent must be a segment of the same row and must end before it starts (a token "
                          "may never see a later token).")


@dataclass(eq=False)
class TreeLayout:
    """A forest of new tokens per row, optionally over a KV cache (the cache is every root's parent).

    Attributes:
        parent: ``[B, N]`` long, index of each token's parent in its row, -1 for roots.
        cache_start: ``[B]`` long, first visible cache column (columns before it are left padding).
        past: number of cache columns ``K - N`` of the mask this layout came from (0: no cache).
        depth: ``[B, N]`` number of ancestors of each token inside the tree.
    """

    parent: torch.Tensor
    cache_start: torch.Tensor
    past: int
    depth: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_parents(cls, parents: torch.Tensor, past_length=0) -> "TreeLayout":
        """From a ``[B, N]`` parent array and per-row cache lengths (an int or ``[B]``).

        Rows with a shorter cache than the longest are left-padded: key columns
        ``[0, past - past_length[b])`` are invisible to row ``b``.
        """
        parents = torch.as_tensor(parents, dtype=torch.long)
        if parents.dim() == 1:
            parents = parents[None]
        _check_parents(parents)
        B = parents.shape[0]
        lengths = torch.as_tensor(past_length, dtype=torch.long, device=parents.device).reshape(-1).expand(B)
        if bool((lengths < 0).any()):
            raise PackmaskError(f"past_length must be >= 0, got {lengths.tolist()}.")
        past = int(lengths.max()) if B else 0
        return cls(parents, past - lengths, past, tree_depths(parents))

    @classmethod
    def from_segments(cls, segments_per_row, seq_len: int, *, device=None) -> "TreeLayout":
        """Packed tree rows (no cache) from per-row segments ``(start, length, parent)``: a token
        attends causally inside its segment and fully to every ancestor segment; ``parent`` is the
        index of a segment of the same row (-1: a root). The padding rule: tokens no segment covers
        (the row's padding) form a root chain of their own, one per run.

        ::

            segments   p=(0, 3, -1)  c=(3, 2, 0)  r=(5, 2, 0)   seq_len 8
            tokens     p0 p1 p2 c0 c1 r0 r1 P
            parents    -1  0  1  2  3  2  5 -1
            positions   0  1  2  3  4  3  4  0

        >>> layout = TreeLayout.from_segments([[(0, 3, -1), (3, 2, 0), (5, 2, 0)]], 8)
        >>> layout.parent.tolist(), layout.position_ids.tolist()
        ([[-1, 0, 1, 2, 3, 2, 5, -1]], [[0, 1, 2, 3, 4, 3, 4, 0]])
        """
        rows = [[tuple(int(x) for x in seg) for seg in r] for r in segments_per_row]
        flat = torch.tensor([seg for r in rows for seg in r], dtype=torch.long).reshape(-1, 3)
        counts = torch.tensor([len(r) for r in rows], dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(len(rows)), counts)
        first = cu_seqlens_from_lengths(counts).long()[:-1]  # each row's first segment
        local = flat[:, 2]
        bad = torch.nonzero((local < -1) | (local >= counts[row])).reshape(-1)
        if len(bad):
            k = int(bad[0])
            raise PackmaskError(f"segments_per_row[{int(row[k])}][{k - int(first[row[k]])}] = {rows[int(row[k])][k - int(first[row[k]])]}: "
                                f"parent must be -1 (a root) or the index of a segment of the same row "
                                f"(0..{int(counts[row[k]]) - 1}).")
        parent = torch.where(local >= 0, local + first[row], local)
        return cls.from_segment_arrays(row, flat[:, 0], flat[:, 1], parent, len(rows), seq_len, device=device)

    @classmethod
    def from_segment_arrays(cls, row, start, length, parent, batch_size: int, seq_len: int, *,
                            device=None) -> "TreeLayout":
        """:meth:`from_segments` over flat ``[S]`` arrays (any array-like): the ``row`` of every
        segment, its ``start`` in the row, its ``length``, and ``parent``, the *global* index of its
        parent segment in these arrays (-1: a root). Vectorised: no loop over segments or tokens.

        >>> TreeLayout.from_segment_arrays([0, 0, 0], [0, 3, 5], [3, 2, 2], [-1, 0, 0], 1, 7).parent.tolist()
        [[-1, 0, 1, 2, 3, 2, 5]]
        """
        row, start, length, parent = (torch.as_tensor(a, dtype=torch.long).reshape(-1).to(device)
                                      for a in (row, start, length, parent))
        B, N = int(batch_size), int(seq_len)
        _check_segments(row, start, length, parent, N)
        tokens = span_indices(row * N + start, length)  # flat index of every covered token
        cover = torch.bincount(tokens, minlength=B * N)
        if bool((cover > 1).any()):
            t = int(torch.nonzero(cover > 1)[0])
            raise PackmaskError(f"segments of row {t // N} overlap at token {t % N}; each token belongs to one segment.")
        segment_of = torch.full((B * N,), -1, dtype=torch.long, device=row.device)
        segment_of[tokens] = torch.repeat_interleave(torch.arange(len(row), device=row.device), length)
        # a segment, or a run of uncovered tokens (the padding rule), begins wherever the segment id changes
        starts = starts_from_ids(segment_of.reshape(B, N))
        parents = (torch.arange(N, device=row.device) - 1).expand(B, N).clone()  # continue the previous token
        parents[starts] = -1
        child = parent >= 0
        gp = parent.clamp(min=0)
        parents[row[child], start[child]] = (start[gp] + length[gp] - 1)[child]  # the parent segment's last token
        return cls.from_parents(parents)

    # ---- shapes and positions -----------------------------------------------------------------
    @property
    def batch_size(self) -> int:
        return self.parent.shape[0]

    @property
    def seq_len(self) -> int:
        return self.parent.shape[1]

    @property
    def key_len(self) -> int:
        return self.past + self.seq_len

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, N]``: visible cache length + depth (what the path has when run alone after the cache)."""
        return (self.past - self.cache_start)[:, None] + self.depth

    def key_position_ids(self, kv_len: int | None = None) -> torch.Tensor:
        """``[B, kv_len]`` position of every key column of a layer's keys (see :meth:`frame`)."""
        key = ("kpos", kv_len)
        if key not in self._memo:
            offset, kv = self.frame(kv_len)
            cols = torch.arange(offset, offset + kv, device=self.parent.device)
            cache_pos = cols[None] - self.cache_start[:, None]
            t = (cols - self.past).clamp(0, self.seq_len - 1)
            tree_pos = self.position_ids[:, t]
            pos = torch.where(cols[None] < self.past, cache_pos, tree_pos)
            self._memo[key] = torch.where(cols[None] < self.key_len, pos, torch.full_like(pos, -(1 << 40)))
        return self._memo[key]

    def frame(self, kv_len: int | None = None) -> tuple[int, int]:
        """``(first mask column, kv_len)`` of a layer's keys.

        A layer's keys are the mask's ``K = past + N`` columns, except: a sliding-window cache layer
        keeps only the last ``kv_len < K`` of them (the evicted ones are outside its window), and a
        static cache returns its whole buffer (``kv_len > K``; the columns from ``K`` on are unused).
        """
        kv = self.key_len if kv_len is None else int(kv_len)
        if kv < self.seq_len:
            raise PackmaskError(f"a layer has {kv} keys for {self.seq_len} new tokens; expected at least {self.seq_len}.")
        return (self.key_len - kv if kv < self.key_len else 0), kv

    # ---- segments (chains of single children) -------------------------------------------------
    def segments(self) -> dict:
        """Segments over the flattened ``B * N`` tokens (computed once, vectorised).

        A token starts a segment unless its parent is the token just before it and that token has
        no other child. Returns ``start`` (flat index), ``length``, ``cu_seqlens`` (int32, the
        segments as varlen sequences), ``parent`` (global segment id
        or -1), ``row``, ``depth`` (segment depth), ``of_token`` ``[B, N]`` and ``ancestors``
        ``[S, D + 1]``: the ancestor segment of each segment at every depth (-1 beyond its own).
        """
        if "segments" in self._memo:
            return self._memo["segments"]
        B, N = self.parent.shape
        dev = self.parent.device
        idx = torch.arange(N, device=dev)
        children = torch.zeros(B, N + 1, dtype=torch.long, device=dev)
        children.scatter_add_(1, torch.where(self.parent >= 0, self.parent, torch.full_like(self.parent, N)),
                              torch.ones_like(self.parent))
        start = torch.ones(B, N, dtype=torch.bool, device=dev)
        start[:, 1:] = (self.parent[:, 1:] != idx[1:] - 1) | (children[:, :N - 1] > 1)
        of_token = doc_ids_from_starts(start)  # segments are the documents of these start flags
        cu = cu_seqlens_from_starts(start)
        seg_start = cu[:-1].long()
        S = seg_start.numel()
        seg_len = lengths_from_cu_seqlens(cu)
        row = seg_start // max(N, 1)
        par_tok = self.parent.reshape(-1)[seg_start]
        seg_parent = torch.where(par_tok >= 0, of_token.reshape(-1)[(row * N + par_tok).clamp(min=0)],
                                 torch.full_like(par_tok, -1))
        # segment ids are ordered like their tokens, so a parent segment always precedes its child
        local_parent = torch.where(seg_parent >= 0, seg_parent, torch.full_like(seg_parent, -1))
        seg_depth = _pointer_jump(local_parent[None], torch.ones_like(local_parent)[None])[0]
        D = int(seg_depth.max()) if S else 0
        # binary lifting: ancestors[s, d] = ancestor of s at depth d
        up = torch.where(seg_parent >= 0, seg_parent, torch.arange(S, device=dev))
        steps = seg_depth[:, None] - torch.arange(D + 1, device=dev)[None]  # [S, D+1]
        cur = torch.arange(S, device=dev)[:, None].expand(S, D + 1).clone()
        for k in range(max(1, D.bit_length())):
            bit = ((steps.clamp(min=0) >> k) & 1).bool()
            cur = torch.where(bit, up[cur], cur)
            up = up[up]
        ancestors = torch.where(steps >= 0, cur, torch.full_like(cur, -1))
        out = dict(start=seg_start, length=seg_len, cu_seqlens=cu, parent=seg_parent, row=row, depth=seg_depth,
                   of_token=of_token, ancestors=ancestors)
        self._memo["segments"] = out
        return out

    # ---- the mask, evaluated on demand --------------------------------------------------------
    def visible(self, b, q, col) -> torch.Tensor:
        """Whether query ``q`` of row ``b`` sees mask column ``col`` (broadcasting index tensors).

        The element-wise form flex's ``mask_mod`` evaluates, O(1) per pair: a cache column is
        visible from ``cache_start[b]`` on; a tree column ``t`` when ``t <= q`` and ``t``'s segment
        is the ancestor of ``q``'s segment at ``t``'s segment depth.
        """
        seg = self.segments()
        of_token, depth, anc = seg["of_token"], seg["depth"], seg["ancestors"]
        t = col - self.past
        tc = t.clamp(0, self.seq_len - 1)
        sq = of_token[b, q]
        sk = of_token[b, tc]
        tree = (anc[sq, depth[sk]] == sk) & (tc <= q)
        cache = (col >= self.cache_start[b]) & (col < self.past)
        return torch.where(t >= 0, tree & (col < self.key_len), cache)

    def dense_mask(self, sliding_window: int | None = None, bidirectional_window: bool = False,
                   kv_len: int | None = None) -> torch.Tensor:
        """``[B, 1, N, kv_len]`` bool mask (True = may attend). O(N·K): CPU / reference paths only.

        ``kv_len``: the layer's number of keys (see :meth:`frame`); None = the mask's ``K``.
        """
        if bidirectional_window:
            raise PackmaskError("a tree layout is causal; a bidirectional sliding window cannot apply to it.")
        key = ("dense", sliding_window, kv_len)
        if key not in self._memo:
            offset, kv = self.frame(kv_len)
            dev = self.parent.device
            b = torch.arange(self.batch_size, device=dev)[:, None, None]
            q = torch.arange(self.seq_len, device=dev)[None, :, None]
            col = torch.arange(offset, offset + kv, device=dev)[None, None, :]
            m = self.visible(b, q, col)
            if sliding_window is not None:
                kpos = self.key_position_ids(kv_len)
                m = m & ((self.position_ids[:, :, None] - kpos[:, None, :]) < sliding_window)
            self._memo[key] = m[:, None]
        return self._memo[key]

    def to(self, device) -> "TreeLayout":
        if self.parent.device == torch.device(device):
            return self
        return TreeLayout(self.parent.to(device), self.cache_start.to(device), self.past, self.depth.to(device))


def analyse_tree_mask(m: torch.Tensor, *, strict: bool = False) -> TreeLayout | None:
    """Recognise a forest (over an optional cache) in a ``[B, N, K]`` bool mask, ``K = past + N``.

    Vectorised, O(B·N·K): each token's parent is the last earlier new token it sees; the mask is a
    tree exactly when every token's row equals its parent's row plus itself and every query of a row
    sees the same contiguous run of cache columns ending at ``past``. Returns None otherwise — or,
    with ``strict`` (a cache is present), raises when a token sees a later token.

    >>> m = TreeLayout.from_parents(torch.tensor([[-1, 0, 0]]), past_length=1).dense_mask()[:, 0]
    >>> analyse_tree_mask(m).parent.tolist()
    [[-1, 0, 0]]
    """
    B, N, K = m.shape
    past = K - N
    if past < 0:
        raise PackmaskError(f"attention_mask has {K} key columns for {N} query tokens; expected past + {N}.")
    new = m[:, :, past:]
    # every condition is computed on the device and read back at once (one host sync per mask), in few
    # launches: the forward of a small model is bound by the host, and this runs once per forward
    later = new.triu(1)  # a token seeing a later token
    lower = new.tril(-1)  # the earlier tokens each token sees: its ancestors, exactly when it is a tree
    # each token's parent is the last earlier token it sees (-1: none, a root)
    if N:
        parent = (lower * torch.arange(1, N + 1, device=m.device)).amax(-1) - 1
    else:
        parent = torch.full((B, N), -1, dtype=torch.long, device=m.device)
    has_parent = parent >= 0
    parent_rows = torch.gather(new, 1, parent.clamp(min=0)[:, :, None].expand(B, N, N)) & has_parent[:, :, None]
    # a tree: nothing later, every token sees itself, and its earlier tokens are exactly its parent's row
    checks = [later.any(), new.diagonal(dim1=1, dim2=2).all(), parent_rows.eq(lower).all()]
    if past:
        first_row = m[:, :1, :past]
        cache_start = past - first_row[:, 0].sum(-1)
        # every query of a row sees the row's cache columns, and they are one run ending at the last one
        checks += [(m[:, :, :past] == first_row).all(), (first_row[..., 1:] >= first_row[..., :-1]).all()]
    else:
        cache_start = torch.zeros(B, dtype=torch.long, device=m.device)
    sees_later, *tree_checks = torch.stack(checks).tolist()
    if sees_later:
        if strict:
            b, i, j = torch.nonzero(later)[0].tolist()
            raise PackmaskError(
                f"attention_mask[{b}, {i}, {past + j}]: new token {i} of row {b} sees the later token {j} (mask column "
                f"{past + j} = past {past} + {j}); a draft-tree token may see only the cache, its ancestors and "
                f"itself. Order the tree parents-first and build the mask with packmask.tree_mask(parents, past_length).")
        return None
    if not all(tree_checks):
        return None
    return TreeLayout(parent, cache_start, past, new.sum(-1) - 1)
