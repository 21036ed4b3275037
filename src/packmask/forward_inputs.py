"""Deriving a packed forward's inputs before the model body runs (the model's forward pre-hook).

RoPE and learned positions are computed before attention, so ``position_ids`` that restart at 0 in
every packed sequence must exist before the model body runs. The pre-hook, attached to every
``PreTrainedModel`` by :mod:`packmask.integration`, fills them in when the caller omitted them:

* from a ``[B, N, N]`` / ``[B, 1, N, N]`` mask (its analysed layout's positions; a 3D mask is
  passed on as its 4D view, which transformers forwards untouched);
* from ``cu_seq_lens_q/k``, or from ``seq_lengths`` (turned into ``cu_seq_lens_q/k``);
* under ``torch.compile``, the packed layout is handed to the layers as ``cu_seq_lens`` tensors.

Every form is read by the one resolver, :func:`packmask.inputs.resolve_layout`. The hook also
opens the forward's :class:`~packmask.inputs.ForwardLayout` (:func:`packmask.inputs.current_forward`, not
under ``torch.compile``), for layers that are not attention; :func:`close_forward_hook` closes it.

On models not on ``attn_implementation="packmask"`` it only runs :mod:`packmask.guards`.

    tokens        a0 a1 a2 b0 b1 | seq_lengths [[3, 2]]
    position_ids   0  1  2  0  1   (derived)
    cu_seq_lens    [0, 3, 5]       (derived)
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from .backends import refresh_traced_request, requested_backend
from .errors import PackmaskError, UnsupportedModelError
from .guards import check_stock_forward
from .inputs import (LAYOUT_KWARG, ForwardLayout, enter_forward, exit_forward, is_packed, layout_from_cu_seq_lens,
                     layout_from_seq_lengths, refresh_traced_state, resolve_layout)
from .kvcache import CACHE_NAMES, cache_keyword, check_mask_against_cache
from .layout import DocumentLayout, TreeLayout
from .recurrent.context import HOOKED as RECURRENT_HOOKED
from .support import check_packed_input, position_offset

__all__ = ["NAME", "LAYOUT_KWARG", "uses_packmask", "derive_inputs_hook", "close_forward_hook", "forward_params"]

NAME = "packmask"

_BOUNDARY_KEYS = ("attention_mask", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q")
_BOUNDARY_TENSORS = _BOUNDARY_KEYS[:4]  # the ones that live beside the tokens (max_length_q is a host number)
_OPEN = "_packmask_open_forwards"  # per model: the tokens of the forwards its pre-hook opened


@lru_cache(maxsize=None)
def forward_params(cls) -> tuple[tuple[str, ...], bool, bool]:
    """``(parameter names, takes position_ids, takes **kwargs)`` of ``cls.forward``."""
    params = inspect.signature(cls.forward).parameters
    names = tuple(p for p in params if p != "self")
    return names, "position_ids" in params, any(p.kind == p.VAR_KEYWORD for p in params.values())


def uses_packmask(model) -> bool:
    """Whether ``model`` runs ``attn_implementation="packmask"`` (for any of its sub-configs)."""
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, dict):
        return NAME in impl.values()
    # recurrent: an attention-free model enabled by packmask.enable (its mixers run per packed sequence)
    return impl == NAME or bool(getattr(model, "_packmask_recurrent_only", False))


def derive_inputs_hook(model, args, kwargs):
    """The model's forward pre-hook: fill in ``position_ids`` (and varlen keys from ``seq_lengths``)
    when the user omitted them, and open the forward's :class:`~packmask.inputs.ForwardLayout`."""
    if not uses_packmask(model):  # stock models: the guards only (traceable: no graph break)
        return _derive_inputs(model, args, kwargs)
    return _packmask_pre_forward(model, args, kwargs, torch.compiler.is_compiling())


def _enter_recurrent(model, derived, args, kwargs):  # recurrent: this forward's layout for packmask.recurrent
    if not model.__dict__.get(RECURRENT_HOOKED):
        return derived
    from .recurrent import enter_forward
    return enter_forward(model, *(derived if derived is not None else (args, kwargs)))


@torch.compiler.disable
def _packmask_pre_forward(model, args, kwargs, compiling: bool):
    if compiling:
        # no ForwardLayout under torch.compile: closing it would break the graph after the model body
        return _enter_recurrent(model, _derive_inputs_outside_graph(model, args, kwargs), args, kwargs)
    open_forwards = model.__dict__.setdefault(_OPEN, [])
    open_forwards.append(None)  # first: the post-hook pops one entry per call, even if this raises
    args, kwargs = _derive_inputs(model, args, kwargs)
    names = forward_params(type(model))[0]
    bound = dict(zip(names, args), **kwargs)
    ref = _tokens(bound)
    forward = None
    if ref is not None:
        forward = ForwardLayout(ref.shape[0], ref.shape[1], {k: bound[k] for k in _BOUNDARY_KEYS
                                                             if bound.get(k) is not None})
    open_forwards[-1] = enter_forward(forward)
    return _enter_recurrent(model, (args, kwargs), args, kwargs)


def close_forward_hook(model, args, output):
    """The model's forward hook (always called, also when the forward raised): closes the forward
    :func:`derive_inputs_hook` opened."""
    if model.__dict__.get(_OPEN):
        _close_forward(model)
    return None


@torch.compiler.disable
def _close_forward(model):
    token = model.__dict__[_OPEN].pop()
    if token is not None:
        exit_forward(token)


def _tokens(bound: dict):
    ref = bound.get("input_ids")
    return ref if ref is not None else bound.get("inputs_embeds")


def _set(names, args, kwargs, name, value):
    """Replace the argument ``name`` wherever the caller passed it (keyword or position)."""
    if name in kwargs or name not in names[:len(args)]:
        kwargs[name] = value
        return args, kwargs
    i = names.index(name)
    return args[:i] + (value,) + args[i + 1:], kwargs


@torch.compiler.disable
def _derive_inputs_outside_graph(model, args, kwargs):
    """Under ``torch.compile``: the hook runs eagerly (one graph break before the model body, never
    inside a layer) and hands the packed layout to the layers as ``cu_seq_lens_q/k`` tensors, marked
    dynamic in length, so a batch with another document split reuses the compiled graph. The host
    ints ``max_length_q/k`` are dropped: they would specialise the graph on the longest document."""
    refresh_traced_request()
    refresh_traced_state()
    args, kwargs = _derive_inputs(model, args, kwargs)
    names, _, takes_kwargs = forward_params(type(model))
    if not takes_kwargs:
        return args, kwargs
    bound = dict(zip(names, args), **kwargs)
    ref = _tokens(bound)
    if ref is None:
        return args, kwargs
    B, N = ref.shape[:2]
    mask = bound.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and bound.get("cu_seq_lens_q") is None:
        layout = resolve_layout(B, N, attention_mask=mask)
        if isinstance(layout, TreeLayout):  # tree-kernel: the layers get the tree kernel's inputs as tensors
            from .backends.tree_triton import NAME as TREE_KERNEL, TREE_KWARG, compiled_model_inputs
            forced = requested_backend(model) == TREE_KERNEL  # opt-in until measured on a GPU (backends.costs)
            # recurrent: the mixers read the tree from the mask (packmask.recurrent.tree_paths): keep it
            forced = forced and not model.__dict__.get(RECURRENT_HOOKED)
            tree = compiled_model_inputs(model, layout, ref.device, model.training) if forced else None
            if tree is None:
                return args, kwargs  # the mask itself goes to the layers
            kwargs[TREE_KWARG] = tree
            return _set(names, args, kwargs, "attention_mask", None)
        if not (isinstance(layout, DocumentLayout) and layout.causal):
            return args, kwargs  # not block-diagonal causal: the mask itself goes to the layers
        args, kwargs = _set(names, args, kwargs, "attention_mask", None)
    else:
        padding = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        layout = resolve_layout(B, N, attention_mask=padding, position_ids=bound.get("position_ids"),
                                cu_seq_lens_q=bound.get("cu_seq_lens_q"), cu_seq_lens_k=bound.get("cu_seq_lens_k"),
                                max_length_q=bound.get("max_length_q"))
    if not is_packed(layout):
        return args, kwargs
    cu = layout.cu_seqlens.to(ref.device)
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = cu
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    return args, kwargs


def _derive_inputs(model, args, kwargs):
    names, takes_positions, _ = forward_params(type(model))
    if not uses_packmask(model):  # help with the mistakes a stock sdpa / eager model would hide (guards.py)
        if kwargs.get(LAYOUT_KWARG) is not None:  # its attention would ignore the layout: wrong, silently
            raise PackmaskError(
                f"{type(model).__name__} got {LAYOUT_KWARG!r} (a context-parallel batch) but runs attn_implementation="
                f"{getattr(model.config, '_attn_implementation', None)!r}: build it with attn_implementation={NAME!r} "
                f"or call packmask.enable(model).")
        return check_stock_forward(model, names, args, kwargs)
    if "cache" in kwargs and "cache" not in names and cache_keyword(names) == "past_key_values":
        # transformers before 5.2x names it past_key_values: cache= would flow on through **kwargs unread
        # and the model would run without the cached tokens
        if kwargs.get("past_key_values") is not None:
            raise PackmaskError("got both cache= and past_key_values=; pass the cache once.")
        kwargs["past_key_values"] = kwargs.pop("cache")
    bound = dict(zip(names, args), **kwargs)
    ref = _tokens(bound)
    for name in _BOUNDARY_TENSORS if ref is not None else ():
        # boundaries built on the host beside tokens on the GPU (a mask, cu_seq_lens): the layers and the
        # recurrent plans would mix devices and fail deep in a kernel
        value = bound.get(name)
        if isinstance(value, torch.Tensor) and value.device != ref.device:
            bound[name] = value.to(ref.device)
            args, kwargs = _set(names, args, kwargs, name, bound[name])
    mask = bound.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        # pass a [B, N, N] mask on as its [B, 1, N, N] view: transformers forwards 4D masks untouched, while
        # some models reshape anything below 4D as a 2D padding mask (ctrl: mask.view(B, -1))
        mask = mask[:, None]
        args, kwargs = _set(names, args, kwargs, "attention_mask", mask)
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and ref is not None:
        # a per-sample mask with a KV cache: its columns must be the cached tokens, then the new ones
        cache = next((c for c in (bound.get(n) for n in CACHE_NAMES) if c is not None), None)
        check_mask_against_cache(mask, ref.shape[1], cache)
    from .recurrent import ensure_installed  # recurrent: mixers run per packed sequence from the first forward
    ensure_installed(model)
    external = kwargs.get(LAYOUT_KWARG)
    if external is not None and hasattr(external, "check_model"):
        external.check_model(model)  # e.g. context parallelism refuses recurrent families by name
    # refuse models that cannot isolate packed sequences (recurrent layers, attention outside the interface)
    check_packed_input(model, mask=mask, position_ids=bound.get("position_ids"),
                       cu_seq_lens=kwargs.get("cu_seq_lens_q"), seq_lengths=kwargs.get("seq_lengths"),
                       batch_size=ref.shape[0] if ref is not None else None)
    seq_lengths = kwargs.pop("seq_lengths", None)
    if not takes_positions:
        if seq_lengths is not None and model.__dict__.get(RECURRENT_HOOKED):  # recurrent: read by
            kwargs["seq_lengths"] = seq_lengths  # packmask.recurrent.enter_forward (an attention-free model)
            return args, kwargs
        if seq_lengths is not None:  # it would flow on through **kwargs unread: the row would run as one sequence
            raise UnsupportedModelError(
                f"{type(model).__name__}.forward takes no position_ids, so packmask cannot restart positions per "
                f"packed sequence from seq_lengths. Train this model unpacked (one sequence per row).")
        return args, kwargs
    if seq_lengths is not None and ref is not None:
        B, N = ref.shape[:2]
        layout = layout_from_seq_lengths(seq_lengths, N, device=ref.device)
        kwargs.setdefault("cu_seq_lens_q", layout.cu_seqlens)
        kwargs.setdefault("cu_seq_lens_k", layout.cu_seqlens)
        kwargs.setdefault("max_length_q", layout.max_seqlen)
        kwargs.setdefault("max_length_k", layout.max_seqlen)
        if kwargs["cu_seq_lens_q"] is layout.cu_seqlens:  # the layers find this analysis on the tensor
            layout_from_cu_seq_lens(layout.cu_seqlens, B, N, max_length_q=layout.max_seqlen)
    if bound.get("position_ids") is not None:
        return args, kwargs
    B, N = ref.shape[:2] if ref is not None else (None, None)
    derivable = mask if isinstance(mask, torch.Tensor) and mask.dim() == 4 else None
    if derivable is None and (ref is None or kwargs.get("cu_seq_lens_q") is None):
        return args, kwargs
    layout = resolve_layout(B, N, attention_mask=derivable, cu_seq_lens_q=kwargs.get("cu_seq_lens_q"),
                            cu_seq_lens_k=kwargs.get("cu_seq_lens_k"), max_length_q=kwargs.get("max_length_q"),
                            packed_only=False)
    if layout is not None:
        positions = layout.position_ids
        offset = position_offset(model)  # RoBERTa-style embeddings start at padding_idx + 1
        positions = positions + offset if offset else positions
        kwargs["position_ids"] = positions.to(ref.device if ref is not None else positions.device)
    return args, kwargs
