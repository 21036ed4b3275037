"""The global divisor of a packed loss: one count over every rank and accumulated micro-batch.

2 ranks x 2 accumulation micro-steps equal one big batch only if every micro-step divides its
*sum* of losses by the count of the whole optimizer step:

* per-token loss: the number of predicted label tokens;
* per-sequence loss: the number of sequences with at least one predicted token.

Worked example -- 2 ranks, 1 micro-step each, per-token loss::

    rank 0   2 predicted tokens, loss sum 4.0      local mean 2.0
    rank 1   6 predicted tokens, loss sum 6.0      local mean 1.0
    one big batch:          (4.0 + 6.0) / 8                         = 1.25
    local means, averaged:  (2.0 + 1.0) / 2                         = 1.5    (wrong)
    global count:           rank 0: 4.0 / 8 = 0.5, rank 1: 6.0 / 8 = 0.75   -> sum 1.25
    DDP averages gradients over ranks, so each rank backpropagates 2 * its share.

:func:`count_loss_items` counts exactly what :func:`packmask.packed_causal_lm_loss` scores (label
not ``ignore_index`` and target in the same sequence as the input), over a list of micro-batches,
and sums it over the ranks with one all-reduce.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

from ..data.loss import all_reduce_count, sequence_ids
from ..errors import PackmaskError

__all__ = ["count_loss_items"]


def _local_count(batch: Mapping, reduction: str, ignore_index: int) -> torch.Tensor:
    labels = batch.get("labels")
    if labels is None:
        raise PackmaskError(f"count_loss_items: a batch has no 'labels' (keys: {sorted(batch)}).")
    B, N = labels.shape
    cu = batch.get("cu_seq_lens_q") if batch.get("cu_seq_lens_q") is not None else batch.get("cu_seq_lens")
    seq = sequence_ids(position_ids=batch.get("position_ids"), cu_seq_lens=cu, shape=(B, N),
                       device=labels.device).to(labels.device)
    valid = (labels[:, 1:] != ignore_index) & (seq[:, 1:] == seq[:, :-1])  # as packed_causal_lm_loss scores
    if reduction == "token":
        return valid.sum()
    scored = torch.zeros(B * N, dtype=torch.long, device=labels.device).index_add(
        0, seq[:, :-1].reshape(-1), valid.reshape(-1).to(torch.long))
    return (scored > 0).sum()


def count_loss_items(batches: Mapping | Iterable[Mapping], *, reduction: str = "token", group=None,
                     ignore_index: int = -100) -> torch.Tensor:
    """Predicted tokens (``"token"``) or scored sequences (``"sequence"``) over ``batches``.

    Args:
        batches: one collated batch or the micro-batches of one optimizer step (dicts with
            ``labels`` and ``position_ids`` or ``cu_seq_lens_q``, as ``PackedCollator`` writes them).
        reduction: ``"token"`` or ``"sequence"``, as in ``packed_causal_lm_loss``.
        group: a process group, ``True`` (default group) or ``None`` (this process only): the
            count is summed over its ranks with one all-reduce.

    Returns:
        An int64 scalar tensor, to pass as ``num_items_in_batch``.

    Example -- one row with sequences of 3 and 2 tokens (``PackedCollator`` labels)::

        >>> batch = {"labels": torch.tensor([[-100, 5, 6, -100, 8]]),
        ...          "position_ids": torch.tensor([[0, 1, 2, 0, 1]])}
        >>> int(count_loss_items(batch)), int(count_loss_items(batch, reduction="sequence"))
        (3, 2)
    """
    if reduction not in ("token", "sequence"):
        raise PackmaskError(f"reduction must be 'token' or 'sequence', got {reduction!r}.")
    if isinstance(batches, Mapping):
        batches = [batches]
    counts = [_local_count(b, reduction, ignore_index) for b in batches]
    if not counts:
        raise PackmaskError("count_loss_items: no batches given.")
    return all_reduce_count(torch.stack(counts).sum(), group)
