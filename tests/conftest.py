import os

# pytest -n 2 on a 2-core machine: one math thread per worker, not two workers x all cores
# (oversubscribed torch threads made the suite 10-25x slower under load). Subprocess tests inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def pytest_collection_modifyitems(config, items):
    """``cuda``-marked tests skip without a GPU and run (and fail for real) on one."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
