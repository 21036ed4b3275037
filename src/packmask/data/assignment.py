"""Lengths in, a :class:`PackAssignment` out: which piece of which document goes into which row.

Pure numpy around the row assignment (:mod:`packmask.data.binpack`, numba; or its numpy twin
:mod:`packmask.data.binpack_python` in a process's first call, see :mod:`packmask.data.kernel_choice`);
the overflow policy (truncate, split, drop, error) and the empty documents are settled here, before
the assignment.

    >>> a = pack_lengths([5, 3, 6, 2], 8)
    >>> a.seq_lengths(), a.row_lengths().tolist()
    ([[6, 2], [5, 3]], [8, 8])
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import PackmaskError
from .binpack_python import rows_bfd
from .kernel_choice import packing_call, use_numba
from .packing_stats import PackingStats
from .spans import lengths_from_offsets, offsets_from_lengths, positions_from_lengths, span_indices

__all__ = ["pack_lengths", "PackAssignment", "assign_rows", "check_packing_args", "STRATEGIES", "OVERFLOWS"]

STRATEGIES = ("bfd", "ffd", "sequential")
OVERFLOWS = ("truncate", "split", "drop", "error")
_MAX_ROW = 1 << 26


@dataclass
class PackAssignment:
    """Where every kept token goes. The output holds ``S`` sequences (pieces of documents) in
    ``R`` rows; sequence ``s`` is ``document[doc_index[s]][start[s] : start[s] + length[s]]`` and row
    ``r`` holds sequences ``row_offsets[r] : row_offsets[r + 1]``, in that order.

    Example -- ``pack_lengths([5, 3, 6, 2], 8)`` (see the module docstring)::

        doc_index    [2, 3, 0, 1]      C, D | A, B
        start        [0, 0, 0, 0]
        length       [6, 2, 5, 3]
        row_offsets  [0, 2, 4]         row 0 = sequences 0..1, row 1 = sequences 2..3
    """

    doc_index: np.ndarray
    start: np.ndarray
    length: np.ndarray
    row_offsets: np.ndarray
    stats: PackingStats

    @property
    def num_rows(self) -> int:
        return int(self.row_offsets.shape[0] - 1)

    def row_lengths(self) -> np.ndarray:
        """Tokens per row, int64 ``[R]``."""
        return lengths_from_offsets(offsets_from_lengths(self.length)[self.row_offsets])

    def seq_lengths(self) -> list[list[int]]:
        """Per-row list of sequence lengths (Python lists; fine for small inputs and tests)."""
        return [self.length[a:b].tolist() for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:])]

    def permute_rows(self, permutation: np.ndarray) -> "PackAssignment":
        """The same packing with rows reordered: new row ``r`` is old row ``permutation[r]``."""
        counts = lengths_from_offsets(self.row_offsets)[permutation]
        take = span_indices(self.row_offsets[:-1][permutation], counts)
        return PackAssignment(self.doc_index[take], self.start[take], self.length[take], offsets_from_lengths(counts),
                              self.stats)


def check_packing_args(max_length: int, strategy: str, overflow: str) -> None:
    """Raise :class:`PackmaskError` naming the fix for a bad ``max_length``, ``strategy`` or ``overflow``."""
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 1:
        raise PackmaskError(f"max_length must be a positive integer (tokens per packed row), got {max_length!r}.")
    if max_length > _MAX_ROW:
        # bfd indexes rows by free space and the sort counts lengths: both take O(max_length) memory
        raise PackmaskError(f"max_length={max_length} is above {_MAX_ROW:,} tokens per row, which this packer does not "
                         "support; pack into rows of at most that size.")
    if strategy not in STRATEGIES:
        raise PackmaskError(f"Unknown strategy {strategy!r}; use one of {STRATEGIES} "
                         "('bfd' packs tightest, 'sequential' keeps document order).")
    if overflow not in OVERFLOWS:
        raise PackmaskError(f"Unknown overflow {overflow!r}; use one of {OVERFLOWS}.")


def assign_rows(lengths: np.ndarray, max_length: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """``(grouped, row_offsets)`` of :func:`packmask.data.binpack.assign_rows`, from the numba kernels or,
    for ``"bfd"`` in a process's first call, from their numpy twin (identical output)."""
    if strategy == "bfd" and not use_numba(lengths.shape[0]):
        return rows_bfd(lengths, max_length)
    from .binpack import assign_rows as numba_assign_rows   # imports numba: only when it runs

    return numba_assign_rows(lengths, max_length, strategy)


def pack_lengths(
    lengths: Any,
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "truncate",
) -> PackAssignment:
    """Assign documents of the given lengths to rows of at most ``max_length`` tokens.

    Args:
        lengths: integer array-like ``[n]`` of document lengths (>= 0).
        max_length: tokens per row.
        strategy: ``"bfd"`` best-fit decreasing over all documents (default, tightest),
            ``"ffd"`` first-fit decreasing, ``"sequential"`` next-fit in input order (keeps order).
        overflow: what happens to a document longer than ``max_length``: ``"truncate"`` (keep its
            first ``max_length`` tokens), ``"split"`` (pieces of ``max_length``, the last shorter, each
            its own sequence), ``"drop"``, or ``"error"``. Empty documents are dropped and counted.

    Returns:
        A :class:`PackAssignment` (with ``.stats``).

    Example::

        >>> a = pack_lengths([5, 3, 6, 2], 8)
        >>> a.seq_lengths()          # row 0: C(6) + D(2), row 1: A(5) + B(3)
        [[6, 2], [5, 3]]
        >>> a.doc_index.tolist()
        [2, 3, 0, 1]
    """
    with packing_call():
        return _pack_lengths(lengths, max_length, strategy, overflow)


def _pack_lengths(lengths, max_length, strategy, overflow) -> PackAssignment:
    begin = time.perf_counter()
    check_packing_args(max_length, strategy, overflow)
    max_length = int(max_length)
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise PackmaskError(f"lengths must be one-dimensional, got shape {lengths.shape}.")
    if lengths.size and not np.issubdtype(lengths.dtype, np.integer):
        raise PackmaskError(f"lengths must be integers, got dtype {lengths.dtype}.")
    lengths = lengths.astype(np.int64, copy=False)
    if lengths.size and lengths.min() < 0:
        raise PackmaskError("lengths must be >= 0.")
    stats = PackingStats(max_length=max_length, strategy=strategy, overflow=overflow, documents=int(lengths.size))

    empty = lengths == 0
    too_long = lengths > max_length
    stats.empty = int(empty.sum())
    n_long = int(too_long.sum())
    if n_long and overflow == "error":
        first = int(np.flatnonzero(too_long)[0])
        raise PackmaskError(
            f"{n_long} document(s) are longer than max_length={max_length} (first: index {first}, "
            f"{int(lengths[first])} tokens). Pass overflow='truncate', 'split' or 'drop', or raise max_length.")

    if overflow == "split" and n_long:
        keep = np.flatnonzero(~empty)
        kept_lengths = lengths[keep]
        pieces_per_doc = -(-kept_lengths // max_length)
        doc_index = np.repeat(keep, pieces_per_doc)
        start = positions_from_lengths(pieces_per_doc) * max_length   # piece k of a document starts at k * max_length
        length = np.minimum(lengths[doc_index] - start, max_length)
        stats.split = n_long
    else:
        if overflow == "drop":
            keep = np.flatnonzero(~empty & ~too_long)
            stats.dropped = n_long
            stats.dropped_tokens = int(lengths[too_long].sum())
        else:
            keep = np.flatnonzero(~empty)
            if overflow == "truncate":
                stats.truncated = n_long
                stats.truncated_tokens = int((lengths[too_long] - max_length).sum())
        doc_index = keep
        start = np.zeros(keep.shape[0], np.int64)
        length = np.minimum(lengths[keep], max_length)

    grouped, row_offsets = assign_rows(length, max_length, strategy)

    stats.sequences = int(grouped.shape[0])
    stats.rows = int(row_offsets.shape[0] - 1)
    stats.tokens = int(length.sum())
    stats.finish()
    stats.seconds = time.perf_counter() - begin
    return PackAssignment(doc_index[grouped].astype(np.int64), start[grouped].astype(np.int64),
                          length[grouped].astype(np.int64), row_offsets, stats)

