"""Masks over a KV cache: which transformers caches packmask can verify draft trees against.

A ``[B, N, K]`` / ``[B, 1, N, K]`` mask given together with a cache must have ``K = past + N``
columns: the cached tokens, then the ``N`` new ones. Each layer's keys line up with those columns:

* ``DynamicLayer`` / ``StaticLayer`` (full attention): the keys are the ``K`` columns (a static
  layer returns its whole buffer; the columns after ``K`` are unused and stay invisible);
* ``DynamicSlidingWindowLayer`` / ``StaticSlidingWindowLayer``: the keys may be only the last
  ``kv_len < K`` columns — the evicted ones are outside every query's window anyway.

Other caches (quantized, offloaded, encoder-decoder, linear-attention states) are refused by name.
"""
from __future__ import annotations

import torch

from .errors import PackmaskError

__all__ = ["cache_past_length", "check_mask_against_cache", "CACHE_NAMES", "cache_keyword", "output_cache"]

#: the cache argument of a model's forward and field of its output: ``cache`` since transformers
#: 5.2x, ``past_key_values`` before (the 5.17 floor); newer releases still take the old name
CACHE_NAMES = ("cache", "past_key_values")


def cache_keyword(names) -> str | None:
    """Which of :data:`CACHE_NAMES` a forward with parameters ``names`` takes (None: neither).

    >>> cache_keyword(["input_ids", "past_key_values", "kwargs"]), cache_keyword(["input_ids", "cache"])
    ('past_key_values', 'cache')
    """
    return next((name for name in CACHE_NAMES if name in names), None)


def output_cache(output):
    """The cache a model returned: ``output.cache``, or ``output.past_key_values`` on releases that
    name it so (reading the old name on a newer release would log a deprecation warning)."""
    return next((output[name] for name in CACHE_NAMES if name in output), None)


def _supported_layer_types() -> tuple[type, ...]:
    from transformers import cache_utils as cu
    names = ("DynamicLayer", "DynamicSlidingWindowLayer", "StaticLayer", "StaticSlidingWindowLayer")
    return tuple(getattr(cu, n) for n in names if hasattr(cu, n))


def cache_past_length(cache) -> int:
    """Number of cached tokens of a transformers cache packmask can use with a tree mask.

    Raises :class:`PackmaskError` naming the cache (or cache layer) type it cannot use.
    """
    if cache is None:
        return 0
    from transformers.cache_utils import DynamicCache, StaticCache
    name = type(cache).__name__
    if not isinstance(cache, (DynamicCache, StaticCache)):
        raise PackmaskError(
            f"a tree / [B, N, past + N] attention_mask cannot be used with a {name}: packmask lines mask columns up "
            f"with the keys of DynamicCache and StaticCache (full and sliding-window layers) only. Use a DynamicCache, "
            f"or attn_implementation='sdpa' with this cache.")
    allowed = _supported_layer_types()
    for i, layer in enumerate(getattr(cache, "layers", [])):
        if not type(layer) in allowed:
            raise PackmaskError(
                f"{name} layer {i} is a {type(layer).__name__}: packmask cannot line a tree mask up with its keys "
                f"(supported: {', '.join(t.__name__ for t in allowed)}). Use a plain DynamicCache, or "
                f"attn_implementation='sdpa' for this model.")
    length = cache.get_seq_length()
    return int(length.item() if isinstance(length, torch.Tensor) else length)


def _seq_length(cache) -> int:
    if cache is None:
        return 0
    try:
        length = cache.get_seq_length()
    except Exception:  # noqa: BLE001 — an exotic cache: let cache_past_length name it
        return -1
    return int(length.item() if isinstance(length, torch.Tensor) else length)


def check_mask_against_cache(mask: torch.Tensor, num_new: int, cache) -> int:
    """Validate a mask's key length against the cache; returns the cache length ``past``.

    >>> check_mask_against_cache(torch.ones(1, 3, 3, dtype=torch.bool), 3, None)
    0
    >>> check_mask_against_cache(torch.ones(1, 3, 5, dtype=torch.bool), 3, None)
    Traceback (most recent call last):
    ...
    packmask.errors.PackmaskError: attention_mask has 5 key columns, but the cache holds 0 tokens and the input 3 new ones: expected 0 + 3 = 3 columns (cached tokens first, then the new tokens). Pass the cache the mask was built for (cache=...), or build the mask with packmask.tree_mask(parents, past_length=0).
    """
    K = mask.shape[-1]
    if mask.shape[-2] != num_new or K < num_new:
        return 0  # not [.., N, past + N] at all: the mask analysis names the shape it expects
    if K == num_new and _seq_length(cache) == 0:
        return 0  # nothing cached yet (training, a cache created empty): any cache type will do
    past = cache_past_length(cache)
    if K != past + num_new:
        raise PackmaskError(
            f"attention_mask has {K} key columns, but the cache holds {past} tokens and the input {num_new} new ones: "
            f"expected {past} + {num_new} = {past + num_new} columns (cached tokens first, then the new tokens). Pass "
            f"the cache the mask was built for (cache=...), or build the mask with "
            f"packmask.tree_mask(parents, past_length={past}).")
    return past
