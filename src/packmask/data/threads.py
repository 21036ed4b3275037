"""Threads for packing's parallel kernels, sized from torch's setting and never changing it.

numba's OpenMP thread pool, when it starts, sets the OpenMP thread count of the calling thread to
``NUMBA_NUM_THREADS`` (all cores). torch reads that same count, so before this module a
``torch.set_num_threads(1)`` (or ``OMP_NUM_THREADS=1``) was silently undone by the first
``pack_dataset``: a training step after packing went from 71 ms to 547 ms on a 2-core machine.

:func:`numba_threads` runs a block with numba using ``min(torch.get_num_threads(), NUMBA_NUM_THREADS)``
threads (or the count asked for, e.g. 1 for single-threaded packing) and puts back both numba's and
torch's thread counts afterwards.

    >>> import torch
    >>> before = torch.get_num_threads()
    >>> with numba_threads(1):
    ...     pass
    >>> torch.get_num_threads() == before
    True
"""
from __future__ import annotations

from contextlib import contextmanager

from ..errors import PackmaskError

__all__ = ["numba_threads"]


def check_threads(num_threads) -> None:
    if num_threads is None:
        return
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise PackmaskError(f"num_threads must be a positive integer or None (follow torch.get_num_threads()), "
                            f"got {num_threads!r}.")


@contextmanager
def numba_threads(num_threads: int | None = None):
    """Run the block with numba's parallel kernels on ``num_threads`` threads (default: torch's count),
    capped at numba's pool size; torch's and numba's thread counts are as before afterwards."""
    check_threads(num_threads)
    import numba
    import torch

    torch_threads = torch.get_num_threads()
    # get_num_threads() starts numba's pool (the moment it rewrites OpenMP's count), so do it here,
    # where the change is undone, rather than inside the first parallel kernel call.
    numba_before = numba.get_num_threads()
    wanted = torch_threads if num_threads is None else num_threads
    wanted = max(1, min(wanted, numba.config.NUMBA_NUM_THREADS))
    try:
        numba.set_num_threads(wanted)
        yield wanted
    finally:
        numba.set_num_threads(numba_before)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
