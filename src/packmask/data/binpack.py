"""Bin packing kernels: which row each sequence goes to, given only lengths (numba, no Python loop
per sequence).

Three strategies, each ``O(n log max_length)`` or better:

* ``"bfd"`` best-fit decreasing -- longest first, each into the open row with the *least* room that
  still fits it (a count segment tree over free-space values finds it in ``O(log max_length)``);
* ``"ffd"`` first-fit decreasing -- longest first, each into the *lowest-numbered* row with room (a
  max segment tree over rows);
* ``"sequential"`` next-fit in input order -- keeps the documents' order.

Worked example (``max_length=8``)::

    lengths        A=5  B=3  C=6  D=2
    longest first  C(6) A(5) B(3) D(2)
    bfd            C -> row 0 (free 2), A -> row 1 (free 3), B -> row 1 (free 0), D -> row 0 (free 0)

    >>> import numpy as np
    >>> grouped, row_offsets = assign_rows(np.array([5, 3, 6, 2]), 8, "bfd")
    >>> grouped.tolist(), row_offsets.tolist()      # row 0 = C, D; row 1 = A, B
    ([2, 3, 0, 1], [0, 2, 4])

The callers (:func:`packmask.data.packing.pack_lengths`) settle overflow and empty documents first,
so every length here is in ``[1, max_length]``.
"""
from __future__ import annotations

import numpy as np
from .numba_cache import njit

__all__ = ["assign_rows"]


def assign_rows(lengths: np.ndarray, max_length: int, strategy: str) -> tuple[np.ndarray, np.ndarray]:
    """Sequence indices grouped by row, and the row offsets into that list.

    Row ``r`` holds sequences ``grouped[row_offsets[r] : row_offsets[r + 1]]``, in placement order;
    rows are numbered in the order they were opened. ``lengths`` is int64 ``[n]`` with values in
    ``[1, max_length]``. Deterministic: ties are broken by input index.
    """
    # one compiled entry point per strategy: a fresh process loads one cached kernel, not four
    entry = {"bfd": _rows_bfd, "ffd": _rows_ffd, "sequential": _rows_sequential}[strategy]
    return entry(np.ascontiguousarray(lengths, np.int64), max_length)


@njit(cache=True)
def _rows_bfd(lengths, max_length):
    order = _order_by_length_desc(lengths, max_length)
    row_of, rows = _assign_bfd(lengths, order, max_length)
    return _group_by_row(row_of, order, rows)


@njit(cache=True)
def _rows_ffd(lengths, max_length):
    order = _order_by_length_desc(lengths, max_length)
    row_of, rows = _assign_ffd(lengths, order, max_length)
    return _group_by_row(row_of, order, rows)


@njit(cache=True)
def _rows_sequential(lengths, max_length):
    order = np.arange(lengths.shape[0])
    row_of, rows = _assign_sequential(lengths, max_length)
    return _group_by_row(row_of, order, rows)


@njit(cache=True)
def _order_by_length_desc(lengths, max_length):
    """Indices of ``lengths`` sorted longest first, ties by index (a stable counting sort,
    O(n + max_length): lengths are integers in [1, max_length])."""
    n = lengths.shape[0]
    counts = np.zeros(max_length + 1, np.int64)
    for i in range(n):
        counts[lengths[i]] += 1
    start = np.empty(max_length + 1, np.int64)
    acc = 0
    for v in range(max_length, -1, -1):
        start[v] = acc
        acc += counts[v]
    order = np.empty(n, np.int64)
    for i in range(n):
        v = lengths[i]
        order[start[v]] = i
        start[v] += 1
    return order


@njit(cache=True)
def _first_nonempty_at_least(tree, size, low):
    """Smallest leaf index >= ``low`` whose count is > 0 in a count segment tree, or -1."""
    node = low + size
    if tree[node] > 0:
        return low
    found = False
    while node > 1:
        if (node & 1) == 0 and tree[node + 1] > 0:
            node = node + 1
            found = True
            break
        node >>= 1
    if not found:
        return -1
    while node < size:
        if tree[2 * node] > 0:
            node = 2 * node
        else:
            node = 2 * node + 1
    return node - size


@njit(cache=True)
def _tree_add(tree, size, leaf, delta):
    node = leaf + size
    while node >= 1:
        tree[node] += delta
        node >>= 1


@njit(cache=True)
def _assign_bfd(lengths, order, max_length):
    """Best-fit decreasing over all pieces. Rows are grouped by free space: ``tree`` is a count
    segment tree over free-space values 0..max_length (a leaf is 1 while some open row has exactly
    that much space), ``head``/``below`` a stack of rows per free-space value. Each piece goes to a
    row with the smallest free space that still fits it, O(log max_length) per piece."""
    n = lengths.shape[0]
    size = 1
    while size < max_length + 1:
        size *= 2
    tree = np.zeros(2 * size, np.int32)
    head = np.full(max_length + 1, -1, np.int64)
    below = np.empty(n, np.int64)
    row_of = np.empty(n, np.int64)
    rows = 0
    for k in range(n):
        i = order[k]
        length = lengths[i]
        space = _first_nonempty_at_least(tree, size, length)
        if space < 0:
            row = rows
            rows += 1
            free = max_length - length
        else:
            row = head[space]
            head[space] = below[row]
            if head[space] == -1:
                _tree_add(tree, size, space, -1)
            free = space - length
        row_of[i] = row
        if free > 0:
            if head[free] == -1:
                _tree_add(tree, size, free, 1)
            below[row] = head[free]
            head[free] = row
    return row_of, rows


@njit(cache=True)
def _assign_ffd(lengths, order, max_length):
    """First-fit decreasing: each piece goes to the lowest-numbered row with room. A max segment
    tree over row slots (unopened slots hold ``max_length``) finds it in O(log n)."""
    n = lengths.shape[0]
    size = 1
    while size < max(n, 1):
        size *= 2
    tree = np.full(2 * size, max_length, np.int32)
    row_of = np.empty(n, np.int64)
    rows = 0
    for k in range(n):
        i = order[k]
        length = lengths[i]
        node = 1
        while node < size:
            if tree[2 * node] >= length:
                node = 2 * node
            else:
                node = 2 * node + 1
        row = node - size
        row_of[i] = row
        if row + 1 > rows:
            rows = row + 1
        tree[node] -= length
        node >>= 1
        while node >= 1:
            left = tree[2 * node]
            right = tree[2 * node + 1]
            tree[node] = left if left > right else right
            node >>= 1
    return row_of, rows


@njit(cache=True)
def _assign_sequential(lengths, max_length):
    """Next-fit in input order: a piece that does not fit closes the current row. Keeps the
    documents' order, both within and across rows."""
    n = lengths.shape[0]
    row_of = np.empty(n, np.int64)
    row = -1
    free = 0
    for i in range(n):
        if lengths[i] > free:
            row += 1
            free = max_length
        row_of[i] = row
        free -= lengths[i]
    return row_of, row + 1


@njit(cache=True)
def _group_by_row(row_of, processing_order, rows):
    """Piece indices grouped by row (rows in creation order; within a row, in placement order)
    and the row offsets into that list."""
    n = row_of.shape[0]
    row_offsets = np.zeros(rows + 1, np.int64)
    for i in range(n):
        row_offsets[row_of[i] + 1] += 1
    for r in range(rows):
        row_offsets[r + 1] += row_offsets[r]
    cursor = row_offsets[:-1].copy()
    grouped = np.empty(n, np.int64)
    for k in range(n):
        i = processing_order[k]
        r = row_of[i]
        grouped[cursor[r]] = i
        cursor[r] += 1
    return grouped, row_offsets
