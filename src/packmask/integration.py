"""The transformers integration: ``attn_implementation="packmask"``.

Registered through transformers' public ``AttentionInterface`` / ``AttentionMaskInterface``; no
model code is edited. Data flows one way:

1. **Model forward pre-hook** (attached to every ``PreTrainedModel`` through PyTorch's public
   module-registration hook; :mod:`packmask.forward_inputs`): when the model runs with
   ``"packmask"`` and ``position_ids`` are omitted, they are derived from the mask /
   ``cu_seq_lens`` / ``seq_lengths`` so that every packed sequence starts at position 0 (RoPE and
   learned positions are computed before attention, so this must happen before the model body runs).
   It opens the forward's :class:`~packmask.inputs.ForwardLayout`; a forward hook closes it.
2. **Mask interface** (once per mask type per forward, called by ``create_causal_mask`` & co.):
   a ``[B, N, N]`` mask is analysed into a compact layout; a 2D padding mask is kept lazily.
3. **Attention function** (per layer): resolves the layout with the one resolver,
   :func:`packmask.inputs.resolve_layout` (cached on the input tensors, so only the first layer
   pays), and dispatches to a kernel (:func:`packmask.backends.attend`).
"""
from __future__ import annotations

import sys

import torch
from transformers import AttentionInterface, PreTrainedModel
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .backends import AttentionSpec, attend, check_backend_name, current_request, decode
from .errors import PackmaskError, UnsupportedModelError
from .forward_inputs import NAME, close_forward_hook, derive_inputs_hook, uses_packmask
from .guards import check_construction
from .inputs import LAYOUT_KWARG, external_layout_required, layout_from_mask, resolve_layout
from .layout import DocumentLayout, TreeLayout
from .segments import starts_from_cu_seqlens
from .support import is_packed_input, unsupported_reason

__all__ = ["NAME", "LAYOUT_KWARG", "PackmaskMask", "packmask_mask", "packmask_attention", "enable", "register"]


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

    # multimodal: a model that hands its prepared mask to an inner model which builds masks again (PaliGemma ->
    # GemmaModel) passes this object back through create_causal_mask, which reads .ndim; packmask_mask returns it as is
    ndim = 4

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
    if isinstance(attention_mask, PackmaskMask):  # multimodal: already prepared by an outer model (PaliGemma)
        return attention_mask
    if isinstance(attention_mask, torch.Tensor) and attention_mask.dim() == 3:
        # [B, N, N] packed rows, or [B, N, past + N] new tokens over a cache (checked by the forward pre-hook)
        layout = _on_device(layout_from_mask(attention_mask, batch_size, q_length), kwargs.get("device"))
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


def layer_layout(module, attention_mask, kwargs, B: int, N: int, kv_len: int, sliding_window=None):
    """The packed layout of one attention call, or None for the ordinary path: the forward's inputs as
    the layer receives them, read by :func:`packmask.inputs.resolve_layout` (cached on the inputs),
    and checked against the layer's keys."""
    causal = getattr(module, "is_causal", True)
    padding = None
    if isinstance(attention_mask, PackmaskMask):
        attention_mask, padding = attention_mask.layout, attention_mask.padding_mask
    if isinstance(attention_mask, torch.Tensor):  # a user's [B, 1, N, K] mask, passed as-is by transformers
        if attention_mask.dim() != 4 or attention_mask.shape[-2] != N or attention_mask.shape[-1] < N:
            raise PackmaskError(
                f"attention_mask of shape {tuple(attention_mask.shape)} does not match the inputs "
                f"[batch={B}, tokens={N}]: pass [B, N, N] or [B, 1, N, N] (with a cache: [B, 1, N, past + N]).")
    if attention_mask is not None:
        layout = resolve_layout(B, N, attention_mask=attention_mask)
        K = layout.key_len if isinstance(layout, TreeLayout) else layout.seq_len
        # a tree's keys may be a sliding cache layer's last kv_len < K columns, or a static buffer's kv_len > K
        if kv_len != K and not (isinstance(layout, TreeLayout) and (kv_len > K or sliding_window is not None)):
            raise PackmaskError(
                f"{type(module).__name__} has {kv_len} keys but the attention_mask has {K} key columns: a mask with a "
                f"cache needs [B, 1, N, past + N] columns (past = cached tokens); a [B, N, N] mask needs no cache.")
        return layout
    if N != kv_len:  # decoding against a cache: nothing is packed — unless the inputs say otherwise
        if is_packed_input(position_ids=kwargs.get("position_ids"), cu_seq_lens=kwargs.get("cu_seq_lens_q"),
                           batch_size=B):
            raise UnsupportedModelError(
                f"{type(module).__name__} attends from {N} packed queries to {kv_len} keys (a cache or keys shared "
                f"from another pass): packmask cannot tell which of those keys belong to which sequence. Pass "
                f"use_cache=False for packed training, or train this model unpacked.")
        return None
    return resolve_layout(B, N, attention_mask=padding, position_ids=kwargs.get("position_ids"),
                          cu_seq_lens_q=kwargs.get("cu_seq_lens_q"), cu_seq_lens_k=kwargs.get("cu_seq_lens_k"),
                          max_length_q=kwargs.get("max_length_q"), causal=causal)


_ABSENT = object()


def _mask_only_window(module):
    """The sliding window of a layer whose model applies it through the mask alone, never handing it
    to the attention function (qwen2_moe: ``module.sliding_window`` on sliding layers; phimoe, blt,
    doge: ``config.sliding_window`` for every layer, through ``create_sliding_window_causal_mask``).
    A packed layout replaces that mask, so the window must come from here. Cached on the module."""
    cached = module.__dict__.get("_packmask_mask_window", _ABSENT)
    if cached is not _ABSENT:
        return cached
    window = getattr(module, "sliding_window", None)
    if window is None and "sliding_window" not in vars(module):
        config = getattr(module, "config", None)
        source = sys.modules.get(type(module).__module__)
        if (config is not None and getattr(config, "layer_types", None) is None
                and hasattr(source, "create_sliding_window_causal_mask")):
            window = getattr(config, "sliding_window", None)
    if isinstance(window, bool) or not isinstance(window, int) or window <= 0:
        window = None  # not a window size (a flag or a placeholder of some model)
    module.__dict__["_packmask_mask_window"] = window
    return window


def _chunk_size(module) -> int | None:
    """The chunk of a chunked-attention layer (llama4's ``"chunked_attention"`` layers: a query sees
    the keys of its own ``attention_chunk_size`` positions only), None for other layers. The model
    applies chunks through its mask alone. Cached on the module."""
    cached = module.__dict__.get("_packmask_chunk", _ABSENT)
    if cached is not _ABSENT:
        return cached
    config = getattr(module, "config", None)
    types, idx = getattr(config, "layer_types", None), getattr(module, "layer_idx", None)
    chunk = None
    if types is not None and isinstance(idx, int) and idx < len(types) and types[idx] == "chunked_attention":
        chunk = getattr(config, "attention_chunk_size", None)
    module.__dict__["_packmask_chunk"] = chunk
    return chunk


def _chunked(layout, chunk: int, module):
    """The layout with every document cut into chunks of ``chunk`` positions (chunked causal attention
    inside a document is block-diagonal over its chunks). Once per layout and chunk size.

        document   a0 a1 a2 a3 a4   (chunk 2)  ->  a0 a1 | a2 a3 | a4
    """
    key = ("chunked", chunk)
    if key not in layout._memo:
        if not isinstance(layout, DocumentLayout):
            raise UnsupportedModelError(
                f"{type(module).__name__} is a chunked-attention layer; packmask applies chunks to block-diagonal "
                f"(document) layouts only, not to a {type(layout).__name__}. Pass seq_lengths / a block-diagonal mask, "
                f"or train this model unpacked.")
        starts = starts_from_cu_seqlens(layout.cu_seqlens, layout.batch_size, layout.seq_len)
        layout._memo[key] = DocumentLayout.from_start_flags(starts | (layout.position_ids % chunk == 0),
                                                             causal=layout.causal)
    return layout._memo[key]


def packmask_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                       sliding_window=_ABSENT, softcap=None, **kwargs):
    """``AttentionInterface`` entry: one call per layer."""
    route = None
    if decode.may_take_a_route(attention_mask, kwargs) and not external_layout_required():
        # a decode call: the route an earlier layer of this forward took (backends.decode)
        route = decode.route_key(module, query, key, attention_mask, (
            scaling, dropout, sliding_window, softcap, _mask_only_window(module), _chunk_size(module)),
            current_request())
        found = decode.remembered_route(attention_mask, route)
        if found is not None:
            return decode.decode_sdpa_attention(query, key, value, *found[:2], module.training, module, found[2]), None
    if sliding_window is _ABSENT:
        sliding_window = _mask_only_window(module)
    sinks = next((kwargs[name] for name in _SINK_KWARGS if kwargs.get(name) is not None), None)
    if kwargs.get("position_bias") is not None:  # recurrent: inkling's additive bias; ignoring it would be wrong
        raise UnsupportedModelError(
            f"{type(module).__name__} hands the attention function an additive position_bias, which packmask's "
            f"attention does not apply. Use attn_implementation='eager' for this model and train unpacked.")
    if query.dim() != 4:  # the mask was applied to hidden states before attention (esm's token dropout)
        raise UnsupportedModelError(
            f"{type(module).__name__} got queries of shape {tuple(query.shape)}, not [batch, heads, tokens, head_dim]: "
            f"the model uses attention_mask outside attention (as a padding mask on its hidden states), so a packed "
            f"[B, N, N] mask cannot reach it intact. Train this model unpacked (2D padding mask).")
    B, H, N, D = query.shape
    kv_len = key.shape[2]
    external = kwargs.get(LAYOUT_KWARG)
    if external is None and external_layout_required():
        raise PackmaskError(
            f"{type(module).__name__} ran packmask attention without the {LAYOUT_KWARG!r} keyword while context "
            f"parallelism is active: pass the whole batch from ContextParallel.shard(...) to the model; a model whose "
            f"forward does not hand its keywords on to attention cannot be context-parallel.")
    tree = kwargs.get("packmask_tree_kernel")  # tree-kernel: a compiled forward on tree rows (forward_inputs)
    layout = None if external is not None or tree is not None else layer_layout(
        module, attention_mask, kwargs, B, N, kv_len, sliding_window)
    chunk = _chunk_size(module) if layout is not None else None
    if chunk is not None and chunk < getattr(layout, "max_seqlen", N):
        layout = _chunked(layout, chunk, module)
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
    if tree is not None:
        from .backends.tree_triton import compiled_layer_attention
        return compiled_layer_attention(query, key, value, tree, spec, module.training), None
    if external is not None:  # a layout that brings its own keys (context parallelism): N is this rank's share
        if sinks is not None:
            raise UnsupportedModelError(f"{type(module).__name__} has attention sinks, which {type(external).__name__} "
                                        f"does not implement.")
        key, value, layout = external.keys_and_layout(module, query, key, value, spec=spec)
    standard = None
    if layout is None and isinstance(attention_mask, PackmaskMask):
        standard = attention_mask.standard_mask()
        if standard is not None and standard.dim() == 4 and standard.shape[-1] != kv_len:
            standard = standard[..., :kv_len]
    taken = {} if route is not None else None
    out = attend(query, key, value, layout, spec, training=module.training, standard_mask=standard, module=module,
                 source_mask=attention_mask if route is not None else None, route=taken)
    if taken:  # a decode call on sdpa: the other layers of this forward take the same route
        decode.remember_route(attention_mask, route, *taken["decode_sdpa"])
    return out, None



def _attach_hook(model) -> None:
    if not getattr(model, "_packmask_hooked", False):
        check_construction(model, NAME)  # before the layers exist: gpt_neo & co. would raise a raw KeyError
        model.register_forward_pre_hook(derive_inputs_hook, with_kwargs=True, prepend=True)
        model.register_forward_hook(close_forward_hook, always_call=True)
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
    ``PreTrainedModel`` inside it. State-space / recurrent / convolution layers are set to run once per
    packed sequence (:mod:`packmask.recurrent`); an attention-free model (mamba, rwkv, ...) that
    transformers will not switch is enabled through them alone. ``backend`` forces one kernel for this
    model's layers (see :mod:`packmask.backends`; a ``with packmask.backend(...)`` block still wins).
    Returns the model.
    """
    for m in model.modules():
        if isinstance(m, PreTrainedModel):
            _attach_hook(m)
    from .recurrent import attention_free, ensure_installed  # recurrent:
    try:
        model.set_attn_implementation(NAME)
    except (ValueError, NotImplementedError):
        if not attention_free(model):  # recurrent: a model with no attention may refuse any implementation
            raise
    if not uses_packmask(model) and attention_free(model):  # recurrent: packmask runs its mixers per sequence
        for m in model.modules():
            if isinstance(m, PreTrainedModel):
                m.__dict__["_packmask_recurrent_only"] = True
    ensure_installed(model)  # recurrent: state-space / convolution mixers run once per packed sequence
    if not uses_packmask(model):  # e.g. gpt_neo: attention classes chosen by name at construction
        raise UnsupportedModelError(
            f"{type(model).__name__} stayed on attn_implementation={model.config._attn_implementation!r}: transformers "
            f"cannot switch this model's attention after construction. {unsupported_reason(model) or ''} Build it with "
            f"attn_implementation='packmask' if the family supports it (check with packmask.verify), or train unpacked.")
    if backend is not None:
        check_backend_name(backend)
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
