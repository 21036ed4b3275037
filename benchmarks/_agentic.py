"""The ``agentic`` case of benchmarks/preference.py: multi-turn agent rollouts as trees.

A group is 8 rollouts x 4 turns forking at every turn: a shared first turn, then two continuations
at each later turn (1 + 2 + 4 + 8 turns). A turn is an environment / user message (unscored, ~100
tokens) and the assistant's reply (scored, ~200 tokens). Segments are in depth-first order. Methods:

  tree / tree_triton / tree_varlen   the group as one tree ([B, N, N] mask; auto, forced kernels)
  paths_varlen   every root-to-leaf rollout packed separately (shared turns repeated), varlen documents
  dense_padded   every rollout its own right-padded row, 2-D padding mask, sdpa (what a trainer does)

Step = forward + backward of the summed log-probs of the scored tokens (GRPO's log-prob pass). The
check compares every rollout's total log-prob across methods.
"""
from __future__ import annotations

import numpy as np
import torch

from packmask.data.tree import Forest

LEAVES, TURNS = 8, 4


def rollout_group(rng, tok, ctx_len, reply_len):
    """One group: ``segments`` (token lists), ``parents``, ``scored`` in depth-first order and the
    rollouts' segment paths (root to leaf)."""
    segs, parents, scored, paths = [], [], [], []

    def turn(level, parent_reply, path):
        ctx = len(segs)
        segs.append(tok(max(2, int(rng.lognormal(np.log(ctx_len), 0.4)))))
        parents.append(parent_reply)
        scored.append(False)
        reply = len(segs)
        segs.append(tok(max(2, int(rng.lognormal(np.log(reply_len), 0.5)))))
        parents.append(ctx)
        scored.append(True)
        path = path + [ctx, reply]
        if level == TURNS - 1:
            paths.append(path)
            return
        for _ in range(2):  # fork at every turn: 1 + 2 + 4 + 8 turns, 8 rollouts
            turn(level + 1, reply, path)

    turn(0, -1, [])
    return segs, parents, scored, paths


def forests(groups):
    """(tree forest, paths forest): kind = 1 + the scored segment's index in its group (0 = context), so a
    branch (scored segment) is identified by (kind, example) in both; in the paths forest every rollout
    is its own example."""
    t_segs, t_par, t_ex, t_kind, t_sc = [], [], [], [], []
    p_segs, p_par, p_ex, p_kind, p_sc = [], [], [], [], []
    path_id = 0
    for g, (segs, parents, scored, paths) in enumerate(groups):
        kind = np.cumsum(scored) * np.asarray(scored)
        t_segs += segs
        t_par += parents
        t_ex += [g] * len(segs)
        t_kind += kind.tolist()
        t_sc += scored
        for path in paths:
            p_segs += [segs[s] for s in path]
            p_par += list(range(-1, len(path) - 1))
            p_ex += [path_id] * len(path)
            p_kind += [int(kind[s]) for s in path]
            p_sc += [scored[s] for s in path]
            path_id += 1
    return (Forest.from_segments(t_segs, t_par, t_ex, t_kind, t_sc),
            Forest.from_segments(p_segs, p_par, p_ex, p_kind, p_sc))


def padded_rollouts(groups, per_step, dev):
    """Every rollout its own right-padded row; ``per_step`` groups per step; batch keys like branch_sums'."""
    out = []
    for i in range(0, len(groups) - per_step + 1, per_step):
        rows, score_cols = [], []
        for segs, _, scored, paths in groups[i:i + per_step]:
            for path in paths:
                toks, cols = [], []
                for s in path:
                    if scored[s]:
                        cols += list(range(len(toks), len(toks) + len(segs[s])))
                    toks += segs[s]
                rows.append(toks)
                score_cols.append(cols)
        L = max(len(r) for r in rows)
        ids = torch.tensor([r + [0] * (L - len(r)) for r in rows], device=dev)
        am = torch.tensor([[1] * len(r) + [0] * (L - len(r)) for r in rows], device=dev)
        lens = np.array([len(c) for c in score_cols])
        r_idx = np.repeat(np.arange(len(rows)), lens)
        cols = np.concatenate([np.asarray(c) for c in score_cols])
        batch = dict(logp_source=torch.tensor(r_idx * L + cols - 1, device=dev),
                     logp_labels=ids.flatten()[torch.tensor(r_idx * L + cols, device=dev)],
                     logp_branch=torch.tensor(r_idx, device=dev), branch_length=torch.tensor(lens, device=dev))
        out.append((dict(input_ids=ids, attention_mask=am), batch, per_step))
    return out


def rollout_totals(sums, batch, groups, kind_of_tree: bool):
    """Every rollout's total log-prob (in group, rollout order) from per-branch sums."""
    kind = batch["branch_kind"].cpu().numpy()
    ex = batch["branch_example"].cpu().numpy()
    s = sums.cpu().double().numpy()
    totals = []
    path_id = 0
    for g, (segs, _, scored, paths) in enumerate(groups):
        kinds = np.cumsum(scored) * np.asarray(scored)
        for path in paths:
            want = {int(kinds[x]) for x in path if scored[x]}
            sel = (ex == (g if kind_of_tree else path_id)) & np.isin(kind, list(want))
            totals.append(s[sel].sum())
            path_id += 1
    return torch.tensor(totals)
