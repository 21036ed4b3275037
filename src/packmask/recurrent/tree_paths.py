"""Shared-prefix trees through a recurrent mixer: each root-to-leaf path runs as one sequence.

In a tree row (``prompt | chosen | rejected``, or a deeper agentic tree) attention shares the prompt
through the tree mask. A recurrent / convolutional mixer cannot: its state at a branch's first token
must be the state at the *end of that branch's ancestors* (the prompt), not the state after the
previous branch. The generic exact way, with no model-specific math: the mixer runs once per
root-to-leaf path, on the concatenation of the path's tokens (gathered from the layer's input), and
every token takes its output from the first path (in token order) that contains it::

    tokens      p0 p1 p2 c0 c1 r0 r1 r2         segments p=(0, 3, -1)  c=(3, 2, p)  r=(5, 3, p)
    path 0      p0 p1 p2 c0 c1                  owns p0 p1 p2 c0 c1   (state: zero -> p -> c)
    path 1      p0 p1 p2 r0 r1 r2               owns r0 r1 r2         (state: zero -> p -> r)
    output      P0 P1 P2 C0 C1 R0 R1 R2          (path 0's outputs, then path 1's, back in token order)

``r0`` starts from the state after ``p2``, exactly as ``p + r`` run alone. Path 1's outputs of the
prompt are dropped, but its input copies of ``p`` still feed ``r`` through the state, so the prompt's
hidden states get gradient from every branch: the sum over paths of each path run alone.

The cost: a mixer layer runs ``sum over leaves of the path length`` tokens (the prompt once per
branch), as many as the unpacked rows; attention layers, MLPs, embeddings and the LM head still run
every token once. Paths are grouped into right-padded calls as documents are (:mod:`.batched`).

>>> from packmask.layout_tree import TreeLayout
>>> plan = tree_paths(TreeLayout.from_segments([[(0, 3, -1), (3, 2, 0), (5, 3, 0)]], 8))
>>> [t.tolist() for t in plan.paths]
[[0, 1, 2, 3, 4], [0, 1, 2, 5, 6, 7]]
>>> plan.spans
[(0, 0, 5), (0, 0, 6)]
>>> plan.source.tolist()   # token t's output: slot source[t] of path 0's outputs, then path 1's
[0, 1, 2, 3, 4, 8, 9, 10]
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..layout_tree import TreeLayout
from ..segments import cu_seqlens_from_lengths, span_indices

__all__ = ["TreePaths", "tree_paths"]


@dataclass(eq=False)
class TreePaths:
    """The root-to-leaf paths of a tree layout, as the per-sequence mixer path runs them.

    Attributes:
        paths: per path, the flat ``B * N`` index of each of its tokens, root first.
        spans: per path ``(row, 0, length)``: the shape :func:`.batched.length_groups` groups by
            (the row also picks each row's final state).
        tokens: every path's tokens, concatenated (``paths`` are views of it).
        offsets: ``[P + 1]`` where each path begins in ``tokens``.
        source: ``[B * N]``: for each token, the slot in ``tokens`` of its occurrence in the first
            path that holds it (the output it takes).
    """

    paths: list
    spans: list
    tokens: torch.Tensor
    offsets: torch.Tensor
    source: torch.Tensor
    group_indices: dict = field(default_factory=dict, repr=False)  # group_index's results, by (members, length)

    def group_index(self, members, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(index [G, L], valid [G, L])`` of paths ``members`` right-padded to ``length`` (padding
        slots repeat the path's last token; :func:`.batched.gather_tokens` zeroes them). Built once
        per forward (the plan is cached on the layout), not once per mixer layer."""
        key = (tuple(members), length)
        if key not in self.group_indices:
            device = self.tokens.device
            members_t = torch.tensor(members, device=device)
            lengths = self.offsets[members_t + 1] - self.offsets[members_t]
            slot = torch.arange(length, device=device)
            valid = slot[None, :] < lengths[:, None]
            index = self.tokens[self.offsets[members_t][:, None] + torch.minimum(slot[None, :], lengths[:, None] - 1)]
            self.group_indices[key] = (index, valid)
        return self.group_indices[key]

    def join(self, outputs: list) -> torch.Tensor:
        """Per-path outputs ``[1, path length, ...]`` -> ``[1, B * N, ...]``: each token's output
        from the first path that holds it, in token order (one gather; the other copies get no gradient)."""
        return torch.cat(outputs, dim=1).index_select(1, self.source.to(outputs[0].device))


def tree_paths(layout: TreeLayout) -> TreePaths:
    """The :class:`TreePaths` of a tree layout without a cache (computed once per layout)."""
    if "recurrent_paths" in layout._memo:
        return layout._memo["recurrent_paths"]
    seg = layout.segments()
    start, length, parent, ancestors = (seg[k] for k in ("start", "length", "parent", "ancestors"))
    S = start.numel()
    is_leaf = torch.ones(S, dtype=torch.bool, device=start.device)
    is_leaf[parent[parent >= 0]] = False
    leaves = torch.nonzero(is_leaf).reshape(-1)  # in token order: rows ascending
    chains = ancestors[leaves]  # [P, D + 1]: root first, -1 past the leaf's own depth
    path_of_segment = torch.arange(len(leaves), device=start.device)[:, None].expand_as(chains)[chains >= 0]
    segments_on_paths = chains[chains >= 0]
    tokens = span_indices(start[segments_on_paths], length[segments_on_paths])
    path_lengths = torch.zeros(len(leaves), dtype=torch.long, device=start.device).index_add_(
        0, path_of_segment, length[segments_on_paths].long())  # summed per segment, not per token
    # every token takes its output from the first path that holds it: its first slot in ``tokens``
    slot = torch.arange(tokens.numel(), device=start.device)
    source = torch.full((layout.batch_size * layout.seq_len,), tokens.numel(), dtype=torch.long, device=start.device)
    source = source.scatter_reduce(0, tokens, slot, reduce="amin")
    lengths = path_lengths.tolist()
    rows = (start[leaves] // max(layout.seq_len, 1)).tolist()
    plan = TreePaths(paths=list(torch.split(tokens, lengths)), spans=[(r, 0, n) for r, n in zip(rows, lengths)],
                     tokens=tokens, offsets=cu_seqlens_from_lengths(path_lengths).long(), source=source)
    layout._memo["recurrent_paths"] = plan
    return plan
