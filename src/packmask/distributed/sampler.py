"""Deal packed rows out to data-parallel ranks so that every rank's step costs the same.

Rows packed to the same length still differ in attention work: a row of two 4k documents costs
about 8x the attention of a row of forty 200-token documents. Each step waits for the slowest
rank, so :class:`BalancedBatchSampler` balances two loads per rank and step:

* **tokens** -- the sum of row lengths (linear layers, memory);
* **attention** -- the number of causal (query, key) pairs, ``sum(L * (L + 1) / 2)`` over the
  sequences of the rows (what a varlen kernel computes).

How, per *window* of ``window_steps`` micro-steps (``window_steps * world_size * batch_size`` rows
drawn in a seeded random order):

1. longest-processing-time first: rows by attention cost, heaviest first, each into the open *bin*
   (one rank's micro-batch of exactly ``batch_size`` rows) with the lowest load -- the larger of
   tokens and attention, each divided by its window mean;
2. the bins sorted by attention, and each run of ``world_size`` neighbours becomes one step, so the
   bins that run side by side cost about the same (with ``batch_size=1`` this is the only lever);
3. swaps between the heaviest bin of a step and another bin of it, while that lowers the larger of
   the two (matters for ``batch_size >= 2``);
4. the window's steps in a seeded random order.

Worked example -- 2 ranks, 1 row per rank per step, one window of 2 steps; rows with
``seq_lengths`` (attention cost ``L(L+1)/2`` summed)::

    row 0  [8]        36        row 2  [2, 2, 2, 2]  12
    row 1  [4, 4]     20        row 3  [7, 1]        29

    sorted by cost: row0 36, row3 29, row1 20, row2 12
    steps of 2 neighbours: (row0, row3) and (row1, row2)     max/mean 1.11 and 1.25
    round-robin 0,1 | 2,3 would pair (row0, row1), (row2, row3):  1.29 and 1.41

The sampler is a *batch sampler*: it yields lists of row indices. With ``rank=r`` it yields rank
``r``'s micro-batches (``torchrun``, your own loop). With ``rank=None`` it yields every rank's
micro-batch of step 0, then of step 1, ... -- the order ``accelerate.prepare`` splits back out
(process ``p`` takes batches ``p, p + world_size, ...``), which is how :mod:`.trainer` plugs it
into the HF ``Trainer``.
"""
from __future__ import annotations

import heapq
from typing import Any, Iterator

import numpy as np
from torch.utils.data import Sampler

from ..data.hf_datasets import arrow_column
from ..data.numba_cache import njit
from ..data.spans import lengths_from_offsets, offsets_from_lengths
from ..errors import PackmaskError

__all__ = ["row_costs", "BalancedBatchSampler", "balance_report", "round_robin_steps"]


def _lengths_flat(seq_lengths: Any) -> tuple[np.ndarray, np.ndarray]:
    """(values, offsets) of a ragged ``seq_lengths`` column, without a Python loop over Arrow data."""
    try:
        import datasets
        if isinstance(seq_lengths, datasets.Dataset):
            if "seq_lengths" not in seq_lengths.column_names:
                raise PackmaskError(f"The dataset has no 'seq_lengths' column (columns: {seq_lengths.column_names}); "
                                    "pack it with packmask.pack_dataset, which writes one.")
            seq_lengths = arrow_column(seq_lengths, "seq_lengths")   # a shuffled / selected view included
    except ImportError:  # pragma: no cover
        pass
    if hasattr(seq_lengths, "combine_chunks"):  # pyarrow.ChunkedArray
        seq_lengths = seq_lengths.combine_chunks()
    if hasattr(seq_lengths, "offsets") and hasattr(seq_lengths, "flatten"):  # pyarrow ListArray
        offsets = np.asarray(seq_lengths.offsets, dtype=np.int64)
        values = np.asarray(seq_lengths.flatten(), dtype=np.int64)
        return values, offsets - offsets[0]
    rows = [np.asarray(row, dtype=np.int64).reshape(-1) for row in seq_lengths]
    offsets = offsets_from_lengths([r.size for r in rows])
    values = np.concatenate(rows) if rows else np.zeros(0, np.int64)
    return values, offsets


def row_costs(seq_lengths: Any) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and causal attention pairs of every packed row.

    Args:
        seq_lengths: per-row sequence lengths: a list of lists, a pyarrow list column, or a packed
            ``datasets.Dataset`` (its ``seq_lengths`` column, as ``pack_dataset`` writes it).

    Returns:
        ``(tokens, attention)``, int64 arrays ``[rows]``; ``attention = sum(L * (L + 1) // 2)``.

    Example::

        >>> tokens, attention = row_costs([[8], [4, 4], [2, 2, 2, 2]])
        >>> tokens.tolist(), attention.tolist()
        ([8, 8, 8], [36, 20, 12])
    """
    values, offsets = _lengths_flat(seq_lengths)
    if values.size and values.min() < 0:
        raise PackmaskError("seq_lengths must be >= 0; a packed row lists the length of each of its sequences.")
    per_row = lengths_from_offsets(offsets)
    row_of = np.repeat(np.arange(per_row.size), per_row)
    tokens = np.bincount(row_of, weights=values, minlength=per_row.size).astype(np.int64)
    attention = np.bincount(row_of, weights=values * (values + 1) // 2, minlength=per_row.size).astype(np.int64)
    return tokens, attention


@njit(cache=True)
def _fill_bins(order, tokens, attention, num_bins, per_bin):
    """Longest-processing-time first with equal bin sizes: each row (heaviest first) goes to the open
    bin whose load -- the larger of tokens and attention, each relative to its mean -- is lowest.
    A heap keeps it ``O(rows log bins)``."""
    load_t = np.zeros(num_bins)
    load_a = np.zeros(num_bins)
    count = np.zeros(num_bins, np.int64)
    bin_of = np.empty(order.size, np.int64)
    mean_t = max(tokens.sum() / num_bins, 1e-9)
    mean_a = max(attention.sum() / num_bins, 1e-9)
    heap = [(0.0, b) for b in range(num_bins)]  # (load, bin); already a valid heap
    for i in range(order.size):
        row = order[i]
        _, best = heapq.heappop(heap)
        bin_of[i] = best
        load_t[best] += tokens[row]
        load_a[best] += attention[row]
        count[best] += 1
        if count[best] < per_bin:
            heapq.heappush(heap, (max(load_t[best] / mean_t, load_a[best] / mean_a), best))
    return bin_of, load_a


@njit(cache=True)
def _refine_step(rows, tokens, attention, rounds):
    """Swap rows between the step's heaviest bin and another bin while the heavier of the two shrinks.

    ``rows`` is ``[world_size, batch_size]`` (edited in place); loads are relative to the step's mean.
    """
    W, B = rows.shape
    load_t = np.zeros(W)
    load_a = np.zeros(W)
    for b in range(W):
        for k in range(B):
            load_t[b] += tokens[rows[b, k]]
            load_a[b] += attention[rows[b, k]]
    mean_t = max(load_t.mean(), 1e-9)
    mean_a = max(load_a.mean(), 1e-9)
    for _ in range(rounds):
        score = np.maximum(load_t / mean_t, load_a / mean_a)
        hi = np.argmax(score)
        best_gain, best = 0.0, (-1, -1, -1)
        for lo in range(W):
            if lo == hi:
                continue
            for i in range(B):
                for j in range(B):
                    dt = tokens[rows[lo, j]] - tokens[rows[hi, i]]
                    da = attention[rows[lo, j]] - attention[rows[hi, i]]
                    new_hi = max((load_t[hi] + dt) / mean_t, (load_a[hi] + da) / mean_a)
                    new_lo = max((load_t[lo] - dt) / mean_t, (load_a[lo] - da) / mean_a)
                    gain = score[hi] - max(new_hi, new_lo)
                    if gain > best_gain + 1e-12:
                        best_gain, best = gain, (lo, i, j)
        lo, i, j = best
        if lo < 0:
            break
        dt = tokens[rows[lo, j]] - tokens[rows[hi, i]]
        da = attention[rows[lo, j]] - attention[rows[hi, i]]
        load_t[hi] += dt
        load_a[hi] += da
        load_t[lo] -= dt
        load_a[lo] -= da
        rows[hi, i], rows[lo, j] = rows[lo, j], rows[hi, i]


def _window_steps(rows: np.ndarray, tokens, attention, world_size: int, batch_size: int, rng) -> np.ndarray:
    """``[steps, world_size, batch_size]`` row indices for one window of rows."""
    num_bins = rows.size // batch_size
    order = rows[np.lexsort((-tokens[rows], -attention[rows]))]
    bin_of, bin_attention = _fill_bins(order, tokens.astype(np.float64), attention.astype(np.float64),
                                       num_bins, batch_size)
    bins = order[np.argsort(bin_of, kind="stable")].reshape(num_bins, batch_size)
    bins = bins[np.argsort(-bin_attention, kind="stable")]  # neighbours by cost run side by side
    steps = np.ascontiguousarray(bins.reshape(num_bins // world_size, world_size, batch_size))
    if batch_size > 1 and world_size > 1:
        t, a = tokens.astype(np.float64), attention.astype(np.float64)
        for step in steps:
            _refine_step(step, t, a, 4 * world_size)
    steps = steps[rng.permutation(steps.shape[0])]
    return steps[:, rng.permutation(world_size)]  # which rank gets the heavier bin: no bias


def round_robin_steps(num_rows: int, world_size: int, batch_size: int, *, seed: int = 0, epoch: int = 0,
                      shuffle: bool = True) -> np.ndarray:
    """The naive baseline (what ``DistributedSampler`` does): ``[steps, world_size, batch_size]``."""
    rows = np.random.default_rng([seed, epoch]).permutation(num_rows) if shuffle else np.arange(num_rows)
    per_step = world_size * batch_size
    rows = rows[: rows.size // per_step * per_step]
    return rows.reshape(-1, batch_size, world_size).transpose(0, 2, 1)


def balance_report(steps: np.ndarray, tokens: np.ndarray, attention: np.ndarray) -> dict:
    """Worst and mean over steps of ``max / mean`` per-rank load (1.0 = perfectly even)."""
    out = {}
    for name, cost in (("tokens", tokens), ("attention", attention)):
        per_rank = cost[steps].sum(axis=2).astype(np.float64)  # [steps, ranks]
        ratio = per_rank.max(axis=1) / np.maximum(per_rank.mean(axis=1), 1e-12)
        out[f"{name}_max_over_mean_worst"] = float(ratio.max()) if ratio.size else 1.0
        out[f"{name}_max_over_mean_avg"] = float(ratio.mean()) if ratio.size else 1.0
        # what a synchronous step waits for, summed over the epoch, over a perfect split
        out[f"{name}_epoch_slowest_over_mean"] = float(per_rank.max(axis=1).sum() / max(per_rank.mean(axis=1).sum(), 1e-12))
    out["steps"] = int(steps.shape[0])
    return out


class BalancedBatchSampler(Sampler):
    """Batch sampler over packed rows with per-step balanced tokens and attention across ranks.

    Args:
        seq_lengths: the packed dataset (``seq_lengths`` column) or per-row lists of lengths.
        batch_size: rows per rank per micro-step (``per_device_train_batch_size``).
        world_size: data-parallel ranks; default ``torch.distributed`` world size (1 if not initialised).
        rank: this rank (yields its micro-batches only), or ``None``: every rank's micro-batches
            step by step (for ``accelerate.prepare``, which hands batch ``i`` to process
            ``i % world_size``). Default: ``None``.
        seed, shuffle: rows are drawn in a ``(seed, epoch)``-seeded random order (``shuffle=False``:
            dataset order; balancing still reorders inside a window).
        window_steps: micro-steps balanced together (default 64). Larger balances better, but the
            same rows tend to meet in a step every epoch (the grouping follows cost, not the shuffle)
            and, with ``batch_size=1``, the rows of one step are alike in cost; 1 balances each step
            only among its own rows.
        drop_last: drop the rows that do not fill a last step (default). ``False`` fills that step
            with rows from the start of the epoch's order (they are seen twice), as
            ``DistributedSampler`` does.

    ``set_epoch(e)`` reshuffles; ``state_dict()`` / ``load_state_dict()`` resume mid-epoch
    (the batches already yielded are skipped).

    Example (2 ranks, rank 0's micro-batches)::

        >>> rows = [[8], [4, 4], [2, 2, 2, 2], [7, 1]]
        >>> sampler = BalancedBatchSampler(rows, batch_size=1, world_size=2, rank=0, window_steps=2)
        >>> sampler.steps().tolist()      # [step][rank][row]: heavy rows 0 and 3 run side by side
        [[[1], [2]], [[0], [3]]]
        >>> list(sampler)                 # rank 0's micro-batches
        [[1], [0]]
        >>> list(BalancedBatchSampler(rows, batch_size=1, world_size=2, rank=None, window_steps=2))
        [[1], [2], [0], [3]]
    """

    def __init__(self, seq_lengths: Any, batch_size: int, *, world_size: int | None = None, rank: int | None = None,
                 seed: int = 0, shuffle: bool = True, window_steps: int = 64, drop_last: bool = True):
        if world_size is None:
            import torch.distributed as dist
            world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        for name, value in (("batch_size", batch_size), ("world_size", world_size), ("window_steps", window_steps)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise PackmaskError(f"BalancedBatchSampler: {name} must be a positive integer, got {value!r}.")
        if rank is not None and not 0 <= rank < world_size:
            raise PackmaskError(f"BalancedBatchSampler: rank {rank} is outside 0..{world_size - 1}.")
        self.tokens, self.attention = row_costs(seq_lengths)
        if self.tokens.size == 0:
            raise PackmaskError("BalancedBatchSampler: the dataset has no rows.")
        self.batch_size, self.world_size, self.rank = int(batch_size), int(world_size), rank
        self.seed, self.shuffle, self.window_steps, self.drop_last = int(seed), shuffle, int(window_steps), drop_last
        self.epoch = 0
        self._resume_from = 0  # batches of this sampler's output to skip on the next iteration
        self._yielded = 0

    # -- size --------------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        per_step = self.world_size * self.batch_size
        n = self.tokens.size
        return n // per_step if self.drop_last else -(-n // per_step)

    def __len__(self) -> int:
        return self.num_steps * (self.world_size if self.rank is None else 1)

    # -- the plan ----------------------------------------------------------------------------------
    def steps(self, epoch: int | None = None) -> np.ndarray:
        """``[steps, world_size, batch_size]`` row indices of one epoch (the same on every rank)."""
        epoch = self.epoch if epoch is None else epoch
        rng = np.random.default_rng([self.seed, epoch])
        n = self.tokens.size
        rows = rng.permutation(n) if self.shuffle else np.arange(n)
        per_step = self.world_size * self.batch_size
        total = self.num_steps * per_step
        if total > n:  # drop_last=False: complete the last step with rows from the start
            rows = np.concatenate([rows, np.resize(rows, total - n)])
        rows = rows[:total]
        per_window = self.window_steps * per_step
        windows = [_window_steps(rows[lo:lo + per_window], self.tokens, self.attention, self.world_size,
                                 self.batch_size, rng) for lo in range(0, total, per_window)]
        if not windows:
            return np.zeros((0, self.world_size, self.batch_size), np.int64)
        return np.concatenate(windows)

    def __iter__(self) -> Iterator[list[int]]:
        plan = self.steps()
        batches = plan.reshape(-1, self.batch_size) if self.rank is None else plan[:, self.rank]
        start, self._resume_from = self._resume_from, 0
        self._yielded = start
        for batch in batches[start:]:
            self._yielded += 1
            yield batch.tolist()

    # -- epochs and resumption ---------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "seed": self.seed, "batches_yielded": self._yielded,
                "world_size": self.world_size, "rank": self.rank, "num_rows": int(self.tokens.size)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "world_size", "rank", "num_rows"):
            mine = self.state_dict()[key]
            if state.get(key, mine) != mine:
                raise PackmaskError(f"BalancedBatchSampler.load_state_dict: saved {key}={state[key]!r} but this sampler "
                                    f"has {key}={mine!r}; resume with the same dataset, seed and world size.")
        self.epoch = int(state["epoch"])
        self._resume_from = self._yielded = int(state["batches_yielded"])
