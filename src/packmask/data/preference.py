"""Shared-prefix packing presets: preference pairs (DPO and friends) and completion groups (GRPO / RLOO).

Each example is one prompt followed by its responses, every response a branch that sees the prompt and
itself, never a sibling; positions restart per branch at ``len(prompt)``. Several examples share a row
(best-fit decreasing on example size, the project's bin packer)::

    max_length = 16;  example 0: P=[p0 p1 p2] C=[c0 c1] R=[r0 r1 r2];  example 1: Q=[q0 q1] D=[d0] E=[e0 e1]

    row 0     p0 p1 p2 c0 c1 r0 r1 r2 | q0 q1 d0 e0 e1
    position   0  1  2  3  4  3  4  5 |  0  1  2  2  3
    segments  (0,3,-1) (3,2,0) (5,3,0) (8,2,-1) (10,1,3) (11,2,3)

The prompt is stored once: the duplicated-prompt layout would need ``2*3 + 2 + 3 + 2*2 + 1 + 2 = 18``
tokens, the tree 13 (``stats.shared_tokens`` counts the difference).

Overflow (an example longer than ``max_length``, or one that needs no truncation but cannot be scored)
is never silent; every case is counted in :class:`TreePackingStats`:

* ``overflow="truncate"`` (default), ``truncation_mode="keep_start"`` (TRL's default): the prompt is kept
  whole and the responses are cut at their ends, the longest first (each keeps
  ``min(len, cap)`` tokens with the largest ``cap`` that fits). An example whose prompt leaves less
  than one token per response is dropped and counted (``dropped``, ``dropped_prompt_too_long``) --
  TRL drops those as well.
* ``truncation_mode="keep_end"``: the responses are kept and the prompt is cut at its *start* to fit
  (keeping at least one prompt token; if the responses alone do not fit they are cut as above).
* ``overflow="drop"``: the example is dropped and counted. ``overflow="error"``: raise.
* An empty prompt or response raises (nothing to predict it from / nothing to score); filter first.
* ``chosen == rejected`` is kept (DPO's loss for it has zero gradient) and counted in ``identical``;
  ``drop_identical=True`` drops and counts them.
"""
from __future__ import annotations

import time

import numpy as np

from ..errors import PackmaskError
from .branch_forest import (CHOSEN, COMPLETION, OVERFLOWS, REJECTED, TRUNCATION_MODES, TreePackingStats,  # noqa: F401
                            prompt_branch_forest)
from .hf_datasets import derived_fingerprint, in_memory_dataset
from .preference_chat import tokenize_preference
from .spans import lengths_from_offsets, offsets_from_lengths, span_indices
from .token_columns import flat_column, get_column, nested_flat_column
from .tree import Forest, PackedForest, pack_forest

__all__ = ["TreePackingStats", "pack_preference", "pack_groups", "preference_forest", "group_forest",
           "tokenize_preference"]


def preference_forest(prompt, chosen, rejected, max_length: int, *, overflow: str = "truncate",
                      truncation_mode: str = "keep_start", drop_identical: bool = False,
                      stats: TreePackingStats | None = None) -> tuple[Forest, TreePackingStats]:
    """The forest of ``prompt | chosen | rejected`` examples (token-id columns: Arrow arrays or lists)."""
    stats = stats or TreePackingStats(max_length=int(max_length), overflow=overflow, truncation_mode=truncation_mode)
    p_vals, p_off = flat_column(prompt)
    c_vals, c_off = flat_column(chosen)
    r_vals, r_off = flat_column(rejected)
    E = p_off.shape[0] - 1
    if c_off.shape[0] - 1 != E or r_off.shape[0] - 1 != E:
        raise PackmaskError(f"prompt, chosen and rejected have {E}, {c_off.shape[0] - 1}, {r_off.shape[0] - 1} rows; "
                            "they must be columns of the same examples.")
    c_len, r_len = lengths_from_offsets(c_off), lengths_from_offsets(r_off)
    same_len = np.flatnonzero((c_len == r_len) & (c_len > 0))
    identical = np.zeros(E, bool)
    if same_len.size:
        lens = c_len[same_len]
        equal = c_vals[span_indices(c_off[same_len], lens)] == r_vals[span_indices(r_off[same_len], lens)]
        identical[same_len] = np.logical_and.reduceat(equal, offsets_from_lengths(lens)[:-1])
    stats.identical = int(identical.sum())
    # one token buffer: prompts, then chosen, then rejected; responses interleaved as chosen_e, rejected_e
    values = np.concatenate([p_vals, c_vals, r_vals])
    p_start, p_len = p_off[:-1], lengths_from_offsets(p_off)
    r_start = np.stack([c_off[:-1] + p_vals.shape[0], r_off[:-1] + p_vals.shape[0] + c_vals.shape[0]], 1).reshape(-1)
    r_lengths = np.stack([c_len, r_len], 1).reshape(-1)
    kinds = np.tile([CHOSEN, REJECTED], E)
    r_per_ex = np.full(E, 2, np.int64)
    if drop_identical and identical.any():
        keep_resp = np.repeat(~identical, 2)
        r_start, r_lengths, kinds = r_start[keep_resp], r_lengths[keep_resp], kinds[keep_resp]
        p_start, p_len, r_per_ex = p_start[~identical], p_len[~identical], r_per_ex[~identical]
    forest = prompt_branch_forest(values, p_start, p_len, r_start, r_lengths, r_per_ex, kinds, max_length,
                                   overflow, truncation_mode, stats, "response")
    if drop_identical:
        ids = np.flatnonzero(~identical)
        forest.example = ids[forest.example]
        stats.examples = E
        stats.dropped += int(identical.sum())
    return forest, stats


def group_forest(prompt, completions, max_length: int, *, overflow: str = "truncate",
                 truncation_mode: str = "keep_start", stats: TreePackingStats | None = None):
    """The forest of ``prompt | completion 0 | ... | completion G-1`` examples."""
    stats = stats or TreePackingStats(max_length=int(max_length), overflow=overflow, truncation_mode=truncation_mode)
    p_vals, p_off = flat_column(prompt)
    values, inner, outer = nested_flat_column(completions)
    if outer.shape[0] != p_off.shape[0]:
        raise PackmaskError(f"{p_off.shape[0] - 1} prompts but {outer.shape[0] - 1} completion groups.")
    r_per_ex = lengths_from_offsets(outer)
    forest = prompt_branch_forest(np.concatenate([p_vals, values]), p_off[:-1], lengths_from_offsets(p_off),
                                  inner[:-1] + p_vals.shape[0], lengths_from_offsets(inner), r_per_ex,
                                   np.full(r_per_ex.sum(), COMPLETION), max_length, overflow, truncation_mode, stats,
                                   "completion")
    return forest, stats


def _to_dataset(packed: PackedForest, source, settings: tuple):
    """Arrow columns straight from the flat arrays (no per-row Python)."""
    import pyarrow as pa

    tok_off = pa.array(packed.row_offsets.astype(np.int32))
    seg_off = pa.array(packed.seg_row_offsets.astype(np.int32))
    lst = lambda off, values, typ: pa.ListArray.from_arrays(off, pa.array(values, type=typ))  # noqa: E731
    table = pa.Table.from_arrays([
        lst(tok_off, packed.tokens, pa.int64()), lst(tok_off, packed.positions, pa.int32()),
        lst(seg_off, packed.seg_length, pa.int32()), lst(seg_off, packed.seg_parent, pa.int32()),
        lst(seg_off, packed.seg_kind, pa.int8()), lst(seg_off, packed.seg_example, pa.int64()),
        lst(seg_off, packed.seg_scored.astype(np.int8), pa.int8()),
    ], names=["input_ids", "position_ids", "seg_lengths", "seg_parents", "seg_kinds", "seg_examples", "seg_scored"])
    return in_memory_dataset(table, derived_fingerprint(source, settings, "packmask.tree/1"))


def pack_preference(dataset, max_length: int, *, tokenizer=None, overflow: str = "truncate",
                    truncation_mode: str = "keep_start", drop_identical: bool = False, strategy: str = "bfd",
                    columns: tuple[str, str, str] = ("prompt_ids", "chosen_ids", "rejected_ids"),
                    return_stats: bool = False):
    """Pack ``{prompt, chosen, rejected}`` examples into shared-prefix tree rows.

    Args:
        dataset: a ``datasets.Dataset``, a dict of columns or a list of dicts. Token-id columns
            ``columns`` (default TRL's ``prompt_ids/chosen_ids/rejected_ids``); or ``prompt/chosen/rejected``
            as text or chat messages together with ``tokenizer`` (tokenized like TRL's DPOTrainer).
        max_length: tokens per packed row (whole examples per row; see the module docstring for overflow).
        overflow, truncation_mode, drop_identical: the overflow policy (module docstring).
        strategy: the bin packer's strategy (``"bfd"`` best-fit decreasing).
    Returns:
        a ``datasets.Dataset`` of rows (``input_ids``, ``position_ids``, ``seg_lengths``, ``seg_parents``,
        ``seg_kinds`` 0 prompt / 1 chosen / 2 rejected, ``seg_examples``, ``seg_scored``), for
        :class:`packmask.data.tree_collator.TreeCollator`; with ``return_stats`` also the stats.

    >>> ds = {"prompt_ids": [[1, 2, 3], [7, 8]], "chosen_ids": [[4, 5], [9]], "rejected_ids": [[6], [10, 11]]}
    >>> rows, stats = pack_preference(ds, 16, return_stats=True)
    >>> rows[0]["input_ids"], rows[0]["position_ids"], rows[0]["seg_parents"]
    ([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [0, 1, 2, 3, 4, 3, 0, 1, 2, 2, 3], [-1, 0, 0, -1, 3, 3])
    >>> stats.rows, stats.shared_tokens
    (1, 5)
    """
    begin = time.perf_counter()
    names = columns
    if tokenizer is not None:
        from datasets import Dataset
        data = dataset if isinstance(dataset, Dataset) else Dataset.from_list(list(dataset)) \
            if not isinstance(dataset, dict) else Dataset.from_dict(dataset)
        dataset = data.map(tokenize_preference, fn_kwargs={"tokenizer": tokenizer}, remove_columns=data.column_names)
        names = ("prompt_ids", "chosen_ids", "rejected_ids")
    forest, stats = preference_forest(*(get_column(dataset, n) for n in names), max_length, overflow=overflow,
                                      truncation_mode=truncation_mode, drop_identical=drop_identical)
    packed = pack_forest(forest, max_length, strategy=strategy)
    stats.finish(packed)
    stats.packed_examples = stats.examples - stats.dropped
    stats.seconds = time.perf_counter() - begin
    out = _to_dataset(packed, dataset, ("preference", int(max_length), overflow, truncation_mode, drop_identical,
                                        strategy, columns))
    return (out, stats) if return_stats else out


def pack_groups(dataset, max_length: int, *, overflow: str = "truncate", truncation_mode: str = "keep_start",
                strategy: str = "bfd", columns: tuple[str, str] = ("prompt_ids", "completion_ids"),
                return_stats: bool = False):
    """Pack one prompt with G completions per example (GRPO / RLOO) into tree rows: the prompt once,
    each completion a branch of it. ``completion_ids`` holds a list of G token lists per example.

    >>> rows = pack_groups({"prompt_ids": [[1, 2]], "completion_ids": [[[3, 4], [5], [6, 7, 8]]]}, 16)
    >>> rows[0]["input_ids"], rows[0]["position_ids"]
    ([1, 2, 3, 4, 5, 6, 7, 8], [0, 1, 2, 3, 2, 2, 3, 4])
    """
    begin = time.perf_counter()
    forest, stats = group_forest(get_column(dataset, columns[0]), get_column(dataset, columns[1]), max_length,
                                 overflow=overflow, truncation_mode=truncation_mode)
    packed = pack_forest(forest, max_length, strategy=strategy)
    stats.finish(packed)
    stats.packed_examples = stats.examples - stats.dropped
    stats.seconds = time.perf_counter() - begin
    out = _to_dataset(packed, dataset, ("groups", int(max_length), overflow, truncation_mode, strategy, columns))
    return (out, stats) if return_stats else out
