"""Per-branch log-probabilities of packed tree rows.

In a tree row the token before a branch's first token is not its predecessor in the row: ``r0`` of
``p0 p1 p2 c0 c1 r0 r1`` is predicted at ``p2``, its parent's last token. The collator
(:func:`packmask.data.tree_collator.collate_forest`) records, for every scored token, the flat row
position that predicts it (``logp_source``); this module gathers only those logits, so it needs no
mask and runs no Python loop per token. Labels follow TRL: prompt tokens are never scored.

>>> import torch
>>> from packmask.data.tree import Forest, pack_forest
>>> from packmask.data.tree_collator import collate_forest
>>> f = Forest.from_segments([[1, 2, 3], [4, 5], [6, 7]], [-1, 0, 0], [0, 0, 0], [0, 1, 2], [0, 1, 1])
>>> batch = collate_forest(pack_forest(f, 8))
>>> logits = torch.zeros(1, 7, 10)          # uniform over 10 tokens: every log-prob is log(1/10)
>>> out = branch_logps(logits, batch)
>>> [round(x, 4) for x in out.sums.tolist()], out.counts.tolist()
([-4.6052, -4.6052], [2, 2])
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import PackmaskError

__all__ = ["BranchLogps", "branch_logps", "per_branch_padded"]


@dataclass
class BranchLogps:
    """``per_token[T]`` log-prob of every scored token (``batch["logp_branch"]`` says its branch),
    ``sums[nb]`` / ``counts[nb]`` per branch; with ``with_stats`` also per-token ``entropy``,
    ``mean_logits`` (mean over the vocabulary) and ``is_top1`` (the label is the arg-max)."""

    per_token: torch.Tensor
    sums: torch.Tensor
    counts: torch.Tensor
    entropy: torch.Tensor | None = None
    mean_logits: torch.Tensor | None = None
    is_top1: torch.Tensor | None = None


def _source_index(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    B, N = batch["input_ids"].shape
    K = batch["logits_to_keep"].shape[0]
    if logits.dim() != 3 or logits.shape[0] != B:
        raise PackmaskError(f"branch_logps: logits must be [B, N, V] with B={B}, got {tuple(logits.shape)}.")
    if logits.shape[1] == N:
        return batch["logp_source"].to(logits.device)
    if logits.shape[1] == K:
        return batch["logp_source_kept"].to(logits.device)
    raise PackmaskError(f"branch_logps: logits cover {logits.shape[1]} positions per row; expected the row length "
                        f"{N}, or {K} when the model ran with logits_to_keep=batch['logits_to_keep'].")


def _score_chunk(flat_logits, index, labels, temperature: float, with_stats: bool):
    """Log-prob (and entropy, mean logit, top-1 hit) of ``labels`` under the rows ``index`` of the logits."""
    rows = flat_logits.index_select(0, index).float()
    if temperature != 1.0:
        rows = rows / temperature
    log_norm = torch.logsumexp(rows, dim=-1)
    per_token = rows.gather(1, labels[:, None])[:, 0] - log_norm
    if not with_stats:
        return (per_token,)
    entropy = log_norm - (torch.softmax(rows, dim=-1) * rows).sum(-1)   # differentiable (GRPO's entropy bonus)
    with torch.no_grad():
        return per_token, entropy, rows.mean(-1), (rows.argmax(-1) == labels)


def branch_logps(logits: torch.Tensor, batch: dict, *, temperature: float = 1.0, with_stats: bool = False,
                 chunk_size: int = 4096) -> BranchLogps:
    """Per-token and per-branch summed log-probs of the scored tokens of packed tree rows.

    Args:
        logits: ``[B, N, V]`` model output for the batch, or ``[B, K, V]`` from a forward with
            ``logits_to_keep=batch["logits_to_keep"]`` (only the predicting positions; less memory).
        batch: the collator's output (keys ``logp_*``, ``branch_*``, ``input_ids``).
        temperature: logits are divided by it (GRPO's sampling temperature).
        with_stats: also return per-token entropy, mean logit and top-1 hit (TRL's metrics).
        chunk_size: scored tokens per chunk. Each chunk's fp32 ``[chunk, V]`` work is recomputed in the
            backward (activation checkpointing) instead of kept, so memory beyond the logits stays at
            one chunk's worth whatever the number of tokens.
    """
    index = _source_index(logits, batch)
    flat = logits.reshape(-1, logits.shape[-1])
    labels = batch["logp_labels"].to(logits.device)
    pieces = []
    for a in range(0, max(index.shape[0], 1), chunk_size):   # one step per chunk of tokens
        args = (flat, index[a:a + chunk_size], labels[a:a + chunk_size], temperature, with_stats)
        if flat.requires_grad and index.shape[0] > chunk_size:
            from torch.utils.checkpoint import checkpoint
            pieces.append(checkpoint(_score_chunk, *args, use_reentrant=False))
        else:
            pieces.append(_score_chunk(*args))
    per_token = torch.cat([p[0] for p in pieces])
    branch = batch["logp_branch"].to(per_token.device)
    nb = batch["branch_length"].shape[0]
    sums = per_token.new_zeros(nb).index_add(0, branch, per_token)
    out = BranchLogps(per_token, sums, batch["branch_length"].to(per_token.device))
    if with_stats:
        out.entropy, out.mean_logits, out.is_top1 = (torch.cat([p[i] for p in pieces]) for i in (1, 2, 3))
    return out


def per_branch_padded(values: torch.Tensor, batch: dict, width: int | None = None) -> torch.Tensor:
    """Scatter per-token ``values[T]`` into ``[num_branches, width]`` (right-padded with 0), branch
    ``b``'s ``i``-th scored token at ``[b, i]`` -- the padded layout unpacked trainers use."""
    nb = batch["branch_length"].shape[0]
    lengths = batch["branch_length"]
    width = int(lengths.max()) if width is None and nb else (width or 0)
    out = values.new_zeros(nb, width)
    branch = batch["logp_branch"].to(values.device)
    offset = batch["branch_offset"].to(values.device)
    return out.index_put((branch, offset), values)
