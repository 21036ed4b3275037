"""Best-fit decreasing without numba: the exact twin of :mod:`packmask.data.binpack`'s ``"bfd"``
(same rows, same order), for a process's first packing call, which would otherwise spend most of
its time importing numba and loading its kernels.

It places a whole group of equal lengths at a time. Longest first, a length-``s`` item goes to the
open row with the least free space ``f >= s`` (the most recently filled such row on ties, as the
numba kernel's stacks do); that row then has ``f - s`` free, still the least ``>= s`` if it is at
least ``s``, so the same row takes the next ``f // s`` items of the group at once. New rows take
``max_length // s`` items each. The Python loop runs once per (group, row touched), not per item.

Worked example (``max_length=8``, as in :mod:`packmask.data.binpack`)::

    lengths        A=5  B=3  C=6  D=2
    group 6  C -> new row 0 (free 2);  group 5  A -> new row 1 (free 3)
    group 3  B -> row 1 (free 3 -> 0); group 2  D -> row 0 (free 2 -> 0)

    >>> grouped, row_offsets = rows_bfd(np.array([5, 3, 6, 2]), 8)
    >>> grouped.tolist(), row_offsets.tolist()      # row 0 = C, D; row 1 = A, B
    ([2, 3, 0, 1], [0, 2, 4])
"""
from __future__ import annotations

import bisect

import numpy as np

from .spans import offsets_from_lengths

__all__ = ["rows_bfd"]


class _OpenRows:
    """Open rows by free space: a stack of rows per free-space value (top = most recent) and the
    sorted free-space values whose stack is not empty."""

    def __init__(self):
        self.stacks: dict[int, list[int]] = {}
        self.frees: list[int] = []

    def push(self, free: int, rows) -> None:
        rows = list(rows)
        if free <= 0 or not rows:
            return  # a full row is never a candidate again
        stack = self.stacks.get(free)
        if not stack:
            self.stacks[free] = stack = []
            bisect.insort(self.frees, free)
        stack.extend(rows)

    def pop_best_fit(self, size: int):
        """The row with the least free space ``>= size`` (top of its stack) and that space, or None."""
        j = bisect.bisect_left(self.frees, size)
        if j == len(self.frees):
            return None
        free = self.frees[j]
        stack = self.stacks[free]
        row = stack.pop()
        if not stack:
            del self.frees[j]
        return row, free


def rows_bfd(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """``(grouped, row_offsets)`` exactly as ``binpack.assign_rows(lengths, max_length, "bfd")``;
    ``lengths`` int ``[n]`` with values in ``[1, max_length]``."""
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-lengths, kind="stable")           # longest first, ties by index
    neg_sizes, counts = np.unique(-lengths[order], return_counts=True)
    open_rows = _OpenRows()
    touched, placed = [], []                               # (row, items) in processing order
    rows = 0
    for size, k in zip((-neg_sizes).tolist(), counts.tolist()):
        i = 0
        while i < k:
            fit = open_rows.pop_best_fit(size)
            if fit is None:                                # new rows, max_length // size items each
                per = max_length // size
                full, last = divmod(k - i, per)
                touched.extend(range(rows, rows + full))
                placed.extend([per] * full)
                open_rows.push(max_length - per * size, range(rows, rows + full))
                rows += full
                if last:
                    touched.append(rows)
                    placed.append(last)
                    open_rows.push(max_length - last * size, [rows])
                    rows += 1
                break
            row, free = fit
            m = min(free // size, k - i)
            touched.append(row)
            placed.append(m)
            open_rows.push(free - m * size, [row])
            i += m
    row_of = np.repeat(np.asarray(touched, np.int64), np.asarray(placed, np.int64))   # in processing order
    grouped = order[np.argsort(row_of, kind="stable")]     # by row; inside a row, in placement order
    return grouped, offsets_from_lengths(np.bincount(row_of, minlength=rows))
