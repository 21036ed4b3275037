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


#: the TRL release whose DPOTrainer / GRPOTrainer these subclasses were written against
MIN_TRL = (1, 16)


def _check_trl() -> None:
    from ..errors import PackmaskError

    try:
        import trl
    except ImportError:
        raise PackmaskError("packmask.trl needs TRL: pip install 'trl>=1.16'.") from None
    version = tuple(int(x) for x in trl.__version__.split(".")[:2] if x.isdigit())
    if version < MIN_TRL:
        raise PackmaskError(f"packmask.trl needs trl>=1.16 (its DPOTrainer / GRPOTrainer methods), found {trl.__version__}; "
                            "pip install -U 'trl>=1.16'.")


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'packmask.trl' has no attribute {name!r}")
    _check_trl()
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
