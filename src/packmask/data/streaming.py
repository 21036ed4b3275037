"""Streaming packing: a stream of tokenized examples in, packed rows out, with a bounded buffer.

For a :class:`datasets.IterableDataset` or any iterable of dicts (see :func:`pack_iterable`). Each
buffer of documents is packed with :func:`packmask.data.assignment.pack_lengths`; rows that are not full
yet wait for the next documents.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from ..errors import PackmaskError
from .assignment import check_packing_args, pack_lengths
from .packing_stats import PackingStats
from .spans import lengths_from_offsets

__all__ = ["pack_iterable"]


# ---------------------------------------------------------------------------------------------------
def _per_token_keys(example: dict, column: str) -> list[str]:
    n = len(example[column])
    keys = [column]
    for key, value in example.items():
        if key in (column, "seq_lengths"):
            continue
        if isinstance(value, (list, tuple, np.ndarray)) or hasattr(value, "tolist"):
            try:
                if len(value) == n:
                    keys.append(key)
            except TypeError:
                pass
    return keys


def _iter_packed(examples, max_length, strategy, overflow, column, buffer_size, min_fill, stats):
    # Overflow and empty documents are settled when a document enters the buffer, so the buffer
    # only holds sequences of 1..max_length tokens and a held-back sequence is never half emitted.
    buffer: list[dict] = []
    keys = None
    iterator = iter(examples)
    exhausted = False
    while True:
        while not exhausted and len(buffer) < buffer_size:
            try:
                example = next(iterator)
            except StopIteration:
                exhausted = True
                break
            if column not in example:
                raise PackmaskError(f"Column {column!r} not found in example with keys {sorted(example)}; pass column=...")
            if keys is None:
                keys = _per_token_keys(example, column)
            doc = {k: list(example[k].tolist() if hasattr(example[k], "tolist") else example[k]) for k in keys}
            n = len(doc[column])
            stats.documents += 1
            if n == 0:
                stats.empty += 1
                continue
            if n > max_length:
                if overflow == "error":
                    raise PackmaskError(
                        f"Document {stats.documents - 1} has {n} tokens, more than max_length={max_length}. "
                        "Pass overflow='truncate', 'split' or 'drop', or raise max_length.")
                if overflow == "drop":
                    stats.dropped += 1
                    stats.dropped_tokens += n
                    continue
                if overflow == "truncate":
                    stats.truncated += 1
                    stats.truncated_tokens += n - max_length
                    buffer.append({k: v[:max_length] for k, v in doc.items()})
                    continue
                stats.split += 1
                buffer.extend({k: v[lo:lo + max_length] for k, v in doc.items()} for lo in range(0, n, max_length))
                continue
            buffer.append(doc)
        if not buffer:
            return
        lengths = np.fromiter((len(doc[column]) for doc in buffer), np.int64, len(buffer))
        assignment = pack_lengths(lengths, max_length, strategy=strategy, overflow="error")
        row_lengths = assignment.row_lengths()
        emit = np.ones(assignment.num_rows, bool)
        if not exhausted:
            # Hold back the sequences of under-filled rows: with the next documents they can fill up.
            # Order-preserving packing may only hold back the still-open last row.
            if strategy == "sequential":
                emit[-1] = False
            else:
                emit = row_lengths >= min_fill * max_length
            held_count = int(lengths_from_offsets(assignment.row_offsets)[~emit].sum())
            if held_count > buffer_size // 2:
                emit[:] = True  # bounded buffer: never hold back more than half of it
        held: list[dict] = []
        for r in range(assignment.num_rows):
            a, b = assignment.row_offsets[r], assignment.row_offsets[r + 1]
            if not emit[r]:
                held.extend(buffer[d] for d in assignment.doc_index[a:b].tolist())
                continue
            row = {k: [] for k in keys}
            for s in range(a, b):
                doc = buffer[assignment.doc_index[s]]
                for k in keys:
                    row[k].extend(doc[k])
            row["seq_lengths"] = assignment.length[a:b].tolist()
            stats.rows += 1
            stats.sequences += b - a
            stats.tokens += int(row_lengths[r])
            yield row
        stats.seconds += assignment.stats.seconds
        stats.finish()
        buffer = held
        if exhausted and not buffer:
            return


def pack_iterable(
    examples: Iterable[dict],
    max_length: int,
    *,
    strategy: str = "bfd",
    overflow: str = "truncate",
    column: str = "input_ids",
    buffer_size: int = 1000,
    min_fill: float = 0.98,
    stats: PackingStats | None = None,
):
    """Pack a stream of tokenized examples with a bounded buffer.

    Up to ``buffer_size`` documents are read and packed with ``strategy``; rows filled to at least
    ``min_fill`` are emitted and the documents of the other rows stay in the buffer to be packed with
    the next documents (never more than half the buffer, so memory stays bounded and the stream
    always advances). At the end everything left is emitted. ``"sequential"`` only holds back the open
    last row, so document order is kept. Deterministic: the same stream gives the same rows.

    Args:
        examples: a :class:`datasets.IterableDataset` (then an ``IterableDataset`` is returned) or any
            iterable of dicts (then a generator of dicts is returned).
        max_length, strategy, overflow, column: as in :func:`pack_dataset`.
        buffer_size: documents held at most.
        min_fill: rows below this fill are held back while the stream lasts.
        stats: a :class:`PackingStats` to accumulate into while the stream is consumed.

    Example (``max_length=8``, buffer of 4 documents)::

        stream   [a0..a4] [b0 b1 b2] [c0..c5] [d0 d1]
        yields   {'input_ids': [c0..c5, d0, d1], 'seq_lengths': [6, 2]}
                 {'input_ids': [a0..a4, b0, b1, b2], 'seq_lengths': [5, 3]}
    """
    check_packing_args(max_length, strategy, overflow)
    if buffer_size < 1:
        raise PackmaskError(f"buffer_size must be >= 1, got {buffer_size}.")
    if stats is None:
        stats = PackingStats(max_length=int(max_length), strategy=strategy, overflow=overflow)
    else:
        stats.max_length, stats.strategy, stats.overflow = int(max_length), strategy, overflow
    try:
        from datasets import IterableDataset
    except ImportError:  # pragma: no cover
        IterableDataset = ()
    if IterableDataset and isinstance(examples, IterableDataset):
        source = examples

        def generate():
            yield from _iter_packed(source, max_length, strategy, overflow, column, buffer_size, min_fill, stats)

        return IterableDataset.from_generator(generate)
    return _iter_packed(examples, max_length, strategy, overflow, column, buffer_size, min_fill, stats)
