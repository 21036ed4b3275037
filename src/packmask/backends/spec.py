"""What one layer's attention call asks for, besides q/k/v and the layout."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["AttentionSpec"]


@dataclass(frozen=True, eq=False)
class AttentionSpec:
    """The features a layer needs; each backend declares which it honours (``refusal``).

    Attributes:
        scale: softmax scale applied to ``q·k``.
        dropout: attention dropout probability (applied only when training).
        softcap: Gemma2-style logit softcapping ``tanh(s / cap) * cap``, or None.
        sliding_window: keys farther than ``window - 1`` positions away are hidden. One-sided
            (``0 <= pos_q - pos_k < window``) for causal layers, two-sided (``|pos_q - pos_k| < window``)
            for bidirectional ones (ModernBERT's local layers).
        is_causal: the layer's own causality (decoders True, encoders False).
        sinks: per-head sink logits (gpt-oss ``s_aux`` / ``sinks``) that join every softmax, or None.
    """

    scale: float
    dropout: float = 0.0
    softcap: float | None = None
    sliding_window: int | None = None
    is_causal: bool = True
    sinks: torch.Tensor | None = None

    def without_window(self) -> "AttentionSpec":
        return replace(self, sliding_window=None)

    @property
    def bidirectional_window(self) -> bool:
        return self.sliding_window is not None and not self.is_causal
