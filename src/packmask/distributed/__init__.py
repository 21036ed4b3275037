"""Multi-process packed training: balanced rows per rank, sharded streaming, global loss counts
(data parallelism), and one long packed row split over several ranks (context parallelism:
``context_parallel.py``, ``cp_plan.py``, ``cp_attention.py``).

Everything is imported on first use (``import packmask.distributed`` stays light).
"""
from __future__ import annotations

import importlib

_LAZY = {
    "BalancedBatchSampler": "packmask.distributed.sampler",
    "row_costs": "packmask.distributed.sampler",
    "balance_report": "packmask.distributed.sampler",
    "round_robin_steps": "packmask.distributed.sampler",
    "count_loss_items": "packmask.distributed.loss",
    "ShardedPackedStream": "packmask.distributed.streaming",
    "shard_documents": "packmask.distributed.streaming",
    "PackedTrainerMixin": "packmask.distributed.trainer",
    "BalancedTrainer": "packmask.distributed.trainer",
    "context_parallel": "packmask.distributed.context_parallel",
    "ContextParallel": "packmask.distributed.context_parallel",
    "ShardPlan": "packmask.distributed.cp_plan",
    "plan_context_parallel": "packmask.distributed.cp_plan",
}

__all__ = sorted(_LAZY)


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packmask.distributed' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
