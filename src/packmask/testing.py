"""Helpers for tests of packed models: tiny random models (:mod:`packmask.tiny`) and the "each sequence
alone" reference (:mod:`packmask.reference`), in one place for test code. Production code imports
those two modules directly.
"""
from __future__ import annotations

from .reference import grad_rel_err, pack_rows, rel_err, run_alone
from .tiny import FAMILY_OVERRIDES, TINY, tiny_config, tiny_model

__all__ = ["TINY", "FAMILY_OVERRIDES", "tiny_config", "tiny_model", "run_alone", "pack_rows", "rel_err",
           "grad_rel_err", "families_choosing_attention_by_name"]


def families_choosing_attention_by_name() -> list[str]:
    """Causal-LM families that, in the *installed* transformers, pick their attention classes by name
    (a ``*_ATTENTION_CLASSES`` dict, :func:`packmask.guards.attention_classes_by_name`) instead of
    transformers' AttentionInterface, so packmask refuses them when built. Which families these are
    changes between releases (falcon moved to the interface in 5.25), so tests take their examples
    from here rather than naming one.

    >>> "llama" in families_choosing_attention_by_name()
    False
    """
    import importlib
    import importlib.util
    import re

    from transformers.models.auto.configuration_auto import model_type_to_module_name
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .guards import attention_classes_by_name

    table = re.compile(r"^\w+_ATTENTION_CLASSES\s*=\s*\{", re.MULTILINE)
    found = []
    for family in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        name = model_type_to_module_name(family)
        module_name = f"transformers.models.{name}.modeling_{name}"
        try:
            spec = importlib.util.find_spec(module_name)
        except ImportError:
            continue
        if spec is None or not spec.origin:
            continue
        with open(spec.origin, encoding="utf-8") as source:  # read first: importing every family is slow
            if not table.search(source.read()):
                continue
        if attention_classes_by_name(importlib.import_module(module_name)) is not None:
            found.append(family)
    return found

