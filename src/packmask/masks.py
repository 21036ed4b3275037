"""Mask functions and builders.

Mask functions follow attention-gym / flex attention's ``mask_mod`` signature
``fn(batch, head, q_idx, kv_idx) -> bool tensor`` and compose with :func:`and_masks` /
:func:`or_masks`. Builders evaluate them into the dense ``[B, N, N]`` bool masks users pass to
``model.forward`` (True = query may attend key).

Worked example — a prefix-LM row: one document of 5 tokens whose first 2 tokens (the prompt) see
each other bidirectionally, then a second document of 3 plain causal tokens::

    >>> m = prefix_lm_mask([[5, 3]], [[2, 0]])[0].int()
    >>> print("\\n".join(" ".join(map(str, r)) for r in m.tolist()))
    1 1 0 0 0 0 0 0
    1 1 0 0 0 0 0 0
    1 1 1 0 0 0 0 0
    1 1 1 1 0 0 0 0
    1 1 1 1 1 0 0 0
    0 0 0 0 0 1 0 0
    0 0 0 0 0 1 1 0
    0 0 0 0 0 1 1 1
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
from transformers.masking_utils import and_masks, or_masks

from . import segments
from .errors import PackmaskError

__all__ = [
    "and_masks", "or_masks", "causal", "bidirectional", "same_document", "sliding_window",
    "prefix", "document_ids_from_lengths", "materialize", "block_diagonal_mask", "prefix_lm_mask",
    "shared_prefix_tree_mask", "tree_mask_from_segments", "tree_mask",
]

MaskFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def causal(b, h, q_idx, kv_idx):
    """A query sees itself and everything before it."""
    return q_idx >= kv_idx


def bidirectional(b, h, q_idx, kv_idx):
    return q_idx >= 0  # all True, shaped like the indices


def same_document(doc_ids: torch.Tensor) -> MaskFn:
    """``doc_ids[b, i]`` names the document of token ``i``; attention stays inside a document."""
    def fn(b, h, q_idx, kv_idx):
        return doc_ids[b, q_idx] == doc_ids[b, kv_idx]
    return fn


def sliding_window(window: int, position_ids: torch.Tensor | None = None) -> MaskFn:
    """A query sees the ``window`` most recent keys (itself included), counted in positions."""
    def fn(b, h, q_idx, kv_idx):
        if position_ids is None:
            return q_idx - kv_idx < window
        return position_ids[b, q_idx] - position_ids[b, kv_idx] < window
    return fn


def prefix(prefix_end: torch.Tensor) -> MaskFn:
    """Keys before ``prefix_end[b, q]`` (the end of the query's prompt) are visible to the query."""
    def fn(b, h, q_idx, kv_idx):
        return kv_idx < prefix_end[b, q_idx]
    return fn


def document_ids_from_lengths(seq_lengths: Sequence[Sequence[int]], seq_len: int | None = None,
                              device=None) -> torch.Tensor:
    """``[B, N]`` document index per token, counted inside each row; trailing padding becomes a
    document of its own and empty documents vanish (:mod:`packmask.segments`).

    >>> document_ids_from_lengths([[2, 1], [3]], 4).tolist()
    [[0, 0, 1, 2], [0, 0, 0, 1]]
    """
    starts = segments.starts_from_lengths(seq_lengths, seq_len, device=device)
    return segments.doc_ids_from_starts(starts, local=True)


def materialize(mask_fn: MaskFn, batch_size: int, seq_len: int, device=None) -> torch.Tensor:
    """Evaluate a mask function into a ``[B, N, N]`` bool tensor (broadcast, no vmap needed)."""
    b = torch.arange(batch_size, device=device)[:, None, None]
    q = torch.arange(seq_len, device=device)[None, :, None]
    k = torch.arange(seq_len, device=device)[None, None, :]
    return mask_fn(b, None, q, k).expand(batch_size, seq_len, seq_len).clone()


def block_diagonal_mask(seq_lengths: Sequence[Sequence[int]], seq_len: int | None = None, *,
                        causal_within: bool = True, device=None) -> torch.Tensor:
    """``[B, N, N]`` mask of packed documents; padding at the row's end is one block of its own
    (the padding rule of :mod:`packmask.segments`).

    >>> block_diagonal_mask([[2, 1]]).int().tolist()
    [[[1, 0, 0], [1, 1, 0], [0, 0, 1]]]
    """
    doc = document_ids_from_lengths(seq_lengths, seq_len, device=device)
    fn = same_document(doc)
    if causal_within:
        fn = and_masks(fn, causal)
    return materialize(fn, doc.shape[0], doc.shape[1], device=device)


def prefix_lm_mask(seq_lengths: Sequence[Sequence[int]], prefix_lengths: Sequence[Sequence[int]],
                   seq_len: int | None = None, device=None) -> torch.Tensor:
    """Packed prefix-LM: inside each document the first ``prefix_lengths`` tokens attend
    bidirectionally among themselves; the rest is causal."""
    starts = segments.starts_from_lengths(seq_lengths, seq_len, device=device)
    doc = segments.doc_ids_from_starts(starts, local=True)
    B, N = doc.shape
    # prefix length of every (row, local document); the padding document has none
    if len(prefix_lengths) != B:
        raise PackmaskError(f"prefix_lengths has {len(prefix_lengths)} rows but seq_lengths has {B}; give one row "
                            f"of prefix lengths per row of seq_lengths.")
    kept = []
    for b, (lens, pre) in enumerate(zip(seq_lengths, prefix_lengths)):
        lens, pre = [int(x) for x in lens], [int(x) for x in pre]
        if len(lens) != len(pre):
            raise PackmaskError(f"row {b}: {len(lens)} seq_lengths but {len(pre)} prefix_lengths; give one prefix "
                                f"length (0 for none) per document.")
        kept.append([p for length, p in zip(lens, pre) if length > 0])
    table = torch.zeros(B, max(map(len, kept), default=0) + 1, dtype=torch.long)
    for b, row in enumerate(kept):
        table[b, :len(row)] = torch.tensor(row, dtype=torch.long)
    first, _ = segments.doc_bounds_from_starts(starts)
    prefix_end = first + table.to(doc.device).gather(1, doc)
    fn = and_masks(same_document(doc), or_masks(causal, prefix(prefix_end)))
    return materialize(fn, B, N, device=device)


def shared_prefix_tree_mask(prefix_length: int, branch_lengths: Sequence[int], device=None) -> torch.Tensor:
    """``[N, N]`` mask of one shared prompt followed by several branches (completions) that each
    see the prompt and their own earlier tokens, never each other — e.g. several samples of one
    prompt in a single row. Derived positions give every branch the depth it has when run alone.

    >>> shared_prefix_tree_mask(2, [2, 1]).int().tolist()
    [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 0, 0, 1]]
    """
    branch = torch.repeat_interleave(torch.arange(1, len(branch_lengths) + 1), torch.tensor(list(branch_lengths)))
    branch = torch.cat([torch.zeros(prefix_length, dtype=torch.long), branch]).to(device)[None]
    def tree(b, h, q_idx, kv_idx):
        kb = branch[b, kv_idx]
        return (kb == 0) | (kb == branch[b, q_idx])
    return materialize(and_masks(causal, tree), 1, branch.shape[1], device=device)[0]


def tree_mask_from_segments(segments_per_row, seq_len: int, device=None):
    """``(mask [B, N, N] bool, position_ids [B, N])`` of packed tree rows, vectorised.

    Each row is a list of segments ``(start, length, parent)``: a token attends causally inside its
    segment and fully to every ancestor segment; positions continue from the parent's last token.
    Tokens no segment covers (padding at the row's end) form a root chain of their own.

    Worked example — prompt ``p`` (3 tokens), chosen ``c`` (2), rejected ``r`` (2)::

        tokens      p0 p1 p2 c0 c1 r0 r1
        positions    0  1  2  3  4  3  4

    >>> mask, pos = tree_mask_from_segments([[(0, 3, -1), (3, 2, 0), (5, 2, 0)]], seq_len=7)
    >>> pos.tolist()
    [[0, 1, 2, 3, 4, 3, 4]]
    >>> mask[0, 5].int().tolist()   # r0 sees the prompt and itself, not the chosen answer
    [1, 1, 1, 0, 0, 1, 0]
    """
    from .layout_tree import TreeLayout
    layout = TreeLayout.from_segments(segments_per_row, seq_len, device=device)
    return layout.dense_mask()[:, 0], layout.position_ids


def tree_mask(parents, past_length=0):
    """``(mask [.., N, past + N] bool, position_ids [.., N])`` of a draft tree over a KV cache.

    ``parents[i]`` is the index of token ``i``'s parent in the tree (earlier than ``i``), or -1
    for a child of the cache. ``parents`` may be ``[N]`` or ``[B, N]`` with ``past_length`` an int
    or one per row (shorter caches are left-padded: their leading columns stay invisible).
    Positions are ``past_length + depth``. No loop per token.

    >>> mask, pos = tree_mask([-1, 0, 0, 1], past_length=2)
    >>> pos.tolist()
    [2, 3, 3, 4]
    >>> mask.int().tolist()
    [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 1]]
    """
    from .layout_tree import TreeLayout
    p = torch.as_tensor(parents, dtype=torch.long)
    layout = TreeLayout.from_parents(p, past_length)
    mask, pos = layout.dense_mask()[:, 0], layout.position_ids
    return (mask[0], pos[0]) if p.dim() == 1 else (mask, pos)
