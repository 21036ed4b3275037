"""Streaming packing sharded over ranks and dataloader workers: every document packed exactly once.

:class:`ShardedPackedStream` wraps ``packmask.pack_iterable``. Shard ``s = rank * num_workers +
worker_id`` of ``S = world_size * num_workers`` takes documents ``s, s + S, s + 2S, ...`` and packs
them on its own, so the shards are disjoint and together cover the stream::

    documents   d0 d1 d2 d3 d4 d5 d6 d7 d8 d9        2 ranks x 2 workers = 4 shards
    rank 0  worker 0   d0 d4 d8      -> rows packed from these only
            worker 1   d1 d5 d9
    rank 1  worker 0   d2 d6
            worker 1   d3 d7

Map-style input (a list, a ``datasets.Dataset``: anything with ``len`` and indexing) is read by
index, so a shard reads only its own documents; any other iterable is read in full by every shard,
which keeps every ``S``-th document (correct, but the reading is repeated ``S`` times -- for a
sharded ``datasets.IterableDataset`` of many files, ``datasets.distributed.split_dataset_by_node``
reads less).

With ``accelerate`` / the HF ``Trainer`` pass ``rank=0, world_size=1``: ``accelerator.prepare``
splits an ``IterableDataset`` across processes itself (process 0 reads and dispatches batches, or
every process keeps every ``world_size``-th batch), so sharding by rank here as well would lose the
other ranks' documents. Rank sharding is for ``torchrun`` with your own loop.

Resumption (``state_dict`` / ``load_state_dict``, in the process that iterates, i.e. with
``num_workers=0``): the state is the epoch and the rows already yielded. ``pack_iterable`` is
deterministic, so on resume the shard packs again from the start of the epoch and skips that many
rows -- the packing work is repeated, no row is repeated or lost.

Ranks can end an epoch with different row counts (their documents differ). A synchronous loop must
stop all ranks together: use ``torch.distributed.algorithms.Join``, or all-reduce an "exhausted"
flag each step. Dropping the extra rows would lose documents, so this class does not.
"""
from __future__ import annotations

import itertools
from typing import Any, Callable, Iterable, Iterator

from torch.utils.data import IterableDataset, get_worker_info

from ..data.streaming import pack_iterable
from ..errors import PackmaskError

__all__ = ["ShardedPackedStream", "shard_documents"]


def shard_documents(documents: Iterable, shard: int, num_shards: int) -> Iterator:
    """Documents ``shard, shard + num_shards, ...`` of ``documents`` (by index when it has ``len``).

    Example::

        >>> list(shard_documents(["d0", "d1", "d2", "d3", "d4"], 1, 2))
        ['d1', 'd3']
    """
    if not 0 <= shard < num_shards:
        raise PackmaskError(f"shard {shard} is outside 0..{num_shards - 1}.")
    if hasattr(documents, "__len__") and hasattr(documents, "__getitem__"):
        return (documents[i] for i in range(shard, len(documents), num_shards))
    return itertools.islice(iter(documents), shard, None, num_shards)


class ShardedPackedStream(IterableDataset):
    """Packed rows of this rank's (and this dataloader worker's) share of a document stream.

    Args:
        documents: tokenized examples (dicts with ``input_ids``, optionally ``labels`` and other
            per-token columns); a list / ``datasets.Dataset`` / any re-iterable, or a callable
            ``epoch -> iterable`` (to reshuffle per epoch).
        max_length: tokens per packed row.
        rank, world_size: default from ``torch.distributed`` (0 and 1 when not initialised).
        **pack_kwargs: passed to ``packmask.pack_iterable`` (``strategy``, ``overflow``,
            ``buffer_size``, ``min_fill``, ``column``).

    Example::

        >>> docs = [{"input_ids": list(range(n))} for n in (3, 5, 2, 4)]
        >>> rank0 = ShardedPackedStream(docs, 8, rank=0, world_size=2)
        >>> [row["seq_lengths"] for row in rank0]          # documents 0 and 2
        [[3, 2]]
    """

    def __init__(self, documents: Iterable | Callable[[int], Iterable], max_length: int, *, rank: int | None = None,
                 world_size: int | None = None, **pack_kwargs: Any):
        if rank is None or world_size is None:
            import torch.distributed as dist
            ready = dist.is_available() and dist.is_initialized()
            rank = (dist.get_rank() if ready else 0) if rank is None else rank
            world_size = (dist.get_world_size() if ready else 1) if world_size is None else world_size
        if world_size < 1 or not 0 <= rank < world_size:
            raise PackmaskError(f"ShardedPackedStream: rank {rank} is outside 0..{world_size - 1}.")
        self.documents, self.max_length, self.pack_kwargs = documents, max_length, pack_kwargs
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._rows_yielded = 0
        self._skip = 0
        self._workers_seen = 1

    def _epoch_documents(self) -> Iterable:
        return self.documents(self.epoch) if callable(self.documents) else self.documents

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        workers, worker = (1, 0) if info is None else (info.num_workers, info.id)
        self._workers_seen = workers
        shard, num_shards = self.rank * workers + worker, self.world_size * workers
        rows = pack_iterable(shard_documents(self._epoch_documents(), shard, num_shards), self.max_length,
                             **self.pack_kwargs)
        skip, self._skip = self._skip, 0
        self._rows_yielded = skip
        for row in itertools.islice(rows, skip, None):
            self._rows_yielded += 1
            yield row

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        if hasattr(self.documents, "set_epoch"):  # datasets.IterableDataset reshuffles its shards
            self.documents.set_epoch(epoch)

    def state_dict(self) -> dict:
        if self._workers_seen > 1:
            raise PackmaskError("ShardedPackedStream.state_dict counts rows in the iterating process; with "
                                "num_workers > 0 the counts live in the workers. Resume with num_workers=0, or "
                                "count consumed batches yourself.")
        return {"epoch": self.epoch, "rows_yielded": self._rows_yielded, "rank": self.rank,
                "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise PackmaskError(f"ShardedPackedStream.load_state_dict: saved for rank {state['rank']} of "
                                f"{state['world_size']}, this is rank {self.rank} of {self.world_size}.")
        self.set_epoch(state["epoch"])
        self._skip = self._rows_yielded = int(state["rows_yielded"])

