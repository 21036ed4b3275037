"""Packing vision-language models exactly: :class:`MultimodalCollator` (see docs/multimodal.md)."""
from __future__ import annotations

from .collator import MultimodalCollator, pack_samples
from .families import FAMILIES, family_of
from .tree import MultimodalTreeCollator
from .vision import varlen_vision

__all__ = ["MultimodalCollator", "MultimodalTreeCollator", "pack_samples", "FAMILIES", "family_of", "varlen_vision"]
