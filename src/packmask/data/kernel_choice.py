"""Which implementation packs: the numba kernels, or their numpy twins for a process's first call.

Importing numba and loading its cached kernels costs a fresh process about 0.5-1 s, more than
packing 200k documents takes once they are loaded. So the first packing call of a process (an
outermost :func:`packing_call`) runs the numpy twins -- :func:`packmask.data.binpack_python.rows_bfd`
for the default ``"bfd"`` assignment and a numpy span copy -- which give identical results (tested
against the kernels); later calls, inputs of at least :data:`NUMBA_AT` documents or spans (where the
load pays for itself), and any call once the kernels are loaded, run numba
(``tests/data/test_kernel_choice.py`` checks both halves in a fresh process).
"""
from __future__ import annotations

import sys
from contextlib import contextmanager

__all__ = ["use_numba", "packing_call", "NUMBA_AT"]

#: documents (or spans) from which the numba kernels run even in a process's first call
NUMBA_AT = 1_000_000

_finished_calls = 0
_depth = 0


def _kernels_loaded() -> bool:
    for module, kernel in (("packmask.data.binpack", "_rows_bfd"), ("packmask.data.span_kernels", "copy_spans")):
        dispatcher = getattr(sys.modules.get(module), kernel, None)
        if dispatcher is not None and dispatcher.signatures:
            return True
    return False


def use_numba(items: int) -> bool:
    """Run the numba kernels for an input of ``items`` documents or spans?"""
    return _finished_calls > 0 or items >= NUMBA_AT or _kernels_loaded()


@contextmanager
def packing_call():
    """Mark a public packing entry point; the first outermost one to finish ends the numpy-only phase."""
    global _depth, _finished_calls
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            _finished_calls += 1
