"""ShardedPackedStream: across ranks x dataloader workers every document is packed exactly once, and a
resumed stream continues without repeating or losing a row."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from torch.utils.data import DataLoader

from packmask.distributed import ShardedPackedStream
from packmask.errors import PackmaskError


def documents(n=120, seed=0):
    rng = np.random.default_rng(seed)
    # every token carries its document's id, so a packed row tells which documents it holds
    return [{"input_ids": [i] * int(rng.integers(1, 40))} for i in range(n)]


def docs_in(rows):
    out = []
    for row in rows:
        start = 0
        for n in row["seq_lengths"]:
            piece = row["input_ids"][start:start + n]
            assert len(set(piece)) == 1  # a sequence is one document, whole
            out.append(piece[0])
            start += n
    return out


@pytest.mark.parametrize("as_generator", [False, True])
def test_ranks_cover_every_document_exactly_once(as_generator):
    docs = documents()
    source = (lambda epoch: iter(docs)) if as_generator else docs
    seen = []
    for rank in range(3):
        seen += docs_in(ShardedPackedStream(source, 64, rank=rank, world_size=3, buffer_size=16))
    assert Counter(seen) == Counter(range(len(docs)))
    # control: the check sees duplicates -- an unsharded stream on each of 3 ranks repeats every document
    unsharded = 3 * docs_in(ShardedPackedStream(docs, 64, rank=0, world_size=1, buffer_size=16))
    assert Counter(unsharded) != Counter(range(len(docs)))


def _identity(batch):
    return batch


def test_ranks_times_dataloader_workers_cover_every_document_exactly_once():
    docs = documents(80)
    seen = []
    for rank in range(2):
        stream = ShardedPackedStream(docs, 64, rank=rank, world_size=2, buffer_size=8)
        loader = DataLoader(stream, batch_size=None, num_workers=2, collate_fn=_identity)
        seen += docs_in(list(loader))
    assert Counter(seen) == Counter(range(len(docs)))


def test_resume_continues_with_the_next_row():
    docs = documents()
    full = list(ShardedPackedStream(docs, 64, rank=1, world_size=2, buffer_size=16))
    stream = ShardedPackedStream(docs, 64, rank=1, world_size=2, buffer_size=16)
    it = iter(stream)
    head = [next(it) for _ in range(5)]
    state = stream.state_dict()
    resumed = ShardedPackedStream(docs, 64, rank=1, world_size=2, buffer_size=16)
    resumed.load_state_dict(state)
    assert head + list(resumed) == full
    with pytest.raises(PackmaskError, match="rank 1 of 2"):
        ShardedPackedStream(docs, 64, rank=0, world_size=2).load_state_dict(state)


def test_set_epoch_reaches_a_per_epoch_document_source():
    docs = documents(30)
    stream = ShardedPackedStream(lambda epoch: docs[::-1] if epoch % 2 else docs, 64, rank=0, world_size=1)
    first = docs_in(stream)
    stream.set_epoch(1)
    assert sorted(docs_in(stream)) == sorted(first) and docs_in(stream) != first

