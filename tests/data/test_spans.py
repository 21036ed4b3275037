"""packmask.data.spans (numpy) against packmask.segments (torch): the same forms, the same restart and
padding rules, on random inputs."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask import segments
from packmask.data import spans
from packmask.errors import PackmaskError

rows_of_lengths = st.lists(st.lists(st.integers(0, 5), max_size=4), min_size=1, max_size=4)


@settings(max_examples=60, deadline=None)
@given(rows=rows_of_lengths, extra=st.integers(0, 3))
def test_lengths_forms_equal_segments(rows, extra):
    N = max(sum(r) for r in rows) + extra
    if N == 0:
        N = 1
    starts_np = spans.starts_from_lengths(rows, N)
    starts_t = segments.starts_from_lengths(rows, N)
    assert np.array_equal(starts_np, starts_t.numpy())
    for local in (False, True):
        assert np.array_equal(spans.doc_ids_from_starts(starts_np, local=local),
                              segments.doc_ids_from_starts(starts_t, local=local).numpy())
    assert np.array_equal(spans.position_ids_from_starts(starts_np), segments.position_ids_from_starts(starts_t).numpy())
    assert np.array_equal(spans.cu_seqlens_from_starts(starts_np), segments.cu_seqlens_from_starts(starts_t).numpy())
    assert spans.lengths_from_starts(starts_np) == segments.lengths_from_starts(starts_t)
    flat = [x for r in rows for x in r]
    assert np.array_equal(spans.offsets_from_lengths(flat), segments.cu_seqlens_from_lengths(torch.tensor(flat, dtype=torch.long)).numpy())
    assert np.array_equal(spans.lengths_from_offsets(spans.offsets_from_lengths(flat)), flat)


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.lists(st.integers(-2, 4), min_size=1, max_size=8), min_size=1, max_size=3))
def test_restart_rule_and_runs_equal_segments(values):
    N = min(len(v) for v in values)
    ids = np.array([v[:N] for v in values], np.int64)
    assert np.array_equal(spans.starts_from_position_ids(ids), segments.starts_from_position_ids(torch.from_numpy(ids)).numpy())
    assert np.array_equal(spans.starts_from_ids(ids), segments.starts_from_ids(torch.from_numpy(ids)).numpy())
    # runs of whole rows: row i starts a run unless it equals row i - 1
    expected = [True] + [not np.array_equal(ids[i], ids[i - 1]) for i in range(1, len(ids))]
    assert spans.run_starts(ids).tolist() == expected
    flat = spans.starts_from_ids(ids.reshape(-1))
    assert spans.run_lengths(flat).sum() == ids.size
    assert np.array_equal(spans.run_lengths(flat), spans.lengths_from_starts(flat)[0])


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 20), st.integers(0, 6)), max_size=8))
def test_span_indices_and_gather_equal_segments(pairs):
    values = np.arange(100, 130, dtype=np.int32)
    starts = np.array([s for s, _ in pairs], np.int64)
    lengths = np.array([n for _, n in pairs], np.int64)
    expected = segments.span_indices(torch.from_numpy(starts), torch.from_numpy(lengths)).numpy()
    assert np.array_equal(spans.span_indices(starts, lengths), expected)
    gathered = spans.gather_spans(values, starts, lengths, num_threads=1)
    assert gathered.dtype == values.dtype and np.array_equal(gathered, values[expected])
    assert np.array_equal(spans.positions_from_lengths(lengths), spans.span_indices(np.zeros_like(starts), lengths))


def test_restart_rule_control():
    """The retired rule "a document starts where the position is 0" differs from the restart rule on
    a row that continues a split document, and on a jump: the comparisons above can fail."""
    positions = np.array([2, 3, 4, 0, 1, 7, 8])
    restart = spans.starts_from_position_ids(positions)
    retired = positions == 0
    assert restart.astype(int).tolist() == [1, 0, 0, 1, 0, 1, 0]
    assert not np.array_equal(restart, retired)


def test_errors_name_the_row_like_segments():
    for bad, N in (([[1], [2, -1]], 4), ([[3, 3]], 5)):
        with pytest.raises(PackmaskError) as np_error:
            spans.starts_from_lengths(bad, N)
        with pytest.raises(PackmaskError) as torch_error:
            segments.starts_from_lengths(bad, N)
        assert str(np_error.value) == str(torch_error.value)
    with pytest.raises(PackmaskError, match="outside"):
        spans.gather_spans(np.arange(4), [3], [2])
    with pytest.raises(PackmaskError, match="first entry"):
        spans.run_lengths(np.array([0, 1], bool))
