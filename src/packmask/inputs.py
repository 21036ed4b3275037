"""One resolver from a forward's inputs to its packed layout, and the layout of the running forward.

A packed batch says where its sequences start in one of several forms. :func:`resolve_layout` is
the one place that reads them, one function per form, tried in this order:

=====================================  =====================================  ===========================
input                                  function                               result
=====================================  =====================================  ===========================
``[B, N, N]`` / ``[B, 1, N, N]`` mask  :func:`layout_from_mask`               any layout (taken literally)
(bool, 0/1 or additive 0/-inf)
``seq_lengths``                        :func:`layout_from_seq_lengths`        documents
``cu_seq_lens_q/k`` (+ ``max_length``)  :func:`layout_from_cu_seq_lens`        documents
packed ``position_ids`` (+ a 2D        :func:`layout_from_position_ids`       documents (padding runs
padding ``attention_mask``)                                                   are documents of their own)
=====================================  =====================================  ===========================

A boundary form that puts one sequence in every row resolves to ``None``: nothing is packed, the
ordinary path runs. Each form is analysed once per forward: the result is cached on its input
tensor (:func:`packmask.layout.cached_on`), so the model's forward pre-hook, every attention layer,
context parallelism and :func:`packmask.support.is_packed_input` share one analysis.

Worked example — one row of 5 tokens packing ``a`` (3 tokens) and ``b`` (2), in every form::

    tokens          a0 a1 a2 b0 b1
    seq_lengths     [[3, 2]]
    cu_seq_lens     [0, 3, 5]
    position_ids     0  1  2  0  1
    mask            block-diagonal causal (packmask.block_diagonal_mask([[3, 2]], 5))

>>> import packmask
>>> forms = [dict(seq_lengths=[[3, 2]]), dict(cu_seq_lens_q=torch.tensor([0, 3, 5])),
...          dict(position_ids=torch.tensor([[0, 1, 2, 0, 1]])),
...          dict(attention_mask=packmask.block_diagonal_mask([[3, 2]], 5))]
>>> [resolve_layout(1, 5, **form).cu_seqlens.tolist() for form in forms]
[[0, 3, 5], [0, 3, 5], [0, 3, 5], [0, 3, 5]]
>>> resolve_layout(1, 5, position_ids=torch.arange(5)[None]) is None   # one sequence per row
True

**The running forward.** The model's forward pre-hook opens a :class:`ForwardLayout` for the
forward it starts (:func:`current_forward` reads it; the forward's post-hook closes it). Layers
that are not attention — recurrent mixers of hybrid models, say — read the boundaries of the
forward they run in from it instead of from their own arguments.
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass, field

import torch

from . import segments
from .errors import PackmaskError, UnsupportedModelError
from .layout import DocumentLayout, GeneralLayout, Layout, TreeLayout, analyse_mask, cached_on

__all__ = ["resolve_layout", "layout_from_mask", "layout_from_seq_lengths", "layout_from_cu_seq_lens",
           "layout_from_position_ids", "is_packed", "ForwardLayout", "current_forward", "forward_scope",
           "LAYOUT_KWARG", "external_layout_required", "require_external_layout", "refresh_traced_state"]

#: Model keyword through which a caller hands packmask's attention a ready-made layout object that
#: brings its own kernel: ``layout.attend(module, q, k, v, spec=..., training=...) -> [B, N, H, D]``.
#: transformers forwards a model's extra keywords to every attention call, so no model code is
#: touched. Context parallelism (:mod:`packmask.distributed.context_parallel`) uses it; while a
#: context-parallel context is active, an attention call without it raises (a model that does not
#: forward its keywords to attention would otherwise attend to this rank's tokens only).
LAYOUT_KWARG = "packmask_layout"

LAYOUT_TYPES = (DocumentLayout, GeneralLayout, TreeLayout)


# ---- one function per input form ----------------------------------------------------------------

def layout_from_mask(mask: torch.Tensor, batch_size: int | None = None, seq_len: int | None = None) -> Layout:
    """The layout of a ``[B, N, N]`` / ``[B, 1, N, N]`` mask (:func:`packmask.layout.analyse_mask`),
    analysed once per mask tensor."""
    return cached_on(mask, "layout", lambda: analyse_mask(mask, batch_size, seq_len))


def layout_from_seq_lengths(seq_lengths, seq_len: int, *, device=None, causal: bool = True) -> DocumentLayout:
    """The documents of per-row ``seq_lengths`` (row padding is one more document)."""
    lengths = seq_lengths.tolist() if isinstance(seq_lengths, torch.Tensor) else seq_lengths
    return DocumentLayout.from_seq_lengths(lengths, seq_len, device=device, causal=causal)


def layout_from_cu_seq_lens(cu_seq_lens_q: torch.Tensor, batch_size: int, seq_len: int, *,
                            cu_seq_lens_k: torch.Tensor | None = None, max_length_q=None,
                            causal: bool = True) -> DocumentLayout:
    """The documents of ``cu_seq_lens_q`` over the flattened ``B * N`` tokens, validated once per
    tensor (the check syncs the device). Self-attention only: ``cu_seq_lens_k`` must equal it."""
    cu = cu_seq_lens_q
    if torch.compiler.is_compiling():
        # traced layers: the forward pre-hook validated cu_seq_lens eagerly, once per forward. Build the
        # layout from tensors only (no host sync, nothing stored on tensors); the row length bounds the
        # longest document, which is unknown without a sync.
        return DocumentLayout(cu.to(torch.int32), seq_len, batch_size, seq_len, causal)

    def build():
        if cu_seq_lens_k is not None and cu_seq_lens_k is not cu and not torch.equal(cu_seq_lens_k, cu):
            raise PackmaskError("cu_seq_lens_k differs from cu_seq_lens_q; packmask packs self-attention, where "
                                "they must be equal.")
        return DocumentLayout.from_cu_seqlens(cu, batch_size, seq_len, max_seqlen=max_length_q, causal=causal)
    return cached_on(cu, ("cu", batch_size, seq_len, causal), build)


def layout_from_position_ids(position_ids: torch.Tensor, batch_size: int | None = None, *,
                             padding_mask: torch.Tensor | None = None, causal: bool = True) -> DocumentLayout | None:
    """The documents of packed ``position_ids`` ``[B, N]`` / ``[1, N]`` (the restart rule of
    :mod:`packmask.segments`), or None when no row restarts (nothing is packed).

    With a 2D ``padding_mask`` (0 = padding), every run of padding becomes a document of its own;
    padding inside a sequence raises. Cached on ``position_ids`` per padding tensor: the entry keeps
    the padding tensor alive, so a later one at a recycled address never reads a stale layout.
    ``[4, B, N]`` (text row, then the 3 multimodal RoPE rows, as :class:`packmask.MultimodalCollator`
    writes them) are read by their text row. ``[3, B, N]`` (multimodal RoPE) positions that restart
    raise: image tokens share positions, so sequence starts cannot be read from them.

    ::

        position_ids   0 1 2 3 0 1 2 0 1 2
        padding_mask   1 1 1 1 1 1 1 0 0 0
        documents      a a a a b b b P P P     cu_seqlens [0, 4, 7, 10]
    """
    pos = position_ids
    if pos.dim() == 3 and pos.shape[0] == 4:
        # multimodal: [4, B, N] is the text row (restarting per sample), then the 3 mRoPE rows
        pos = cached_on(pos, "text_row", lambda: position_ids[0])
    if pos.dim() == 3:
        if cached_on(pos, "restarts", lambda: bool(segments.starts_from_position_ids(pos[0])[:, 1:].any())):
            raise UnsupportedModelError(
                "packed rows with 3D (multimodal RoPE) position_ids and no mask: packmask cannot tell where each "
                "sequence starts from them. Pass attention_mask=packmask.block_diagonal_mask(seq_lengths) (or "
                "[B, 1, N, N]) or cu_seq_lens_q/k together with the 3D position_ids.")
        return None
    B = batch_size if batch_size is not None else pos.shape[0]
    N = pos.shape[-1]
    padding = None
    if padding_mask is not None and padding_mask.dim() == 2 and not bool(padding_mask.all()):
        padding = padding_mask
    if padding is None:
        return cached_on(pos, ("pos", B, causal, None), lambda: _documents_of_positions(pos.expand(B, N), None, causal))
    build = lambda: (padding, _documents_of_positions(pos.expand(B, N), padding.bool(), causal))  # noqa: E731
    if padding.is_inference():  # no version counter (torch.inference_mode): not cached
        return build()[1]
    return cached_on(pos, ("pos", B, causal, id(padding), padding._version), build)[1]


def _documents_of_positions(pos, padding, causal):
    starts = segments.starts_from_position_ids(pos)
    if not bool(starts[:, 1:].any()):
        return None  # one sequence per row: nothing is packed
    if padding is not None:
        padding = padding[:, -pos.shape[1]:]
        pad_change = segments.starts_from_ids(padding)  # every run of padding or of real tokens begins a document
        bad = pad_change & padding & ~starts  # a real token continuing a sequence across padding
        if bool(bad.any()):
            b, i = torch.nonzero(bad)[0].tolist()
            raise PackmaskError(
                f"row {b} has padding inside a packed sequence (before token {i}); put padding at the end of the row "
                f"or between sequences, or drop the 2D attention_mask and pass a [B, N, N] mask.")
        starts = starts | pad_change
    return DocumentLayout.from_start_flags(starts, causal=causal)


# ---- the one entry point -------------------------------------------------------------------------

def resolve_layout(batch_size: int | None, seq_len: int | None, *, attention_mask=None, position_ids=None,
                   cu_seq_lens_q=None, cu_seq_lens_k=None, max_length_q=None, seq_lengths=None,
                   causal: bool = True, packed_only: bool = True, device=None, **_ignored) -> Layout | None:
    """The packed layout of a forward's inputs, or None when nothing is packed (see the module docstring).

    ``attention_mask`` may be a ``[B, N, N]`` / ``[B, 1, N, N]`` mask, a layout already analysed, or
    a 2D padding mask (read together with ``position_ids``). ``causal`` applies to the boundary forms
    (a mask says itself whether it is causal). ``packed_only=False`` returns the layout of
    ``seq_lengths`` / ``cu_seq_lens`` even with one sequence per row (its positions). Other keywords of a forward are ignored, so
    ``resolve_layout(B, N, **model_kwargs)`` works. ``device``: where a layout built from host
    ``seq_lengths`` lives (the tokens' device; the tensor forms keep their own).
    """
    mask = attention_mask
    if isinstance(mask, LAYOUT_TYPES):
        return mask
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4):
        return layout_from_mask(mask, batch_size, seq_len)
    if seq_lengths is not None:
        layout = layout_from_seq_lengths(seq_lengths, seq_len, device=device, causal=causal)
        return layout if is_packed(layout) or not packed_only else None
    if cu_seq_lens_q is not None:
        layout = layout_from_cu_seq_lens(cu_seq_lens_q, batch_size, seq_len, cu_seq_lens_k=cu_seq_lens_k,
                                         max_length_q=max_length_q, causal=causal)
        return layout if is_packed(layout) or not packed_only else None
    if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == seq_len and position_ids.dim() in (2, 3):
        padding = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        return layout_from_position_ids(position_ids, batch_size, padding_mask=padding, causal=causal)
    return None


def is_packed(layout: Layout | None) -> bool:
    """Whether a layout isolates more than one sequence in some row, or is not block-diagonal at all
    (a document layout with one document per row is the ordinary causal / full mask).

    >>> is_packed(DocumentLayout.from_seq_lengths([[5], [5]], 5)), is_packed(DocumentLayout.from_seq_lengths([[3, 2]], 5))
    (False, True)
    """
    if layout is None:
        return False
    if isinstance(layout, DocumentLayout):
        return layout.cu_seqlens.numel() - 1 > layout.batch_size
    return True


# ---- the running forward ---------------------------------------------------------------------------

@dataclass(eq=False)
class ForwardLayout:
    """The packed inputs of one running forward (what :func:`current_forward` returns).

    Attributes:
        batch_size, seq_len: the ``[B, N]`` shape of the forward's tokens.
        inputs: the boundary keywords the forward runs with (``attention_mask``, ``position_ids``,
            ``cu_seq_lens_q/k``, ``max_length_q``), after the pre-hook derived what was missing.
        layout: resolved on first read (:func:`resolve_layout`, sharing the attention layers'
            cached analysis); None when nothing is packed.
    """

    batch_size: int
    seq_len: int
    inputs: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    @property
    def layout(self) -> Layout | None:
        if "layout" not in self._memo:
            self._memo["layout"] = resolve_layout(self.batch_size, self.seq_len, **self.inputs)
        return self._memo["layout"]


_current: contextvars.ContextVar[ForwardLayout | None] = contextvars.ContextVar("packmask_forward", default=None)
_RECORDED = "_packmask_forward_layout"


def current_forward(module: torch.nn.Module | None = None) -> ForwardLayout | None:
    """The :class:`ForwardLayout` of the forward running now (None outside a packmask forward).

    Pass the calling layer as ``module`` to stay right under activation checkpointing: a checkpointed
    layer is recomputed during backward, after its forward returned (on CUDA in autograd's own thread).
    The layer's read during the forward is remembered on it, and the recomputation reads that again
    — as the backend choice is replayed (:func:`packmask.backends.requested_backend`).
    """
    found = _current.get()
    if module is None:
        return found
    if torch._C._current_graph_task_id() != -1:  # inside backward: a checkpointed layer being recomputed
        return found if found is not None else module.__dict__.get(_RECORDED)
    module.__dict__[_RECORDED] = found  # a forward: record it (or forget a previous forward's)
    return found


def enter_forward(forward: ForwardLayout | None) -> contextvars.Token:
    """Make ``forward`` the running forward (the model's pre-hook); undo with :func:`exit_forward`."""
    return _current.set(forward)


def exit_forward(token: contextvars.Token) -> None:
    _current.reset(token)


@contextlib.contextmanager
def forward_scope(forward: ForwardLayout | None):
    """``with forward_scope(ForwardLayout(B, N, inputs)):`` — run layers outside a model's forward
    (tests, custom loops) as if inside one."""
    token = enter_forward(forward)
    try:
        yield forward
    finally:
        exit_forward(token)


# ---- context parallelism: the layout keyword is required while a context is active -------------------

_external_required: contextvars.ContextVar[int] = contextvars.ContextVar("packmask_external_layout", default=0)
# torch.compile cannot trace ContextVar.get: traced attention reads this mirror, refreshed eagerly by
# the forward pre-hook before every forward (dynamo guards on it)
_traced_state = {"external_required": False}


@contextlib.contextmanager
def require_external_layout():
    """Inside this block, packmask attention without :data:`LAYOUT_KWARG` raises (context parallelism:
    a model that drops its keywords would attend to this rank's tokens only). Per thread / task."""
    token = _external_required.set(_external_required.get() + 1)
    refresh_traced_state()
    try:
        yield
    finally:
        _external_required.reset(token)
        refresh_traced_state()


def external_layout_required() -> bool:
    if torch.compiler.is_compiling():
        return _traced_state["external_required"]
    return _external_required.get() > 0


def refresh_traced_state() -> None:
    _traced_state["external_required"] = _external_required.get() > 0
