"""Global loss counts in one process: the shares of simulated ranks add up to the one-big-batch loss,
``num_items_in_batch`` means sequences for the per-sequence loss, and the default is unchanged."""
from __future__ import annotations

import pytest
import torch

from packmask.data.collator import PackedCollator
from packmask.data.loss import packed_causal_lm_loss
from packmask.distributed import count_loss_items
from packmask.errors import PackmaskError

ROWS = [{"input_ids": list(range(1, 10)), "seq_lengths": [4, 5]},
        {"input_ids": list(range(1, 8)), "seq_lengths": [2, 2, 3]},
        {"input_ids": list(range(1, 12)), "seq_lengths": [11]},
        {"input_ids": list(range(1, 6)), "seq_lengths": [1, 4]}]


def _batches():
    collate = PackedCollator()
    return [collate(ROWS[:2]), collate(ROWS[2:])]  # two "ranks" (or micro-batches) of unequal content


def _logits(batch, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*batch["input_ids"].shape, 16, generator=g)


@pytest.mark.parametrize("reduction", ["token", "sequence"])
def test_shares_with_global_count_add_up_to_the_big_batch_loss(reduction):
    batches = _batches()
    logits = [_logits(b, i) for i, b in enumerate(batches)]
    count = count_loss_items(batches, reduction=reduction)
    shares = [packed_causal_lm_loss(lg, b["labels"], position_ids=b["position_ids"], reduction=reduction,
                                    num_items_in_batch=count) for lg, b in zip(logits, batches)]
    # one big batch: all rows padded to one width, one call with the local count
    big = PackedCollator()(ROWS)
    width = big["input_ids"].shape[1]
    big_logits = torch.zeros(len(ROWS), width, 16)
    r = 0
    for lg in logits:
        big_logits[r:r + lg.shape[0], :lg.shape[1]] = lg
        r += lg.shape[0]
    whole = packed_causal_lm_loss(big_logits, big["labels"], position_ids=big["position_ids"], reduction=reduction)
    assert torch.allclose(sum(shares), whole, rtol=1e-6, atol=0)
    # control: the mean of local means is a different number
    local = [packed_causal_lm_loss(lg, b["labels"], position_ids=b["position_ids"], reduction=reduction)
             for lg, b in zip(logits, batches)]
    assert abs((sum(local) / 2 - whole).item()) > 1e-2


def test_counts_match_what_the_loss_scores():
    b = _batches()[0]
    # row 0: 4+5 tokens -> 3+4 predictions; row 1: 2,2,3 -> 1+1+2; 5 sequences
    assert int(count_loss_items(b)) == 11
    assert int(count_loss_items(b, reduction="sequence")) == 5
    single = _batches()[1]  # a length-1 sequence has nothing to predict and is not counted
    assert int(count_loss_items(single, reduction="sequence")) == 2


def test_num_items_in_batch_is_the_sequence_count_for_sequence_loss_and_default_unchanged():
    b = _batches()[0]
    lg = _logits(b, 0)
    kwargs = dict(position_ids=b["position_ids"], reduction="sequence")
    default = packed_causal_lm_loss(lg, b["labels"], **kwargs)
    assert torch.equal(packed_causal_lm_loss(lg, b["labels"], num_items_in_batch=5, **kwargs), default)
    assert torch.allclose(packed_causal_lm_loss(lg, b["labels"], num_items_in_batch=10, **kwargs), default / 2)
    with pytest.raises(TypeError, match="num_sequences_in_batch"):  # removed in 0.3.0
        packed_causal_lm_loss(lg, b["labels"], num_sequences_in_batch=5, **kwargs)


def test_reduce_across_needs_an_initialised_group_and_no_given_count():
    b = _batches()[0]
    lg = _logits(b, 0)
    with pytest.raises(PackmaskError, match="init_process_group"):
        packed_causal_lm_loss(lg, b["labels"], position_ids=b["position_ids"], reduce_across=True)
    with pytest.raises(PackmaskError, match="already a global count"):
        packed_causal_lm_loss(lg, b["labels"], position_ids=b["position_ids"], num_items_in_batch=3,
                              reduce_across=True)
