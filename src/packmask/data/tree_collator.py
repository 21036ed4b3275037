"""Model inputs for packed tree rows: ``input_ids``, the dense ``[B, N, N]`` tree mask, ``position_ids``,
and the per-branch bookkeeping :func:`packmask.branch_logps` needs.

One row, prompt ``p0 p1 p2``, chosen ``c0 c1``, rejected ``r0 r1``, one pad token::

    col          0  1  2  3  4  5  6  7
    input_ids   p0 p1 p2 c0 c1 r0 r1  P
    position     0  1  2  3  4  3  4  0
    mask         p0 p1 p2 c0 c1 r0 r1 P
        p0        1  .  .  .  .  .  .  .
        p1        1  1  .  .  .  .  .  .
        p2        1  1  1  .  .  .  .  .
        c0        1  1  1  1  .  .  .  .
        c1        1  1  1  1  1  .  .  .
        r0        1  1  1  .  .  1  .  .
        r1        1  1  1  .  .  1  1  .
        P         .  .  .  .  .  .  .  1
    scored tokens (logp_target)   3  4  5  6        branch 0 = chosen, branch 1 = rejected
    predicted at  (logp_source)   2  3  2  5        r0 (col 5) is predicted at p2 (col 2), not at c1

>>> from packmask.data.tree import Forest, pack_forest
>>> f = Forest.from_segments([[1, 2, 3], [4, 5], [6, 7]], [-1, 0, 0], [0, 0, 0], [0, 1, 2], [0, 1, 1])
>>> batch = collate_forest(pack_forest(f, 8), seq_len=8)
>>> batch["position_ids"].tolist()
[[0, 1, 2, 3, 4, 3, 4, 0]]
>>> batch["logp_source"].tolist(), batch["logp_target"].tolist(), batch["logp_branch"].tolist()
([2, 3, 2, 5], [3, 4, 5, 6], [0, 0, 1, 1])
>>> batch["attention_mask"][0, 5].int().tolist()
[1, 1, 1, 0, 0, 1, 0, 0]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import PackmaskError
from .spans import (lengths_from_offsets, offsets_from_lengths, position_ids_from_starts, positions_from_lengths,
                    span_indices, starts_from_lengths)
from .tree import PackedForest, concat_forests

__all__ = ["token_parents", "tree_layout", "segment_starts", "collate_forest", "TreeCollator", "BRANCH_KEYS"]

#: batch keys that are bookkeeping for :func:`packmask.branch_logps`, not model arguments
BRANCH_KEYS = ("logp_source", "logp_target", "logp_labels", "logp_branch", "logp_source_kept", "logits_to_keep",
               "branch_example", "branch_kind", "branch_length", "branch_offset")


def token_parents(packed: PackedForest, seg_rows: np.ndarray, N: int) -> np.ndarray:
    """``[R, N]`` row-local index of each token's parent in the tree (``-1`` for a root's first token):
    the previous token inside a segment, the parent segment's last token at a segment's start.
    Padding after a row's last segment is a root chain of its own. This is the form
    :class:`packmask.layout_tree.TreeLayout` takes (built by :func:`tree_layout`).

    >>> from packmask.data.tree import PackedForest
    >>> z = np.zeros(3, np.int64)
    >>> forest = PackedForest(np.zeros(7, np.int64), z, np.array([0, 7]), np.array([0, 3]), np.array([0, 3, 5]),
    ...                       np.array([3, 2, 2]), np.array([-1, 0, 0]), z, z, z)
    >>> token_parents(forest, np.zeros(3, np.int64), 8).tolist()   # p0 p1 p2 | c0 c1 | r0 r1 | pad
    [[-1, 0, 1, 2, 3, 2, 5, -1]]
    """
    return tree_layout(packed, seg_rows, N).parent.numpy()


def tree_layout(packed: PackedForest, seg_rows: np.ndarray, N: int):
    """The :class:`~packmask.layout_tree.TreeLayout` of packed tree rows of ``N`` tokens
    (:meth:`~packmask.layout_tree.TreeLayout.from_segment_arrays`: its padding rule, one root chain
    after each row's last segment)."""
    from ..layout_tree import TreeLayout

    parent = np.where(packed.seg_parent >= 0, packed.seg_parent + packed.seg_row_offsets[seg_rows], -1)  # global
    return TreeLayout.from_segment_arrays(seg_rows, packed.seg_start, packed.seg_length, parent, packed.num_rows, N)


def segment_starts(packed: PackedForest, N: int) -> np.ndarray:
    """``[R, N]`` bool, True at the first token of every segment and of the row padding (the padding
    rule of :mod:`packmask.data.spans`: the tokens after a row's last segment are one more segment).

    >>> from packmask.data.tree import PackedForest
    >>> z = np.zeros(3, np.int64)
    >>> forest = PackedForest(np.zeros(7, np.int64), z, np.array([0, 7]), np.array([0, 3]), np.array([0, 3, 5]),
    ...                       np.array([3, 2, 2]), np.array([-1, 0, 0]), z, z, z)
    >>> segment_starts(forest, 8).astype(int).tolist()
    [[1, 0, 0, 1, 0, 1, 0, 1]]
    """
    per_row = np.split(packed.seg_length, packed.seg_row_offsets[1:-1]) if packed.num_rows else []
    return starts_from_lengths(per_row, N).reshape(packed.num_rows, N)


def _row_length(longest: int, seq_len: int | None, pad_to_multiple_of: int | None) -> int:
    if seq_len is not None:
        if longest > seq_len:
            raise PackmaskError(f"a packed row has {longest} tokens, more than seq_len={seq_len}.")
        return seq_len
    if pad_to_multiple_of:
        return -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    return max(longest, 1)


def collate_forest(packed: PackedForest, *, pad_token_id: int = 0, seq_len: int | None = None,
                   pad_to_multiple_of: int | None = None, return_mask: bool = True,
                   device=None) -> dict[str, Any]:
    """Tensors for a batch of packed tree rows (see the module docstring for every key).

    Branches are the scored segments, numbered by ``(kind, example)``: for preference rows branch
    ``e`` is example ``e``'s chosen answer and ``E + e`` its rejected one (TRL's ``[chosen, rejected]``
    batch order).
    """
    R = packed.num_rows
    row_len = packed.row_lengths()
    N = _row_length(int(row_len.max()) if R else 0, seq_len, pad_to_multiple_of)
    seg_rows = np.repeat(np.arange(R), lengths_from_offsets(packed.seg_row_offsets))
    tok_rows = np.repeat(np.arange(R), row_len)
    flat = tok_rows * N + positions_from_lengths(row_len)

    input_ids = np.full(R * N, pad_token_id, np.int64)
    input_ids[flat] = packed.tokens
    # the padding's positions by the padding rule (0, 1, ...); the trees' own positions on top
    positions = position_ids_from_starts(segment_starts(packed, N)).reshape(-1)
    positions[flat] = packed.positions

    out: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids.reshape(R, N)),
        "position_ids": torch.from_numpy(positions.reshape(R, N)),
    }
    if return_mask:
        out["attention_mask"] = tree_layout(packed, seg_rows, N).dense_mask()[:, 0]
    out.update(_branch_bookkeeping(packed, seg_rows, N, input_ids))
    if device is not None:
        out = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in out.items()}
    return out


def _branch_bookkeeping(packed: PackedForest, seg_rows: np.ndarray, N: int, input_ids: np.ndarray) -> dict:
    scored = np.flatnonzero(packed.seg_scored)
    order = scored[np.lexsort((packed.seg_example[scored], packed.seg_kind[scored]))]   # branch b = segment order[b]
    root = packed.seg_parent[order] < 0
    start, length, rows = packed.seg_start[order], packed.seg_length[order], seg_rows[order]
    # a root has no token before its first one: its first token is not scored (as running it alone)
    n = np.maximum(length - root, 0)
    first_target = start + root
    parent_global = packed.seg_row_offsets[rows] + np.maximum(packed.seg_parent[order], 0)
    parent_last = packed.seg_start[parent_global] + packed.seg_length[parent_global] - 1
    target_cols = span_indices(first_target, n)
    source_cols = target_cols - 1
    branch = np.repeat(np.arange(order.shape[0]), n)
    is_first = np.zeros(target_cols.shape[0], bool)
    firsts = offsets_from_lengths(n)[:-1][n > 0]
    is_first[firsts] = True
    source_cols[is_first] = np.repeat(np.where(root, first_target - 1, parent_last), n)[is_first]
    tok_rows = np.repeat(rows, n)
    keep = np.unique(source_cols)
    K = keep.shape[0]
    target = tok_rows * N + target_cols
    return {
        "logp_source": torch.from_numpy(tok_rows * N + source_cols),
        "logp_target": torch.from_numpy(target),
        "logp_labels": torch.from_numpy(input_ids[target]),
        "logp_branch": torch.from_numpy(branch),
        "logits_to_keep": torch.from_numpy(keep),
        "logp_source_kept": torch.from_numpy(tok_rows * K + np.searchsorted(keep, source_cols)),
        "branch_example": torch.from_numpy(packed.seg_example[order].copy()),
        "branch_kind": torch.from_numpy(packed.seg_kind[order].copy()),
        "branch_length": torch.from_numpy(n.astype(np.int64)),
        "branch_offset": torch.from_numpy(positions_from_lengths(n)),
    }


@dataclass
class TreeCollator:
    """Collate rows written by :func:`packmask.pack_preference` / :func:`packmask.pack_groups`
    (columns ``input_ids``, ``seg_lengths``, ``seg_parents``, ...) into model inputs.

    Use with a ``Trainer``: the ``seg_*`` columns are not model arguments, so set
    ``TrainingArguments(remove_unused_columns=False)``. The output's :data:`BRANCH_KEYS` are not model
    arguments either: pop them (or pass the batch to :func:`packmask.branch_logps`) before ``model(**batch)``.
    """

    pad_token_id: int = 0
    pad_to_multiple_of: int | None = None
    seq_len: int | None = None
    return_mask: bool = True

    def __call__(self, rows: list[dict]) -> dict:
        return collate_forest(concat_forests(rows), pad_token_id=self.pad_token_id, seq_len=self.seq_len,
                              pad_to_multiple_of=self.pad_to_multiple_of, return_mask=self.return_mask)
