"""The numpy twins of the packing kernels (a process's first call) give exactly the numba kernels'
results: the bfd assignment and the span copy; and a fresh process's first pack_dataset call runs
without numba, the next one with it, with the same rows."""
import os
import subprocess
import sys
import textwrap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask.data import binpack
from packmask.data.binpack_python import rows_bfd
from packmask.data.span_kernels import copy_spans
from packmask.data.spans import gather_spans_numpy, offsets_from_lengths

SRC = os.path.join(os.path.dirname(__file__), "..", "..", "src")


@settings(max_examples=80, deadline=None)
@given(max_length=st.integers(1, 64), data=st.data())
def test_python_bfd_equals_numba_bfd(max_length, data):
    lengths = np.array(data.draw(st.lists(st.integers(1, max_length), max_size=80)), np.int64)
    grouped, row_offsets = rows_bfd(lengths, max_length)
    expected_grouped, expected_offsets = binpack.assign_rows(lengths, max_length, "bfd")
    assert np.array_equal(grouped, expected_grouped) and np.array_equal(row_offsets, expected_offsets)


def test_python_bfd_on_skewed_lengths_and_control():
    rng = np.random.default_rng(0)
    lengths = np.clip(np.exp(rng.normal(np.log(400), 1.0, 20_000)), 8, 8192).astype(np.int64)
    for got, want in zip(rows_bfd(lengths, 8192), binpack.assign_rows(lengths, 8192, "bfd")):
        assert np.array_equal(got, want)
    # control: the same comparison tells bfd from ffd on an input where their rows differ
    lengths = np.array([1, 1, 2, 9, 7, 10])
    assert not np.array_equal(rows_bfd(lengths, 10)[0], binpack.assign_rows(lengths, 10, "ffd")[0])


@settings(max_examples=40, deadline=None)
@given(pairs=st.lists(st.tuples(st.integers(0, 30), st.integers(0, 9)), max_size=10),
       dtype=st.sampled_from([np.int32, np.int64, np.float32]))
def test_numpy_copy_equals_numba_copy(pairs, dtype):
    values = (np.arange(40) * 3 + 1).astype(dtype)
    starts = np.array([s for s, _ in pairs], np.int64)
    lengths = np.array([n for _, n in pairs], np.int64)
    dst = offsets_from_lengths(lengths)
    got = gather_spans_numpy(values, starts, lengths)
    want = copy_spans(values, starts, lengths, dst[:-1], int(dst[-1]))
    assert got.dtype == want.dtype and np.array_equal(got, want)


def test_first_call_runs_without_numba_then_with_it():
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from datasets import Dataset
        import packmask
        rng = np.random.default_rng(0)
        docs = [list(range(int(n))) for n in rng.integers(1, 60, 300)]
        ds = Dataset.from_dict({"input_ids": docs})
        first = packmask.pack_dataset(ds, 64)
        print("numba after first:", "numba" in sys.modules)
        second = packmask.pack_dataset(ds, 64)
        print("numba after second:", "numba" in sys.modules)
        print("same rows:", first[:] == second[:])
    """)
    env = dict(os.environ, PYTHONPATH=os.path.abspath(SRC))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "numba after first: False" in done.stdout
    assert "numba after second: True" in done.stdout
    assert "same rows: True" in done.stdout
