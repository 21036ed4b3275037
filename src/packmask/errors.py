"""The one exception type packmask raises for input it will not guess about."""
from __future__ import annotations


class PackmaskError(ValueError):
    """Bad or unsupported input. The message says what was wrong and how to fix it.

    A ``ValueError`` subclass so that callers that already catch ``ValueError`` keep working.
    """


class UnsupportedModelError(PackmaskError):
    """The model has a feature that attention masks alone cannot isolate per sequence."""
