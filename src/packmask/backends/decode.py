"""Draft-tree verification on sdpa: the caller's own mask, transformers' own sdpa call.

A *decode* call (:func:`packmask.backends.costs.is_decode_layout`: a few new tokens over a KV
cache) without a measured cost table runs dense sdpa — what a user of ``attn_implementation="sdpa"``
gets with the same ``[B, 1, N, past + N]`` mask. To be never slower than that, packmask hands sdpa:

* the **mask the caller passed** (a bool ``[B, 1, N, K]`` tensor whose columns are this layer's keys;
  its analysed tree layout equals it exactly), not one rebuilt from the layout — else the layout's
  dense mask, built once per forward and cached on the layout;
* **transformers' own sdpa function** (``ALL_ATTENTION_FUNCTIONS["sdpa"]``): the same GQA handling
  (``repeat_kv`` where torch's fused kernels refuse ``enable_gqa`` with a mask, on CUDA), hence the
  same kernel.

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

__all__ = ["decode_mask", "decode_sdpa_attention", "transformers_sdpa"]


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


def transformers_sdpa():
    """transformers' registered ``"sdpa"`` attention function (None if this transformers has none)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    try:
        return ALL_ATTENTION_FUNCTIONS["sdpa"]
    except KeyError:
        return None


def decode_sdpa_attention(q, k, v, mask: torch.Tensor, spec: AttentionSpec, training: bool, module=None):
    """sdpa over ``mask`` as ``attn_implementation="sdpa"`` runs it for ``module`` (returns ``[B, N, H, D]``).
    Without a module that says its kv groups, packmask's own sdpa call (``enable_gqa``)."""
    groups = getattr(module, "num_key_value_groups", None)
    fn = transformers_sdpa() if groups is not None and q.shape[1] == k.shape[1] * groups else None
    if fn is None:
        return sdpa_attention(q, k, v, mask, spec, training)
    out, _ = fn(module, q, k, v, mask, dropout=spec.dropout if training else 0.0, scaling=spec.scale,
                is_causal=False)
    return out
