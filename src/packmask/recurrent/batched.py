"""Packed sequences run through a mixer in few right-padded calls, grouped by a cost model (the default).

One call per sequence is exact by construction but launches each mixer once per document. The
mixers of causal LMs are causal: a token's output depends on itself and earlier tokens only, so
zeros appended *after* a sequence cannot change its outputs. Sequences are therefore sorted by
length (longest first), cut into contiguous groups, and each group is gathered into a ``[G, L, ...]``
batch padded on the right with zeros (``position_ids`` continue), run in one call, and cut back.

Where to cut is a trade: fewer calls means more padded tokens. A call of ``G`` sequences padded to
``L`` is priced ``(call_overhead_rows + G) * L``: its padded tokens, plus a fixed ``call_overhead_rows``
extra rows of length ``L`` for being a call at all (launches, and the kernels' sequential loops over
the token axis, which do not grow with ``G``). :func:`cheapest_groups` finds the partition of least
total price exactly (a dynamic program over the sorted lengths). The price of a call differs by device
(:data:`CALL_OVERHEAD_ROWS`; ``packmask.recurrent.configure(call_overhead_rows=...)`` overrides it)::

    row 0   a0 a1 a2 a3 | b0 b1 b2 | c0          lengths 4, 3, 1

    CPU (0.5 rows a call: padded compute matters)
    call 1  [a0 a1 a2 a3]                         (0.5 + 2) * 4 = 10
            [b0 b1 b2 0 ]
    call 2  [c0]                                  (0.5 + 1) * 1 = 1.5     total 11.5 (one call: 14)

    CUDA (8 rows a call: launch-bound)
    call 1  [a0 a1 a2 a3]                         (8 + 3) * 4 = 44        (two calls: 40 + 9 = 49)
            [b0 b1 b2 0 ]
            [c0 0  0  0 ]

The padded length avoids every size in the mixer's parameter shapes (heads, state, channels) so the
token axis of each output is the unique axis of that length, whatever the layer returns
(``[G, L, hidden]``, ``[G, heads, L, d]``, ...); an output with two such axes is re-run one token
longer. ``packmask.recurrent.configure(batched=False)`` switches to one call per sequence.

>>> length_groups([(0, 0, 4), (0, 4, 7), (0, 7, 8)], call_overhead_rows=0.5)
[([0, 1], 4), ([2], 1)]
>>> length_groups([(0, 0, 4), (0, 4, 7), (0, 7, 8)], call_overhead_rows=8)
[([0, 1, 2], 4)]
"""
from __future__ import annotations

from collections import deque

import torch

__all__ = ["CALL_OVERHEAD_ROWS", "call_overhead_rows_for", "cheapest_groups", "groups_cost", "length_groups",
           "group_index", "gather_tokens", "padded_length"]

#: the price of one mixer call, in extra padded rows of the call's length, by device type and by how the
#: mixer's PyTorch code runs (:func:`packmask.recurrent.detect.mixer_kind`). ``looped`` mixers step through
#: the tokens in Python (transformers' chunked gated delta rule: a few small launches per 64-token chunk,
#: whatever the batch), so on CUDA a call is launch-bound: on an H200 (bf16, Qwen3.5-shaped, hidden 2048,
#: 2026-12-05) ~0.5 ms per chunk step and layer (fwd + bwd) against ~0.3 us per padded token of
#: projections, i.e. a call of length L costs about 25 padded rows of L; 8 leaves a margin for kernels
#: with less work per call (fla) and for memory. Measured with it: 2 calls per layer instead of 7, 3.9x the
#: contaminated run's tokens/s. ``vectorized`` mixers (Mamba2's state-space duality: every chunk at once;
#: short convolutions) pay for padded tokens in compute *and* memory: on the same H200 a Nemotron-H-shaped
#: model took 2.2 s and 103 GiB grouped into 2 calls, 1.46 s and 27 GiB as 18 calls (one per document),
#: so a call there is worth a small fraction of a row. On CPU padded compute dominates for both.
#: Devices not listed take the "cuda" values.
CALL_OVERHEAD_ROWS = {"cpu": {"looped": 0.5, "vectorized": 0.5}, "cuda": {"looped": 8.0, "vectorized": 0.1}}


def call_overhead_rows_for(device: torch.device | str, setting="auto", kind: str = "looped") -> float:
    """The price of a call on ``device`` for a mixer of ``kind``: ``setting`` if it is a number, else the
    default of :data:`CALL_OVERHEAD_ROWS`.

    >>> call_overhead_rows_for("cpu"), call_overhead_rows_for("cuda:0"), call_overhead_rows_for("cpu", 3)
    (0.5, 8.0, 3)
    >>> call_overhead_rows_for("cuda", kind="vectorized")
    0.1
    """
    if setting != "auto":
        return setting
    prices = CALL_OVERHEAD_ROWS.get(torch.device(device).type, CALL_OVERHEAD_ROWS["cuda"])
    return prices[kind]


def groups_cost(lengths, cuts, call_overhead_rows: float) -> float:
    """The price of cutting ``lengths`` (longest first) at ``cuts`` (``[0, ..., len(lengths)]``).

    >>> groups_cost([4, 3, 1], [0, 2, 3], 0.5)
    11.5
    """
    return sum((call_overhead_rows + end - start) * lengths[start] for start, end in zip(cuts, cuts[1:]))


def cheapest_groups(lengths, call_overhead_rows: float) -> list[int]:
    """Where to cut ``lengths`` (sorted longest first) into contiguous groups of least total price
    ``sum over groups of (call_overhead_rows + members) * longest``; returns the cuts ``[0, ..., n]``.

    The dynamic program: ``best[j]``, the least price of the first ``j`` lengths, is
    ``min over i < j of best[i] + (call_overhead_rows + j - i) * lengths[i]`` (group ``i:j`` padded to
    its first, longest, member). Each ``i`` is a line in ``j`` (slope ``lengths[i]``, falling as ``i``
    grows) and the queries ``j`` rise, so a lower hull of those lines answers each query in amortised
    O(1): O(n) in all (a packed batch can hold thousands of short documents).

        lengths 4 3 1, call_overhead_rows 0.5: group i:j priced (0.5 + j - i) * lengths[i]
        j   candidates, by where the last group starts              best[j]   groups
        1   i=0: 1.5*4 = 6                                          6         [4]
        2   i=0: 2.5*4 = 10   i=1: 6 + 1.5*3 = 10.5                 10        [4 3]
        3   i=0: 3.5*4 = 14   i=1: 6 + 2.5*3 = 13.5                 11.5      [4 3] [1]
            i=2: 10 + 1.5*1 = 11.5

    >>> cheapest_groups([4, 3, 1], 0.5)
    [0, 2, 3]
    >>> cheapest_groups([4, 3, 1], 8)
    [0, 3]
    >>> cheapest_groups([], 8)
    [0]
    """
    n = len(lengths)
    best, start_of = [0.0] * (n + 1), [0] * (n + 1)
    hull = deque()  # candidate group starts i, slopes falling, each the cheapest on some range of j

    def line(i):  # the price of a group starting at i and ending at j is slope * j + intercept
        return lengths[i], best[i] + (call_overhead_rows - i) * lengths[i]

    def price(i, j):
        slope, intercept = line(i)
        return slope * j + intercept

    def useless(first, middle, last):  # middle is nowhere below both neighbours
        (m1, b1), (m2, b2), (m3, b3) = line(first), line(middle), line(last)
        return (b3 - b1) * (m1 - m2) <= (b2 - b1) * (m1 - m3)

    for j in range(1, n + 1):
        new = j - 1
        if hull and lengths[hull[-1]] == lengths[new]:  # equal slopes: keep the lower line
            if line(new)[1] >= line(hull[-1])[1]:
                new = None
            else:
                hull.pop()
        if new is not None:
            while len(hull) >= 2 and useless(hull[-2], hull[-1], new):
                hull.pop()
            hull.append(new)
        while len(hull) >= 2 and price(hull[1], j) <= price(hull[0], j):
            hull.popleft()  # j only rises: a line overtaken stays overtaken
        start_of[j], best[j] = hull[0], price(hull[0], j)
    cuts = [n]
    while cuts[-1] > 0:
        cuts.append(start_of[cuts[-1]])
    return cuts[::-1]


def length_groups(spans, call_overhead_rows: float, max_call_tokens: int | None = None) -> list[tuple[list[int], int]]:
    """Groups of span indices ``(members, longest)``, longest first, partitioned by
    :func:`cheapest_groups` (``spans`` are ``(row, start, end)``). ``max_call_tokens``: a group whose
    padded slots (members x longest) exceed it is split into consecutive groups that fit (at least one
    member each), so no call holds more tokens than the packed batch itself: the mixer's activations then
    peak no higher than an unpacked run over the same rows.

    >>> length_groups([(0, 0, 4), (0, 4, 7), (0, 7, 8)], call_overhead_rows=8)
    [([0, 1, 2], 4)]
    >>> length_groups([(0, 0, 4), (0, 4, 7), (0, 7, 8)], call_overhead_rows=8, max_call_tokens=8)
    [([0, 1], 4), ([2], 1)]
    """
    order = sorted(range(len(spans)), key=lambda i: spans[i][1] - spans[i][2])  # longest first, stable
    lengths = [spans[i][2] - spans[i][1] for i in order]
    cuts = cheapest_groups(lengths, call_overhead_rows)
    groups = []
    for start, end in zip(cuts, cuts[1:]):
        longest = lengths[start]
        fit = end - start if max_call_tokens is None else max(1, max_call_tokens // max(longest, 1))
        for at in range(start, end, fit):
            groups.append((order[at:min(at + fit, end)], lengths[at]))
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
