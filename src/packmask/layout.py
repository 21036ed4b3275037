"""Layouts: the compact description of who attends to whom in a batch of packed rows.

Every input form (a dense ``[B, N, N]`` mask, ``cu_seq_lens``, ``seq_lengths``, packed
``position_ids``) is turned into one of two layouts, once per forward:

* :class:`DocumentLayout` — block-diagonal: each token belongs to one contiguous *document* of its
  row and attends only inside it (causally, or bidirectionally for encoders). Stored as
  ``cu_seqlens`` over the flattened ``B * N`` tokens, the form varlen kernels take.
* :class:`GeneralLayout` — anything else (prefix-LM, trees, mixed blocks): the boolean mask itself,
  plus the document segmentation and positions derived from it.

Sequence boundaries (where a document starts, the padding rule, ``cu_seqlens`` <-> positions) are
never computed here: :mod:`packmask.segments` is the one place that converts them.

Worked example: two rows of 6 tokens, row 0 packs documents ``a`` (3 tokens) and ``b`` (3 tokens),
row 1 packs ``c`` (4) and ``d`` (2)::

    tokens        a0 a1 a2 b0 b1 b2 | c0 c1 c2 c3 d0 d1
    position_ids   0  1  2  0  1  2 |  0  1  2  3  0  1
    cu_seqlens    [0, 3, 6, 10, 12]            (over the 12 flattened tokens)

    causal mask of row 0 (1 = query row may attend key column)
        a0 a1 a2 b0 b1 b2
    a0   1  .  .  .  .  .
    a1   1  1  .  .  .  .
    a2   1  1  1  .  .  .
    b0   .  .  .  1  .  .
    b1   .  .  .  1  1  .
    b2   .  .  .  1  1  1

>>> layout = DocumentLayout.from_seq_lengths([[3, 3], [4, 2]], seq_len=6)
>>> layout.cu_seqlens.tolist(), layout.max_seqlen
([0, 3, 6, 10, 12], 4)
>>> layout.position_ids.tolist()
[[0, 1, 2, 0, 1, 2], [0, 1, 2, 3, 0, 1]]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from . import segments
from .errors import PackmaskError
from .layout_tree import TreeLayout, analyse_tree_mask, tree_depths

__all__ = [
    "DocumentLayout",
    "GeneralLayout",
    "TreeLayout",
    "Layout",
    "analyse_mask",
    "position_ids_from_mask",
    "cached_on",
]


def cached_on(tensor: torch.Tensor, key, compute: Callable):
    """Memoise ``compute()`` on ``tensor`` (its storage owner), invalidated by in-place edits.

    This is what makes analysis happen once per forward: every layer receives the same mask /
    ``position_ids`` / ``cu_seq_lens`` tensor, so the first layer computes and the rest reuse.
    The cache lives as an attribute of the tensor and dies with it: no global state, no risk of a
    new tensor at a recycled address picking up a stale layout.
    """
    if torch.compiler.is_compiling():  # traced code cannot store on tensors: compute (see integration)
        return compute()
    owner = tensor
    while owner._base is not None:  # views (mask[:, None]) share their base's cache
        owner = owner._base
    if owner.is_inference():  # torch.inference_mode: no version counter to see in-place edits, so no cache
        return compute()
    store = owner.__dict__.setdefault("_packmask_cache", {})
    full_key = (key, tuple(tensor.shape), tensor.stride(), tensor.storage_offset(), owner._version)
    if full_key not in store:  # None ("nothing packed") is a result too, computed once
        if len(store) > 16:  # stale versions of an edited tensor
            store.clear()
        store[full_key] = compute()
    return store[full_key]


def _within_window(pos: torch.Tensor, window: int, bidirectional: bool) -> torch.Tensor:
    """``[B, N, N]``: key within ``window`` positions of the query (before it; either side if bidirectional)."""
    delta = pos[:, :, None] - pos[:, None, :]
    return (delta.abs() if bidirectional else delta) < window


@dataclass(eq=False)
class DocumentLayout:
    """Block-diagonal layout: contiguous documents, each attending only to itself.

    Attributes:
        cu_seqlens: int32 ``[num_docs + 1]`` cumulative document lengths over the flattened
            ``batch_size * seq_len`` tokens (the varlen-kernel convention); row boundaries are
            always document boundaries.
        max_seqlen: length of the longest document (a host int: kernels need it).
        batch_size, seq_len: the ``[B, N]`` shape of the batch.
        causal: True for decoders (attend to earlier tokens of the document), False for
            bidirectional documents (encoders).
    """

    cu_seqlens: torch.Tensor
    max_seqlen: int
    batch_size: int
    seq_len: int
    causal: bool = True
    _memo: dict = field(default_factory=dict, repr=False)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, batch_size: int, seq_len: int, *, max_seqlen=None,
                        causal: bool = True, name: str = "cu_seq_lens_q") -> "DocumentLayout":
        cu = cu_seqlens.reshape(-1)
        longest = segments.check_cu_seqlens(cu, batch_size, seq_len, max_seqlen=max_seqlen, name=name)
        return cls(cu.to(torch.int32), longest, batch_size, seq_len, causal)

    @classmethod
    def from_seq_lengths(cls, seq_lengths: Sequence[Sequence[int]], seq_len: int, *, device=None,
                         causal: bool = True) -> "DocumentLayout":
        """From per-row lists of sequence lengths (the ``seq_lengths`` column of packed datasets).

        Trailing row padding is one document of its own; empty documents vanish
        (:func:`packmask.segments.starts_from_lengths`). Built on the host, moved to ``device`` once.
        """
        starts = segments.starts_from_lengths(seq_lengths, seq_len)
        cu = segments.cu_seqlens_from_starts(starts)
        return cls(cu.to(device) if device is not None else cu, segments.max_length(cu), starts.shape[0], seq_len,
                   causal)

    @classmethod
    def from_position_ids(cls, position_ids: torch.Tensor, *, causal: bool = True) -> "DocumentLayout":
        """A new document starts wherever the position does not continue the previous one by +1
        (the restart rule of :mod:`packmask.segments`)."""
        return cls.from_start_flags(segments.starts_from_position_ids(position_ids), causal=causal)

    @classmethod
    def from_start_flags(cls, start: torch.Tensor, *, causal: bool = True) -> "DocumentLayout":
        """From ``[B, N]`` bool start flags (:mod:`packmask.segments`' pivot form)."""
        B, N = start.shape
        cu = segments.cu_seqlens_from_starts(start)
        return cls(cu, segments.max_length(cu), B, N, causal)

    # ---- derived views (each computed once per layout) ----------------------------------------
    def _derive(self):
        if "doc" not in self._memo:
            doc, pos = segments.doc_ids_and_positions_from_cu_seqlens(self.cu_seqlens, self.batch_size, self.seq_len)
            self._memo["doc"], self._memo["pos"] = doc, pos
        return self._memo["doc"], self._memo["pos"]

    @property
    def doc_ids(self) -> torch.Tensor:
        """``[B, N]`` global document index of every token."""
        return self._derive()[0]

    @property
    def position_ids(self) -> torch.Tensor:
        """``[B, N]`` position of every token inside its document (restarts at 0)."""
        return self._derive()[1]

    @property
    def seq_lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()

    def dense_mask(self, sliding_window: int | None = None, bidirectional_window: bool = False,
                   kv_len: int | None = None) -> torch.Tensor:
        """``[B, 1, N, N]`` bool mask (True = may attend). O(N²): for CPU/reference paths only.

        ``sliding_window`` hides keys ``window`` or more positions before the query, and with
        ``bidirectional_window`` also those ``window`` or more after it (encoders' local layers).
        """
        key = ("dense", sliding_window, bidirectional_window)
        if key not in self._memo:
            doc, pos = self.doc_ids, self.position_ids
            m = doc[:, :, None] == doc[:, None, :]
            if self.causal:
                m &= pos[:, :, None] >= pos[:, None, :]
            if sliding_window is not None:
                m &= _within_window(pos, sliding_window, bidirectional_window)
            self._memo[key] = m[:, None]
        return self._memo[key]

    def to(self, device) -> "DocumentLayout":
        if self.cu_seqlens.device == torch.device(device):
            return self
        return DocumentLayout(self.cu_seqlens.to(device, non_blocking=True), self.max_seqlen,
                              self.batch_size, self.seq_len, self.causal)


@dataclass(eq=False)
class GeneralLayout:
    """Any mask that is not block-diagonal over contiguous documents.

    Attributes:
        mask: ``[B, N, N]`` bool, True = query may attend key (exactly what the user gave).
        doc_ids: ``[B, N]`` connected segments of the mask (no attention crosses a segment edge).
        position_ids: ``[B, N]`` positions derived from the mask (see :func:`position_ids_from_mask`).
    """

    mask: torch.Tensor
    doc_ids: torch.Tensor
    position_ids: torch.Tensor
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.mask.shape[0]

    @property
    def seq_len(self) -> int:
        return self.mask.shape[1]

    def dense_mask(self, sliding_window: int | None = None, bidirectional_window: bool = False,
                   kv_len: int | None = None) -> torch.Tensor:
        key = ("dense", sliding_window, bidirectional_window)
        if key not in self._memo:
            m = self.mask
            if sliding_window is not None:
                m = m & _within_window(self.position_ids, sliding_window, bidirectional_window)
            self._memo[key] = m[:, None]
        return self._memo[key]


Layout = DocumentLayout | GeneralLayout | TreeLayout


# ---------------------------------------------------------------------------------------------
# Dense-mask analysis
# ---------------------------------------------------------------------------------------------

def _as_bool_mask(mask: torch.Tensor, batch_size: int | None, seq_len: int | None) -> torch.Tensor:
    """Validate a ``[B, N, N]`` / ``[B, 1, N, N]`` mask and return it as ``[B, N, N]`` bool."""
    if not isinstance(mask, torch.Tensor):
        raise PackmaskError(f"attention_mask must be a torch.Tensor, got {type(mask).__name__}.")
    if mask.dim() == 4:
        if mask.shape[1] != 1:
            raise PackmaskError(
                f"attention_mask of shape {tuple(mask.shape)} has {mask.shape[1]} heads; packmask takes one mask "
                f"for all heads: pass [B, N, N] or [B, 1, N, N].")
        mask = mask[:, 0]
    if mask.dim() != 3 or mask.shape[-1] < mask.shape[-2]:
        raise PackmaskError(
            f"attention_mask must be [batch, tokens, tokens] (or [batch, 1, tokens, tokens]; with a KV cache "
            f"[batch, tokens, past + tokens]); got shape {tuple(mask.shape)}.")
    B, N, K = mask.shape
    if (batch_size is not None and B != batch_size) or (seq_len is not None and N != seq_len):
        raise PackmaskError(
            f"attention_mask has shape {tuple(mask.shape)} but the inputs are [batch={batch_size}, "
            f"tokens={seq_len}]: expected [{batch_size}, {seq_len}, {'past + ' if K != N else ''}{seq_len}].")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point():
        # all zero reads as additive (everything visible: Pixtral's mask of one image); as 0/1 it would
        # let no query attend
        if bool((mask < 0).any()) or not bool(mask.any()):
            # additive convention (0 = attend, very negative = blocked), as transformers' eager uses
            blocked = mask <= torch.finfo(mask.dtype).min / 2
            if not bool((blocked | (mask == 0)).all()):
                raise PackmaskError(
                    "a float attention_mask must hold 0/1 (1 = attend) or additive 0/-inf values; soft biases are "
                    "not a mask (use a score_mod / ALiBi-style model instead).")
            return ~blocked
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise PackmaskError("a float attention_mask must hold only 0 and 1 (1 = attend).")
        return mask != 0
    if mask.dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64):
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise PackmaskError("an integer attention_mask must hold only 0 and 1 (1 = attend).")
        return mask != 0
    raise PackmaskError(f"attention_mask dtype {mask.dtype} is not supported; use bool (True = attend).")


def analyse_mask(mask: torch.Tensor, batch_size: int | None = None, seq_len: int | None = None) -> Layout:
    """Turn a dense ``[B, N, N]`` mask into the most compact layout that reproduces it exactly.

    Reads the mask with a few O(N²) reductions (no per-token Python), then:

    * every query sees exactly ``[doc_start, i]`` → :class:`DocumentLayout` (causal);
    * every query sees exactly its whole segment → :class:`DocumentLayout` (bidirectional);
    * every query sees its ancestors in a forest and itself →
      :class:`~packmask.layout_tree.TreeLayout` (shared-prefix rows; a ``[B, N, past + N]``
      mask over a KV cache must be one);
    * otherwise → :class:`GeneralLayout` holding the mask.

    A query that may attend to nothing raises :class:`PackmaskError` naming it (softmax over no
    keys is undefined: it would be NaN).
    """
    m = _as_bool_mask(mask, batch_size, seq_len)
    B, N, K = m.shape
    if K != N:  # new tokens over a KV cache: a draft tree (or a plain continuation, a one-branch tree)
        tree = analyse_tree_mask(m, strict=True)  # one host sync; a tree's queries all see themselves
        if tree is None:
            _check_every_query_sees_a_key(m.sum(-1))
            raise PackmaskError(
                f"attention_mask of shape {tuple(m.shape)} (past {K - N} + {N} new tokens) is not a tree over the "
                f"cache: with a cache, packmask takes masks where every new token sees one contiguous run of cache "
                f"columns ending at the last one (the same for the whole row), its ancestors in the tree and itself. "
                f"Build it with packmask.tree_mask(parents, past_length), or use attn_implementation='sdpa'.")
        return tree
    count = m.sum(-1)  # visible keys per query
    _check_every_query_sees_a_key(count)
    idx = torch.arange(N, device=m.device)
    m8 = m.to(torch.uint8)
    first = m8.argmax(-1)  # argmax returns the first maximal index
    last = (N - 1) - m8.flip(-1).argmax(-1)
    del m8
    # A segment edge before token i: no query >= i sees a key < i, and no query < i sees a key >= i.
    suffix_min_first = first.flip(-1).cummin(-1).values.flip(-1)
    prefix_max_last = last.cummax(-1).values
    start_flag = torch.ones(B, N, dtype=torch.bool, device=m.device)
    start_flag[:, 1:] = (suffix_min_first[:, 1:] >= idx[1:]) & (prefix_max_last[:, :-1] < idx[1:])
    seg_start, seg_end = segments.doc_bounds_from_starts(start_flag)
    row_lower = (last <= idx).all(-1, keepdim=True)  # causal (lower-triangular) rows
    positions = torch.where(row_lower, count - 1, idx - seg_start)

    causal_full = bool(((last <= idx) & (count == idx - seg_start + 1)).all())
    if causal_full:
        return DocumentLayout.from_start_flags(start_flag, causal=True)
    if bool((count == seg_end - seg_start).all()):
        return DocumentLayout.from_start_flags(start_flag, causal=False)
    tree = analyse_tree_mask(m)  # shared-prefix rows (prompt | chosen | rejected), any causal forest
    if tree is not None:
        return tree
    doc_ids = segments.doc_ids_from_starts(start_flag, local=True)
    # positions come from the mask's causal part: bidirectional blocks over a forest (the image spans or the
    # prefix of a shared VLM prompt) keep the forest's depths, which a sliding window is measured in
    lower = m & (idx[None, :] <= idx[:, None])
    return GeneralLayout(m, doc_ids, _forgetful_forest_positions(lower, torch.ones_like(row_lower), positions))


def _check_every_query_sees_a_key(count: torch.Tensor) -> None:
    """Raise naming the first query that may attend to no key (``count``: visible keys per query)."""
    if bool((count == 0).any()):
        b, i = (torch.nonzero(count == 0)[0]).tolist()
        raise PackmaskError(
            f"attention_mask[{b}, {i}] lets query {i} of row {b} attend to no key (its softmax would be NaN). "
            f"Every query needs at least one visible key; for padding tokens let each attend to itself "
            f"(mask[b, i, i] = True) and give them label -100.")


def _forgetful_forest_positions(m: torch.Tensor, row_lower: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Positions of causal rows where every query sees at most what its parent (the last earlier key
    it sees) sees, plus itself — a sliding window over documents or tree branches. Their position
    is the depth along parents: ``visible keys − 1`` would stop growing at ``window − 1``.

        windowed document (window 3)     parents          depth (position)
        a0 a1 a2 a3 a4                    -1 0 1 2 3       0 1 2 3 4
    """
    B, N, _ = m.shape
    idx = torch.arange(N, device=m.device)
    earlier = m & (idx[None, :] < idx[:, None])
    has_parent = earlier.any(-1)
    parent = torch.where(has_parent, (N - 1) - earlier.flip(-1).to(torch.uint8).argmax(-1), -1)
    parent_rows = torch.gather(m, 1, parent.clamp(min=0)[:, :, None].expand(B, N, N)) & has_parent[:, :, None]
    eye = torch.eye(N, dtype=torch.bool, device=m.device)
    # [B]: every query sees itself and at most what its parent sees (it forgets, never adds)
    forest = row_lower[:, 0] & m.diagonal(dim1=1, dim2=2).all(-1) & (m <= (parent_rows | eye)).all(-1).all(-1)
    if not bool(forest.any()):
        return positions
    return torch.where(forest[:, None], tree_depths(parent), positions)


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions that make each packed sequence start at 0, derived from a ``[B, N, N]`` mask.

    Causal (lower-triangular) rows: the depth of a token along its parents (the last earlier key it
    sees) where every query sees itself and at most what its parent sees — documents, trees and
    shared prefixes, with or without a sliding window already in the mask; otherwise the number of
    visible keys − 1. Other rows (bidirectional blocks): the same depth over the mask's causal part when that is
    such a forest (a shared prompt with bidirectional image spans), else the index inside the segment.

    >>> m = torch.ones(5, 5, dtype=torch.bool).tril()
    >>> m[3:, :3] = False                 # two documents: 3 + 2 tokens
    >>> position_ids_from_mask(m[None]).tolist()
    [[0, 1, 2, 0, 1]]
    """
    return analyse_mask(mask).position_ids
