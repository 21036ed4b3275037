"""Plain math, exactly as transformers' eager path computes it: honours every feature.

Softmax in fp32, softcap before the mask, sink logits joining the softmax (gpt-oss), dropout.
O(N²) memory; the reference the other backends are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import AttentionSpec

NAME = "eager"


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    return None


def _plain_mask(spec: AttentionSpec, n_q: int, n_k: int, device) -> torch.Tensor | None:
    """The mask of an unpacked call without one: causal (bottom-right aligned) and the window."""
    if not spec.is_causal and spec.sliding_window is None:
        return None
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None]
    mask = k_pos <= q_pos if spec.is_causal else torch.ones(n_q, n_k, dtype=torch.bool, device=device)
    if spec.sliding_window is not None:
        mask = mask & ((q_pos - k_pos).abs() < spec.sliding_window)
    return mask


def eager_attention(q, k, v, mask: torch.Tensor | None, spec: AttentionSpec, training: bool) -> torch.Tensor:
    """``q [B, H, N, D]``, ``k, v [B, Hkv, K, D]``, ``mask`` bool broadcastable to ``[B, H, N, K]``
    (None: the layer's plain causal / window mask). Returns ``[B, N, H, D]``."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * spec.scale
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    if mask is None:
        mask = _plain_mask(spec, q.shape[2], k.shape[2], q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    if spec.sinks is not None:
        # one extra logit per head joins every query's softmax and is dropped afterwards (gpt-oss)
        B, H, N, _ = scores.shape
        sinks = spec.sinks if spec.sinks.dim() == 4 else spec.sinks.reshape(1, -1, 1, 1)  # recurrent: [B, H, N, 1]
        sink = sinks.expand(B, H, N, 1).to(scores.dtype)  # per-token sinks (inkling2) or one per head (gpt-oss)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1, dtype=torch.float32)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32)
        if mask is not None:  # a fully masked row (left padding) gives 0, not NaN
            probs = probs.masked_fill(~mask.any(-1, keepdim=True), 0.0)
    probs = F.dropout(probs.to(q.dtype), p=spec.dropout, training=training)
    return torch.matmul(probs, v).transpose(1, 2)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    mask = layout.dense_mask(spec.sliding_window, bidirectional_window=spec.bidirectional_window,
                             kv_len=k.shape[2]).to(q.device)
    return eager_attention(q, k, v, mask, spec, training)
