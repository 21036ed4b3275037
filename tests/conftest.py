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


@pytest.fixture
def fake_varlen_kernel(monkeypatch):
    """Install a plain-math stand-in for torch's CUDA-only ``varlen_attn`` (CPU tests of the glue
    around it). The backend memoises the kernel's signature, so it gets a fresh memo for the stand-in,
    restored with everything else at teardown; no test can leak a stand-in's signature to another."""
    import functools

    import torch.nn.attention.varlen as torch_varlen

    from packmask.backends import varlen as varlen_backend

    def install(kernel):
        monkeypatch.setattr(torch_varlen, "varlen_attn", kernel)
        fresh = functools.lru_cache(maxsize=None)(varlen_backend.varlen_params.__wrapped__)
        monkeypatch.setattr(varlen_backend, "varlen_params", fresh)
    return install
