"""Deprecated alias: use :mod:`packmask.data.loss` (moved in 0.2.0)."""
import warnings as _warnings

from .data.loss import *  # noqa: F401,F403
from .data.loss import __all__  # noqa: F401

_warnings.warn("packmask.loss moved to packmask.data.loss; the old path will be removed in 0.3.0.",
               DeprecationWarning, stacklevel=2)
