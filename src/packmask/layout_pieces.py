"""Pieces layouts: queries that attend to gathered runs of keys, given as varlen pieces.

A layout for the calls whose keys are not the queries' own row: every *piece* (a run of
consecutive queries of one document) attends to its own run of key rows, gathered by index from
the flattened keys. Context parallelism builds one per rank (its queries against the all-gathered
keys of the row, :mod:`packmask.distributed.cp_attention`); tree layouts decompose the same way
(:func:`packmask.backends.tree.tree_pieces`). The dispatcher runs a pieces layout on varlen
(:func:`packmask.backends.varlen.varlen_pieces_attention`) or, through its dense mask, on sdpa /
eager.

Worked example — one row, queries ``a1 a2`` of a document ``a`` whose keys ``a0 a1 a2`` sit at
flat key rows ``4 5 6``::

    piece   queries (flat)   key_index   cu_seqlens_q   cu_seqlens_k   causal: bottom-right aligned
    0       0 1              4 5 6       [0, 2]         [0, 3]         a1 sees a0 a1, a2 sees a0 a1 a2

>>> pieces = KeyPieces(torch.tensor([0, 2]), torch.tensor([0, 3]), torch.tensor([4, 5, 6]), 2, 3)
>>> layout = PiecesLayout(pieces, lambda: torch.ones(1, 2, 7, dtype=torch.bool), 1, 2, 7)
>>> layout.dense_mask().shape
torch.Size([1, 1, 2, 7])
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from .errors import PackmaskError

__all__ = ["KeyPieces", "PiecesLayout"]


@dataclass(frozen=True)
class KeyPieces:
    """Varlen pieces with gathered keys: ``cu_seqlens_q`` over the flattened ``B * N`` queries;
    ``key_index`` into the flattened ``B * kv_len`` keys, one run per piece, delimited by
    ``cu_seqlens_k``; the longest piece and key run (host ints: kernels need them)."""

    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    key_index: torch.Tensor
    max_q: int
    max_k: int

    def to(self, device) -> "KeyPieces":
        return KeyPieces(self.cu_seqlens_q.to(device), self.cu_seqlens_k.to(device), self.key_index.to(device),
                         self.max_q, self.max_k)


@dataclass(eq=False)
class PiecesLayout:
    """``B`` rows of ``N`` queries against ``key_len`` key columns per row, as varlen pieces.

    Attributes:
        pieces_fn: the :class:`KeyPieces`, or a zero-argument function building them (on first
            use; read them as ``layout.pieces``).
        mask_fn: a zero-argument function returning the ``[B, N, key_len]`` bool mask (True = may
            attend), built only if a dense backend runs the call.
        batch_size, seq_len, key_len: the shape of the call.
        causal: pieces are causal (bottom-right aligned) or bidirectional.
        sliding_window: the window already applied to the pieces and the mask (None: none); a call
            with another window is refused rather than run with the wrong one.
    """

    pieces_fn: KeyPieces | Callable[[], KeyPieces]
    mask_fn: Callable[[], torch.Tensor]
    batch_size: int
    seq_len: int
    key_len: int
    causal: bool = True
    sliding_window: int | None = None
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def pieces(self) -> KeyPieces:
        if "pieces" not in self._memo:
            self._memo["pieces"] = self.pieces_fn if isinstance(self.pieces_fn, KeyPieces) else self.pieces_fn()
        return self._memo["pieces"]

    def dense_mask(self, sliding_window: int | None = None, bidirectional_window: bool = False,
                   kv_len: int | None = None) -> torch.Tensor:
        """``[B, 1, N, key_len]`` bool mask (the window is already in it)."""
        if sliding_window != self.sliding_window or (kv_len is not None and kv_len != self.key_len):
            raise PackmaskError(
                f"this pieces layout was built for sliding_window={self.sliding_window} and {self.key_len} keys, "
                f"not sliding_window={sliding_window} and {kv_len} keys.")
        if "dense" not in self._memo:
            self._memo["dense"] = self.mask_fn()[:, None]
        return self._memo["dense"]
