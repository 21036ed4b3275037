"""The transformers integration: ``attn_implementation="packmask"``.

Registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``; no
model code is edited. Data flows one way:

1. **Model forward pre-hook** (attached to every ``PreTrainedModel`` through PyTorch's public
   module-registration hook): when the model runs with ``"packmask"`` and ``position_ids`` are
   omitted, they are derived from the mask / ``cu_seq_lens`` / ``seq_lengths`` so that every
   packed sequence starts at position 0 (RoPE and learned positions are computed before
   attention, so this must happen before the model body runs).
2. **Mask interface** (once per mask type per forward, called by ``create_causal_mask`` & co.):
   a ``[B, N, N]`` mask is analysed into a compact layout; a 2D padding mask is kept lazily.
3. **Attention function** (per layer): resolves the layout (cached on the input tensors, so
   only the first layer pays) and dispatches to a kernel (:mod:`packmask.backends`).
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .backends import AttentionSpec, attend, begin_forward
from .errors import PackmaskError, UnsupportedModelError
from .guards import check_construction, check_stock_forward
from .kvcache import check_mask_against_cache
from .layout import DocumentLayout, GeneralLayout, TreeLayout, analyse_mask, cached_on
from .segments import starts_from_ids, starts_from_position_ids
from .support import check_packed_input, position_offset

__all__ = ["NAME", "LAYOUT_KWARG", "PackmaskMask", "packmask_attention", "packmask_mask", "enable", "register"]

NAME = "packmask"


class PackmaskMask:
    """What the mask interface hands to the model's layers (like flex's ``BlockMask``, not a tensor).

    Either a ``layout`` analysed from a user's ``[B, N, N]`` mask, or the arguments of
    transformers' own mask for the ordinary path, materialised only if a layer needs it.
    """

    def __init__(self, batch_size, q_length, kv_length, layout=None, mask_kwargs=None, padding_mask=None):
        self.layout = layout
        self.padding_mask = padding_mask  # 2D [B, kv] bool, None when there is no padding
        self._mask_kwargs = mask_kwargs
        self._dense = None
        self.shape = (batch_size, 1, q_length, kv_length)

    def standard_mask(self):
        """transformers' 4D bool mask for the unpacked path (None = plain causal)."""
        if self._mask_kwargs is not None:
            self._dense = sdpa_mask(**self._mask_kwargs)
            self._mask_kwargs = None
        return self._dense

    def __repr__(self):
        return f"PackmaskMask(shape={self.shape}, layout={type(self.layout).__name__ if self.layout else None})"


def packmask_mask(batch_size, q_length, kv_length, q_offset=0, kv_offset=0, mask_function=None,
                  attention_mask=None, **kwargs):
    """``AttentionMaskInterface`` entry: called by ``create_causal_mask`` & co. once per forward."""
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 3:
        # [B, N, N] packed rows, or [B, N, past + N] new tokens over a cache (checked by the forward pre-hook)
        layout = cached_on(attention_mask, "layout",
                           lambda: _on_device(analyse_mask(attention_mask, batch_size, q_length), kwargs.get("device")))
        return PackmaskMask(batch_size, q_length, kv_length, layout=layout)
    padding = None
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 2:
        if not bool(attention_mask.all()):
            padding = attention_mask.bool()
    mask_kwargs = dict(kwargs, batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset,
                       kv_offset=kv_offset, attention_mask=attention_mask)
    if mask_function is not None:
        mask_kwargs["mask_function"] = mask_function
    mask_kwargs.pop("dtype", None)
    mask_kwargs.pop("config", None)
    return PackmaskMask(batch_size, q_length, kv_length, mask_kwargs=mask_kwargs, padding_mask=padding)


def _on_device(layout, device):
    if device is not None and isinstance(layout, DocumentLayout):
        return layout.to(device)
    return layout


_SINK_KWARGS = ("s_aux", "sinks")  # per-head sink logits (gpt-oss): honoured by the eager backend


def _resolve_layout(module, attention_mask, kwargs, B, N, kv_len, device, sliding_window=None):
    """The packed layout of this forward, or None for the ordinary path. Cached on the inputs."""
    causal = getattr(module, "is_causal", True)
    if isinstance(attention_mask, PackmaskMask) and attention_mask.layout is not None:
        attention_mask = attention_mask.layout
    if isinstance(attention_mask, torch.Tensor):  # a user's [B, 1, N, K] mask, passed as-is by transformers
        if attention_mask.dim() != 4 or attention_mask.shape[-2] != N or attention_mask.shape[-1] < N:
            raise PackmaskError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not match the inputs "
                f"[batch={B}, tokens={N}]: pass [B, N, N] or [B, 1, N, N] (with a cache: [B, 1, N, past + N]).")
        attention_mask = cached_on(attention_mask, "layout", lambda: analyse_mask(attention_mask, B, N))
    if isinstance(attention_mask, (DocumentLayout, GeneralLayout, TreeLayout)):
        layout = attention_mask
        K = layout.key_len if isinstance(layout, TreeLayout) else layout.seq_len
        # a tree's keys may be a sliding cache layer's last kv_len < K columns, or a static buffer's kv_len > K
        if kv_len != K and not (isinstance(layout, TreeLayout) and (kv_len > K or sliding_window is not None)):
            raise PackmaskError(
                f"{type(module).__name__} has {kv_len} keys but the attention_mask has {K} key columns: a mask with a "
                f"cache needs [B, 1, N, past + N] columns (past = cached tokens); a [B, N, N] mask needs no cache.")
        return layout
    if N != kv_len:  # decoding against a cache: nothing is packed — unless the inputs say otherwise
        from .support import is_packed_input
        if is_packed_input(position_ids=kwargs.get("position_ids"), cu_seq_lens=kwargs.get("cu_seq_lens_q"),
                           batch_size=B):
            raise UnsupportedModelError(
                f"{type(module).__name__} attends from {N} packed queries to {kv_len} keys (a cache or keys shared "
                f"from another pass): packmask cannot tell which of those keys belong to which sequence. Pass "
                f"use_cache=False for packed training, or train this model unpacked.")
        return None
    if kwargs.get("cu_seq_lens_q") is not None:
        layout = _layout_from_cu(kwargs, B, N, causal)
        return layout if len(layout.cu_seqlens) - 1 > B else None
    pos = kwargs.get("position_ids")
    if pos is not None and pos.dim() == 3 and pos.shape[-1] == N and cached_on(
            pos, "restarts", lambda: bool(starts_from_position_ids(pos[0])[:, 1:].any())):
        # multimodal RoPE: [3, B, N] (temporal, height, width) positions; image tokens share positions, so
        # sequence starts cannot be read from them
        raise UnsupportedModelError(
            "packed rows with 3D (multimodal RoPE) position_ids and no mask: packmask cannot tell where each sequence "
            "starts from them. Pass attention_mask=packmask.block_diagonal_mask(seq_lengths) (or [B, 1, N, N]) or "
            "cu_seq_lens_q/k together with the 3D position_ids.")
    if pos is None or pos.dim() != 2 or pos.shape[-1] != N:
        return None
    padding = attention_mask.padding_mask if isinstance(attention_mask, PackmaskMask) else None
    key = ("pos", B, causal, None if padding is None else id(padding))
    return cached_on(pos, key, lambda: _layout_from_positions(pos.expand(B, N), padding, causal))


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


#: Model keyword through which a caller hands packmask's attention a ready-made layout object that
#: brings its own kernel: ``layout.attend(module, q, k, v, spec=..., training=...) -> [B, N, H, D]``.
#: transformers forwards a model's extra keywords to every attention call, so no model code is
#: touched. Context parallelism (:mod:`packmask.distributed.context_parallel`) uses it; while a
#: context-parallel context is active, an attention call without it raises (a model that does not
#: forward its keywords to attention would otherwise attend to this rank's tokens only).
LAYOUT_KWARG = "packmask_layout"
_external_layout = {"required": 0}


def packmask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       sliding_window=None, softcap=None, **kwargs):
    """``AttentionInterface`` entry: one call per layer."""
    sinks = next((kwargs[name] for name in _SINK_KWARGS if kwargs.get(name) is not None), None)
    if query.dim() != 4:  # the mask was applied to hidden states before attention (esm's token dropout)
        raise UnsupportedModelError(
            f"{type(module).__name__} got queries of shape {tuple(query.shape)}, not [batch, heads, tokens, head_dim]: "
            f"the model uses attention_mask outside attention (as a padding mask on its hidden states), so a packed "
            f"[B, N, N] mask cannot reach it intact. Train this model unpacked (2D padding mask).")
    B, H, N, D = query.shape
    kv_len = key.shape[2]
    external = kwargs.get(LAYOUT_KWARG)
    if external is None and _external_layout["required"]:
        raise PackmaskError(
            f"{type(module).__name__} ran packmask attention without the {LAYOUT_KWARG!r} keyword while context "
            f"parallelism is active: pass the whole batch from ContextParallel.shard(...) to the model; a model whose "
            f"forward does not hand its keywords on to attention cannot be context-parallel.")
    layout = None if external is not None else _resolve_layout(module, attention_mask, kwargs, B, N, kv_len,
                                                                query.device, sliding_window)
    window = int(sliding_window) if sliding_window else None
    if layout is not None and window is not None and window >= getattr(layout, "key_len", N):
        window = None  # no document (no root-to-leaf path over the cache) is longer than the window
    spec = AttentionSpec(
        scale=float(scaling) if scaling is not None else D ** -0.5,
        dropout=float(dropout or 0.0),
        softcap=float(softcap) if softcap else None,
        sliding_window=window,
        is_causal=getattr(module, "is_causal", True),
        sinks=sinks,
    )
    if external is not None:  # a layout with its own kernel (context parallelism): N is this rank's share
        if sinks is not None:
            raise UnsupportedModelError(f"{type(module).__name__} has attention sinks, which {type(external).__name__} "
                                        f"does not implement.")
        return external.attend(module, query, key, value, spec=spec, training=module.training), None
    standard = None
    if layout is None and isinstance(attention_mask, PackmaskMask):
        standard = attention_mask.standard_mask()
        if standard is not None and standard.dim() == 4 and standard.shape[-1] != kv_len:
            standard = standard[..., :kv_len]
    out = attend(query, key, value, layout, spec, training=module.training, standard_mask=standard, module=module)
    return out, None


# ---------------------------------------------------------------------------------------------
# Deriving position_ids before the model body runs
# ---------------------------------------------------------------------------------------------

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
        if isinstance(found, DocumentLayout) and found.causal:
            layout = found
            if "attention_mask" in kwargs:
                kwargs["attention_mask"] = None
            else:
                i = names.index("attention_mask")
                args = args[:i] + (None,) + args[i + 1:]
    else:
        pos = kwargs.get("position_ids", bound.get("position_ids"))
        if isinstance(pos, torch.Tensor) and pos.dim() == 2 and pos.shape[-1] == N:
            padding = mask.bool() if isinstance(mask, torch.Tensor) and mask.dim() == 2 and not bool(mask.all()) else None
            layout = cached_on(pos, ("pos", B, True, None if padding is None else id(mask)),
                               lambda: _layout_from_positions(pos.expand(B, N), padding, True))
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
    begin_forward()  # a backend(...) block remembered on a reused input's layout ends here
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


def _attach_hook(model) -> None:
    if not getattr(model, "_packmask_hooked", False):
        check_construction(model, NAME)  # before the layers exist: falcon & co. would raise a raw KeyError
        model.register_forward_pre_hook(_derive_inputs_hook, with_kwargs=True, prepend=True)
        model._packmask_hooked = True


def _on_submodule_registered(module, name, submodule):
    # Runs while models are being constructed (never per forward). Every PreTrainedModel gets the
    # cheap pre-hook, which does nothing unless its config selects "packmask".
    if isinstance(module, PreTrainedModel):
        _attach_hook(module)
    return None


def enable(model, backend: str | None = None):
    """Switch an existing model to packmask (needed only for models built before ``import packmask``).

    Sets ``attn_implementation="packmask"`` and attaches the position-deriving hook to every
    ``PreTrainedModel`` inside it. ``backend`` forces one kernel for this model's layers (see
    :mod:`packmask.backends`; a ``with packmask.backend(...)`` block still wins). Returns the model.
    """
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            _attach_hook(m)
    model.set_attn_implementation(NAME)
    if not _uses_packmask(model):  # e.g. falcon: attention classes chosen by name at construction
        from .support import unsupported_reason
        raise UnsupportedModelError(
            f"{type(model).__name__} stayed on attn_implementation={model.config._attn_implementation!r}: transformers "
            f"cannot switch this model's attention after construction. {unsupported_reason(model) or ''} Build it with "
            f"attn_implementation='packmask' if the family supports it (check with packmask.verify), or train unpacked.")
    if backend is not None:
        from .backends import _check_name
        _check_name(backend)
        for m in model.modules():  # read per layer call by the dispatcher (packmask.backends.requested_backend)
            m._packmask_backend = backend
    return model


_registered = {}


def register() -> None:
    """Register ``"packmask"`` with transformers (idempotent; done by ``import packmask``)."""
    if _registered:
        return
    AttentionInterface.register(NAME, packmask_attention)
    AttentionMaskInterface.register(NAME, packmask_mask)
    _registered["hook"] = torch.nn.modules.module.register_module_module_registration_hook(_on_submodule_registered)


register()
