"""Deriving a packed forward's inputs before the model body runs (the model's forward pre-hook).

RoPE and learned positions are computed before attention, so ``position_ids`` that restart at 0 in
every packed sequence must exist before the model body runs. The pre-hook, attached to every
``PreTrainedModel`` by :mod:`packmask.integration`, fills them in when the caller omitted them:

* from a ``[B, N, N]`` / ``[B, 1, N, N]`` mask (its analysed layout's positions; a 3D mask is
  passed on as its 4D view, which transformers forwards untouched);
* from ``cu_seq_lens_q/k``, or from ``seq_lengths`` (turned into ``cu_seq_lens_q/k``);
* under ``torch.compile``, the packed layout is handed to the layers as ``cu_seq_lens`` tensors.

On models not on ``attn_implementation="packmask"`` it only runs :mod:`packmask.guards`.

    tokens        a0 a1 a2 b0 b1 | seq_lengths [[3, 2]]
    position_ids   0  1  2  0  1   (derived)
    cu_seq_lens    [0, 3, 5]       (derived)
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from .errors import PackmaskError, UnsupportedModelError
from .guards import check_stock_forward
from .kvcache import check_mask_against_cache
from .layout import DocumentLayout, TreeLayout, analyse_mask, cached_on
from .segments import starts_from_ids, starts_from_position_ids
from .support import check_packed_input, position_offset

NAME = "packmask"

#: Model keyword through which a caller hands packmask's attention a ready-made layout object that
#: brings its own kernel: ``layout.attend(module, q, k, v, spec=..., training=...) -> [B, N, H, D]``.
#: transformers forwards a model's extra keywords to every attention call, so no model code is
#: touched. Context parallelism (:mod:`packmask.distributed.context_parallel`) uses it; while a
#: context-parallel context is active, an attention call without it raises (a model that does not
#: forward its keywords to attention would otherwise attend to this rank's tokens only).
LAYOUT_KWARG = "packmask_layout"
_external_layout = {"required": 0}


def _layout_from_cu(kwargs, B, N, causal=True) -> DocumentLayout:
    """The layout of ``cu_seq_lens_q/k`` (validated once per forward: the check syncs the device)."""
    cu = kwargs["cu_seq_lens_q"]
    if torch.compiler.is_compiling():
        # traced layers: the forward pre-hook validated cu_seq_lens eagerly, once per forward
        # (_derive_inputs_outside_graph). Build the layout from tensors only: no host sync, nothing
        # stored on tensors. The longest document is unknown without a sync; the row length bounds it.
        return DocumentLayout(cu.to(torch.int32), N, B, N, causal)

    def build():
        cu_k = kwargs.get("cu_seq_lens_k")
        if cu_k is not None and cu_k is not cu and not torch.equal(cu_k, cu):
            raise PackmaskError("cu_seq_lens_k differs from cu_seq_lens_q; packmask packs self-attention, where "
                                "they must be equal.")
        return DocumentLayout.from_cu_seqlens(cu, B, N, max_seqlen=kwargs.get("max_length_q"), causal=causal)
    return cached_on(cu, ("cu", B, N, causal), build)


def layout_from_positions_cached(pos, B: int, causal: bool, padding, padding_owner):
    """:func:`_layout_from_positions`, cached on ``pos`` per padding tensor. The entry keeps
    ``padding_owner`` (the tensor the padding was read from) alive: a key on its ``id`` alone went
    stale when a later forward's padding tensor was allocated at the freed address."""
    N = pos.shape[-1]
    if padding is None:
        return cached_on(pos, ("pos", B, causal, None), lambda: _layout_from_positions(pos.expand(B, N), None, causal))
    key = ("pos", B, causal, id(padding_owner), padding_owner._version)
    return cached_on(pos, key, lambda: (padding_owner, _layout_from_positions(pos.expand(B, N), padding, causal)))[1]


def _layout_from_positions(pos, padding, causal):
    layout = DocumentLayout.from_position_ids(pos, causal=causal)
    B = pos.shape[0]
    if len(layout.cu_seqlens) - 1 == B:
        return None  # one sequence per row: nothing is packed
    if padding is None:
        return layout
    padding = padding[:, -pos.shape[1]:]
    # padding runs become documents of their own (their outputs are never used: labels are -100)
    pos_start = starts_from_position_ids(pos)
    pad_change = starts_from_ids(padding)  # every run of padding or of real tokens begins a document
    bad = pad_change & padding & ~pos_start  # a real token continuing a sequence across padding
    if bool(bad.any()):
        b, i = torch.nonzero(bad)[0].tolist()
        raise PackmaskError(
            f"row {b} has padding inside a packed sequence (before token {i}); put padding at the end of the row or "
            f"between sequences, or drop the 2D attention_mask and pass a [B, N, N] mask.")
    return DocumentLayout._from_start_flags(pos_start | pad_change, causal=causal)

@lru_cache(maxsize=None)
def _forward_params(cls) -> tuple[tuple[str, ...], bool]:
    params = inspect.signature(cls.forward).parameters
    names = tuple(p for p in params if p != "self")
    return names, "position_ids" in params


def _uses_packmask(model) -> bool:
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if isinstance(impl, dict):
        return NAME in impl.values()
    return impl == NAME


def _derive_inputs_hook(model, args, kwargs):
    """Fill in ``position_ids`` (and varlen keys from ``seq_lengths``) when the user omitted them."""
    if torch.compiler.is_compiling() and _uses_packmask(model):
        return _derive_inputs_outside_graph(model, args, kwargs)
    return _derive_inputs(model, args, kwargs)


@torch.compiler.disable
def _derive_inputs_outside_graph(model, args, kwargs):
    """Under ``torch.compile``: the hook runs eagerly (one graph break before the model body, never
    inside a layer) and hands the packed layout to the layers as ``cu_seq_lens_q/k`` tensors, marked
    dynamic in length, so a batch with another document split reuses the compiled graph. The host
    ints ``max_length_q/k`` are dropped: they would specialise the graph on the longest document."""
    from .backends import refresh_traced_request
    refresh_traced_request()
    derived = _derive_inputs(model, args, kwargs)
    args, kwargs = derived if derived is not None else (args, kwargs)
    if not _uses_packmask(model) or not _forward_takes_kwargs(type(model)):
        return args, kwargs
    names, _ = _forward_params(type(model))
    bound = dict(zip(names, args))
    ref = kwargs.get("input_ids", bound.get("input_ids"))
    ref = ref if ref is not None else kwargs.get("inputs_embeds", bound.get("inputs_embeds"))
    if ref is None:
        return args, kwargs
    B, N = ref.shape[:2]
    mask = kwargs.get("attention_mask", bound.get("attention_mask"))
    layout = None
    if kwargs.get("cu_seq_lens_q") is not None:
        layout = _layout_from_cu(kwargs, B, N)
    elif isinstance(mask, torch.Tensor) and mask.dim() == 4:
        found = cached_on(mask, "layout", lambda: analyse_mask(mask, B, N))
        tree = None
        if isinstance(found, TreeLayout):  # tree-kernel: the layers get the tree kernel's inputs as tensors
            from .backends.tree_triton import TREE_KWARG, compiled_model_inputs
            tree = compiled_model_inputs(model, found, ref.device, model.training)
            if tree is not None:
                kwargs[TREE_KWARG] = tree
        if (isinstance(found, DocumentLayout) and found.causal) or tree is not None:
            layout = found if tree is None else None
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = None
            else:
                i = names.index("attention_mask")
                args = args[:i] + (None,) + args[i + 1:]
    else:
        pos = kwargs.get("position_ids", bound.get("position_ids"))
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == N:
            padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()) else None
            layout = layout_from_positions_cached(pos, B, True, padding, mask)
    if layout is None or len(layout.cu_seqlens) - 1 <= B:
        return args, kwargs
    cu = layout.cu_seqlens.to(ref.device)
    torch._dynamo.maybe_mark_dynamic(cu, 0)
    kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = cu
    kwargs.pop("max_length_q", None)
    kwargs.pop("max_length_k", None)
    return args, kwargs


@lru_cache(maxsize=None)
def _forward_takes_kwargs(cls) -> bool:
    return any(p.kind == p.VAR_KEYWORD for p in inspect.signature(cls.forward).parameters.values())


def _derive_inputs(model, args, kwargs):
    names, takes_positions = _forward_params(type(model))
    if not _uses_packmask(model):  # help with the mistakes a stock sdpa / eager model would hide (guards.py)
        if kwargs.get(LAYOUT_KWARG) is not None:  # its attention would ignore the layout: wrong, silently
            raise PackmaskError(
                f"{type(model).__name__} got {LAYOUT_KWARG!r} (a context-parallel batch) but runs attn_implementation="
                f"{getattr(model.config, '_attn_implementation', None)!r}: build it with attn_implementation={NAME!r} "
                f"or call packmask.enable(model).")
        return check_stock_forward(model, names, args, kwargs)
    bound = dict(zip(names, args))
    mask = kwargs.get("attention_mask", bound.get("attention_mask"))
    ids = kwargs.get("input_ids", bound.get("input_ids"))
    embeds = kwargs.get("inputs_embeds", bound.get("inputs_embeds"))
    ref = ids if ids is not None else embeds
    if isinstance(mask, torch.Tensor) and mask.dim() == 3:
        # pass a [B, N, N] mask on as its [B, 1, N, N] view: transformers forwards 4D masks untouched, while
        # some models reshape anything below 4D as a 2D padding mask (ctrl: mask.view(B, -1))
        mask = mask[:, None]
        if "attention_mask" in kwargs:
            kwargs["attention_mask"] = mask
        else:
            i = names.index("attention_mask")
            args = args[:i] + (mask,) + args[i + 1:]
    if isinstance(mask, torch.Tensor) and mask.dim() == 4 and ref is not None:
        # a per-sample mask with a KV cache: its columns must be the cached tokens, then the new ones
        cache = next((c for c in (kwargs.get(n, bound.get(n)) for n in ("cache", "past_key_values")) if c is not None),
                     None)
        check_mask_against_cache(mask, ref.shape[1], cache)
    external = kwargs.get(LAYOUT_KWARG)
    if external is not None and hasattr(external, "check_model"):
        external.check_model(model)  # e.g. context parallelism refuses recurrent families by name
    # refuse models that cannot isolate packed sequences (recurrent layers, attention outside the interface)
    check_packed_input(model, mask=mask, position_ids=kwargs.get("position_ids", bound.get("position_ids")),
                       cu_seq_lens=kwargs.get("cu_seq_lens_q"), seq_lengths=kwargs.get("seq_lengths"),
                       batch_size=ref.shape[0] if ref is not None else None)
    seq_lengths = kwargs.pop("seq_lengths", None)
    if not takes_positions:
        if seq_lengths is not None:  # it would flow on through **kwargs unread: the row would run as one sequence
            raise UnsupportedModelError(
                f"{type(model).__name__}.forward takes no position_ids, so packmask cannot restart positions per "
                f"packed sequence from seq_lengths. Train this model unpacked (one sequence per row).")
        return args, kwargs
    if seq_lengths is not None and ref is not None:
        B, N = ref.shape[:2]
        lengths = seq_lengths.tolist() if isinstance(seq_lengths, torch.Tensor) else seq_lengths
        layout = DocumentLayout.from_seq_lengths(lengths, N, device=ref.device)
        kwargs.setdefault("cu_seq_lens_q", layout.cu_seqlens)
        kwargs.setdefault("cu_seq_lens_k", layout.cu_seqlens)
        kwargs.setdefault("max_length_q", layout.max_seqlen)
        kwargs.setdefault("max_length_k", layout.max_seqlen)
        cached_on(layout.cu_seqlens, ("cu", B, N, True), lambda: layout)
    if kwargs.get("position_ids", bound.get("position_ids")) is not None:
        return args, kwargs
    positions = None
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4):
        B = ref.shape[0] if ref is not None else None
        N = ref.shape[1] if ref is not None else None
        positions = cached_on(mask, "layout", lambda: analyse_mask(mask, B, N)).position_ids
    elif kwargs.get("cu_seq_lens_q") is not None and ref is not None:
        positions = _layout_from_cu(kwargs, *ref.shape[:2]).position_ids
    if positions is not None:
        offset = position_offset(model)  # RoBERTa-style embeddings start at padding_idx + 1
        positions = positions + offset if offset else positions
        kwargs["position_ids"] = positions.to(ref.device if ref is not None else positions.device)
    return args, kwargs

