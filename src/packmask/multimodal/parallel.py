"""Image-text records through the processor, in this process or in worker processes, results in record order.

Each record costs a processor call (image decode, resize, tokenize), so a large file is processed in
chunks of :data:`CHUNK` records over ``num_proc`` worker processes; each worker gets the processor once
(``load(source)`` where given, as ``packmask pack --processor`` reloads it from its folder; else the
processor object itself) and returns, per record, ``("ok", sample)`` or ``("bad", field, problem, fix)``
(a :class:`~packmask.multimodal.records.RecordProblem`'s parts: it does not pickle whole). The results
come back in record order whatever the number of workers, so the packed rows are the same::

    records     r0 ... r63 | r64 ... r127 | r128 r129      (chunks of 64)
    num_proc=2  worker A: chunk 0, chunk 2   worker B: chunk 1
    results     ok ... ok  | ok ... bad ... | ok ok          (in record order)

>>> from packmask.multimodal.tiny_processor import tiny_processor
>>> results = list(process_records([{"text": "w3 w4"}, {"text": 5}], tiny_processor("gemma3"),
...                                dict(field="text", kind="text")))
>>> results[0][0], len(results[0][1]["input_ids"]), results[1][:2]
('ok', 2, ('bad', 'text'))
"""
from __future__ import annotations

import itertools
from typing import Callable, Iterable, Iterator

from .records import RecordProblem, process_record

__all__ = ["CHUNK", "process_chunk", "process_records"]

CHUNK = 64  # records per task: large enough that a worker's per-task cost is small against the processor's
_WORKER: dict = {}  # a worker process's processor and options (set once per worker)


def _start_worker(load: Callable | None, source, options: dict) -> None:
    _WORKER["processor"] = load(source) if load is not None else source
    _WORKER["options"] = options


def process_chunk(items: list, processor, options: dict) -> list:
    """Items through ``processor``, in order: an item is a record, or ``(record, options)`` whose options
    (``field``, ``kind``) override ``options`` for that record."""
    results = []
    for item in items:
        record, extra = item if isinstance(item, tuple) else (item, {})
        try:
            results.append(("ok", process_record(record, processor, **{**options, **extra})))
        except RecordProblem as problem:
            results.append(("bad", problem.field, problem.problem, problem.fix))
    return results


def _chunks(items: Iterable) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, CHUNK)):
        yield chunk


def _worker_chunk(items: list) -> list:
    return process_chunk(items, _WORKER["processor"], _WORKER["options"])


def process_records(items: Iterable, processor, options: dict, num_proc: int = 1, *, load: Callable | None = None,
                    source=None) -> Iterator[tuple]:
    """Each item's result (see :func:`process_chunk`), in order, with ``options`` for
    :func:`~packmask.multimodal.records.process_record`. ``num_proc > 1`` runs chunks in worker
    processes, which get ``load(source)`` (a module-level function, so it pickles) or else ``processor``
    itself; a consumer that stops early (a bad record) cancels the chunks not started."""
    if isinstance(num_proc, bool) or not isinstance(num_proc, int) or num_proc < 1:
        from ..errors import PackmaskError

        raise PackmaskError(f"num_proc must be a positive integer (worker processes), got {num_proc!r}.")
    chunks = _chunks(items)
    first = next(chunks, [])
    second = next(chunks, None)
    if num_proc == 1 or second is None:  # lazily, one chunk in memory at a time
        for chunk in itertools.chain([first], [second] if second is not None else [], chunks):
            yield from process_chunk(chunk, processor, options)
        return
    chunks = itertools.chain([first, second], chunks)
    from concurrent.futures import ProcessPoolExecutor

    initargs = (load, source, options) if load is not None else (None, processor, options)
    executor = ProcessPoolExecutor(max_workers=num_proc, initializer=_start_worker, initargs=initargs)
    try:
        for results in executor.map(_worker_chunk, chunks):
            yield from results
    finally:  # the chunks not started are dropped
        executor.shutdown(wait=True, cancel_futures=True)
