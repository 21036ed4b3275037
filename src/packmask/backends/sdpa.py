"""PyTorch SDPA over a dense bool mask: runs anywhere, O(N²) mask memory (the CPU path)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .spec import AttentionSpec

NAME = "sdpa"


def refusal(layout, spec: AttentionSpec, q: torch.Tensor, training: bool) -> str | None:
    """Why sdpa cannot run this call exactly (None: it can)."""
    if spec.softcap is not None:
        return "sdpa cannot apply logit softcapping"
    if spec.sinks is not None:
        return "sdpa cannot add attention-sink logits"
    return None


def sdpa_attention(q, k, v, mask: torch.Tensor | None, spec: AttentionSpec, training: bool) -> torch.Tensor:
    """PyTorch SDPA with a dense bool mask (True = attend) or ``is_causal``."""
    is_causal = mask is None and spec.is_causal and q.shape[2] > 1
    # enable_gqa: the kernels read shared kv heads in place (no expanded copy kept for backward)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                         dropout_p=spec.dropout if training else 0.0, scale=spec.scale,
                                         enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


def run(q, k, v, layout, spec: AttentionSpec, training: bool) -> torch.Tensor:
    mask = layout.dense_mask(spec.sliding_window, bidirectional_window=spec.bidirectional_window).to(q.device)
    return sdpa_attention(q, k, v, mask, spec, training)
