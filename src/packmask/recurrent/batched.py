"""Packed sequences of similar length run through a mixer in one call, right-padded (the default).

One call per sequence is exact by construction but launches each mixer once per document. The
mixers of causal LMs are causal: a token's output depends on itself and earlier tokens only, so
zeros appended *after* a sequence cannot change its outputs. Sequences are therefore sorted by
length and grouped (each at least :data:`GROUP_RATIO` of its group's longest), gathered into a
``[G, L, ...]`` batch padded on the right with zeros (``position_ids`` continue), run in one call,
and cut back::

    row 0   a0 a1 a2 a3 | b0 b1 b2 | c0          lengths 4, 3, 1
    group 1 [a0 a1 a2 a3]                         (longest: 4)
            [b0 b1 b2 0 ]                         3 >= 0.75 * 4
    group 2 [c0]                                  1 <  0.75 * 4: a group of its own

The padded length avoids every size in the mixer's parameter shapes (heads, state, channels) so the
token axis of each output is the unique axis of that length, whatever the layer returns
(``[G, L, hidden]``, ``[G, heads, L, d]``, ...); an output with two such axes is re-run one token
longer. ``packmask.recurrent.configure(batched=False)`` switches to one call per sequence.

>>> length_groups([(0, 0, 4), (0, 4, 7), (0, 7, 8)])
[([0, 1], 4), ([2], 1)]
"""
from __future__ import annotations

import torch

__all__ = ["GROUP_RATIO", "length_groups", "group_index", "gather_tokens", "padded_length"]

#: a sequence joins a group when it is at least this fraction of the group's longest (padding <= 1/ratio)
GROUP_RATIO = 0.75


def length_groups(spans, ratio: float = GROUP_RATIO) -> list[tuple[list[int], int]]:
    """Groups of span indices ``(members, longest)``, longest first, each member at least ``ratio``
    of its group's longest."""
    order = sorted(range(len(spans)), key=lambda i: spans[i][1] - spans[i][2])  # longest first, stable
    groups = []
    for i in order:
        length = spans[i][2] - spans[i][1]
        if groups and length >= ratio * groups[-1][1]:
            groups[-1][0].append(i)
        else:
            groups.append(([i], length))
    return groups


def padded_length(longest: int, forbidden: frozenset) -> int:
    """The smallest length >= ``longest`` that is no size of the mixer's parameters."""
    length = longest
    while length in forbidden:
        length += 1
    return length


def group_index(layout, spans, members, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(index [G, L], valid [G, L])``: flattened ``B * N`` token index of every slot (padding slots
    repeat the sequence's last token) and whether it holds a real token. Cached on the layout."""
    key = ("group_index", tuple(members), length)
    if key not in layout._memo:
        device = layout.cu_seqlens.device
        starts = torch.tensor([spans[i][0] * layout.seq_len + spans[i][1] for i in members], device=device)
        lengths = torch.tensor([spans[i][2] - spans[i][1] for i in members], device=device)
        slot = torch.arange(length, device=device)
        valid = slot[None, :] < lengths[:, None]
        index = starts[:, None] + torch.minimum(slot[None, :], lengths[:, None] - 1)
        layout._memo[key] = (index, valid)
    return layout._memo[key]


def gather_tokens(value: torch.Tensor, index: torch.Tensor, valid: torch.Tensor, batch: int, seq_len: int,
                  continue_positions: bool = False, channels_first: bool = False) -> torch.Tensor:
    """``[B | 1, N, ...]`` (or ``[B | 1, C, N]`` with ``channels_first``) -> ``[G, L, ...]``
    (``[G, C, L]``), zero in the padding slots (``position_ids`` continue the sequence instead)."""
    if channels_first:
        value = value.movedim(-1, 1)
    if value.shape[0] != batch:
        value = value.expand(batch, *value.shape[1:])
    flat = value.reshape(batch * seq_len, *value.shape[2:])
    out = flat.index_select(0, index.reshape(-1)).reshape(*index.shape, *value.shape[2:])
    mask = valid.reshape(*valid.shape, *([1] * (out.dim() - 2)))
    if continue_positions:
        fill = out[:, :1] + torch.arange(index.shape[1], device=out.device, dtype=out.dtype).reshape(
            1, -1, *([1] * (out.dim() - 2)))
    else:
        fill = torch.zeros((), dtype=out.dtype, device=out.device)
    out = torch.where(mask, out, fill)
    return out.movedim(1, -1) if channels_first else out
