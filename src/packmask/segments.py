"""Sequence boundaries: the one place that converts between the forms a packed batch's documents take.

A batch holds ``B`` rows of ``N`` tokens; each row packs one or more *documents* (sequences), each
a contiguous run of tokens that attends only inside itself. The same boundaries come in five forms:

* ``seq_lengths`` -- per row, the lengths of its documents (a ragged list, as packed datasets store it);
* ``starts`` -- ``[B, N]`` bool, True at the first token of every document (the pivot form: every
  conversion goes through it);
* ``doc_ids`` -- ``[B, N]`` long, the document of every token, numbered over the whole batch
  (*global*, as :class:`~packmask.DocumentLayout` and the loss use) or inside each row (*local*,
  as :func:`~packmask.masks.document_ids_from_lengths` returns);
* ``position_ids`` -- ``[B, N]`` long, the index of every token inside its document;
* ``cu_seqlens`` -- int32 ``[D + 1]``, cumulative document lengths over the *flattened* ``B * N``
  tokens (the varlen-kernel and ``DataCollatorWithFlattening`` convention).

Worked example: ``seq_lengths=[[3, 2], [4]]`` in rows of ``N = 6`` tokens (``P`` = row padding)::

    tokens         a0 a1 a2 b0 b1 P | c0 c1 c2 c3 P  P
    starts          1  .  .  1  .  1 |  1  .  .  .  1  .
    doc_ids         0  0  0  1  1  2 |  3  3  3  3  4  4      (global)
    local doc ids   0  0  0  1  1  2 |  0  0  0  0  1  1
    position_ids    0  1  2  0  1  0 |  0  1  2  3  0  1
    cu_seqlens     [0, 3, 5, 6, 10, 12]                        (over the 12 flattened tokens)

>>> starts = starts_from_lengths([[3, 2], [4]], 6)
>>> starts.int().tolist()
[[1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0]]
>>> doc_ids_from_starts(starts).tolist()
[[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]
>>> position_ids_from_starts(starts).tolist()
[[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
>>> cu_seqlens_from_starts(starts).tolist()
[0, 3, 5, 6, 10, 12]
>>> lengths_from_starts(starts)          # the padding is a document of its own
[[3, 2, 1], [4, 2]]

**The restart rule.** A document starts at the first token of every row, and wherever the position
does not continue the previous one by exactly one: ``position_ids[i] != position_ids[i - 1] + 1``.
So a 0 after anything but -1 starts a document, and so does any other jump. Why this rule and not
"a document starts where the position is 0":

* it needs no knowledge of the first position: RoBERTa-style models number tokens from
  ``padding_idx + 1``, and a row that holds the rest of a split document starts mid-way;
* a jump to any other value is a restart too, so no such token silently attends across it;
* it is the rule transformers itself applies to packed ``position_ids``
  (``masking_utils.find_packed_sequence_indices``), so packmask and transformers' own masks agree.

The price: inside one document positions must rise by exactly one (a gap starts a new document).

**The padding rule.** Tokens after a row's last document (``sum(seq_lengths[b]) < N``) form *one
more document* with positions ``0, 1, ...``, one causal block in masks. Every query then sees at
least one key (no NaN softmax), ``cu_seqlens`` covers all ``B * N`` tokens as kernels require, and
every producer agrees: :class:`~packmask.PackedCollator`, :func:`~packmask.block_diagonal_mask`,
:meth:`~packmask.DocumentLayout.from_seq_lengths` and :func:`~packmask.testing.pack_rows`. Padding
outputs are never used (their labels are -100). Documents of length 0 hold no tokens and vanish.

**Flattened form.** ``starts.reshape(-1)`` describes the ``B * N`` tokens as one row: every
function here takes ``[N]`` as well as ``[B, N]``. Flatten the *starts*, not the positions: a row
that continues a split document (positions ``6, 7, ...``) would merge with the row before it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .errors import PackmaskError

__all__ = [
    "starts_from_lengths", "spans_from_lengths", "starts_from_position_ids", "starts_from_ids", "starts_from_cu_seqlens",
    "doc_ids_from_starts", "position_ids_from_starts", "doc_bounds_from_starts", "cu_seqlens_from_starts",
    "lengths_from_starts", "doc_ids_and_positions_from_cu_seqlens", "check_cu_seqlens", "max_length",
    "cu_seqlens_from_lengths", "lengths_from_cu_seqlens", "span_indices",
]


# ---- into starts ------------------------------------------------------------------------------

def _documents(seq_lengths, seq_len: int | None):
    """Validated ``(row, offset, length)`` of every listed document (``[D]`` tensors), the tokens
    each row's documents cover (``[B]``) and the row length ``N``. Loops over documents, not tokens."""
    rows = seq_lengths.tolist() if isinstance(seq_lengths, torch.Tensor) else seq_lengths
    rows = [[int(x) for x in row] for row in rows]
    B = len(rows)
    lengths = torch.tensor([x for row in rows for x in row], dtype=torch.long)
    row_of = torch.repeat_interleave(torch.arange(B), torch.tensor([len(row) for row in rows], dtype=torch.long))
    if bool((lengths < 0).any()):
        b = int(row_of[int(torch.nonzero(lengths < 0)[0])])
        raise PackmaskError(f"seq_lengths of row {b} has a negative length ({rows[b]}); lengths count tokens.")
    totals = torch.zeros(B, dtype=torch.long).index_add_(0, row_of, lengths)
    if seq_len is None:
        if B == 0:
            raise PackmaskError("seq_lengths is empty and no seq_len is given: the row length is unknown.")
        seq_len = int(totals.max())
    too_long = torch.nonzero(totals > seq_len)
    if len(too_long):
        b = int(too_long[0])
        raise PackmaskError(
            f"seq_lengths of row {b} sum to {int(totals[b])} but the row holds {seq_len} tokens: a document is "
            f"longer than the row. Re-pack with a larger max_length or overflow='split'.")
    row_base = torch.cumsum(totals, 0) - totals  # tokens in earlier rows
    offset = torch.cumsum(lengths, 0) - lengths - row_base[row_of]  # first token of each document in its row
    return row_of, offset, lengths, totals, int(seq_len)


def starts_from_lengths(seq_lengths: Sequence[Sequence[int]] | torch.Tensor, seq_len: int | None = None, *,
                        device=None) -> torch.Tensor:
    """``[B, N]`` starts of per-row document lengths, the trailing padding one document of its own.

    ``seq_len`` defaults to the longest row. A 2D tensor of lengths may be zero-padded (zeros vanish).

    ::

        seq_lengths [[2, 0, 1], []]   seq_len 4
        row 0       d0 d0 d1 P        starts 1 . 1 1     (the empty document vanishes)
        row 1       P  P  P  P        starts 1 . . .     (an empty row is one padding document)

    >>> starts_from_lengths([[2, 0, 1], []], 4).int().tolist()
    [[1, 0, 1, 1], [1, 0, 0, 0]]
    >>> starts_from_lengths([[4, 4]], 6)
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: seq_lengths of row 0 sum to 8 but the row holds 6 tokens: a document is longer than the row. Re-pack with a larger max_length or overflow='split'.
    """
    row_of, offset, lengths, totals, N = _documents(seq_lengths, seq_len)
    B = len(totals)
    real = lengths > 0
    starts = torch.zeros(B, N + 1, dtype=torch.bool)  # column N catches "padding starts at N" (none)
    starts[row_of[real], offset[real]] = True
    starts[torch.arange(B), totals] = True  # the padding document (or the empty row)
    starts = starts[:, :N]
    return starts.to(device) if device is not None else starts


def spans_from_lengths(seq_lengths: Sequence[Sequence[int]] | torch.Tensor,
                       seq_len: int | None = None) -> list[tuple[int, int, int]]:
    """``(row, start, length)`` of every non-empty document, row padding excluded (host ints).

    >>> spans_from_lengths([[3, 0, 2], [4]], 6)
    [(0, 0, 3), (0, 3, 2), (1, 0, 4)]
    """
    row_of, offset, lengths, _, _ = _documents(seq_lengths, seq_len)
    real = lengths > 0
    return [tuple(span) for span in torch.stack([row_of[real], offset[real], lengths[real]], 1).tolist()]


def starts_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Starts of packed ``position_ids`` ``[..., N]`` by the restart rule (see the module docstring).

    ::

        position_ids   0 1 2 0 1 | 2 3 4 2 3 | 0 1 5 6 | -1 0 1
        starts         1 . . 1 . | 1 . . 1 . | 1 . 1 . |  1 . .
                       (0 after 2)  (offset 2)  (a jump)  (0 after -1 continues)

    >>> starts_from_position_ids(torch.tensor([[0, 1, 2, 0, 1], [2, 3, 4, 2, 3]])).int().tolist()
    [[1, 0, 0, 1, 0], [1, 0, 0, 1, 0]]
    >>> starts_from_position_ids(torch.tensor([0, 1, 5, 6])).int().tolist()
    [1, 0, 1, 0]
    """
    starts = torch.ones(position_ids.shape, dtype=torch.bool, device=position_ids.device)
    starts[..., 1:] = position_ids[..., 1:] != position_ids[..., :-1] + 1
    return starts


def starts_from_ids(ids: torch.Tensor) -> torch.Tensor:
    """Starts of runs of equal ids ``[..., N]``: document ids (global or local), or a 2D padding mask
    (every run of padding or of real tokens begins a document).

    ::

        ids      0 0 1 1 1 0     (an id that comes back later is a new document: documents are contiguous)
        starts   1 . 1 . . 1

    >>> starts_from_ids(torch.tensor([0, 0, 1, 1, 1, 0])).int().tolist()
    [1, 0, 1, 0, 0, 1]
    """
    starts = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
    starts[..., 1:] = ids[..., 1:] != ids[..., :-1]
    return starts


def starts_from_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int) -> torch.Tensor:
    """``[B, N]`` starts of a valid ``cu_seqlens`` over ``B * N`` flattened tokens (:func:`check_cu_seqlens`).

    >>> starts_from_cu_seqlens(torch.tensor([0, 3, 5, 6, 10, 12]), 2, 6).int().tolist()
    [[1, 0, 0, 1, 0, 1], [1, 0, 0, 0, 1, 0]]
    """
    flat = torch.zeros(batch_size * seq_len + 1, dtype=torch.bool, device=cu_seqlens.device)
    flat[cu_seqlens.reshape(-1).long()] = True  # the last entry (B * N) lands in the extra slot
    return flat[:-1].reshape(batch_size, seq_len)


# ---- out of starts ----------------------------------------------------------------------------

def doc_ids_from_starts(starts: torch.Tensor, *, local: bool = False) -> torch.Tensor:
    """Document index of every token: numbered over the whole batch, or inside each row (``local``).

    >>> s = torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)
    >>> doc_ids_from_starts(s).tolist(), doc_ids_from_starts(s, local=True).tolist()
    ([[0, 0, 1], [2, 3, 3]], [[0, 0, 1], [0, 1, 1]])
    """
    if local:
        return starts.long().cumsum(-1) - 1
    return (starts.reshape(-1).long().cumsum(0) - 1).reshape(starts.shape)


def doc_bounds_from_starts(starts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(first, end)``: index of the first token of every token's document, and one past its last,
    inside the row.

    ::

        starts   1 . . 1 .
        first    0 0 0 3 3
        end      3 3 3 5 5

    >>> first, end = doc_bounds_from_starts(torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool))
    >>> first.tolist(), end.tolist()
    ([0, 0, 0, 3, 3], [3, 3, 3, 5, 5])
    """
    N = starts.shape[-1]
    idx = torch.arange(N, device=starts.device)
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values
    next_starts = torch.zeros_like(starts)
    next_starts[..., :-1] = starts[..., 1:]  # token i is the last of its document
    end = torch.where(next_starts, idx + 1, torch.full_like(idx, N)).flip(-1).cummin(-1).values.flip(-1)
    return first, end


def position_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """Position of every token inside its document (0 at each start).

    >>> position_ids_from_starts(torch.tensor([1, 0, 0, 1, 0], dtype=torch.bool)).tolist()
    [0, 1, 2, 0, 1]
    """
    idx = torch.arange(starts.shape[-1], device=starts.device)
    return idx - torch.where(starts, idx, torch.zeros_like(idx)).cummax(-1).values


def cu_seqlens_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens`` over the flattened tokens of ``starts`` (``[B, N]`` or ``[N]``).

    >>> cu_seqlens_from_starts(torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool)).tolist()
    [0, 2, 3, 4, 6]
    """
    flat = starts.reshape(-1)
    begins = torch.nonzero(flat).reshape(-1)
    total = torch.tensor([flat.numel()], dtype=begins.dtype, device=flat.device)
    return torch.cat([begins, total]).to(torch.int32)


def cu_seqlens_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """int32 ``cu_seqlens`` of consecutive pieces of these lengths: ``[0, l0, l0 + l1, ...]``.

    >>> cu_seqlens_from_lengths(torch.tensor([3, 0, 2])).tolist()
    [0, 3, 3, 5]
    """
    return torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]).to(torch.int32)


def lengths_from_cu_seqlens(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """``[D]`` long lengths of the pieces of a ``cu_seqlens`` (no host sync).

    >>> lengths_from_cu_seqlens(torch.tensor([0, 3, 3, 5], dtype=torch.int32)).tolist()
    [3, 0, 2]
    """
    cu = cu_seqlens.reshape(-1).long()
    return cu[1:] - cu[:-1]


def span_indices(starts: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """The indices of the spans ``[starts[i], starts[i] + lengths[i])``, concatenated (vectorised).

    >>> span_indices(torch.tensor([5, 0, 9]), torch.tensor([2, 3, 0])).tolist()
    [5, 6, 0, 1, 2]
    """
    first = torch.cumsum(lengths, 0) - lengths  # where each span begins in the output
    total = int(lengths.sum())
    return (torch.repeat_interleave(starts, lengths, output_size=total)
            + torch.arange(total, device=starts.device) - torch.repeat_interleave(first, lengths, output_size=total))


def lengths_from_starts(starts: torch.Tensor) -> list[list[int]]:
    """Per-row document lengths (host lists), the padding document included: starts cannot tell it apart.

    >>> lengths_from_starts(torch.tensor([[1, 0, 1], [1, 1, 0]], dtype=torch.bool))
    [[2, 1], [1, 2]]
    """
    starts = starts.reshape(-1, starts.shape[-1])
    B, N = starts.shape
    cu = cu_seqlens_from_starts(starts).long()
    per_row = torch.bincount(cu[:-1] // max(N, 1), minlength=B).tolist()
    return [row.tolist() for row in torch.split(cu[1:] - cu[:-1], per_row)]


# ---- cu_seqlens -------------------------------------------------------------------------------

def doc_ids_and_positions_from_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int,
                                          seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``[B, N]`` global document index (the index into ``cu_seqlens``, so empty documents keep
    their number) and position of every token, from ``cu_seqlens`` (no host sync).

    >>> doc, pos = doc_ids_and_positions_from_cu_seqlens(torch.tensor([0, 3, 3, 5]), 1, 5)
    >>> doc.tolist(), pos.tolist()          # document 1 is empty
    ([[0, 0, 0, 2, 2]], [[0, 1, 2, 0, 1]])
    """
    cu = cu_seqlens.reshape(-1).long()
    idx = torch.arange(batch_size * seq_len, device=cu.device)
    # searching the whole cu (cu[0] = 0 <= every index, hence the -1) rather than the slice cu[1:]:
    # inductor cannot lower searchsorted over a slice of a dynamic-length tensor (torch 2.11, CUDA)
    doc = torch.searchsorted(cu, idx, right=True) - 1
    return doc.reshape(batch_size, seq_len), (idx - cu[doc]).reshape(batch_size, seq_len)


def check_cu_seqlens(cu_seqlens: torch.Tensor, batch_size: int, seq_len: int, *, max_seqlen=None,
                     name: str = "cu_seq_lens_q") -> int:
    """Validate ``cu_seqlens`` over ``B * N`` flattened tokens; return the longest document (host int).

    Valid: starts at 0, ends at ``B * N``, non-decreasing, and every row boundary ``r * N`` is a
    document boundary (a document fits in one row). One small host copy (this syncs the device).

    >>> check_cu_seqlens(torch.tensor([0, 3, 5, 6, 10, 12]), 2, 6)
    4
    >>> check_cu_seqlens(torch.tensor([0, 4, 12]), 2, 6)    # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: cu_seq_lens_q has a sequence that crosses from row 0 into row 1 ...
    """
    cu = cu_seqlens.reshape(-1).tolist()
    total = batch_size * seq_len
    if len(cu) < 2 or cu[0] != 0 or cu[-1] != total:
        raise PackmaskError(
            f"{name} must start at 0 and end at batch*tokens = {batch_size}*{seq_len} = {total}; "
            f"got {cu[:3]}...{cu[-2:]}. Build it over the flattened batch (row padding "
            f"counted as a sequence of its own), e.g. with packmask.PackedCollator.")
    lengths = [b - a for a, b in zip(cu, cu[1:])]
    if min(lengths) < 0:
        raise PackmaskError(f"{name} must be non-decreasing; got {cu}.")
    bounds = set(cu)
    missing = [r for r in range(1, batch_size) if r * seq_len not in bounds]
    if missing:
        raise PackmaskError(
            f"{name} has a sequence that crosses from row {missing[0] - 1} into row {missing[0]} "
            f"(no boundary at token {missing[0] * seq_len}); a sequence must fit in one row of "
            f"{seq_len} tokens. Split or truncate it when packing (packmask.pack_dataset(overflow=...)).")
    longest = max(lengths)
    if max_seqlen is not None and int(max_seqlen) < longest:
        raise PackmaskError(f"max_length_q={int(max_seqlen)} is smaller than the longest sequence ({longest}) in {name}.")
    return longest


def max_length(cu_seqlens: torch.Tensor) -> int:
    """Length of the longest document (host int: kernels need it; syncs the device).

    >>> max_length(torch.tensor([0, 3, 5, 6, 10, 12]))
    4
    """
    cu = cu_seqlens.reshape(-1)
    return int((cu[1:] - cu[:-1]).max())
