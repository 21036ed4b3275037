"""The layout of the running forward, where the wrapped mixers read it (a ``ContextVar``).

packmask analyses a forward's packed layout once (from a ``[B, N, N]`` / ``[B, 1, N, N]`` mask,
``cu_seq_lens_q``, ``seq_lengths`` or packed ``position_ids``). The model's forward pre-hook
(:func:`enter_forward`, called by packmask's input-deriving pre-hook *after* it has turned
``seq_lengths`` into ``cu_seq_lens_q`` and a 3D mask into 4D) sets it here for the duration of the
model's forward; a forward hook that runs on exceptions too (:func:`exit_forward`) resets it::

    model(input_ids, attention_mask=block_diagonal_mask([[3, 2]], 5))
      enter_forward   layout = DocumentLayout(cu_seqlens=[0, 3, 5])  -> ContextVar
        layers ... mixer (SegmentedForward) reads it, runs [0:3] and [3:5] apart
      exit_forward    ContextVar reset

**Activation checkpointing** recomputes a layer during backward, outside the model's forward,
where the ContextVar is empty. Two mechanisms carry the layout into the recompute:

* transformers' ``gradient_checkpointing_enable``: every module's ``_gradient_checkpointing_func``
  (the per-instance checkpoint function transformers calls with the layer's forward) is wrapped
  (:class:`CheckpointWithLayout`, on each training forward, so enabling checkpointing later works
  too): the function it checkpoints is bound to this forward's layout, so the original call and
  the recompute both run with it. Exact whatever the order of backward passes.
* checkpoint wrappers around a module's ``__call__`` (FSDP's activation checkpointing, a manual
  ``torch.utils.checkpoint(layer, ...)``) run module hooks again on recompute:
  :func:`replay_pre_hook` (on every decoder layer that holds a mixer, and on the mixer) remembers
  the layout of each training-mode call under the identity of its input tensor (storage, offset,
  shape, version: the tensor checkpointing saves and hands back, or a detached alias of it) and
  sets it again when that input comes back with no forward active. Calls inside unpacked forwards
  are remembered too (as unpacked), so a recompute never picks up a stale layout.
"""
from __future__ import annotations

import inspect
from collections import OrderedDict
from contextvars import ContextVar
from functools import lru_cache

import torch

from ..errors import UnsupportedModelError
from ..inputs import resolve_layout
from ..layout import DocumentLayout
from ..layout_tree import TreeLayout
from ..segments import starts_from_cu_seqlens

__all__ = ["current_layout", "packed_layout", "enter_forward", "exit_forward", "replay_pre_hook", "replay_exit_hook",
           "bind_checkpointing", "CheckpointWithLayout", "UNPACKED", "HOOKED", "CHECKPOINTED"]

#: the value of the ContextVar inside a model forward whose input is not packed
UNPACKED = "unpacked"
#: model attribute marking a PreTrainedModel whose forward sets the layout (it has the exit hook)
HOOKED = "_packmask_recurrent_hooked"
#: model attribute: the modules of the model that can hold a ``_gradient_checkpointing_func``
CHECKPOINTED = "_packmask_recurrent_checkpointed"
_TOKENS = "_packmask_recurrent_tokens"
_REPLAY = "_packmask_recurrent_replay"
_REPLAY_TOKENS = "_packmask_recurrent_replay_tokens"
_REPLAY_SIZE = 8  # remembered calls per layer: forwards whose backward has not run yet

_LAYOUT: ContextVar = ContextVar("packmask_recurrent_layout", default=None)

#: a cache handed to the model: packed input with one is refused
_MODEL_CACHE_ARGUMENTS = ("past_key_values", "cache", "cache_params", "state")


def current_layout() -> DocumentLayout | TreeLayout | None:
    """The packed layout of the running forward, None when nothing is packed (or no forward runs)."""
    layout = _LAYOUT.get()
    return None if layout is None or layout is UNPACKED else layout


@lru_cache(maxsize=None)
def _forward_names(cls) -> tuple[str, ...]:
    return tuple(p for p in inspect.signature(cls.forward).parameters if p != "self")


@lru_cache(maxsize=None)
def _takes_kwargs(cls) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())


def _refuse(what: str):
    raise UnsupportedModelError(
        f"packmask cannot pack this recurrent model exactly: {what} State-space / recurrent layers are run once per "
        f"document of a block-diagonal layout; pass seq_lengths, cu_seq_lens_q/k, packed position_ids or a "
        f"block-diagonal [B, N, N] mask (packmask.block_diagonal_mask), or train unpacked.")


_BOUNDARY_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "seq_lengths")


def packed_layout(model, args, kwargs) -> DocumentLayout | TreeLayout | None:
    """The block-diagonal layout of a forward's inputs when some row holds more than one real
    sequence, the :class:`~packmask.layout_tree.TreeLayout` of shared-prefix rows (no cache), else
    None. Layouts a per-sequence run cannot reproduce (general masks, bidirectional documents) raise
    :class:`~packmask.UnsupportedModelError`.

    >>> from packmask.testing import tiny_model
    >>> model = tiny_model("mamba")
    >>> ids = torch.zeros(1, 5, dtype=torch.long)
    >>> packed_layout(model, (), dict(input_ids=ids, seq_lengths=[[3, 2]])).cu_seqlens.tolist()
    [0, 3, 5]
    >>> packed_layout(model, (), dict(input_ids=ids)) is None
    True
    """
    bound = dict(zip(_forward_names(type(model)), args), **kwargs)
    ref = bound.get("input_ids")
    ref = ref if ref is not None else bound.get("inputs_embeds")
    if not isinstance(ref, torch.Tensor) or ref.dim() < 2:
        return None
    B, N = ref.shape[:2]
    mask = bound.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4) and mask.shape[-1] != N:
        _refuse(f"an attention_mask with {mask.shape[-1]} key columns for {N} tokens (a mask over a cache).")
    padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()) else None
    # the one resolver of every input form (packmask.inputs), as the attention layers read it
    layout = resolve_layout(B, N, **{k: bound[k] for k in _BOUNDARY_KEYS if bound.get(k) is not None},
                            device=ref.device)  # seq_lengths come as host lists: the plans index GPU states
    if layout is None:
        return None
    if isinstance(layout, DocumentLayout):
        starts = starts_from_cu_seqlens(layout.cu_seqlens, B, N)
        if padding is not None:
            starts = starts & padding[:, -N:]  # runs of padding are documents of their own: count real ones
        if not bool((starts.sum(-1) > 1).any()):
            return None
        if not layout.causal:
            _refuse("the mask is bidirectional inside each document, but recurrent layers are causal.")
        return layout
    if isinstance(layout, TreeLayout) and not layout.past:
        return layout  # shared-prefix rows: each root-to-leaf path runs as one sequence (.tree_paths)
    _refuse(f"the attention mask is a {type(layout).__name__} (a general mask, neither separate documents nor a "
            f"shared-prefix tree); a recurrent state can follow only a sequence or a tree's branches.")


@torch.compiler.disable  # under torch.compile: analysed eagerly, once per forward, before the graph runs
def enter_forward(model, args, kwargs):
    """Set the layout of this forward for the model's mixers (packmask's forward pre-hook calls it
    last). Returns ``(args, kwargs)``: on packed input ``use_cache`` becomes False (a packed row's
    cache would hold several sequences) and ``seq_lengths`` is consumed."""
    if not model.__dict__.get(HOOKED):
        return args, kwargs
    tokens = model.__dict__.setdefault(_TOKENS, [])
    tokens.append(None)  # popped by exit_forward, which runs even when this raises
    if _LAYOUT.get() is not None:
        return args, kwargs  # an outer model (ForCausalLM around its base model) set it already
    layout = packed_layout(model, args, kwargs)
    kwargs.pop("seq_lengths", None)
    if layout is not None:
        names = _forward_names(type(model))
        bound = dict(zip(names, args))
        for name in _MODEL_CACHE_ARGUMENTS:
            if kwargs.get(name, bound.get(name)) is not None:
                _refuse(f"packed input came with a cache ({name}); packed sequences cannot share one. Pass "
                        f"use_cache=False and no cache for packed training.")
        if kwargs.get("use_cache", bound.get("use_cache")) is True:
            _refuse("packed input came with use_cache=True; a cache of a packed row would mix its sequences. Pass "
                    "use_cache=False (or leave it out) for packed training.")
        if "use_cache" not in bound and ("use_cache" in names or _takes_kwargs(type(model))):
            kwargs["use_cache"] = False
        if kwargs.get("cu_seq_lens_q") is None and _takes_kwargs(type(model)) and isinstance(layout, DocumentLayout):
            # packed position_ids: some hybrids hand no position_ids to their attention layers (granitemoehybrid);
            # the boundaries reach packmask's attention as cu_seq_lens instead (the mixers drop them)
            kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = layout.cu_seqlens.to(torch.int32)
    if model.training and torch.is_grad_enabled():
        bind_checkpointing(model.__dict__.get(CHECKPOINTED, ()))
    tokens[-1] = _LAYOUT.set(layout if layout is not None else UNPACKED)
    return args, kwargs


def _reset_last(module, key: str) -> None:
    """Pop the ContextVar token an enter hook pushed under ``module.__dict__[key]`` and reset the layout to
    what it was before (``None`` tokens: the enter hook set nothing)."""
    tokens = module.__dict__.get(key)
    if tokens:
        token = tokens.pop()
        if token is not None:
            _LAYOUT.reset(token)


def exit_forward(model, args, output):
    """Reset the layout set by :func:`enter_forward` (a forward hook with ``always_call=True``)."""
    _reset_last(model, _TOKENS)


class _WithLayout:
    """``fn`` run with ``layout`` as the forward's layout (the original call and the recompute)."""

    def __init__(self, fn, layout):
        self.fn, self.layout = fn, layout

    def __call__(self, *args, **kwargs):
        token = _LAYOUT.set(self.layout)
        try:
            return self.fn(*args, **kwargs)
        finally:
            _LAYOUT.reset(token)


class CheckpointWithLayout:
    """A module's ``_gradient_checkpointing_func`` whose checkpointed function keeps the layout."""

    def __init__(self, checkpoint_func):
        self.checkpoint_func = checkpoint_func

    def __call__(self, fn, *args, **kwargs):
        layout = _LAYOUT.get()
        return self.checkpoint_func(fn if layout is None else _WithLayout(fn, layout), *args, **kwargs)


def bind_checkpointing(modules) -> None:
    """Wrap the ``_gradient_checkpointing_func`` of ``modules`` that have one (see the module doc)."""
    for module in modules:
        func = module.__dict__.get("_gradient_checkpointing_func")
        if func is not None and not isinstance(func, CheckpointWithLayout):
            module._gradient_checkpointing_func = CheckpointWithLayout(func)


def _first_tensor(args, kwargs):
    for value in (*args, kwargs.get("hidden_states"), *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value
    return None


def _identity(tensor: torch.Tensor):
    return (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor._version)


def replay_pre_hook(module, args, kwargs):
    """Remember each training-mode call's layout under its input's identity; set it again when the
    input comes back outside any forward (activation checkpointing's recompute)."""
    tokens = module.__dict__.setdefault(_REPLAY_TOKENS, [])
    tokens.append(None)
    tensor = _first_tensor(args, kwargs)
    if tensor is None:
        return None
    store = module.__dict__.setdefault(_REPLAY, OrderedDict())
    key = _identity(tensor)
    active = _LAYOUT.get()
    if active is not None:
        if module.training:
            store[key] = active
            store.move_to_end(key)
            while len(store) > _REPLAY_SIZE:
                store.popitem(last=False)
    elif key in store:
        tokens[-1] = _LAYOUT.set(store[key])
    return None


def replay_exit_hook(module, args, output):
    """Reset the layout a checkpoint recompute's pre-hook replayed (``always_call=True``)."""
    _reset_last(module, _REPLAY_TOKENS)
