"""What the CLI prints: tables, and the warnings that must not be missed.

    >>> import numpy as np
    >>> truncation_warning(np.array([10, 500]), tokens_lost=244, max_length=256, overflow="truncate")
    'truncation cut 244 of 510 tokens (47.8%) from 1 sequence longer than --max-length 256 (fix: pass --overflow split to keep every token, or a larger --max-length)'
    >>> truncation_warning(np.array([10, 500]), tokens_lost=2, max_length=256, overflow="truncate") is None
    True
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["input_table", "truncation_warning", "print_warning", "print_report", "demo_table", "LOSS_WARN_FRACTION"]

LOSS_WARN_FRACTION = 0.01  # warn when overflow handling removes more than 1% of the input tokens


def input_table(path: Path, lengths, max_length: int):
    """Documents, tokens and length percentiles of INPUT, and how many exceed ``max_length``."""
    import numpy as np
    from rich.table import Table

    table = Table(title=f"input: {path}")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    for name in ("min", "median", "p90", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column(f"> {max_length}", justify="right")
    if len(lengths) == 0:
        table.add_row("0", "0", *["-"] * 6)
        return table
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    table.add_row(f"{len(lengths):,}", f"{int(lengths.sum()):,}", f"{lengths.min():,}", f"{p50:,.0f}",
                  f"{p90:,.0f}", f"{p99:,.0f}", f"{lengths.max():,}", f"{int((lengths > max_length).sum()):,}")
    return table


def truncation_warning(lengths, tokens_lost: int, max_length: int, overflow: str) -> str | None:
    """The warning text when ``--overflow truncate|drop`` removed more than 1% of the tokens."""
    total = int(lengths.sum())
    if total == 0 or tokens_lost <= LOSS_WARN_FRACTION * total:
        return None
    too_long = int((lengths > max_length).sum())
    verb = "truncation cut" if overflow == "truncate" else "--overflow drop removed"
    return (f"{verb} {tokens_lost:,} of {total:,} tokens ({tokens_lost / total:.1%}) from {too_long:,} "
            f"sequence{'s' if too_long != 1 else ''} longer than --max-length {max_length:,} "
            f"(fix: pass --overflow split to keep every token, or a larger --max-length)")


def print_warning(console, text: str) -> None:
    """A warning that stands out: bold yellow on the terminal, ``warning:`` in logs."""
    from rich.markup import escape

    console.print(f"[bold yellow]warning:[/] [yellow]{escape(text)}[/]")


def print_report(console, report) -> None:
    """Print what verify returned: a rich renderable, or an object with ``.table()``."""
    if report is None:
        return
    if hasattr(report, "__rich__") or hasattr(report, "__rich_console__"):
        console.print(report)
    elif callable(getattr(report, "table", None)):
        console.print(report.table())


def demo_table(result: dict):
    """The demo's rich table: throughput, padding, losses at equal steps, isolation."""
    from rich.table import Table

    padded, packed = result["padded"], result["packed"]
    steps = len(packed["losses"])
    table = Table(title=f"packmask demo — {steps} steps each, same documents per step, {result['device']}")
    table.add_column("")
    table.add_column("padded (sdpa)", justify="right")
    table.add_column("packed (packmask)", justify="right")
    speedup = packed["real_tokens_per_s"] / padded["real_tokens_per_s"]
    table.add_row("real tokens / s" + (" (after warm-up)" if packed["warmup_steps"] else ""),
                  f"{padded['real_tokens_per_s']:,.0f}", f"{packed['real_tokens_per_s']:,.0f}  ({speedup:.1f}x)")
    table.add_row("padding fraction", f"{padded['padding_fraction']:.1%}", f"{packed['padding_fraction']:.1%}")
    table.add_row("token slots computed", f"{padded['token_slots']:,}", f"{packed['token_slots']:,}")
    warmup = packed["warmup_steps"]
    if warmup:
        def split_time(run):
            return f"{run['warmup_seconds']:.1f} s + {run['train_seconds'] - run['warmup_seconds']:.1f} s"

        table.add_row(f"time: {warmup} warm-up steps + rest", split_time(padded), split_time(packed))
    else:
        table.add_row("training time", f"{padded['train_seconds']:.1f} s", f"{packed['train_seconds']:.1f} s")
    for step in sorted({1, max(1, steps // 2), steps}):
        table.add_row(f"loss at step {step}", f"{padded['losses'][step - 1]:.4f}", f"{packed['losses'][step - 1]:.4f}")
    first_gap = abs(padded["losses"][0] - packed["losses"][0])
    table.add_row("|loss diff| step 1 / max", "", f"{first_gap:.0e} / {result['max_abs_loss_diff_at_equal_steps']:.0e}")
    iso = result["isolation"]
    table.add_row("max |per-seq loss − alone|", f"{iso['max_abs_diff_plain_causal_vs_alone']:.1e} plain causal",
                  f"{iso['max_abs_diff_packed_vs_alone']:.1e}")
    table.caption = (
        "loss diff: same weights and documents at every step; what remains is float rounding "
        "(different kernels sum in different orders).\n"
        f"per-seq loss: {iso['documents']} held-out documents packed into {iso['rows']} rows vs each "
        "run alone; 'plain causal' = the same rows without packmask (documents see each other)."
    )
    return table
