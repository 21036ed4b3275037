"""The "each sequence alone" reference: where the documents of packed rows lie, each run on its own,
and the relative errors the comparisons use (shared by :func:`packmask.verify`, the CLI and the tests).
"""
from __future__ import annotations

import torch

from . import segments

__all__ = ["pack_rows", "run_alone", "rel_err", "grad_rel_err"]


def pack_rows(seq_lengths, seq_len=None):
    """Row-major helpers for a packed batch: ``(doc_slices, position_ids)``.

    ``doc_slices`` lists ``(row, start, length)`` for every real (non-empty) document; the row's
    trailing padding is one more document for ``position_ids`` (the padding rule of
    :mod:`packmask.segments`), but no slice.

    >>> slices, pos = pack_rows([[3, 2], [4]], 6)
    >>> slices
    [(0, 0, 3), (0, 3, 2), (1, 0, 4)]
    >>> pos.tolist()
    [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    """
    slices = segments.spans_from_lengths(seq_lengths, seq_len)
    return slices, segments.position_ids_from_starts(segments.starts_from_lengths(seq_lengths, seq_len))


def run_alone(model, input_ids, doc_slices, **kwargs):
    """Logits of every document run on its own, scattered back into the packed ``[B, N, V]`` grid
    (positions not covered by a document stay 0)."""
    out = None
    for b, s, length in doc_slices:
        logits = model(input_ids=input_ids[b:b + 1, s:s + length], use_cache=False, **kwargs).logits
        if out is None:
            out = logits.new_zeros(input_ids.shape + (logits.shape[-1],))
        out = out.index_put((torch.tensor([b]), torch.arange(s, s + length)), logits[0])
    return out


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def grad_rel_err(model_a, model_b) -> tuple[float, str]:
    """Largest per-parameter relative gradient error between two models with the same parameters."""
    worst, name = 0.0, ""
    params_b = dict(model_b.named_parameters())
    for n, p in model_a.named_parameters():
        q = params_b[n]
        if p.grad is None and q.grad is None:
            continue
        if (p.grad is None) != (q.grad is None):
            return float("inf"), n
        if q.grad.norm() == 0 and p.grad.norm() == 0:
            continue
        e = rel_err(p.grad, q.grad)
        if e > worst:
            worst, name = e, n
    return worst, name
