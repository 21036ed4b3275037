"""Arrow assembly: build packed list columns by moving whole spans of the flat values buffer.

A list column in Arrow is a flat ``values`` buffer plus ``offsets`` (row ``i`` is
``values[offsets[i]:offsets[i + 1]]``). Packing only reorders spans of that buffer, so a packed column
is one gather of spans into a new buffer and a new, coarser offsets array -- no Python object per
token or per document.

Worked example (two documents packed into one row, the second first)::

    values    [a0 a1 a2 | b0 b1]        offsets [0, 3, 5]
    spans     src_starts [3, 0]   span_lengths [2, 3]
    packed    values [b0 b1 a0 a1 a2]   offsets [0, 5]

    >>> import pyarrow as pa, numpy as np
    >>> column = pa.array([[10, 11, 12], [20, 21]])
    >>> gather_list_column(column, np.array([3, 0]), np.array([2, 3]), np.array([0, 5])).to_pylist()
    [[20, 21, 10, 11, 12]]
"""
from __future__ import annotations

import numpy as np

from ..errors import PackmaskError
from .spans import gather_spans, lengths_from_offsets, span_indices

__all__ = ["single_chunk", "list_lengths", "is_list", "gather_list_column", "coarser_offsets"]


def single_chunk(column):
    """One contiguous Arrow array: a single chunk as is (no copy); several concatenated once."""
    import pyarrow as pa

    if isinstance(column, pa.ChunkedArray):
        return column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    return column


def is_list(array) -> bool:
    import pyarrow as pa

    return pa.types.is_list(array.type) or pa.types.is_large_list(array.type)


def list_lengths(array) -> np.ndarray:
    """Length of every list in ``array`` (null lists count 0), int64 ``[rows]``."""
    import pyarrow.compute as pc

    if array.null_count == 0:
        return lengths_from_offsets(array.offsets.to_numpy())
    return pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)


def coarser_offsets(array, row_token_offsets: np.ndarray):
    """The same values buffer cut into bigger rows (when packing keeps every token in place)."""
    import pyarrow as pa

    offsets = array.offsets.to_numpy()
    return type(array).from_arrays(pa.array((row_token_offsets + offsets[0]).astype(offsets.dtype)),
                                   array.values, type=array.type)


def gather_list_column(array, src_starts: np.ndarray, span_lengths: np.ndarray, row_token_offsets: np.ndarray,
                       *, num_threads: int | None = None):
    """New list array whose rows are the concatenated spans of ``array``'s flat values.

    Span ``s`` is ``values[src_starts[s] : src_starts[s] + span_lengths[s]]`` (indices into the flat
    values buffer); row ``r`` of the result holds values ``row_token_offsets[r] : row_token_offsets[r + 1]``
    of the concatenation (:func:`packmask.data.spans.gather_spans`). ``num_threads`` as in
    :func:`packmask.data.threads.numba_threads`.
    """
    import pyarrow as pa

    values = array.values  # the child array the offsets index into (slices included)
    total = int(row_token_offsets[-1])
    offset_dtype = np.int64 if pa.types.is_large_list(array.type) else np.int32
    if total > np.iinfo(offset_dtype).max:
        raise PackmaskError(f"Packed column has {total} values, too many for {array.type}; cast it to a large_list.")
    flat = None
    if values.null_count == 0 and (pa.types.is_integer(values.type) or values.type in (pa.float32(), pa.float64())):
        flat = values.to_numpy(zero_copy_only=True)
    if flat is not None:
        new_values = pa.array(gather_spans(flat, src_starts, span_lengths, num_threads=num_threads), type=values.type)
    else:
        new_values = values.take(pa.array(span_indices(src_starts, span_lengths)))
    return type(array).from_arrays(pa.array(row_token_offsets.astype(offset_dtype)), new_values, type=array.type)
