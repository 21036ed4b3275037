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
from dataclasses import dataclass, field

import numpy as np

from ..errors import PackmaskError
from .arrow import _gather_spans
from .tree import Forest, PackedForest, _offsets, _ranges, pack_forest

__all__ = ["TreePackingStats", "pack_preference", "pack_groups", "preference_forest", "group_forest",
           "tokenize_preference"]

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

    def _finish(self, packed: PackedForest) -> None:
        self.rows = packed.num_rows
        self.tokens = int(packed.tokens.shape[0])
        self.fill = self.tokens / (self.rows * self.max_length) if self.rows else 0.0


# ---------------------------------------------------------------------------------------------------
# column access (Arrow buffers or Python lists) -> (flat values, offsets)
# ---------------------------------------------------------------------------------------------------
def _flat(column) -> tuple[np.ndarray, np.ndarray]:
    import pyarrow as pa

    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        offsets = array.offsets.to_numpy().astype(np.int64)
        values = array.values.to_numpy(zero_copy_only=False)
        if not np.issubdtype(values.dtype, np.integer):
            raise PackmaskError(f"token columns must hold integer ids, got Arrow type {array.type}; tokenize first "
                                "(or pass tokenizer=...).")
        return values, offsets
    lists = [np.asarray(x, np.int64).reshape(-1) for x in column]
    offsets = _offsets(np.array([x.shape[0] for x in lists], np.int64))
    return (np.concatenate(lists) if lists else np.zeros(0, np.int64)), offsets


def _nested_flat(column) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """list<list<int>> -> (values, inner offsets, outer offsets)."""
    import pyarrow as pa

    if isinstance(column, (pa.ChunkedArray, pa.Array)):
        array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        outer = array.offsets.to_numpy().astype(np.int64)
        values, inner = _flat(array.values)
        return values, inner, outer
    groups = [list(g) for g in column]
    values, inner = _flat([c for g in groups for c in g])
    return values, inner, _offsets(np.array([len(g) for g in groups], np.int64))


def _get_column(data, name: str):
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover
        Dataset = ()
    if Dataset and isinstance(data, Dataset):
        if name not in data.column_names:
            raise PackmaskError(f"column {name!r} not found (columns: {data.column_names}).")
        column = data.data.table.column(name)
        if data._indices is not None:   # a shuffled / selected view: one Arrow gather of this column
            column = column.take(data._indices.column(0))
        return column
    if isinstance(data, dict):
        if name not in data:
            raise PackmaskError(f"column {name!r} not found (keys: {sorted(data)}).")
        return data[name]
    rows = list(data)
    if rows and name not in rows[0]:
        raise PackmaskError(f"column {name!r} not found in the examples (keys: {sorted(rows[0])}).")
    return [r[name] for r in rows]


# ---------------------------------------------------------------------------------------------------
# overflow policy, vectorised over examples
# ---------------------------------------------------------------------------------------------------
def _water_fill_cap(resp_len: np.ndarray, owner: np.ndarray, budget: np.ndarray, n_examples: int) -> np.ndarray:
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


def _prompt_branch_forest(values, p_start, p_len, r_start, r_len, r_per_ex, kinds, max_length, overflow,
                          truncation_mode, stats: TreePackingStats, what: str) -> Forest:
    """The forest of ``prompt + responses`` examples after the overflow policy. Every prompt and
    response is a span ``values[start : start + len]`` of one token buffer."""
    if overflow not in OVERFLOWS:
        raise PackmaskError(f"unknown overflow {overflow!r}; use one of {OVERFLOWS}.")
    if truncation_mode not in TRUNCATION_MODES:
        raise PackmaskError(f"unknown truncation_mode {truncation_mode!r}; use one of {TRUNCATION_MODES}.")
    if isinstance(max_length, bool) or not isinstance(max_length, (int, np.integer)) or max_length < 2:
        raise PackmaskError(f"max_length must be an integer >= 2 (tokens per packed row), got {max_length!r}.")
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
        raise PackmaskError(f"example {int(owner[i])}: {what} {i - int(np.cumsum(r_per_ex)[owner[i]] - r_per_ex[owner[i]])} "
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
            cap = _water_fill_cap(r_len, owner, budget, E)
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
    seg_first = np.cumsum(seg_per_ex) - seg_per_ex
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
    offsets = _offsets(lengths)
    tokens = _gather_spans(values, src, lengths, offsets[:-1], int(offsets[-1]))
    kind = np.full(S, PROMPT, np.int64)
    kind[~is_prompt] = np.asarray(kinds, np.int64)[np.arange(r_len.shape[0])[resp_keep]]
    parent = np.where(is_prompt, -1, 0)
    stats.shared_tokens = int((keep_p * (r_per_ex - 1))[keep].sum())
    return Forest(tokens, offsets, parent, seg_example, kind, ~is_prompt).validate()


def preference_forest(prompt, chosen, rejected, max_length: int, *, overflow: str = "truncate",
                      truncation_mode: str = "keep_start", drop_identical: bool = False,
                      stats: TreePackingStats | None = None) -> tuple[Forest, TreePackingStats]:
    """The forest of ``prompt | chosen | rejected`` examples (token-id columns: Arrow arrays or lists)."""
    stats = stats or TreePackingStats(max_length=int(max_length), overflow=overflow, truncation_mode=truncation_mode)
    p_vals, p_off = _flat(prompt)
    c_vals, c_off = _flat(chosen)
    r_vals, r_off = _flat(rejected)
    E = p_off.shape[0] - 1
    if c_off.shape[0] - 1 != E or r_off.shape[0] - 1 != E:
        raise PackmaskError(f"prompt, chosen and rejected have {E}, {c_off.shape[0] - 1}, {r_off.shape[0] - 1} rows; "
                            "they must be columns of the same examples.")
    c_len, r_len = np.diff(c_off), np.diff(r_off)
    same_len = np.flatnonzero((c_len == r_len) & (c_len > 0))
    identical = np.zeros(E, bool)
    if same_len.size:
        lens = c_len[same_len]
        equal = c_vals[_ranges(c_off[same_len], lens)] == r_vals[_ranges(r_off[same_len], lens)]
        identical[same_len] = np.logical_and.reduceat(equal, np.cumsum(lens) - lens)
    stats.identical = int(identical.sum())
    # one token buffer: prompts, then chosen, then rejected; responses interleaved as chosen_e, rejected_e
    values = np.concatenate([p_vals, c_vals, r_vals])
    p_start, p_len = p_off[:-1], np.diff(p_off)
    r_start = np.stack([c_off[:-1] + p_vals.shape[0], r_off[:-1] + p_vals.shape[0] + c_vals.shape[0]], 1).reshape(-1)
    r_lengths = np.stack([c_len, r_len], 1).reshape(-1)
    kinds = np.tile([CHOSEN, REJECTED], E)
    r_per_ex = np.full(E, 2, np.int64)
    if drop_identical and identical.any():
        keep_resp = np.repeat(~identical, 2)
        r_start, r_lengths, kinds = r_start[keep_resp], r_lengths[keep_resp], kinds[keep_resp]
        p_start, p_len, r_per_ex = p_start[~identical], p_len[~identical], r_per_ex[~identical]
    forest = _prompt_branch_forest(values, p_start, p_len, r_start, r_lengths, r_per_ex, kinds, max_length,
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
    p_vals, p_off = _flat(prompt)
    values, inner, outer = _nested_flat(completions)
    if outer.shape[0] != p_off.shape[0]:
        raise PackmaskError(f"{p_off.shape[0] - 1} prompts but {outer.shape[0] - 1} completion groups.")
    r_per_ex = np.diff(outer)
    forest = _prompt_branch_forest(np.concatenate([p_vals, values]), p_off[:-1], np.diff(p_off),
                                   inner[:-1] + p_vals.shape[0], np.diff(inner), r_per_ex,
                                   np.full(r_per_ex.sum(), COMPLETION), max_length, overflow, truncation_mode, stats,
                                   "completion")
    return forest, stats


def _to_dataset(packed: PackedForest, source, settings: tuple):
    """Arrow columns straight from the flat arrays (no per-row Python). Named after its inputs:
    letting ``Dataset()`` fingerprint it would hash every token (seconds)."""
    import hashlib

    from datasets.fingerprint import generate_random_fingerprint
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable

    tok_off = pa.array(packed.row_offsets.astype(np.int32))
    seg_off = pa.array(packed.seg_row_offsets.astype(np.int32))
    lst = lambda off, values, typ: pa.ListArray.from_arrays(off, pa.array(values, type=typ))  # noqa: E731
    table = pa.Table.from_arrays([
        lst(tok_off, packed.tokens, pa.int64()), lst(tok_off, packed.positions, pa.int32()),
        lst(seg_off, packed.seg_length, pa.int32()), lst(seg_off, packed.seg_parent, pa.int32()),
        lst(seg_off, packed.seg_kind, pa.int8()), lst(seg_off, packed.seg_example, pa.int64()),
        lst(seg_off, packed.seg_scored.astype(np.int8), pa.int8()),
    ], names=["input_ids", "position_ids", "seg_lengths", "seg_parents", "seg_kinds", "seg_examples", "seg_scored"])
    parent = getattr(source, "_fingerprint", None) or generate_random_fingerprint()
    fingerprint = hashlib.sha256(repr((parent, settings, "packmask.tree/1")).encode()).hexdigest()[:16]
    return Dataset(InMemoryTable(table), fingerprint=fingerprint)


def tokenize_preference(example: dict, tokenizer) -> dict:
    """``{prompt, chosen, rejected}`` as text or chat messages -> ``prompt_ids / chosen_ids / rejected_ids``
    the way TRL's DPOTrainer tokenizes, so packed and unpacked training see the same tokens: EOS appended
    to text answers; messages rendered by the chat template (:func:`packmask.data.chat.tokenize_messages`
    for the conversations, the prompt with its generation prompt), each answer starting where the
    tokenized prompt and prompt+answer diverge."""
    if isinstance(example["prompt"], str):
        def ids(text):
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = tokenizer.eos_token or ""
        chosen, rejected = (a if a.endswith(eos) else a + eos for a in (example["chosen"], example["rejected"]))
        prompt_ids, pc, pr = ids(example["prompt"]), ids(example["prompt"] + chosen), ids(example["prompt"] + rejected)
    else:
        from .chat import tokenize_messages

        pc, pr = (tokenize_messages(tokenizer, list(example["prompt"]) + list(example[k]), train_on="all")["input_ids"]
                  for k in ("chosen", "rejected"))   # validates the messages and the template
        prompt_ids = list(tokenizer.apply_chat_template(list(example["prompt"]), tokenize=True, return_dict=False,
                                                        add_generation_prompt=True))
    n = min(_common_prefix(prompt_ids, pc), _common_prefix(prompt_ids, pr))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def _common_prefix(a, b) -> int:
    m = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(diff[0]) if diff.size else m


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
    forest, stats = preference_forest(*(_get_column(dataset, n) for n in names), max_length, overflow=overflow,
                                      truncation_mode=truncation_mode, drop_identical=drop_identical)
    packed = pack_forest(forest, max_length, strategy=strategy)
    stats._finish(packed)
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
    forest, stats = group_forest(_get_column(dataset, columns[0]), _get_column(dataset, columns[1]), max_length,
                                 overflow=overflow, truncation_mode=truncation_mode)
    packed = pack_forest(forest, max_length, strategy=strategy)
    stats._finish(packed)
    stats.packed_examples = stats.examples - stats.dropped
    stats.seconds = time.perf_counter() - begin
    out = _to_dataset(packed, dataset, ("groups", int(max_length), overflow, truncation_mode, strategy, columns))
    return (out, stats) if return_stats else out
