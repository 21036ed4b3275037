"""TRL trainers on shared-prefix packed rows: ``PackedDPOTrainer`` and ``PackedGRPOTrainer``.

Subclasses of ``trl.DPOTrainer`` / ``trl.GRPOTrainer`` (same arguments); trl is imported only when one
of them is used, so ``import packmask`` stays light.
"""
from __future__ import annotations

import importlib

__all__ = ["PackedDPOTrainer", "PackedPreferenceCollator", "PackedGRPOTrainer", "SUPPORTED_DPO_LOSSES"]

_LAZY = {
    "PackedDPOTrainer": "packmask.trl.dpo",
    "PackedPreferenceCollator": "packmask.trl.dpo",
    "SUPPORTED_DPO_LOSSES": "packmask.trl.dpo_losses",
    "PackedGRPOTrainer": "packmask.trl.grpo",
}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packmask.trl' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
