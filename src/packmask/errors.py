"""The exception packmask raises for input it will not guess about, and its warning category."""
from __future__ import annotations


class PackmaskError(ValueError):
    """Bad or unsupported input. The message says what was wrong and how to fix it.

    A ``ValueError`` subclass so that callers that already catch ``ValueError`` keep working.
    """


class UnsupportedModelError(PackmaskError):
    """The model has a feature that attention masks alone cannot isolate per sequence."""


class PackmaskWarning(UserWarning):
    """Input that runs but probably not as meant (e.g. packed positions that transformers will mix)."""
