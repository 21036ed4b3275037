"""Causal-LM loss on packed rows that equals the loss of the same sequences run one by one.

Two reductions:

* ``"token"`` (default, what transformers' ``ForCausalLMLoss`` does with ``num_items_in_batch``): the
  sum of every predicted token's cross-entropy divided by the number of predicted tokens (or by
  ``num_items_in_batch``, the count over all gradient-accumulation micro-batches, when given).
  Packing does not change it as long as no prediction crosses a sequence boundary.
* ``"sequence"``: the mean over sequences of each sequence's mean token loss, so a long and a short
  sequence weigh the same -- the average of per-sequence ``model(seq, labels=seq).loss``. Packing
  *does* change a plain mean here (it would weight by tokens), so sequence ids are needed:
  derived from ``position_ids`` (a new sequence starts wherever the position does not continue the
  previous one by +1, the restart rule of :mod:`packmask.segments`) or ``cu_seq_lens`` (over the
  flattened ``B * N`` tokens).

Worked example -- one row holding ``a`` (3 tokens) and ``b`` (2 tokens)::

    tokens        a0 a1 a2 b0 b1
    position_ids  0  1  2  0  1
    labels        -100 a1 a2 -100 b1     (from PackedCollator)

    logits[t] is scored against labels[t + 1]:
      a0 -> a1, a1 -> a2            (sequence a, 2 predictions)
      a2 -> b0   never: masked      (labels[3] = -100, and it crosses a boundary anyway)
      b0 -> b1                      (sequence b, 1 prediction)

    token:     (l(a0->a1) + l(a1->a2) + l(b0->b1)) / 3
    sequence:  ((l(a0->a1) + l(a1->a2)) / 2 + l(b0->b1)) / 2

Predictions whose target lies in another sequence than their input are ignored even when the label
is not ``-100``, so labels straight from ``input_ids`` are safe too.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import segments
from ..errors import PackmaskError

__all__ = ["packed_causal_lm_loss", "sequence_ids", "all_reduce_count"]


def sequence_ids(*, position_ids: torch.Tensor | None = None, cu_seq_lens: torch.Tensor | None = None,
                 shape: tuple[int, int], device=None) -> torch.Tensor:
    """Global sequence index ``[B, N]`` of every token (sequences numbered over the whole batch).

    From ``cu_seq_lens`` (over the flattened ``B * N`` tokens; wins when both are given), else from
    ``position_ids`` by the restart rule of :mod:`packmask.segments` (a sequence starts at every row's
    first token and wherever the position does not continue the previous one by +1), else one
    sequence per row.

    ::

        position_ids  0 1 2 0 1 | 2 3 2 3 4      (the second row's model numbers from 2, like RoBERTa)
        sequence ids  0 0 0 1 1 | 2 2 3 3 3

    >>> sequence_ids(position_ids=torch.tensor([[0, 1, 2, 0, 1], [2, 3, 2, 3, 4]]), shape=(2, 5)).tolist()
    [[0, 0, 0, 1, 1], [2, 2, 3, 3, 3]]
    """
    B, N = shape
    if cu_seq_lens is not None:
        segments.check_cu_seqlens(cu_seq_lens, B, N, name="cu_seq_lens")
        return segments.doc_ids_and_positions_from_cu_seqlens(cu_seq_lens, B, N)[0]
    if position_ids is not None:
        pos = position_ids.expand(B, N) if position_ids.shape != (B, N) else position_ids
        return segments.doc_ids_from_starts(segments.starts_from_position_ids(pos))
    return torch.arange(B, device=device).unsqueeze(1).expand(B, N)  # one sequence per row


def packed_causal_lm_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    cu_seq_lens: torch.Tensor | None = None,
    reduction: str = "token",
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    reduce_across=None,
) -> torch.Tensor:
    """Shifted cross-entropy over packed rows.

    Args:
        logits: ``[B, N, V]`` (any float dtype; computed in fp32).
        labels: ``[B, N]``, unshifted (as for ``model(..., labels=...)``); ``ignore_index`` is skipped.
        position_ids / cu_seq_lens: sequence boundaries (one of them; ``cu_seq_lens`` wins). Without
            either, each row is one sequence.
        reduction: ``"token"`` or ``"sequence"`` (see the module docstring).
        num_items_in_batch: the count to divide by instead of the local one: for ``"token"`` the
            predicted tokens, for ``"sequence"`` the sequences with at least one predicted token,
            over every rank and accumulated micro-batch (the HF Trainer passes the token count;
            :func:`packmask.distributed.count_loss_items` gives either).
        reduce_across: a ``torch.distributed`` process group (or ``True`` for the default group):
            the local count is summed over its ranks with one all-reduce and used as the divisor.
            Either way the result is this rank's share, ``local sum / global count``: the shares of
            all ranks add up to the global mean. DDP and FSDP *average* gradients over ranks, so
            multiply by the world size before ``backward`` (the HF Trainer does that itself).

    Returns:
        A scalar tensor.
    """
    if reduction not in ("token", "sequence"):
        raise PackmaskError(f"reduction must be 'token' or 'sequence', got {reduction!r}.")
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise PackmaskError(f"logits must be [B, N, V] and labels [B, N]; got {tuple(logits.shape)} and "
                         f"{tuple(labels.shape)}.")
    if num_items_in_batch is not None and reduce_across is not None:
        raise PackmaskError("num_items_in_batch is already a global count; do not also pass reduce_across.")
    B, N, V = logits.shape
    seq = sequence_ids(position_ids=position_ids, cu_seq_lens=cu_seq_lens, shape=(B, N),
                       device=labels.device).to(labels.device)
    target = labels[:, 1:]
    valid = (target != ignore_index) & (seq[:, 1:] == seq[:, :-1])  # never score across a boundary
    per_token = F.cross_entropy(logits[:, :-1].float().reshape(-1, V),
                                torch.where(valid, target, 0).reshape(-1), reduction="none").reshape(B, N - 1)
    per_token = per_token * valid
    if reduction == "token":
        denominator = valid.sum() if num_items_in_batch is None else num_items_in_batch
        denominator = all_reduce_count(denominator, reduce_across)
        if isinstance(denominator, torch.Tensor):
            denominator = denominator.to(per_token.device)
        return per_token.sum() / denominator
    owner = seq[:, :-1].reshape(-1)
    count = int(seq.max()) + 1 if seq.numel() else 0
    sums = torch.zeros(count, dtype=per_token.dtype, device=per_token.device).index_add(0, owner, per_token.reshape(-1))
    tokens = torch.zeros(count, dtype=per_token.dtype, device=per_token.device).index_add(
        0, owner, valid.reshape(-1).to(per_token.dtype))
    scored = tokens > 0
    means = sums[scored] / tokens[scored]
    denominator = scored.sum() if num_items_in_batch is None else num_items_in_batch
    denominator = all_reduce_count(denominator, reduce_across)
    if isinstance(denominator, torch.Tensor):
        denominator = denominator.to(means.device)
    return means.sum() / denominator


def all_reduce_count(count, group):
    """``count`` summed over the ranks of ``group`` (``True``: the default group); unchanged for ``None``."""
    if group is None:
        return count
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise PackmaskError("reduce_across needs torch.distributed to be initialised (dist.init_process_group, "
                            "torchrun or accelerate launch); pass reduce_across=None in a single process.")
    total = count.detach().to(torch.float64 if count.is_floating_point() else torch.long).clone()
    if dist.get_backend(None if group is True else group) == "nccl" and total.device.type != "cuda":
        total = total.cuda()
    dist.all_reduce(total, group=None if group is True else group)
    return total
