"""Helpers for tests of packed models: tiny random models (:mod:`packmask.tiny`) and the "each sequence
alone" reference (:mod:`packmask.reference`), in one place for test code. Production code imports
those two modules directly.
"""
from __future__ import annotations

from .reference import grad_rel_err, pack_rows, rel_err, run_alone
from .tiny import FAMILY_OVERRIDES, TINY, tiny_config, tiny_model

__all__ = ["TINY", "FAMILY_OVERRIDES", "tiny_config", "tiny_model", "run_alone", "pack_rows", "rel_err",
           "grad_rel_err"]
