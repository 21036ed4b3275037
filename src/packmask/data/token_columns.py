"""Token-id columns in, flat buffers out: ``(values, offsets)`` from Arrow arrays, ``datasets`` columns
or Python lists, with no Python loop over Arrow data.

    >>> values, offsets = flat_column([[1, 2, 3], [4]])
    >>> values.tolist(), offsets.tolist()
    ([1, 2, 3, 4], [0, 3, 4])
    >>> values, inner, outer = nested_flat_column([[[1, 2], [3]], [[4]]])
    >>> values.tolist(), inner.tolist(), outer.tolist()
    ([1, 2, 3, 4], [0, 2, 3, 4], [0, 2, 3])
"""
from __future__ import annotations

import numpy as np

from ..errors import PackmaskError
from .hf_datasets import arrow_column
from .spans import offsets_from_lengths

__all__ = ["flat_column", "nested_flat_column", "get_column"]


def flat_column(column) -> tuple[np.ndarray, np.ndarray]:
    """list<int> (Arrow array or lists) -> ``(values, offsets)``; offsets are into ``values``."""
    import pyarrow as pa

    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        if not np.issubdtype(values.dtype, np.integer):
            raise PackmaskError(f"token columns must hold integer ids, got Arrow type {array.type}; tokenize first "
                                "(or pass tokenizer=...).")
        return values, offsets
    lists = [np.asarray(x, np.int64).reshape(-1) for x in column]
    offsets = offsets_from_lengths(np.array([x.shape[0] for x in lists], np.int64))
    return (np.concatenate(lists) if lists else np.zeros(0, np.int64)), offsets


def nested_flat_column(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list<list<int>> -> ``(values, inner offsets, outer offsets)``."""
    import pyarrow as pa

    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        outer = array.offsets.to_numpy().astype(np.int64)
        values, inner = flat_column(array.values)
        return values, inner, outer
    groups = [list(g) for g in column]
    values, inner = flat_column([c for g in groups for c in g])
    return values, inner, offsets_from_lengths(np.array([len(g) for g in groups], np.int64))


def get_column(data, name: str):
    """Column ``name`` of a ``datasets.Dataset`` (as Arrow, a shuffled / selected view applied), a dict
    of columns, or a list of example dicts."""
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover
        Dataset = ()
    if Dataset and isinstance(data, Dataset):
        if name not in data.column_names:
            raise PackmaskError(f"column {name!r} not found (columns: {data.column_names}).")
        return arrow_column(data, name)
    if isinstance(data, dict):
        if name not in data:
            raise PackmaskError(f"column {name!r} not found (keys: {sorted(data)}).")
        return data[name]
    rows = list(data)
    if rows and name not in rows[0]:
        raise PackmaskError(f"column {name!r} not found in the examples (keys: {sorted(rows[0])}).")
    return [r[name] for r in rows]
