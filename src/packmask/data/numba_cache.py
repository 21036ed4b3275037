"""``njit`` with an on-disk cache that also works from a read-only install.

numba caches compiled kernels in ``__pycache__`` next to the module, or, where that is not writable
(a system or container install), in the user's cache folder. Where neither is writable numba refuses
to decorate a ``cache=True`` function at all ("cannot cache function ...: no locator available"),
which would make ``import packmask.data.packing`` fail. :func:`njit` then caches in a per-user folder
under the system temporary directory (numba's ``NUMBA_CACHE_DIR`` locator, pointed there only while
that one function is decorated: nothing changes for the rest of the process), and compiles without
a cache as the last resort: slower first calls, never an import error.

    >>> @njit
    ... def twice(x):
    ...     return 2 * x
    >>> twice(21)
    42
"""
from __future__ import annotations

import os
import tempfile

import numba
from numba import prange

__all__ = ["njit", "prange", "fallback_cache_dir"]


def fallback_cache_dir() -> str:
    """The folder used when numba finds no writable cache location of its own."""
    user = os.environ.get("USER") or str(os.getuid() if hasattr(os, "getuid") else "user")
    return os.path.join(tempfile.gettempdir(), f"packmask-numba-cache-{user}")


def njit(*args, **kwargs):
    """``numba.njit``; with ``cache=True``, falls back as the module docstring says instead of raising."""
    if not kwargs.get("cache"):
        return numba.njit(*args, **kwargs)

    def decorate(function):
        try:
            return numba.njit(**kwargs)(function)
        except RuntimeError as error:
            if "cannot cache" not in str(error):
                raise
        if not numba.config.CACHE_DIR:
            numba.config.CACHE_DIR = fallback_cache_dir()   # read when the locator is chosen, i.e. now
            try:
                return numba.njit(**kwargs)(function)
            except RuntimeError as error:
                if "cannot cache" not in str(error):
                    raise
            finally:
                numba.config.CACHE_DIR = ""
        return numba.njit(**{**kwargs, "cache": False})(function)

    return decorate(args[0]) if args and callable(args[0]) else decorate
