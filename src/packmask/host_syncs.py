"""Counting the calls that make the host wait for the device (host syncs), on any device.

On a GPU, reading a tensor's value on the host (``bool(t)``, ``t.item()``, ``t.tolist()``,
``int(t)``, ``torch.nonzero``, ``torch.equal``, ``repeat_interleave`` without ``output_size``, ...)
waits until every kernel queued before it has run. In a forward that is host-bound (a small model,
draft-tree verification), each one idles the GPU; inside a layer it costs that once per layer.
:func:`count_host_syncs` counts these calls through a ``TorchFunctionMode``, so a CPU test can
prove a path has none per layer.

>>> t = torch.tensor([1, 0, 2])
>>> with count_host_syncs() as syncs:
...     bool((t > 0).any()), t.tolist(), (t * 2).sum()
(True, [1, 0, 2], tensor(6))
>>> dict(syncs)
{'__bool__': 1, 'tolist': 1}
"""
from __future__ import annotations

import collections
import contextlib

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["SYNCING_CALLS", "count_host_syncs"]

#: calls that read device values on the host (``repeat_interleave`` only without ``output_size``)
SYNCING_CALLS = frozenset({"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                           "argwhere", "equal", "unique", "unique_consecutive", "masked_select", "cpu", "numpy",
                           "repeat_interleave"})


class _SyncCounter(TorchFunctionMode):
    def __init__(self, counts: collections.Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name in SYNCING_CALLS:
            tensor_repeats = name == "repeat_interleave" and len(args) > 1 and isinstance(args[1], torch.Tensor)
            if name != "repeat_interleave" or (tensor_repeats and kwargs.get("output_size") is None):
                self.counts[name] += 1
        elif name == "to" and _to_cpu(args, kwargs):
            self.counts["to(cpu)"] += 1
        return func(*args, **kwargs)


def _to_cpu(args, kwargs) -> bool:
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    if isinstance(target, (str, torch.device)):
        return torch.device(target).type == "cpu" and isinstance(args[0], torch.Tensor) and args[0].is_cuda
    return False


@contextlib.contextmanager
def count_host_syncs():
    """``with count_host_syncs() as counts:`` — ``counts`` (a ``Counter`` by call name) of the calls inside
    the block that sync the device on a GPU (counted on any device)."""
    counts: collections.Counter = collections.Counter()
    with _SyncCounter(counts):
        yield counts
