"""Packing never changes torch's thread count (issue 10, item 4), and numba's pool follows torch's.

Runs in a subprocess: numba's thread pool starts once per process, and starting it is the moment that
used to rewrite OpenMP's (so torch's) thread count.
"""
import subprocess
import sys
import textwrap

import pytest

from packmask import PackmaskError
from packmask.data.threads import numba_threads

SCRIPT = textwrap.dedent("""
    import sys
    import torch
    torch.set_num_threads(1)
    assert torch.get_num_threads() == 1  # asking first matters: it is what made the old code lose the setting
    import numba
    from datasets import Dataset
    import packmask
    from packmask.data.threads import numba_threads

    ds = Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]] * 50})
    packmask.pack_dataset(ds, 8)   # a process's first packing call runs numba-free (data/kernel_choice.py) ...
    assert "packmask.data.span_kernels" not in sys.modules
    packed = packmask.pack_dataset(ds, 8)   # ... the second starts numba's pool: the moment under test
    assert "packmask.data.span_kernels" in sys.modules
    assert torch.get_num_threads() == 1, f"pack_dataset changed torch's threads to {torch.get_num_threads()}"
    with numba_threads() as used:
        assert used == 1 and numba.get_num_threads() == 1, (used, numba.get_num_threads())
    assert sum(packed["seq_lengths"], []) != [] and packed.num_rows == 57  # it did pack (450 tokens, rows of 8)

    torch.set_num_threads(2)
    packmask.pack_dataset(ds, 8, strategy="ffd")
    assert torch.get_num_threads() == 2, torch.get_num_threads()
    numba_before = numba.get_num_threads()
    packmask.pack_dataset(ds, 8, num_threads=1)
    assert torch.get_num_threads() == 2 and numba.get_num_threads() == numba_before
    print("ok")
""")


def test_pack_dataset_keeps_torch_thread_count():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=240)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_named(bad):
    with pytest.raises(PackmaskError, match="num_threads"):
        with numba_threads(bad):
            pass
