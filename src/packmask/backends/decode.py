"""Draft-tree verification on sdpa: the caller's own mask, transformers' own sdpa call.

A *decode* call (:func:`packmask.backends.costs.is_decode_layout`: a few new tokens over a KV
cache) without a measured cost table runs dense sdpa — what a user of ``attn_implementation="sdpa"``
gets with the same ``[B, 1, N, past + N]`` mask. To be never slower than that, packmask hands sdpa:

* the **mask the caller passed** (a bool ``[B, 1, N, K]`` tensor whose columns are this layer's keys;
  its analysed tree layout equals it exactly), not one rebuilt from the layout — else the layout's
  dense mask, built once per forward and cached on the layout;
* that mask **in the additive form** sdpa would convert it to in every layer (0 / -inf in the
  queries' dtype), converted once per forward;
* shared kv heads **read in place** (``enable_gqa``) where sdpa takes them with a mask without its
  math kernel (CPU; CUDA where the memory-efficient kernel does: asked once per forward,
  :func:`gqa_in_place`), else **transformers' own sdpa function** (``ALL_ATTENTION_FUNCTIONS["sdpa"]``: ``repeat_kv``, the same kernel as
  ``attn_implementation="sdpa"``) — never the math kernel that ``enable_gqa`` with a mask falls back to
  where the fused kernels refuse it;
* the **route remembered per forward**: the first layer that takes this path stores its mask and
  spec on the mask tensor under a key of everything the route depends on (:func:`route_key`); the
  other layers of the forward find it there (:func:`remembered_route`) and skip the resolver, the
  checks and the dispatcher (measured in ``benchmarks/decode_overhead.py``).

Worked example: a draft tree ``0 -> 1, 0 -> 2`` over 2 cached tokens; the caller's mask is used as is::

    key columns   c0 c1 | t0 t1 t2
    t0             1  1 |  1  .  .
    t1             1  1 |  1  1  .
    t2             1  1 |  1  .  1

>>> import packmask
>>> from packmask.layout import analyse_mask
>>> mask, _ = packmask.tree_mask(torch.tensor([[-1, 0, 0]]), 2)
>>> mask4 = mask[:, None]
>>> layout = analyse_mask(mask4)
>>> decode_mask(layout, mask4, kv_len=5, sliding_window=None) is mask4
True
>>> decode_mask(layout, mask4.float(), kv_len=5, sliding_window=None).dtype   # not bool: the layout's mask
torch.bool
"""
from __future__ import annotations

import torch

from .sdpa import sdpa_attention
from .spec import AttentionSpec

__all__ = ["decode_mask", "additive_mask", "decode_sdpa_attention", "gqa_in_place", "transformers_sdpa", "may_take_a_route",
           "route_key", "remembered_route", "remember_route"]


def decode_mask(layout, source_mask, kv_len: int, sliding_window: int | None) -> torch.Tensor:
    """The bool ``[B, 1, N, kv_len]`` mask for sdpa: ``source_mask`` itself when it is a bool 4D mask with
    the layout's shape and this layer's keys (and no window narrows it), else the layout's dense mask
    (cached on the layout: built once per forward, whatever the number of layers)."""
    if (sliding_window is None and isinstance(source_mask, torch.Tensor) and source_mask.dtype == torch.bool
            and source_mask.dim() == 4 and source_mask.shape[1] == 1
            and tuple(source_mask.shape[-2:]) == (layout.seq_len, kv_len) and kv_len == layout.key_len
            and source_mask.shape[0] == layout.batch_size):
        return source_mask
    return layout.dense_mask(sliding_window, kv_len=kv_len)


def additive_mask(layout, mask: torch.Tensor, dtype: torch.dtype, kv_len: int, sliding_window: int | None):
    """``mask`` (bool, True = attend) as the additive 0 / -inf mask of ``dtype`` that sdpa turns a bool mask
    into before every call: built once per forward (cached on the layout) instead of once per layer.

    >>> import packmask
    >>> from packmask.layout import analyse_mask
    >>> m = packmask.tree_mask(torch.tensor([[-1, 0]]), 1)[0][:, None]
    >>> additive_mask(analyse_mask(m), m, torch.float32, 3, None)[0, 0].tolist()
    [[0.0, 0.0, -inf], [0.0, 0.0, 0.0]]
    """
    key = ("additive", dtype, kv_len, sliding_window)
    memo = layout._memo
    if key not in memo or memo[key].device != mask.device:
        memo[key] = torch.full(mask.shape, float("-inf"), dtype=dtype, device=mask.device).masked_fill_(mask, 0.0)
    return memo[key]


def transformers_sdpa():
    """transformers' registered ``"sdpa"`` attention function (None if this transformers has none)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    try:
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    except KeyError:
        return None


def gqa_in_place(q, k, v, mask) -> bool:
    """Whether sdpa reads shared kv heads in place (``enable_gqa``) for this masked call without falling
    back to its math kernel: on CPU yes (torch's CPU kernel takes GQA with a mask; 2.4x faster than
    ``repeat_kv`` on 32 / 4 heads over 1088 keys on this project's CPU machine), on CUDA where the
    memory-efficient kernel takes it (asked with the additive mask sdpa checks). Elsewhere transformers'
    ``repeat_kv`` is the faster way."""
    if k.shape[1] == q.shape[1]:
        return False
    if q.device.type == "cpu":
        return True
    if not q.is_cuda:
        return False
    # sdpa turns a bool mask into an additive one of the queries' dtype before it picks a kernel: ask with that
    additive = mask if mask.dtype == q.dtype else mask.new_empty(mask.shape, dtype=q.dtype)  # no kernel launched
    try:
        from torch.backends.cuda import SDPAParams, can_use_efficient_attention
        return bool(can_use_efficient_attention(SDPAParams(q, k, v, additive, 0.0, False, True), False))
    except (ImportError, TypeError, RuntimeError):  # a torch whose SDPAParams takes no enable_gqa
        return False


def decode_sdpa_attention(q, k, v, mask: torch.Tensor, spec: AttentionSpec, training: bool, module=None,
                          native_gqa: bool | None = None):
    """sdpa over ``mask`` (returns ``[B, N, H, D]``): with ``enable_gqa`` where the fused kernel takes it
    (:func:`gqa_in_place`; ``native_gqa`` is that answer, when known), else as
    ``attn_implementation="sdpa"`` runs it for ``module`` (its kv groups expanded by transformers). Without
    a module that says its kv groups, packmask's own sdpa call."""
    if native_gqa if native_gqa is not None else gqa_in_place(q, k, v, mask):
        return sdpa_attention(q, k, v, mask, spec, training)
    groups = getattr(module, "num_key_value_groups", None)
    fn = transformers_sdpa() if groups is not None and q.shape[1] == k.shape[1] * groups else None
    if fn is None:
        return sdpa_attention(q, k, v, mask, spec, training)
    out, _ = fn(module, q, k, v, mask, dropout=spec.dropout if training else 0.0, scaling=spec.scale,
                is_causal=False)
    return out


_ROUTES = "_packmask_decode_routes"  # on the mask tensor the layers receive: {route_key: (mask or None, spec)}
_UNUSUAL_KWARGS = frozenset({"s_aux", "sinks", "position_bias", "packmask_layout", "packmask_tree_kernel"})


def may_take_a_route(mask, kwargs: dict) -> bool:
    """Whether a layer with this mask may reuse an earlier layer's route: a 4D mask with more key columns
    than queries (a cache), not an inference tensor (no version counter), no gradients (not training, not a
    checkpointed layer's recomputation), not under ``torch.compile``, no sinks / bias / external layout in
    ``kwargs``. Cheap: checked first.

    >>> draft = torch.ones(1, 1, 3, 10, dtype=torch.bool)      # 3 draft tokens over 7 cached ones
    >>> with torch.no_grad():
    ...     may_take_a_route(draft, {}), may_take_a_route(draft[..., :3], {}), may_take_a_route(draft, {"sinks": 1})
    (True, False, False)
    >>> may_take_a_route(draft, {})                           # gradients on: every layer dispatches
    False
    """
    return (isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-1] > mask.shape[-2]
            and not mask.is_inference()  # torch.inference_mode: no version counter to key the route on
            and not torch.is_grad_enabled() and not torch.compiler.is_compiling()
            and (not kwargs or _UNUSUAL_KWARGS.isdisjoint(kwargs)))


def route_key(module, query, key, mask, layer_args: tuple, forced: str | None) -> tuple:
    """What a decode layer's route depends on, besides the mask's values (where :func:`may_take_a_route`):
    the mask's version (an in-place edit is a new route), the shapes / dtype / device of the call, the
    layer's attention arguments and mask-only window / chunk (``layer_args``), its kv groups, causality,
    training flag, and the backend asked for (``forced``, plus the model's own setting)."""
    base = mask if mask._base is None else mask._base
    own = module.__dict__
    return (base._version, tuple(query.shape), tuple(key.shape), query.dtype, query.device, layer_args,
            own.get("num_key_value_groups"), own.get("is_causal", True), own.get("training"),
            own.get("_packmask_backend"), forced)


def remembered_route(mask, route) -> tuple | None:
    """``(mask for sdpa, spec, native_gqa)`` an earlier layer of this forward stored for ``route``, or None."""
    routes = mask.__dict__.get(_ROUTES)
    found = routes.get(route) if routes is not None and route is not None else None
    if found is None:
        return None
    return (mask if found[0] is None else found[0]), found[1], found[2]


def remember_route(mask, route, used_mask, spec: AttentionSpec, native_gqa: bool) -> None:
    """Store the route a layer took (the caller's mask is stored as None: no reference cycle through it)."""
    routes = mask.__dict__.setdefault(_ROUTES, {})
    if len(routes) > 8:  # earlier versions of an edited mask
        routes.clear()
    routes[route] = (None if used_mask is mask else used_mask, spec, native_gqa)
