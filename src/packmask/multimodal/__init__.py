"""Packing vision-language models exactly: :class:`MultimodalCollator` (see docs/multimodal.md)."""
from __future__ import annotations

from .collator import MultimodalCollator, pack_samples
from .families import FAMILIES, family_of
from .packed import PackedImageText, load_packed_image_text, pack_image_text
from .tree import MultimodalTreeCollator
from .vision import varlen_vision

__all__ = ["MultimodalCollator", "MultimodalTreeCollator", "pack_samples", "FAMILIES", "family_of", "varlen_vision",
           "pack_image_text", "PackedImageText", "load_packed_image_text"]
