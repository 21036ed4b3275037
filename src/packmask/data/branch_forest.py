"""One prompt, several responses: the overflow policy and the :class:`~packmask.data.tree.Forest` it
leaves, vectorised over examples (the shared core of :func:`packmask.pack_preference`,
:func:`packmask.pack_groups` and :class:`packmask.trl.PackedGRPOTrainer`).

Every prompt and response is a span ``values[start : start + len]`` of one token buffer; each
example becomes the segments ``prompt, response 0, response 1, ...`` with every response a child of
the prompt::

    values     p0 p1 p2 c0 c1 r0            p_start [0]  p_len [3]  r_start [3, 5]  r_len [2, 1]
    segments   [p0 p1 p2] [c0 c1] [r0]      parents -1, 0, 0

    >>> stats = TreePackingStats(max_length=8, overflow="truncate", truncation_mode="keep_start")
    >>> forest = prompt_branch_forest(np.arange(6), [0], [3], [3, 5], [2, 1], [2], [1, 2], 8, "truncate",
    ...                               "keep_start", stats, "response")
    >>> forest.seg_lengths.tolist(), forest.parent.tolist(), stats.shared_tokens
    ([3, 2, 1], [-1, 0, 0], 3)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..errors import PackmaskError
from .spans import gather_spans, offsets_from_lengths
from .tree import Forest, PackedForest

__all__ = ["TreePackingStats", "prompt_branch_forest", "water_fill_cap", "OVERFLOWS", "TRUNCATION_MODES", "PROMPT",
           "CHOSEN", "REJECTED", "COMPLETION"]

OVERFLOWS = ("truncate", "drop", "error")
TRUNCATION_MODES = ("keep_start", "keep_end")
PROMPT, CHOSEN, REJECTED, COMPLETION = 0, 1, 2, 1


@dataclass
class TreePackingStats:
    """What a tree packing run did. ``tokens`` are the packed tokens; ``shared_tokens`` the prompt
    tokens the duplicated-prompt layout would have added (prompt length x (responses - 1))."""

    max_length: int
    overflow: str
    truncation_mode: str
    examples: int = 0
    packed_examples: int = 0
    rows: int = 0
    tokens: int = 0
    shared_tokens: int = 0
    fill: float = 0.0
    truncated: int = 0
    truncated_tokens: int = 0
    dropped: int = 0
    dropped_tokens: int = 0
    dropped_prompt_too_long: int = 0
    identical: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def finish(self, packed: PackedForest) -> None:
        """Fill ``rows``, ``tokens`` and ``fill`` from the packed rows."""
        self.rows = packed.num_rows
        self.tokens = int(packed.tokens.shape[0])
        self.fill = self.tokens / (self.rows * self.max_length) if self.rows else 0.0



def water_fill_cap(resp_len: np.ndarray, owner: np.ndarray, budget: np.ndarray, n_examples: int) -> np.ndarray:
    """Per example the largest ``cap`` with ``sum(min(resp_len, cap)) <= budget`` (binary search, all
    examples at once; ``log2(max length)`` vectorised passes)."""
    lo = np.zeros(n_examples, np.int64)
    hi = np.full(n_examples, int(resp_len.max()) + 1 if resp_len.size else 1, np.int64)
    while np.any(hi - lo > 1):
        mid = (lo + hi) // 2
        used = np.bincount(owner, weights=np.minimum(resp_len, mid[owner]), minlength=n_examples)
        fits = used <= budget
        lo = np.where(fits, mid, lo)
        hi = np.where(fits, hi, mid)
    return lo


def prompt_branch_forest(values, p_start, p_len, r_start, r_len, r_per_ex, kinds, max_length, overflow,
                         truncation_mode, stats: TreePackingStats, what: str) -> Forest:
    """The forest of ``prompt + responses`` examples after the overflow policy (module docstring).

    Example ``e`` has the prompt ``values[p_start[e] : + p_len[e]]`` and ``r_per_ex[e]`` responses, the
    next ones of ``r_start`` / ``r_len`` (``kinds`` labels each response); ``what`` names a response
    in errors ("response", "completion")."""
    if overflow not in OVERFLOWS:
        raise PackmaskError(f"unknown overflow {overflow!r}; use one of {OVERFLOWS}.")
    if truncation_mode not in TRUNCATION_MODES:
        raise PackmaskError(f"unknown truncation_mode {truncation_mode!r}; use one of {TRUNCATION_MODES}.")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise PackmaskError(f"max_length must be an integer >= 2 (tokens per packed row), got {max_length!r}.")
    values = np.asarray(values)
    p_start, p_len, r_start, r_len, r_per_ex = (np.asarray(x, np.int64) for x in (p_start, p_len, r_start, r_len,
                                                                                   r_per_ex))
    E = p_len.shape[0]
    stats.examples = E
    owner = np.repeat(np.arange(E), r_per_ex)
    if np.any(p_len == 0):
        e = int(np.flatnonzero(p_len == 0)[0])
        raise PackmaskError(f"example {e}: the prompt is empty; every response needs at least one prompt token to be "
                            "predicted from (add a BOS token, or filter such examples out).")
    if np.any(r_per_ex == 0):
        raise PackmaskError(f"example {int(np.flatnonzero(r_per_ex == 0)[0])} has no {what}.")
    if np.any(r_len == 0):
        i = int(np.flatnonzero(r_len == 0)[0])
        raise PackmaskError(f"example {int(owner[i])}: {what} {i - int(offsets_from_lengths(r_per_ex)[owner[i]])} "
                            "is empty; there is nothing to score -- filter such examples out first.")
    resp_total = np.bincount(owner, weights=r_len, minlength=E).astype(np.int64)
    size = p_len + resp_total
    keep_p = p_len.copy()
    keep_r = r_len.copy()
    over = size > max_length
    keep = np.ones(E, bool)
    if np.any(over):
        if overflow == "error":
            e = int(np.flatnonzero(over)[0])
            raise PackmaskError(f"{int(over.sum())} example(s) exceed max_length={max_length} (first: example {e}, prompt "
                                f"{int(p_len[e])} + {what} {int(resp_total[e])} tokens). Pass overflow='truncate' or 'drop', "
                                "or raise max_length.")
        if overflow == "drop":
            keep &= ~over
        else:
            if truncation_mode == "keep_end":
                keep_p = np.where(over, np.clip(max_length - resp_total, 1, None), p_len)
            budget = max_length - keep_p
            too_long_prompt = over & (budget < r_per_ex)
            keep &= ~too_long_prompt
            stats.dropped_prompt_too_long = int(too_long_prompt.sum())
            cap = water_fill_cap(r_len, owner, budget, E)
            cut = over[owner] & keep[owner]
            keep_r = np.where(cut, np.minimum(r_len, cap[owner]), r_len)
            stats.truncated = int((over & keep).sum())
            stats.truncated_tokens = int((size - keep_p - np.bincount(owner, weights=keep_r, minlength=E))[over & keep].sum())
    stats.dropped = int((~keep).sum())
    stats.dropped_tokens = int(size[~keep].sum())

    # segments interleaved per example: prompt, response 0, response 1, ...
    seg_per_ex = np.where(keep, 1 + r_per_ex, 0)
    ex_ids = np.flatnonzero(keep)
    S = int(seg_per_ex.sum())
    seg_first = offsets_from_lengths(seg_per_ex)[:-1]
    is_prompt = np.zeros(S, bool)
    is_prompt[seg_first[ex_ids]] = True
    seg_example = np.repeat(np.arange(E), seg_per_ex)
    resp_keep = keep[owner]
    lengths = np.empty(S, np.int64)
    src = np.empty(S, np.int64)
    lengths[is_prompt] = keep_p[ex_ids]
    src[is_prompt] = (p_start + p_len - keep_p)[ex_ids]            # keep the prompt's end
    lengths[~is_prompt] = keep_r[resp_keep]
    src[~is_prompt] = r_start[resp_keep]                          # keep each response's start
    offsets = offsets_from_lengths(lengths)
    tokens = gather_spans(values, src, lengths)
    kind = np.full(S, PROMPT, np.int64)
    kind[~is_prompt] = np.asarray(kinds, np.int64)[np.arange(r_len.shape[0])[resp_keep]]
    parent = np.where(is_prompt, -1, 0)
    stats.shared_tokens = int((keep_p * (r_per_ex - 1))[keep].sum())
    return Forest(tokens, offsets, parent, seg_example, kind, ~is_prompt).validate()
