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


@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark("vlm")`` imports ``benchmarks/vlm.py`` in-process (no interpreter start-up on a
    loaded CI machine) with ``benchmarks/`` on ``sys.path`` (the scripts import ``_report`` and each
    other's data builders); the modules it imported from there are dropped afterwards."""
    import importlib.util
    import sys
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(folder))
    before = set(sys.modules)

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"{name}_benchmark", folder / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    yield load
    for name in set(sys.modules) - before:
        if str(folder) in str(getattr(sys.modules[name], "__file__", "") or ""):
            del sys.modules[name]
