"""The ``datasets`` adapter: a ``Dataset``'s Arrow data in, an in-memory ``Dataset`` out, through the
library's public API.

A shuffled or selected ``Dataset`` is a full table plus an indices mapping; reading it in the
``"arrow"`` format applies the mapping (one Arrow ``take``), and an unshuffled one comes back without
a copy.

    >>> from datasets import Dataset
    >>> ds = Dataset.from_dict({"input_ids": [[1, 2], [3], [4, 5, 6]]}).select([2, 0])
    >>> arrow_table(ds).column("input_ids").to_pylist()
    [[4, 5, 6], [1, 2]]
"""
from __future__ import annotations

import hashlib

__all__ = ["arrow_table", "arrow_column", "derived_fingerprint", "in_memory_dataset"]


def arrow_table(dataset):
    """The rows of ``dataset`` (indices mapping applied), as one ``pyarrow.Table``."""
    # formatted_as, not with_format: no deep copy of the Dataset (whose garbage a later collection
    # pays for; measured 0.2 s in a fresh process with torch loaded)
    with dataset.formatted_as("arrow"):
        return dataset[:]


def arrow_column(dataset, name: str):
    """One column of ``dataset`` (indices mapping applied), as a ``pyarrow.ChunkedArray``."""
    with dataset.formatted_as("arrow"):
        return dataset[name]


def derived_fingerprint(source, settings: tuple, tag: str) -> str:
    """A fingerprint for a dataset derived from ``source`` with ``settings``: the source's fingerprint
    and the settings hashed, instead of letting ``Dataset()`` hash every token (seconds).

    ``datasets`` has no public accessor for a dataset's fingerprint, hence the one attribute read
    here; a source without one (a dict, a list) gets a random fingerprint, as ``datasets`` gives."""
    from datasets.fingerprint import generate_random_fingerprint

    parent = getattr(source, "_fingerprint", None) or generate_random_fingerprint()
    return hashlib.sha256(repr((parent, settings, tag)).encode()).hexdigest()[:16]


def in_memory_dataset(table, fingerprint: str):
    """An in-memory ``Dataset`` over ``table`` named ``fingerprint``."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    return Dataset(InMemoryTable(table), fingerprint=fingerprint)
