"""Spans in numpy: the data side's one place for boundaries (the numpy twin of :mod:`packmask.segments`).

Data code holds documents as *spans* of flat buffers: a token buffer plus ``offsets`` (document
``i`` is ``values[offsets[i]:offsets[i + 1]]``, the Arrow list layout), or per-row document lengths.
This module converts between those forms and gathers spans; :mod:`packmask.segments` does the same
in torch for the model side, with the same two rules:

* **restart rule** -- a document starts at the first token of a row and wherever the position does
  not continue the previous one by exactly one (:func:`starts_from_position_ids`);
* **padding rule** -- the tokens after a row's last document are one more document with positions
  ``0, 1, ...`` (:func:`starts_from_lengths`).

Worked example, ``lengths [3, 2]`` in a row of ``N = 6`` (``P`` = padding)::

    tokens         a0 a1 a2 b0 b1 P
    offsets        [0, 3, 5]                  (offsets_from_lengths([3, 2]))
    starts          1  .  .  1  .  1          (starts_from_lengths([[3, 2]], 6))
    doc ids         0  0  0  1  1  2
    positions       0  1  2  0  1  0

>>> offsets_from_lengths([3, 2]).tolist()
[0, 3, 5]
>>> starts = starts_from_lengths([[3, 2]], 6)
>>> starts.astype(int).tolist(), doc_ids_from_starts(starts).tolist(), position_ids_from_starts(starts).tolist()
([[1, 0, 0, 1, 0, 1]], [[0, 0, 0, 1, 1, 2]], [[0, 1, 2, 0, 1, 0]])
>>> span_indices([5, 0], [2, 3]).tolist()         # the token indices of spans [5, 7) and [0, 3)
[5, 6, 0, 1, 2]
>>> gather_spans(np.arange(10, 20), [5, 0], [2, 3]).tolist()
[15, 16, 10, 11, 12]

Everything is vectorised: no Python loop per token or per document.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..errors import PackmaskError

__all__ = [
    "offsets_from_lengths", "lengths_from_offsets", "span_indices", "positions_from_lengths", "run_starts",
    "run_lengths", "starts_from_lengths", "starts_from_position_ids", "starts_from_ids", "doc_ids_from_starts",
    "position_ids_from_starts", "cu_seqlens_from_starts", "lengths_from_starts", "gather_spans", "gather_spans_numpy",
]


# ---- offsets and spans ------------------------------------------------------------------------

def offsets_from_lengths(lengths) -> np.ndarray:
    """int64 ``[n + 1]`` offsets of consecutive spans of these lengths: ``[0, l0, l0 + l1, ...]``.

    >>> offsets_from_lengths([3, 0, 2]).tolist()
    [0, 3, 3, 5]
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    out = np.zeros(lengths.shape[0] + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def lengths_from_offsets(offsets) -> np.ndarray:
    """int64 ``[n]`` span lengths of ``[n + 1]`` offsets (Arrow offsets may start above 0).

    >>> lengths_from_offsets([4, 7, 7, 9]).tolist()
    [3, 0, 2]
    """
    offsets = np.asarray(offsets).reshape(-1).astype(np.int64, copy=False)
    return offsets[1:] - offsets[:-1]


def span_indices(starts, lengths) -> np.ndarray:
    """The indices of the spans ``[starts[i], starts[i] + lengths[i])``, concatenated (the numpy twin
    of :func:`packmask.segments.span_indices`).

    >>> span_indices([5, 0, 9], [2, 3, 0]).tolist()
    [5, 6, 0, 1, 2]
    """
    starts = np.asarray(starts, np.int64).reshape(-1)
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    total = int(lengths.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    return np.repeat(starts - offsets_from_lengths(lengths)[:-1], lengths) + np.arange(total, dtype=np.int64)


def positions_from_lengths(lengths) -> np.ndarray:
    """Position of every element inside its span, spans of these lengths back to back.

    >>> positions_from_lengths([3, 0, 2]).tolist()
    [0, 1, 2, 0, 1]
    """
    lengths = np.asarray(lengths, np.int64).reshape(-1)
    return span_indices(np.zeros(lengths.shape[0], np.int64), lengths)


def run_starts(keys) -> np.ndarray:
    """``[n]`` bool, True where entry ``i`` of ``keys`` (``[n]`` or ``[n, ...]``: whole rows are
    compared) differs from entry ``i - 1``; entry 0 always starts a run.

    ::

        keys     7 7 3 3 3 7
        starts   1 . 1 . . 1

    >>> run_starts([7, 7, 3, 3, 3, 7]).astype(int).tolist()
    [1, 0, 1, 0, 0, 1]
    >>> run_starts([[1, 2], [1, 2], [1, 3]]).astype(int).tolist()
    [1, 0, 1]
    """
    keys = np.asarray(keys)
    n = keys.shape[0]
    starts = np.ones(n, bool)
    if n > 1:
        starts[1:] = (keys[1:] != keys[:-1]).reshape(n - 1, -1).any(1)
    return starts


def run_lengths(starts) -> np.ndarray:
    """Lengths of the runs that ``[n]`` flat starts delimit (``starts[0]`` must be True).

    >>> run_lengths(np.array([1, 0, 1, 0, 0, 1], bool)).tolist()
    [2, 3, 1]
    """
    starts = np.asarray(starts, bool).reshape(-1)
    if starts.size and not starts[0]:
        raise PackmaskError("run_lengths: the first entry must start a run (starts[0] is False).")
    first = np.flatnonzero(starts)
    return lengths_from_offsets(np.append(first, starts.shape[0]))


# ---- the forms of segments.py, in numpy ----------------------------------------------------------

def starts_from_lengths(seq_lengths: Sequence[Sequence[int]], seq_len: int | None = None) -> np.ndarray:
    """``[B, N]`` starts of per-row document lengths, the trailing padding one document of its own
    (the padding rule; empty documents vanish). ``seq_len`` defaults to the longest row.

    >>> starts_from_lengths([[2, 0, 1], []], 4).astype(int).tolist()
    [[1, 0, 1, 1], [1, 0, 0, 0]]
    """
    rows = [np.asarray(row, np.int64).reshape(-1) for row in seq_lengths]
    B = len(rows)
    lengths = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    per_row = np.array([row.shape[0] for row in rows], np.int64)
    row_of = np.repeat(np.arange(B), per_row)
    if lengths.size and lengths.min() < 0:
        b = int(row_of[np.flatnonzero(lengths < 0)[0]])
        raise PackmaskError(f"seq_lengths of row {b} has a negative length ({rows[b].tolist()}); lengths count tokens.")
    totals = np.bincount(row_of, weights=lengths, minlength=B).astype(np.int64)
    if seq_len is None:
        if B == 0:
            raise PackmaskError("seq_lengths is empty and no seq_len is given: the row length is unknown.")
        seq_len = int(totals.max())
    if np.any(totals > seq_len):
        b = int(np.flatnonzero(totals > seq_len)[0])
        raise PackmaskError(
            f"seq_lengths of row {b} sum to {int(totals[b])} but the row holds {seq_len} tokens: a document is "
            f"longer than the row. Re-pack with a larger max_length or overflow='split'.")
    offset = offsets_from_lengths(lengths)[:-1] - offsets_from_lengths(totals)[:-1][row_of]  # inside the row
    starts = np.zeros((B, int(seq_len) + 1), bool)  # column N catches "padding starts at N" (none)
    real = lengths > 0
    starts[row_of[real], offset[real]] = True
    starts[np.arange(B), totals] = True  # the padding document (or the empty row)
    return starts[:, :seq_len]


def starts_from_position_ids(position_ids) -> np.ndarray:
    """Starts of packed positions ``[..., N]`` by the restart rule.

    >>> starts_from_position_ids([0, 1, 2, 0, 1, 5, 6, -1, 0]).astype(int).tolist()
    [1, 0, 0, 1, 0, 1, 0, 1, 0]
    """
    position_ids = np.asarray(position_ids)
    starts = np.ones(position_ids.shape, bool)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def starts_from_ids(ids) -> np.ndarray:
    """Starts of runs of equal ids along the last axis ``[..., N]``.

    >>> starts_from_ids([0, 0, 1, 1, 1, 0]).astype(int).tolist()
    [1, 0, 1, 0, 0, 1]
    """
    ids = np.asarray(ids)
    starts = np.ones(ids.shape, bool)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    return starts


def doc_ids_from_starts(starts, *, local: bool = False) -> np.ndarray:
    """Document index of every token, numbered over the whole batch or inside each row (``local``).

    >>> s = np.array([[1, 0, 1], [1, 1, 0]], bool)
    >>> doc_ids_from_starts(s).tolist(), doc_ids_from_starts(s, local=True).tolist()
    ([[0, 0, 1], [2, 3, 3]], [[0, 0, 1], [0, 1, 1]])
    """
    starts = np.asarray(starts, bool)
    if local:
        return np.cumsum(starts, -1, dtype=np.int64) - 1
    return (np.cumsum(starts.reshape(-1), dtype=np.int64) - 1).reshape(starts.shape)


def position_ids_from_starts(starts) -> np.ndarray:
    """Position of every token inside its document (0 at each start).

    >>> position_ids_from_starts(np.array([1, 0, 0, 1, 0], bool)).tolist()
    [0, 1, 2, 0, 1]
    """
    starts = np.asarray(starts, bool)
    idx = np.arange(starts.shape[-1], dtype=np.int64)
    return idx - np.maximum.accumulate(np.where(starts, idx, 0), axis=-1)


def cu_seqlens_from_starts(starts) -> np.ndarray:
    """int32 ``cu_seqlens`` over the flattened tokens of ``starts`` (``[B, N]`` or ``[N]``).

    >>> cu_seqlens_from_starts(np.array([[1, 0, 1], [1, 1, 0]], bool)).tolist()
    [0, 2, 3, 4, 6]
    """
    flat = np.asarray(starts, bool).reshape(-1)
    return np.append(np.flatnonzero(flat), flat.shape[0]).astype(np.int32)


def lengths_from_starts(starts) -> list[list[int]]:
    """Per-row document lengths (host lists), the padding document included.

    >>> lengths_from_starts(np.array([[1, 0, 1], [1, 1, 0]], bool))
    [[2, 1], [1, 2]]
    """
    starts = np.asarray(starts, bool)
    starts = starts.reshape(-1, starts.shape[-1])
    return [run_lengths(row).tolist() for row in starts]


# ---- gathering spans ----------------------------------------------------------------------------

def gather_spans(values: np.ndarray, starts, lengths, *, num_threads: int | None = None) -> np.ndarray:
    """``values[starts[i] : starts[i] + lengths[i]]`` for every span, concatenated (no index array per
    token). numba's parallel copy on ``num_threads`` threads (as in
    :func:`packmask.data.threads.numba_threads`), or a numpy copy in a process's first packing call
    (:mod:`packmask.data.kernel_choice`); the same values either way.

    >>> gather_spans(np.array([10, 11, 12, 20, 21]), [3, 0], [2, 3]).tolist()
    [20, 21, 10, 11, 12]
    """
    from .kernel_choice import use_numba

    values = np.ascontiguousarray(values)
    starts = np.ascontiguousarray(starts, np.int64).reshape(-1)
    lengths = np.ascontiguousarray(lengths, np.int64).reshape(-1)
    dst = offsets_from_lengths(lengths)
    if lengths.size and (starts.min() < 0 or (starts + lengths).max() > values.shape[0] or lengths.min() < 0):
        raise PackmaskError(f"gather_spans: a span lies outside the {values.shape[0]} values.")
    if not use_numba(lengths.shape[0]):
        return gather_spans_numpy(values, starts, lengths)
    from .span_kernels import copy_spans   # numba: imported on first use, not with this module
    from .threads import numba_threads

    with numba_threads(num_threads):
        return copy_spans(values, starts, lengths, dst[:-1], int(dst[-1]))


def gather_spans_numpy(values: np.ndarray, starts, lengths) -> np.ndarray:
    """:func:`gather_spans` in numpy, one thread. The output lives in an anonymous memory map, not a
    ``numpy.empty`` buffer: numpy asks the kernel for transparent huge pages on large arrays, and on a
    fragmented machine the first touch of those stalls in compaction (the reason numba's copy
    allocates its own output too; see :mod:`packmask.data.span_kernels`).

    >>> gather_spans_numpy(np.array([10, 11, 12, 20, 21]), [3, 0], [2, 3]).tolist()
    [20, 21, 10, 11, 12]
    """
    import mmap

    values = np.asarray(values)
    total = int(np.sum(lengths))
    size = max(total * values.itemsize, 1)
    if hasattr(mmap, "MAP_POPULATE"):   # Linux: fault the pages in at once (measured: half the copy's wall time)
        buffer = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE)
    else:
        buffer = mmap.mmap(-1, size)
    out = np.frombuffer(buffer, values.dtype, total)
    if total:
        np.concatenate([values[s:s + n] for s, n in zip(np.asarray(starts).tolist(), np.asarray(lengths).tolist())],
                       out=out)
    return out
