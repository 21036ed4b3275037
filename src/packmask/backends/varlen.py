"""torch's ``varlen_attn`` (FlashAttention-2 varlen inside) over the flattened batch.

Honours block-diagonal layouts (causal or bidirectional), tree layouts (shared-prefix rows and
draft trees over a KV cache, through the decomposition of :mod:`packmask.backends.tree`), GQA
without expanding K/V, scale and sliding windows (one- or two-sided). Needs CUDA and fp16/bf16.
Not: softcap, dropout, sinks, general masks.
"""
from __future__ import annotations

import inspect
from functools import lru_cache

import torch

from ..layout import DocumentLayout, TreeLayout
from .spec import AttentionSpec

NAME = "varlen"


@lru_cache(maxsize=None)
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


@lru_cache(maxsize=None)
def varlen_available() -> bool:
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


@lru_cache(maxsize=None)
def _gqa_native_varlen() -> bool:
    """True when torch's varlen custom op can be handed fewer kv heads than query heads.

    torch >= 2.13 says so with ``enable_gqa``; on older torch the public wrapper has no flag, but
    the custom op passes the tensors straight to FlashAttention-2, which handles
    ``num_heads % num_heads_kv == 0`` itself (probed on torch 2.11: benchmarks/gqa_varlen_probe.py).
    """
    import torch.nn.attention.varlen  # noqa: F401 — registers torch.ops.torch_attn
    if "enable_gqa" in _varlen_params():
        return True
    try:
        schema = torch.ops.torch_attn._varlen_attn.default._schema
    except (AttributeError, RuntimeError):
        return False
    names = [a.name for a in schema.arguments]
    return names[:10] == ["query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "is_causal", "scale",
                          "window_size"]


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    if not (q.is_cuda and varlen_available()):
        return "varlen needs CUDA and torch.nn.attention.varlen"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return "varlen needs fp16/bf16"
    if not isinstance(layout, (DocumentLayout, TreeLayout)):
        return "varlen needs a block-diagonal or tree layout"
    if spec.softcap is not None or spec.sinks is not None:
        return "varlen cannot apply softcapping or sinks"
    if spec.dropout > 0 and training:
        return "varlen has no dropout"
    if q.shape[-1] > 256:
        return "varlen supports head dims up to 256"
    return None


def _flat(x: torch.Tensor) -> torch.Tensor:
    B, H, N, D = x.shape
    return x.transpose(1, 2).reshape(B * N, H, D)


def window_size(layout: DocumentLayout, spec: AttentionSpec) -> tuple[int, int]:
    """FlashAttention's ``(left, right)`` band (-1 = unbounded) for the layout's documents and the
    layer's window: the same keys as ``layout.dense_mask(window, spec.bidirectional_window)``. The
    window is one-sided for causal layers (a decoder given bidirectional documents still sees every
    later key of its document) and two-sided for bidirectional layers.

    >>> from packmask.layout import DocumentLayout
    >>> docs = DocumentLayout.from_seq_lengths([[4]], 4, causal=False)
    >>> window_size(docs, AttentionSpec(1.0, sliding_window=3, is_causal=True))
    (2, -1)
    >>> window_size(docs, AttentionSpec(1.0, sliding_window=3, is_causal=False))
    (2, 2)
    """
    window = spec.sliding_window
    left = window - 1 if window is not None else -1
    if layout.causal:
        return left, 0
    return left, (window - 1 if spec.bidirectional_window else -1)


def varlen_flat(qf, kf, vf, cu_q, cu_k, max_q: int, max_k: int, *, scale: float, window_size: tuple[int, int],
                native_gqa: bool | None = None) -> torch.Tensor:
    """torch's ``varlen_attn`` on flat ``[T, H, D]`` queries, ``[T_k, Hkv, D]`` keys/values; returns
    ``[T, H, D]``. ``window_size`` is FlashAttention's ``(left, right)`` band (-1 = unbounded, right 0 =
    causal, bottom-right aligned). GQA without expanding K/V wherever torch allows it."""
    from torch.nn.attention.varlen import varlen_attn
    H = qf.shape[1]
    if kf.shape[1] != H:
        if "enable_gqa" in _varlen_params():
            return varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size,
                               enable_gqa=True)
        if native_gqa if native_gqa is not None else _gqa_native_varlen():
            # torch 2.11: the public wrapper has no enable_gqa; call its custom op, which forwards the
            # un-expanded kv heads to FlashAttention-2 (saves expanding K/V: memory and copies)
            out, _, _ = torch.ops.torch_attn._varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, window_size[1] == 0,
                                                          scale, list(window_size))
            return out
        kf = kf.repeat_interleave(H // kf.shape[1], dim=1)
        vf = vf.repeat_interleave(H // vf.shape[1], dim=1)
    return varlen_attn(qf, kf, vf, cu_q, cu_k, max_q, max_k, scale=scale, window_size=window_size)


def varlen_attention(q, k, v, layout: DocumentLayout, spec: AttentionSpec, native_gqa: bool | None = None) -> torch.Tensor:
    """``q [B, H, N, D]``, ``k, v [B, Hkv, N, D]`` over the layout's documents; returns ``[B, N, H, D]``."""
    B, H, N, D = q.shape
    cu = layout.cu_seqlens.to(q.device)
    mx = layout.max_seqlen
    out = varlen_flat(_flat(q), _flat(k), _flat(v), cu, cu, mx, mx, scale=spec.scale,
                      window_size=window_size(layout, spec), native_gqa=native_gqa)
    return out.view(B, N, H, D)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    if isinstance(layout, TreeLayout):
        from .tree import tree_varlen_attention
        return tree_varlen_attention(q, k, v, layout, spec)
    return varlen_attention(q, k, v, layout, spec)
