"""Packing: put several tokenized documents into one row of at most ``max_length`` tokens.

Three layers, each usable on its own:

* :func:`pack_lengths` -- lengths only (an integer array) in, a :class:`PackAssignment` out: which piece
  of which document goes into which row. Pure numpy + numba, ``O(n + max_length)`` sort and
  ``O(n log max_length)`` best-fit, so 10M documents pack in seconds.
* :func:`pack_dataset` -- a :class:`datasets.Dataset` in, a packed ``Dataset`` out. Token data is moved
  as Arrow buffers (one contiguous copy per document span, no Python loop per token or per document);
  every per-token list column is carried, and a ``seq_lengths`` column (the name TRL uses) records the
  length of each sequence in each row.
* :func:`pack_iterable` -- the streaming version for :class:`datasets.IterableDataset` or any iterable
  of examples, with a bounded buffer.

Worked example (``max_length=8``, best-fit decreasing)::

    documents        A=[a0 a1 a2 a3 a4]  B=[b0 b1 b2]  C=[c0 c1 c2 c3 c4 c5]  D=[d0 d1]
    lengths          5                   3             6                      2

    sorted by length, longest first: C(6) A(5) B(3) D(2)
    C -> new row 0 (free 2);  A -> new row 1 (free 3);  B -> best fit is row 1 (free 3 -> 0)
    D -> best fit is row 0 (free 2 -> 0)

    row 0   input_ids  [c0 c1 c2 c3 c4 c5 d0 d1]   seq_lengths [6, 2]
    row 1   input_ids  [a0 a1 a2 a3 a4 b0 b1 b2]   seq_lengths [5, 3]

Sequences longer than ``max_length`` follow ``overflow``: ``"truncate"`` (keep the first
``max_length`` tokens), ``"split"`` (cut into ``max_length`` pieces, each becomes its own sequence
whose positions restart at 0), ``"drop"`` or ``"error"``. Empty documents are always dropped and
counted in :attr:`PackingStats.empty` -- an empty sequence has no token to attend from and no label to
predict, so keeping it would only create a zero-length segment.
"""
from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import PackmaskError
from . import arrow
from .binpack import assign_rows
from .threads import check_threads

__all__ = ["pack_lengths", "pack_dataset", "pack_iterable", "PackingStats", "PackAssignment"]

STRATEGIES = ("bfd", "ffd", "sequential")
OVERFLOWS = ("truncate", "split", "drop", "error")
_MAX_ROW = 1 << 26


# ---------------------------------------------------------------------------------------------------
# stats
# ---------------------------------------------------------------------------------------------------
@dataclass
class PackingStats:
    """What a packing run produced. ``fill = tokens / (rows * max_length)``; ``lower_bound`` is
    ``ceil(tokens / max_length)``, the fewest rows any packer could use for the kept tokens.

    Document counters (``truncated``, ``split``, ``dropped``, ``empty``) count input documents;
    ``*_tokens`` count the tokens each policy removed.
    """

    max_length: int
    strategy: str
    overflow: str
    documents: int = 0
    sequences: int = 0
    rows: int = 0
    tokens: int = 0
    fill: float = 0.0
    lower_bound: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    split: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    empty: int = 0
    seconds: float = 0.0
    dropped_columns: list[str] = field(default_factory=list)

    def _finish(self) -> None:
        self.fill = self.tokens / (self.rows * self.max_length) if self.rows else 0.0
        self.lower_bound = math.ceil(self.tokens / self.max_length) if self.tokens else 0

    def table(self):
        """A ``rich.table.Table`` with one line per field."""
        from rich.table import Table

        table = Table(title=f"packmask packing ({self.strategy}, max_length={self.max_length}, overflow={self.overflow})")
        table.add_column("field")
        table.add_column("value", justify="right")
        table.add_row("documents in", f"{self.documents:,}")
        table.add_row("sequences out", f"{self.sequences:,}")
        table.add_row("rows", f"{self.rows:,}")
        table.add_row("lower bound (rows)", f"{self.lower_bound:,}")
        table.add_row("tokens", f"{self.tokens:,}")
        table.add_row("fill", f"{self.fill:.4f}")
        table.add_row("truncated docs (tokens cut)", f"{self.truncated:,} ({self.truncated_tokens:,})")
        table.add_row("split docs", f"{self.split:,}")
        table.add_row("dropped docs (tokens)", f"{self.dropped:,} ({self.dropped_tokens:,})")
        table.add_row("empty docs (dropped)", f"{self.empty:,}")
        if self.dropped_columns:
            table.add_row("columns not carried", ", ".join(self.dropped_columns))
        table.add_row("seconds", f"{self.seconds:.3f}")
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        return (f"PackingStats(rows={self.rows}, lower_bound={self.lower_bound}, fill={self.fill:.4f}, "
                f"tokens={self.tokens}, documents={self.documents}, truncated={self.truncated}, "
                f"split={self.split}, dropped={self.dropped}, empty={self.empty}, seconds={self.seconds:.3f})")


# ---------------------------------------------------------------------------------------------------
# lengths -> assignment
# ---------------------------------------------------------------------------------------------------
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
        cumulative = np.concatenate([[0], np.cumsum(self.length)])
        return np.diff(cumulative[self.row_offsets])

    def seq_lengths(self) -> list[list[int]]:
        """Per-row list of sequence lengths (Python lists; fine for small inputs and tests)."""
        return [self.length[a:b].tolist() for a, b in zip(self.row_offsets[:-1], self.row_offsets[1:])]

    def permute_rows(self, permutation: np.ndarray) -> "PackAssignment":
        """The same packing with rows reordered: new row ``r`` is old row ``permutation[r]``."""
        counts = np.diff(self.row_offsets)[permutation]
        new_offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        old_starts = self.row_offsets[:-1][permutation]
        take = (np.repeat(old_starts - new_offsets[:-1], counts) + np.arange(new_offsets[-1])).astype(np.int64)
        return PackAssignment(self.doc_index[take], self.start[take], self.length[take], new_offsets, self.stats)


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
        first_piece = np.concatenate([[0], np.cumsum(pieces_per_doc)[:-1]])
        piece_number = np.arange(doc_index.shape[0]) - np.repeat(first_piece, pieces_per_doc)
        start = piece_number * max_length
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
    stats._finish()
    stats.seconds = time.perf_counter() - begin
    return PackAssignment(doc_index[grouped].astype(np.int64), start[grouped].astype(np.int64),
                          length[grouped].astype(np.int64), row_offsets, stats)


# ---------------------------------------------------------------------------------------------------
# datasets.Dataset
# ---------------------------------------------------------------------------------------------------
def _pack_one(dataset, max_length, strategy, overflow, column, shuffle, seed, num_threads):
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    begin = time.perf_counter()
    if column not in dataset.column_names:
        raise PackmaskError(f"Column {column!r} not found (columns: {dataset.column_names}). Tokenize first, or pass "
                         f"column=<name of the token-id list column>.")
    if "seq_lengths" in dataset.column_names:
        raise PackmaskError("The dataset already has a 'seq_lengths' column, so it is packed already (each row holds "
                            "several documents, and seq_lengths is the only record of where they end); pack the "
                            "unpacked source dataset instead (dropping seq_lengths would merge each row's documents).")
    table = dataset.data.table
    # A shuffled/selected Dataset keeps the full table plus an indices mapping; follow it instead of copying.
    row_index = None
    if dataset._indices is not None:
        row_index = dataset._indices.column(0).to_numpy().astype(np.int64)

    token_array = arrow.single_chunk(table.column(column))
    if not arrow.is_list(token_array):
        raise PackmaskError(f"Column {column!r} must hold lists of token ids, got Arrow type {token_array.type}.")
    token_lengths = arrow.list_lengths(token_array)

    carried, dropped_columns = [], []
    for name in table.column_names:
        array = arrow.single_chunk(table.column(name))
        if name == column:
            carried.append((name, array))
        elif arrow.is_list(array) and np.array_equal(arrow.list_lengths(array), token_lengths):
            carried.append((name, array))
        else:
            dropped_columns.append(name)

    doc_lengths = token_lengths if row_index is None else token_lengths[row_index]
    assignment = pack_lengths(doc_lengths, max_length, strategy=strategy, overflow=overflow)
    if shuffle:
        assignment = assignment.permute_rows(np.random.default_rng(seed).permutation(assignment.num_rows))

    table_rows = assignment.doc_index if row_index is None else row_index[assignment.doc_index]
    row_token_offsets = np.concatenate([[0], np.cumsum(assignment.row_lengths())]).astype(np.int64)
    identity = (
        strategy == "sequential" and row_index is None and not shuffle
        and assignment.doc_index.shape[0] == token_lengths.shape[0]
        and np.array_equal(assignment.length, token_lengths)
    )
    out_columns, out_names = [], []
    for name, array in carried:
        if identity:
            # Nothing moves: the packed rows are just coarser offsets over the same values buffer.
            new = arrow.coarser_offsets(array, row_token_offsets)
        else:
            src_starts = array.offsets.to_numpy()[table_rows].astype(np.int64) + assignment.start
            new = arrow.gather_list_column(array, src_starts, assignment.length, row_token_offsets,
                                           num_threads=num_threads)
        out_columns.append(new)
        out_names.append(name)
    seq_lengths = pa.ListArray.from_arrays(pa.array(assignment.row_offsets.astype(np.int32)),
                                           pa.array(assignment.length.astype(np.int32)))
    out_columns.append(seq_lengths)
    out_names.append("seq_lengths")
    # Name the result after its inputs: letting Dataset() fingerprint it would hash every token (seconds).
    fingerprint = hashlib.sha256(repr((dataset._fingerprint, int(max_length), strategy, overflow, column, shuffle,
                                       seed, "packmask.pack_dataset/1")).encode()).hexdigest()[:16]
    packed = Dataset(InMemoryTable(pa.Table.from_arrays(out_columns, names=out_names)), fingerprint=fingerprint)

    fmt = dataset.format
    if fmt.get("type") is not None or fmt.get("columns") is not None:
        columns = fmt.get("columns")
        if columns is not None:
            columns = [c for c in columns if c in out_names] + ["seq_lengths"]
        packed = packed.with_format(fmt.get("type"), columns=columns, output_all_columns=fmt.get("output_all_columns", False),
                                    **fmt.get("format_kwargs", {}))
    stats = assignment.stats
    stats.dropped_columns = dropped_columns
    stats.seconds = time.perf_counter() - begin
    return packed, stats


def pack_dataset(
    dataset,
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "truncate",
    column: str = "input_ids",
    shuffle: bool = False,
    seed: int = 0,
    return_stats: bool = False,
    buffer_size: int = 10_000,
    num_threads: int | None = None,
):
    """Pack a tokenized dataset into rows of at most ``max_length`` tokens.

    Args:
        dataset: a :class:`datasets.Dataset` (or ``DatasetDict``, packed split by split) with a list
            column of token ids. An ``IterableDataset`` is handed to :func:`pack_iterable`.
        max_length: tokens per packed row.
        strategy: ``"bfd"`` best-fit decreasing over the *whole* dataset (default), ``"ffd"``
            first-fit decreasing, or ``"sequential"`` (next-fit, keeps the dataset order).
        overflow: documents longer than ``max_length`` are ``"truncate"``-d (default), ``"split"``,
            ``"drop"``-ped or raise (``"error"``); counted in the stats either way.
        column: the token-id column. Every list column with the same per-row lengths (``labels``,
            ``attention_mask``, ``completion_mask``, ``assistant_masks``, ...) is carried along token by
            token; other columns cannot be split per token and are dropped (listed in
            ``stats.dropped_columns``).
        shuffle, seed: shuffle the packed rows' order with ``numpy.random.default_rng(seed)``. Packing
            itself is deterministic (ties broken by input index), so the same inputs and seed give the
            same output.
        return_stats: also return the :class:`PackingStats`.
        buffer_size: only for an ``IterableDataset`` (see :func:`pack_iterable`).
        num_threads: threads for copying token spans. ``None`` (default) follows
            ``torch.get_num_threads()``; ``1`` packs single-threaded. torch's own thread count is never
            changed (see :mod:`packmask.data.threads`).

    Returns:
        The packed ``Dataset`` (in memory; same format as the input) with the carried columns plus
        ``seq_lengths`` (list of int32, the sequence lengths of each row, summing to the row length);
        ``(dataset, stats)`` when ``return_stats``.

    Example::

        >>> from datasets import Dataset
        >>> ds = Dataset.from_dict({"input_ids": [[1, 2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12, 13, 14], [15, 16]]})
        >>> pack_dataset(ds, 8)[:]
        {'input_ids': [[9, 10, 11, 12, 13, 14, 15, 16], [1, 2, 3, 4, 5, 6, 7, 8]],
         'seq_lengths': [[6, 2], [5, 3]]}
    """
    from datasets import Dataset, DatasetDict, IterableDataset, IterableDatasetDict

    check_packing_args(max_length, strategy, overflow)
    check_threads(num_threads)
    if isinstance(dataset, (IterableDataset, IterableDatasetDict)):
        from .streaming import pack_iterable

        if shuffle:
            raise PackmaskError("shuffle=True is not available for streaming datasets; call .shuffle(seed, buffer_size) "
                             "on the IterableDataset instead.")
        if isinstance(dataset, IterableDatasetDict):
            return IterableDatasetDict({k: pack_iterable(v, max_length, strategy=strategy, overflow=overflow,
                                                         column=column, buffer_size=buffer_size)
                                        for k, v in dataset.items()})
        return pack_iterable(dataset, max_length, strategy=strategy, overflow=overflow, column=column,
                             buffer_size=buffer_size)
    if isinstance(dataset, DatasetDict):
        results = {k: _pack_one(v, max_length, strategy, overflow, column, shuffle, seed, num_threads) for k, v in dataset.items()}
        packed = DatasetDict({k: v[0] for k, v in results.items()})
        return (packed, {k: v[1] for k, v in results.items()}) if return_stats else packed
    if not isinstance(dataset, Dataset):
        raise TypeError(f"pack_dataset takes a datasets.Dataset / DatasetDict / IterableDataset, got "
                        f"{type(dataset).__name__}; for a plain iterable of dicts use pack_iterable.")
    packed, stats = _pack_one(dataset, max_length, strategy, overflow, column, shuffle, seed, num_threads)
    return (packed, stats) if return_stats else packed


def __getattr__(name):
    # pack_iterable lives in .streaming, which builds on this module: resolved on first use, so
    # either module can be imported first without a cycle
    if name == "pack_iterable":
        from .streaming import pack_iterable
        return pack_iterable
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
