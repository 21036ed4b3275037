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

import time

import numpy as np

from ..errors import PackmaskError
from . import arrow
from .assignment import OVERFLOWS, STRATEGIES, PackAssignment, check_packing_args, pack_lengths  # noqa: F401 (API)
from .hf_datasets import arrow_table, derived_fingerprint, in_memory_dataset
from .kernel_choice import packing_call
from .packing_stats import PackingStats
from .spans import offsets_from_lengths
from .streaming import pack_iterable
from .threads import check_threads

__all__ = ["pack_lengths", "pack_dataset", "pack_iterable", "PackingStats", "PackAssignment"]


def _pack_one(dataset, max_length, strategy, overflow, column, shuffle, seed, num_threads):
    with packing_call():
        return _pack_table(dataset, max_length, strategy, overflow, column, shuffle, seed, num_threads)


def _pack_table(dataset, max_length, strategy, overflow, column, shuffle, seed, num_threads):
    import pyarrow as pa

    begin = time.perf_counter()
    if column not in dataset.column_names:
        raise PackmaskError(f"Column {column!r} not found (columns: {dataset.column_names}). Tokenize first, or pass "
                         f"column=<name of the token-id list column>.")
    if "seq_lengths" in dataset.column_names:
        raise PackmaskError("The dataset already has a 'seq_lengths' column, so it is packed already (each row holds "
                            "several documents, and seq_lengths is the only record of where they end); pack the "
                            "unpacked source dataset instead (dropping seq_lengths would merge each row's documents).")
    table = arrow_table(dataset)
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

    assignment = pack_lengths(token_lengths, max_length, strategy=strategy, overflow=overflow)
    if shuffle:
        assignment = assignment.permute_rows(np.random.default_rng(seed).permutation(assignment.num_rows))

    row_token_offsets = offsets_from_lengths(assignment.row_lengths())
    identity = (
        strategy == "sequential" and not shuffle
        and assignment.doc_index.shape[0] == token_lengths.shape[0]
        and np.array_equal(assignment.length, token_lengths)
    )
    out_columns, out_names = [], []
    for name, array in carried:
        if identity:
            # Nothing moves: the packed rows are just coarser offsets over the same values buffer.
            new = arrow.coarser_offsets(array, row_token_offsets)
        else:
            src_starts = array.offsets.to_numpy()[assignment.doc_index].astype(np.int64) + assignment.start
            new = arrow.gather_list_column(array, src_starts, assignment.length, row_token_offsets,
                                           num_threads=num_threads)
        out_columns.append(new)
        out_names.append(name)
    seq_lengths = pa.ListArray.from_arrays(pa.array(assignment.row_offsets.astype(np.int32)),
                                           pa.array(assignment.length.astype(np.int32)))
    out_columns.append(seq_lengths)
    out_names.append("seq_lengths")
    fingerprint = derived_fingerprint(dataset, (int(max_length), strategy, overflow, column, shuffle, seed),
                                      "packmask.pack_dataset/1")
    packed = in_memory_dataset(pa.Table.from_arrays(out_columns, names=out_names), fingerprint)

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

