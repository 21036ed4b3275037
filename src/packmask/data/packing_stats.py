"""What a packing run produced: :class:`PackingStats`, and its rich table.

    >>> stats = PackingStats(max_length=8, strategy="bfd", overflow="truncate", rows=2, tokens=16)
    >>> stats.finish()
    >>> stats.fill, stats.lower_bound
    (1.0, 2)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["PackingStats"]


@dataclass
class PackingStats:
    """What a packing run produced. ``fill = tokens / (rows * max_length)``; ``lower_bound`` is
    ``ceil(tokens / max_length)``, the fewest rows any packer could use for the kept tokens.

    Document counters (``truncated``, ``split``, ``dropped``, ``empty``) count input documents;
    ``*_tokens`` count the tokens each policy removed.
    """

    max_length: int
    strategy: str
    overflow: str
    documents: int = 0
    sequences: int = 0
    rows: int = 0
    tokens: int = 0
    fill: float = 0.0
    lower_bound: int = 0
    truncated: int = 0
    truncated_tokens: int = 0
    split: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    empty: int = 0
    seconds: float = 0.0
    dropped_columns: list[str] = field(default_factory=list)

    def finish(self) -> None:
        """Fill ``fill`` and ``lower_bound`` from ``rows``, ``tokens`` and ``max_length``."""
        self.fill = self.tokens / (self.rows * self.max_length) if self.rows else 0.0
        self.lower_bound = math.ceil(self.tokens / self.max_length) if self.tokens else 0

    def table(self):
        """A ``rich.table.Table`` with one line per field."""
        from rich.table import Table

        table = Table(title=f"packmask packing ({self.strategy}, max_length={self.max_length}, overflow={self.overflow})")
        table.add_column("field")
        table.add_column("value", justify="right")
        table.add_row("documents in", f"{self.documents:,}")
        table.add_row("sequences out", f"{self.sequences:,}")
        table.add_row("rows", f"{self.rows:,}")
        table.add_row("lower bound (rows)", f"{self.lower_bound:,}")
        table.add_row("tokens", f"{self.tokens:,}")
        table.add_row("fill", f"{self.fill:.4f}")
        table.add_row("truncated docs (tokens cut)", f"{self.truncated:,} ({self.truncated_tokens:,})")
        table.add_row("split docs", f"{self.split:,}")
        table.add_row("dropped docs (tokens)", f"{self.dropped:,} ({self.dropped_tokens:,})")
        table.add_row("empty docs (dropped)", f"{self.empty:,}")
        if self.dropped_columns:
            table.add_row("columns not carried", ", ".join(self.dropped_columns))
        table.add_row("seconds", f"{self.seconds:.3f}")
        return table

    def __rich__(self):
        return self.table()

    def __str__(self) -> str:
        return (f"PackingStats(rows={self.rows}, lower_bound={self.lower_bound}, fill={self.fill:.4f}, "
                f"tokens={self.tokens}, documents={self.documents}, truncated={self.truncated}, "
                f"split={self.split}, dropped={self.dropped}, empty={self.empty}, seconds={self.seconds:.3f})")

