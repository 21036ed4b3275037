"""The PNGs the CLI writes: ``pack``'s length / fill histograms and the demo's loss curves.

Both draw with matplotlib's non-interactive ``Agg`` backend and save to the path they are given
(the caller passes a staged temporary path, so a figure is never half-written either).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["plot_length_histograms", "plot_demo"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_length_histograms(lengths, row_lengths, max_length: int, path: Path, title: str = "",
                           image_format: str | None = None) -> None:
    """Two histograms: sequence lengths (with ``max_length`` marked) and per-row fill.

    ``lengths``: tokens per input sequence; ``row_lengths``: tokens per packed row.
    """
    import numpy as np

    plt = _pyplot()
    fig, (ax_len, ax_fill) = plt.subplots(1, 2, figsize=(11, 4))
    ax_len.hist(lengths, bins=60, color="#4c72b0")
    ax_len.axvline(max_length, color="#c44e52", ls="--", label=f"max_length {max_length:,}")
    ax_len.set_yscale("log")
    ax_len.set_xlabel("tokens per sequence")
    ax_len.set_ylabel("sequences (log)")
    ax_len.set_title(f"{len(lengths):,} sequences, median {int(np.median(lengths)):,} tokens")
    ax_len.legend()
    fill = row_lengths / max_length
    ax_fill.hist(fill, bins=np.linspace(0, 1, 41), color="#55a868")
    ax_fill.axvline(fill.mean(), color="black", ls=":", label=f"mean fill {fill.mean():.1%}")
    ax_fill.set_xlabel("row fill (tokens / max_length)")
    ax_fill.set_yscale("log")  # nearly all rows are full; the log scale shows the few that are not
    ax_fill.set_ylabel("packed rows (log)")
    ax_fill.set_title(f"{len(row_lengths):,} packed rows")
    ax_fill.legend(loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format=image_format)
    plt.close(fig)


def plot_demo(result: dict, path: Path) -> None:
    """Two panels: both loss curves over steps, and real tokens/s with the padding fraction."""
    plt = _pyplot()
    padded, packed = result["padded"], result["packed"]
    fig, (ax_loss, ax_tps) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [2, 1]})
    steps = range(1, len(packed["losses"]) + 1)
    ax_loss.plot(steps, padded["losses"], color="#d62728", lw=3, alpha=0.45, label="padded (sdpa)")
    ax_loss.plot(steps, packed["losses"], color="#1f77b4", lw=1.3, ls="--", label="packed (packmask)")
    ax_loss.set_xlabel("optimizer step (same documents in both runs)")
    ax_loss.set_ylabel("mean next-token cross-entropy")
    ax_loss.set_title(f"loss at equal steps: max |diff| = {result['max_abs_loss_diff_at_equal_steps']:.1e}")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    rates = [padded["real_tokens_per_s"], packed["real_tokens_per_s"]]
    bars = ax_tps.bar(["padded", "packed"], rates, color=["#d62728", "#1f77b4"])
    for bar, run in zip(bars, (padded, packed)):
        ax_tps.annotate(f"{bar.get_height():,.0f}\n{run['padding_fraction']:.0%} padding",
                        (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom", fontsize=9)
    ax_tps.set_ylim(0, max(rates) * 1.25)
    ax_tps.set_ylabel("real (non-padding) tokens / s, after warm-up")
    ax_tps.set_title(f"throughput on {result['device']}")
    iso = result["isolation"]
    fig.suptitle(
        f"packmask demo: tiny Llama on {result['corpus']['documents']:,} stdlib docstrings — "
        f"per-sequence loss packed vs alone: max |diff| {iso['max_abs_diff_packed_vs_alone']:.1e} "
        f"(plain causal: {iso['max_abs_diff_plain_causal_vs_alone']:.1e})",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
