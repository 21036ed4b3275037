"""BalancedBatchSampler: a partition of the rows, deterministic, resumable, and better balanced than
round-robin (single process; the multi-process use is in test_distributed_multiprocess.py)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask.data.packing import pack_lengths
from packmask.distributed import BalancedBatchSampler, balance_report, round_robin_steps, row_costs
from packmask.errors import PackmaskError


def packed_seq_lengths(n_docs=3000, max_length=1024, seed=0, median=120.0):
    rng = np.random.default_rng(seed)
    lengths = np.clip(np.exp(rng.normal(np.log(median), 1.0, n_docs)), 4, max_length).astype(np.int64)
    a = pack_lengths(lengths, max_length)
    return a.seq_lengths()


ROWS = packed_seq_lengths()


def test_row_costs_from_lists_arrow_and_dataset():
    import pyarrow as pa
    from datasets import Dataset

    rows = [[8], [4, 4], [2, 2, 2, 2], [7, 1]]
    expect = ([8, 8, 8, 8], [36, 20, 12, 29])
    got = row_costs(rows)
    assert (got[0].tolist(), got[1].tolist()) == expect
    got = row_costs(pa.array(rows))
    assert (got[0].tolist(), got[1].tolist()) == expect
    got = row_costs(Dataset.from_dict({"seq_lengths": rows, "input_ids": [[0] * 8] * 4}))
    assert (got[0].tolist(), got[1].tolist()) == expect


@settings(max_examples=30, deadline=None)
@given(n_rows=st.integers(1, 200), world=st.integers(1, 9), batch=st.integers(1, 4), window=st.integers(1, 6),
       drop_last=st.booleans(), seed=st.integers(0, 5))
def test_every_rank_gets_disjoint_rows_and_all_ranks_cover_the_epoch(n_rows, world, batch, window, drop_last, seed):
    rng = np.random.default_rng(seed)
    rows = [rng.integers(1, 50, size=rng.integers(1, 5)).tolist() for _ in range(n_rows)]
    per_rank = [list(BalancedBatchSampler(rows, batch, world_size=world, rank=r, seed=seed, window_steps=window,
                                          drop_last=drop_last)) for r in range(world)]
    lengths = {len(p) for p in per_rank}
    assert len(lengths) == 1  # every rank runs the same number of steps (no DDP hang)
    assert all(len(b) == batch for p in per_rank for b in p)
    seen = [i for p in per_rank for b in p for i in b]
    per_step = world * batch
    if drop_last:
        assert len(seen) == len(set(seen)) == n_rows // per_step * per_step  # no duplicates; drops < one step
    else:
        assert set(seen) == set(range(n_rows))  # nothing lost; the last step is completed with repeats
        assert len(seen) == -(-n_rows // per_step) * per_step
    interleaved = list(BalancedBatchSampler(rows, batch, world_size=world, rank=None, seed=seed, window_steps=window,
                                            drop_last=drop_last))
    assert [interleaved[i::world] for i in range(world)] == per_rank  # accelerate's split gives each rank its own


def test_deterministic_per_seed_and_epoch_and_reshuffled_by_set_epoch():
    a = BalancedBatchSampler(ROWS, 2, world_size=4, rank=1, seed=7)
    b = BalancedBatchSampler(ROWS, 2, world_size=4, rank=1, seed=7)
    assert list(a) == list(b)
    b.set_epoch(1)
    assert list(a) != list(b)
    assert list(BalancedBatchSampler(ROWS, 2, world_size=4, rank=1, seed=8)) != list(a)


def test_state_dict_resumes_mid_epoch_without_repeating_or_skipping():
    full = BalancedBatchSampler(ROWS, 2, world_size=4, rank=2, seed=3)
    full.set_epoch(5)
    expected = list(full)
    first = BalancedBatchSampler(ROWS, 2, world_size=4, rank=2, seed=3)
    first.set_epoch(5)
    it = iter(first)
    head = [next(it) for _ in range(7)]
    state = first.state_dict()
    resumed = BalancedBatchSampler(ROWS, 2, world_size=4, rank=2, seed=3)
    resumed.load_state_dict(state)
    assert head + list(resumed) == expected
    assert list(resumed) == expected  # the skip applies to one iteration only
    with pytest.raises(PackmaskError, match="world_size"):
        BalancedBatchSampler(ROWS, 2, world_size=8, rank=2, seed=3).load_state_dict(state)


@pytest.mark.parametrize("world,batch", [(8, 1), (8, 4), (64, 2)])
def test_balanced_beats_round_robin_on_attention(world, batch):
    tokens, attention = row_costs(ROWS)
    balanced = balance_report(BalancedBatchSampler(ROWS, batch, world_size=world).steps(), tokens, attention)
    naive = balance_report(round_robin_steps(len(ROWS), world, batch), tokens, attention)
    assert balanced["attention_epoch_slowest_over_mean"] < naive["attention_epoch_slowest_over_mean"]
    assert balanced["attention_max_over_mean_avg"] < 0.5 * (1 + naive["attention_max_over_mean_avg"])
    if batch >= 4:
        assert balanced["attention_max_over_mean_worst"] <= 1.05
    # control: the report sees imbalance where there is some
    assert naive["attention_max_over_mean_avg"] > 1.1


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "batch_size"), (dict(batch_size=1, world_size=2, rank=2), "rank 2"),
    (dict(batch_size=1, window_steps=0), "window_steps")])
def test_bad_arguments_name_the_fix(kwargs, match):
    with pytest.raises(PackmaskError, match=match):
        BalancedBatchSampler(ROWS, **kwargs)


def test_dataset_without_seq_lengths_is_refused():
    from datasets import Dataset
    with pytest.raises(PackmaskError, match="pack_dataset"):
        BalancedBatchSampler(Dataset.from_dict({"input_ids": [[1, 2]]}), 1)
