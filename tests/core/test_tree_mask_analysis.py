"""analyse_tree_mask against a brute-force reading of the tree rule, on trees and on near-trees.

The analysis runs on the device with one host read-back (all checks at once); here every accept /
reject decision, and the parents and cache starts it returns, are compared with a per-token Python
reading of the rule on small random masks: tree masks over a left-padded cache, and the same masks
with one bit flipped (most of which are no tree: the control that the checks can reject).
"""
from __future__ import annotations

import torch
from hypothesis import given, settings, strategies as st

from packmask.layout_tree import analyse_tree_mask
from packmask.masks import tree_mask


def _brute_force(m: torch.Tensor, past: int):
    """(parents, cache_start) of one row's [N, past + N] mask read token by token, or None if no tree."""
    N = m.shape[0]
    new = m[:, past:].tolist()
    cache = m[:, :past].tolist()
    if any(row != cache[0] for row in cache):
        return None
    ones = [c for c, x in enumerate(cache[0]) if x]
    start = past - len(ones)
    if ones != list(range(start, past)):
        return None
    parents = []
    for i in range(N):
        if not new[i][i] or any(new[i][j] for j in range(i + 1, N)):
            return None
        earlier = {j for j in range(i) if new[i][j]}
        p = max(earlier) if earlier else -1
        if p >= 0 and earlier != {p} | {j for j in range(p) if new[p][j]}:
            return None
        parents.append(p)
    return parents, start


@st.composite
def near_trees(draw):
    N = draw(st.integers(1, 7))
    past = draw(st.integers(0, 4))
    parents = [draw(st.integers(-1, i - 1)) for i in range(N)]
    visible = draw(st.integers(0, past))
    m = tree_mask(torch.tensor([parents]), torch.tensor([visible]) if past else 0)[0][0].clone()
    m = torch.cat([torch.zeros(N, past - m.shape[1] + N, dtype=torch.bool), m], 1) if m.shape[1] < past + N else m
    if draw(st.booleans()):  # flip one bit: usually no tree any more
        i, j = draw(st.integers(0, N - 1)), draw(st.integers(0, past + N - 1))
        m[i, j] = ~m[i, j]
    return m, past


@settings(max_examples=150, deadline=None)
@given(near_trees())
def test_analysis_equals_the_rule_read_token_by_token(case):
    m, past = case
    expected = _brute_force(m, past)
    got = analyse_tree_mask(m[None])
    if expected is None:
        assert got is None
    else:
        assert got is not None
        assert got.parent[0].tolist() == expected[0] and int(got.cache_start[0]) == expected[1]
        assert torch.equal(got.dense_mask()[0, 0], m)  # and the layout reproduces the mask exactly
