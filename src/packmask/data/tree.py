"""Tree packing, the general form: a forest of token segments, each with a parent.

An *example* is a small tree of segments (a prompt with two answers, a prompt with G completions,
a multi-turn conversation with branches). Whole examples go into rows of at most ``max_length``
tokens by the project's bin packer (:func:`packmask.data.packing.pack_lengths`, best-fit decreasing
on example size). Inside a row a token attends causally inside its own segment and fully to every
token of every ancestor segment; positions continue from the parent::

    example 0: prompt P=[p0 p1 p2], chosen C=[c0 c1] (parent P), rejected R=[r0 r1] (parent P)

    tokens      p0 p1 p2 c0 c1 r0 r1 | pad
    segments    (0,3,-1) (3,2,0) (5,2,0) | (7,1,-1)      (start, length, parent)
    positions    0  1  2  3  4  3  4 |  0
    scored       .  .  .  c0 c1 r0 r1                       (responses; the prompt is context)
    predicted by .  .  .  p2 c0 p2 r0                       (r0's predictor is its parent's last token)

Everything is numpy over flat arrays (one entry per segment or per token); the only Python loops
run over tree depth or over rows, never over tokens.

>>> forest = Forest.from_segments([[1, 2, 3], [4, 5], [6, 7]], parents=[-1, 0, 0], example=[0, 0, 0],
...                               kind=[0, 1, 2], scored=[False, True, True])
>>> rows = pack_forest(forest, max_length=8)
>>> rows.tokens.tolist(), rows.positions.tolist()
([1, 2, 3, 4, 5, 6, 7], [0, 1, 2, 3, 4, 3, 4])
>>> rows.seg_start.tolist(), rows.seg_parent.tolist()
([0, 3, 5], [-1, 0, 0])
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import PackmaskError
from .assignment import pack_lengths
from .kernel_choice import packing_call
from .spans import gather_spans, lengths_from_offsets, offsets_from_lengths, run_lengths, run_starts, span_indices

__all__ = ["Forest", "PackedForest", "pack_forest", "concat_forests"]


@dataclass
class Forest:
    """Examples as flat segment arrays (``S`` segments, ``T`` tokens).

    ``tokens[seg_offsets[s]:seg_offsets[s+1]]`` are segment ``s``'s tokens; ``parent[s]`` is the index
    (within the same example, counted from the example's first segment) of its parent, ``-1`` for a
    root, and must be smaller than the segment's own index (parents come first). ``example[s]`` is the
    example id, non-decreasing. ``kind`` labels a segment (preference: 0 prompt, 1 chosen, 2 rejected);
    ``scored`` marks segments whose tokens get log-probabilities.
    """

    tokens: np.ndarray
    seg_offsets: np.ndarray
    parent: np.ndarray
    example: np.ndarray
    kind: np.ndarray
    scored: np.ndarray

    @classmethod
    def from_segments(cls, segments, parents, example, kind, scored) -> "Forest":
        lengths = np.array([len(s) for s in segments], np.int64)
        tokens = np.concatenate([np.asarray(s, np.int64) for s in segments]) if len(segments) else np.zeros(0, np.int64)
        return cls(tokens, offsets_from_lengths(lengths), np.asarray(parents, np.int64), np.asarray(example, np.int64),
                   np.asarray(kind, np.int64), np.asarray(scored, bool)).validate()

    @property
    def seg_lengths(self) -> np.ndarray:
        return lengths_from_offsets(self.seg_offsets)

    def validate(self) -> "Forest":
        S = self.parent.shape[0]
        for name in ("example", "kind", "scored"):
            if getattr(self, name).shape[0] != S:
                raise PackmaskError(f"Forest: {name} has {getattr(self, name).shape[0]} entries for {S} segments.")
        if self.seg_offsets.shape[0] != S + 1 or self.seg_offsets[-1] != self.tokens.shape[0]:
            raise PackmaskError("Forest: seg_offsets must have one entry per segment plus one and end at len(tokens).")
        if S and np.any(self.example[1:] < self.example[:-1]):
            raise PackmaskError("Forest: segments must be grouped by example (example ids non-decreasing).")
        local = np.arange(S) - self._example_first_segment()
        bad = (self.parent >= local) | (self.parent < -1)
        if np.any(bad):
            s = int(np.flatnonzero(bad)[0])
            raise PackmaskError(f"Forest: segment {s} (example {int(self.example[s])}) has parent {int(self.parent[s])}; "
                                "a parent must be an earlier segment of the same example, or -1 for a root.")
        return self

    def _example_first_segment(self) -> np.ndarray:
        """For every segment, the global index of its example's first segment."""
        S = self.parent.shape[0]
        if S == 0:
            return np.zeros(0, np.int64)
        new = run_starts(self.example)
        return np.repeat(np.flatnonzero(new), run_lengths(new))

    def example_sizes(self) -> tuple[np.ndarray, np.ndarray]:
        """``(example ids, tokens per example, first segment of each example, segments per example)``."""
        ids, start = np.unique(self.example, return_index=True)
        seg_counts = lengths_from_offsets(np.append(start, self.parent.shape[0]))
        sizes = np.add.reduceat(self.seg_lengths, start) if start.size else np.zeros(0, np.int64)
        return ids, sizes.astype(np.int64), start, seg_counts


@dataclass
class PackedForest:
    """Rows of packed trees. Tokens of row ``r`` are ``tokens[row_offsets[r]:row_offsets[r+1]]``;
    segments of row ``r`` are ``seg_row_offsets[r]:seg_row_offsets[r+1]`` with row-local ``seg_start``,
    ``seg_length`` and ``seg_parent`` (row-local segment index, ``-1`` for roots)."""

    tokens: np.ndarray
    positions: np.ndarray
    row_offsets: np.ndarray
    seg_row_offsets: np.ndarray
    seg_start: np.ndarray
    seg_length: np.ndarray
    seg_parent: np.ndarray
    seg_example: np.ndarray
    seg_kind: np.ndarray
    seg_scored: np.ndarray

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets.shape[0] - 1)

    def row_lengths(self) -> np.ndarray:
        return lengths_from_offsets(self.row_offsets)

    def segments(self) -> list[list[tuple[int, int, int]]]:
        """Per row ``[(start, length, parent), ...]`` -- the form :meth:`packmask.TreeLayout.from_segments`
        and :func:`packmask.masks.tree_mask_from_segments` take."""
        return [list(zip(self.seg_start[a:b].tolist(), self.seg_length[a:b].tolist(), self.seg_parent[a:b].tolist()))
                for a, b in zip(self.seg_row_offsets[:-1], self.seg_row_offsets[1:])]


def _segment_positions(parent_global: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Position of every segment's first token: 0 for roots, else the parent's first position plus the
    parent's length. One vectorised pass per tree level."""
    pos0 = np.zeros(parent_global.shape[0], np.int64)
    has_parent = parent_global >= 0
    p = parent_global[has_parent]
    for _ in range(parent_global.shape[0] + 1):
        new = pos0.copy()
        new[has_parent] = pos0[p] + lengths[p]
        if np.array_equal(new, pos0):
            return pos0
        pos0 = new
    raise PackmaskError("Forest: parent links form a cycle.")  # pragma: no cover - validate() forbids it


def pack_forest(forest: Forest, max_length: int, *, strategy: str = "bfd") -> PackedForest:
    """Pack whole examples of ``forest`` into rows of at most ``max_length`` tokens.

    An example larger than a row raises (the presets apply their overflow policy before calling this).
    """
    with packing_call():
        return _pack_forest(forest, max_length, strategy)


def _pack_forest(forest: Forest, max_length: int, strategy: str) -> PackedForest:
    ids, sizes, first_seg, seg_counts = forest.example_sizes()
    if np.any(sizes > max_length):
        i = int(np.flatnonzero(sizes > max_length)[0])
        raise PackmaskError(f"example {int(ids[i])} has {int(sizes[i])} tokens, more than a row of max_length={max_length}; "
                            "truncate or drop it first (pack_preference / pack_groups do that with overflow=...).")
    if np.any(sizes == 0):
        raise PackmaskError(f"example {int(ids[np.flatnonzero(sizes == 0)[0]])} has no tokens.")
    assignment = pack_lengths(sizes, max_length, strategy=strategy, overflow="error")
    order = assignment.doc_index                       # examples in row order
    examples_per_row = lengths_from_offsets(assignment.row_offsets)
    counts = seg_counts[order]
    seg_take = span_indices(first_seg[order], counts)       # global segment ids in row order
    seg_rows = np.repeat(np.repeat(np.arange(assignment.num_rows), examples_per_row), counts)
    seg_row_offsets = offsets_from_lengths(np.bincount(seg_rows, minlength=assignment.num_rows))

    lengths = forest.seg_lengths[seg_take]
    dst = offsets_from_lengths(lengths)
    row_offsets = dst[seg_row_offsets]
    seg_start = dst[:-1] - row_offsets[seg_rows]

    # parents: example-local -> global (input order) -> row-local (output order)
    first_of_seg = forest._example_first_segment()
    parent_in = np.where(forest.parent >= 0, forest.parent + first_of_seg, -1)
    pos0_in = _segment_positions(parent_in, forest.seg_lengths)
    where = np.empty(seg_take.shape[0], np.int64)
    where[seg_take] = np.arange(seg_take.shape[0])
    parent_out = parent_in[seg_take]
    seg_parent = np.where(parent_out >= 0, where[np.maximum(parent_out, 0)] - seg_row_offsets[seg_rows], -1)

    tokens = gather_spans(forest.tokens, forest.seg_offsets[:-1][seg_take], lengths)
    positions = span_indices(pos0_in[seg_take], lengths)
    return PackedForest(tokens, positions, row_offsets, seg_row_offsets, seg_start, lengths, seg_parent,
                        forest.example[seg_take], forest.kind[seg_take], forest.scored[seg_take])


def concat_forests(rows: list[dict]) -> PackedForest:
    """A :class:`PackedForest` from dataset rows (the columns :func:`packmask.pack_preference` writes). One loop
    over rows (lists are joined), none over tokens."""
    if not rows:
        raise PackmaskError("no rows to collate.")
    need = ("input_ids", "seg_lengths", "seg_parents")
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise PackmaskError(f"row {i} lacks {missing}; tree rows come from packmask.pack_preference / pack_groups "
                                "(keep these columns: set TrainingArguments(remove_unused_columns=False)).")
    cat = lambda key, dtype: np.concatenate([np.asarray(r[key], dtype) for r in rows])  # noqa: E731
    seg_length = cat("seg_lengths", np.int64)
    tokens = cat("input_ids", np.int64)
    n_seg = np.array([len(r["seg_lengths"]) for r in rows], np.int64)
    n_tok = np.array([len(r["input_ids"]) for r in rows], np.int64)
    seg_row_offsets, row_offsets = offsets_from_lengths(n_seg), offsets_from_lengths(n_tok)
    seg_rows = np.repeat(np.arange(len(rows)), n_seg)
    per_row_sum = np.bincount(seg_rows, weights=seg_length, minlength=len(rows)).astype(np.int64)
    if not np.array_equal(per_row_sum, n_tok):
        r = int(np.flatnonzero(per_row_sum != n_tok)[0])
        raise PackmaskError(f"row {r}: seg_lengths sum to {per_row_sum[r]} but the row has {n_tok[r]} tokens.")
    seg_start = (offsets_from_lengths(seg_length)[:-1] - row_offsets[seg_rows])
    S = seg_length.shape[0]
    get = lambda key, dtype, default: cat(key, dtype) if key in rows[0] else np.full(S, default, dtype)  # noqa: E731
    parent = cat("seg_parents", np.int64)
    if "position_ids" in rows[0]:
        positions = cat("position_ids", np.int64)
    else:
        gparent = np.where(parent >= 0, parent + seg_row_offsets[seg_rows], -1)
        positions = span_indices(_segment_positions(gparent, seg_length), seg_length)
    return PackedForest(tokens, positions, row_offsets, seg_row_offsets, seg_start, seg_length, parent,
                        get("seg_examples", np.int64, -1), get("seg_kinds", np.int64, 0),
                        get("seg_scored", np.int64, 1).astype(bool))
