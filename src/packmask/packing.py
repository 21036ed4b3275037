"""Deprecated alias: use :mod:`packmask.data.packing` (moved in 0.2.0)."""
import warnings as _warnings

from .data.packing import *  # noqa: F401,F403
from .data.packing import __all__  # noqa: F401

_warnings.warn("packmask.packing moved to packmask.data.packing; the old path will be removed in 0.3.0.",
               DeprecationWarning, stacklevel=2)
