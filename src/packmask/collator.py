"""Deprecated alias: use :mod:`packmask.data.collator` (moved in 0.2.0)."""
import warnings as _warnings

from .data.collator import *  # noqa: F401,F403
from .data.collator import __all__  # noqa: F401

_warnings.warn("packmask.collator moved to packmask.data.collator; the old path will be removed in 0.3.0.",
               DeprecationWarning, stacklevel=2)
