"""Qwen vision towers in ONE varlen attention call per layer instead of one call per image / window.

Qwen2-VL, Qwen2.5-VL and Qwen3-VL vision attention hand their per-image (per-window) ``cu_seqlens``
to the attention function only when ``is_flash_attention_requested(self.config)``, i.e. when the
implementation's *name* contains "flash"; any other implementation (sdpa, eager, packmask) loops
over the pieces in Python: one attention call per image, or per window for Qwen2.5-VL's windowed
layers -- thousands of small calls per step on real data. transformers refuses to switch a model to
an unknown name containing "flash", and there is no hook for this choice.

:func:`varlen_vision` therefore changes ONE kind of layer on ONE model instance, explicitly (as PEFT
and Liger do): each vision attention module gets its own shallow copy of its config whose
``_attn_implementation`` is ``"packmask_flash_varlen"``, a name registered with transformers' public
``AttentionInterface`` for packmask's attention function. The module then takes its own varlen
branch and calls packmask with ``cu_seq_lens_q/k``: a bidirectional block-diagonal layout, one
kernel call (varlen on CUDA). The outputs equal the per-piece loop (tested on unpacked input:
tests/multimodal/test_multimodal_vision.py). ``varlen_vision(model, enable=False)`` restores the
modules' own configs. ``model.set_attn_implementation`` does not reach these copies.

    pieces (cu_seqlens)   image 0: 0..64 | image 1: 64..96 | image 2: 96..160
    stock                 3 attention calls
    varlen_vision         1 call, attention inside each piece (bidirectional)
"""
from __future__ import annotations

import copy
import inspect

from transformers import AttentionInterface

from ..errors import PackmaskError

__all__ = ["varlen_vision", "VARLEN_VISION"]

#: the implementation name the switched vision attention modules read (it must contain "flash")
VARLEN_VISION = "packmask_flash_varlen"
_SAVED = "_packmask_own_config"


def _takes_varlen_branch(module) -> bool:
    """A vision attention module with a varlen branch keyed on the implementation name (by feature:
    a ``cu_seqlens`` argument and ``is_flash_attention_requested`` in its forward)."""
    forward = type(module).forward
    if "cu_seqlens" not in inspect.signature(forward).parameters:
        return False
    try:
        source = inspect.getsource(forward)
    except (OSError, TypeError):
        return False
    return "is_flash_attention_requested" in source and "cu_seq_lens_q" in source


def varlen_vision(model, enable: bool = True) -> int:
    """Run ``model``'s vision attention as one varlen packmask call per layer (``enable=False``
    undoes it). Returns the number of attention modules switched; raises :class:`PackmaskError`
    when the model has none that take ``cu_seqlens``.

    >>> from packmask.multimodal.tiny import tiny_vlm
    >>> model = tiny_vlm("qwen2_5_vl")
    >>> varlen_vision(model), varlen_vision(model, enable=False)
    (2, 2)
    """
    from ..integration import packmask_attention

    AttentionInterface.register(VARLEN_VISION, packmask_attention)  # idempotent: the same function
    count = 0
    for module in model.modules():
        if not hasattr(module, "config") or not _takes_varlen_branch(module):
            continue
        if enable and _SAVED not in module.__dict__:
            module.__dict__[_SAVED] = module.config
            config = copy.copy(module.config)
            config._attn_implementation = VARLEN_VISION
            module.config = config
        elif not enable and _SAVED in module.__dict__:
            module.config = module.__dict__.pop(_SAVED)
        count += 1
    if not count:
        raise PackmaskError(f"{type(model).__name__} has no vision attention that takes cu_seqlens (Qwen2-VL, "
                            f"Qwen2.5-VL, Qwen3-VL do); its vision tower runs per image as it is.")
    return count
