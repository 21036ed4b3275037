"""Help at the point of the mistake, for models that are *not* on ``attn_implementation="packmask"``.

After ``import packmask`` every transformers model carries a forward pre-hook (see
:mod:`packmask.integration`). On a model that uses packmask it derives positions; on any other model
it only looks for the packed inputs that transformers would crash on or silently mix, and says how to
fix them:

=====================================================  ==========================================
input to a model on ``sdpa`` / ``eager`` / ``flex``    what happens
=====================================================  ==========================================
``[B, N, N]`` mask                                     :class:`PackmaskError` naming
                                                       ``attn_implementation="packmask"`` (transformers
                                                       fails in ``expand(...)``, or gpt2-style models
                                                       silently mix sequences)
``[B, 1, N, N]`` integer mask on ``sdpa`` / ``flex``   :class:`PackmaskError` (torch rejects the dtype)
``[B, 1, N, N]`` bool mask on ``eager``                rewritten to the additive form eager expects
                                                       (the *eager guard*, below), then correct
``position_ids`` that restart inside a row (packed)    one warning: these mix sequences, so name the
with a 2D mask, or with a cache, or on an encoder      fix
=====================================================  ==========================================

Masks transformers itself handles are left alone: float (additive) 4D masks, 4D masks against a
cache (queries != keys), 2D padding masks, and packed ``position_ids`` with no mask and no cache
(transformers' own packed path, which is correct).

The **eager guard** works around a transformers pitfall: ``eager`` *adds* a user's 4D mask to the
scores, so a bool or 0/1 mask adds 1 or 0 instead of blocking, and packed rows attend across
sequences without an error. It rewrites such a mask (models on ``eager`` that go through
transformers' attention interface only) and logs once, on logger ``"packmask"``, when it first acts.
Switch it off with ``packmask.configure(eager_mask_guard=False)`` (per process: it guards a
transformers bug, not a packmask feature); the other checks with
``packmask.configure(stock_model_checks=False)``.

    >>> previous = configure(eager_mask_guard=False)
    >>> previous
    {'eager_mask_guard': True, 'stock_model_checks': True}
    >>> configure(**previous)["eager_mask_guard"]
    False
"""
from __future__ import annotations

import logging
import sys
import warnings

import torch

from .errors import PackmaskError, PackmaskWarning, UnsupportedModelError
from .segments import starts_from_position_ids

__all__ = ["configure", "check_stock_forward", "check_construction", "restart_inside_rows", "is_causal_model"]

logger = logging.getLogger("packmask")

_SETTINGS = {"eager_mask_guard": True, "stock_model_checks": True}
_ONCE: set = set()  # messages already logged / warned in this process
_STOCK_IMPLEMENTATIONS = ("sdpa", "eager", "flex_attention")
_FIX = ('Build the model with attn_implementation="packmask" after `import packmask` (or call '
        'packmask.enable(model))')


def configure(*, eager_mask_guard: bool | None = None, stock_model_checks: bool | None = None) -> dict:
    """Switch packmask's checks on models that do not use it; returns the previous settings.

    Args:
        eager_mask_guard: rewrite bool / 0-1 4D masks given to ``eager`` models into the additive form
            (default on; see the module docstring).
        stock_model_checks: raise or warn on packed inputs that sdpa / eager / flex models would crash
            on or silently mix (default on).

    ``None`` leaves a setting as it is. The settings are per process.
    """
    previous = dict(_SETTINGS)
    for name, value in (("eager_mask_guard", eager_mask_guard), ("stock_model_checks", stock_model_checks)):
        if value is not None:
            if not isinstance(value, bool):
                raise PackmaskError(f"configure({name}=...) takes True or False, got {value!r}.")
            _SETTINGS[name] = value
    return previous


def _once(key: str) -> bool:
    """True the first time ``key`` is seen in this process."""
    if key in _ONCE:
        return False
    _ONCE.add(key)
    return True


def restart_inside_rows(position_ids: torch.Tensor, real: torch.Tensor | None = None) -> torch.Tensor:
    """Where a new sequence starts inside a row: ``position != previous + 1`` between two real tokens.

    Returns a bool ``[B, N - 1]`` tensor (entry ``i`` is about the token ``i + 1``). Padding (``real``
    False) neither starts nor continues a sequence, so left-padded generation is not packed.

    >>> restart_inside_rows(torch.tensor([[0, 1, 2, 0, 1]])).tolist()
    [[False, False, True, False]]
    >>> restart_inside_rows(torch.tensor([[1, 1, 0, 1]]), real=torch.tensor([[0, 0, 1, 1]])).tolist()
    [[False, False, False]]
    """
    restart = starts_from_position_ids(position_ids)[..., 1:]  # the one restart rule (packmask.segments)
    if real is not None:
        real = real.bool()
        restart = restart & real[..., 1:] & real[..., :-1]
    return restart


def _caller_level() -> int:
    """``stacklevel`` that points a warning at the user's ``model(...)`` line (past packmask and torch.nn)."""
    import os

    skip = (os.path.dirname(__file__), os.path.dirname(torch.nn.__file__))
    level, frame = 2, sys._getframe(2)  # 1 = the function that warns
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        level, frame = level + 1, frame.f_back
    return level


def _argument(names, args, kwargs, name):
    if name in kwargs:
        return kwargs[name]
    if name in names:
        index = names.index(name)
        if index < len(args):
            return args[index]
    return None


def _is_bidirectional(model) -> bool:

    return not is_causal_model(model)


def check_stock_forward(model, names, args, kwargs):
    """The pre-hook's work for a model not on packmask: raise / warn on mistakes, then the eager guard.

    Returns ``(args, kwargs)`` when the inputs were rewritten, else None.
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _STOCK_IMPLEMENTATIONS or not getattr(model, "_supports_attention_backend", False):
        return None  # flash (handles packed positions itself) and models with their own attention code
    mask = _argument(names, args, kwargs, "attention_mask")
    # not while torch.compile traces: the checks read tensor values (a graph break per forward)
    if _SETTINGS["stock_model_checks"] and not torch.compiler.is_compiling():
        _check_mask(impl, mask, _argument(names, args, kwargs, "input_ids"))
        _check_positions(model, impl, mask, names, args, kwargs)
    if impl == "eager" and _SETTINGS["eager_mask_guard"]:
        return _additive_eager_mask(model, names, args, kwargs, mask)
    return None


def _check_mask(impl, mask, input_ids) -> None:
    if not isinstance(mask, torch.Tensor) or mask.dim() not in (3, 4) or mask.shape[-1] != mask.shape[-2]:
        return
    if input_ids is not None and input_ids.dim() == 2 and input_ids.shape[-1] != mask.shape[-1]:
        return  # queries against a cache: transformers' own 4D generation masks
    if mask.dim() == 3:
        raise PackmaskError(
            f"attention_mask of shape {tuple(mask.shape)} (a per-sample [B, N, N] mask) reached a model on "
            f"attn_implementation={impl!r}, which takes only 2D padding or [B, 1, N, N] masks and would fail or mix "
            f"the packed sequences. {_FIX}.")
    if impl != "eager" and not mask.is_floating_point() and mask.dtype != torch.bool:
        raise PackmaskError(
            f"attention_mask is a [B, 1, N, N] {str(mask.dtype).replace('torch.', '')} tensor, which "
            f"attn_implementation={impl!r} cannot use (it takes bool, True = may attend). Pass mask.bool(), or: "
            f"{_FIX}.")


def _check_positions(model, impl, mask, names, args, kwargs) -> None:
    if "packed-positions" in _ONCE:
        return  # warned already: no further device syncs for this check
    pos = _argument(names, args, kwargs, "position_ids")
    if isinstance(pos, torch.Tensor) and pos.dim() == 3 and pos.shape[0] == 4:
        pos = pos[0]  # multimodal: [4, B, L] mRoPE position ids; the text row says where sequences restart
    if not isinstance(pos, torch.Tensor) or pos.dim() != 2 or pos.shape[-1] < 2:
        return
    if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 2):
        return  # a 4D mask (or a dict of them per layer type) says who attends whom itself
    if mask is None:
        use_cache = _argument(names, args, kwargs, "use_cache")
        if use_cache is None:
            use_cache = bool(getattr(model.config, "use_cache", False)) and not (
                model.training and getattr(model, "is_gradient_checkpointing", False))
        given = (_argument(names, args, kwargs, key) for key in ("cache", "past_key_values", "cache_params"))
        cache = any(c is not None for c in given) or bool(use_cache)
        if not cache and not _is_bidirectional(model):
            return  # transformers' packed path: no mask and no cache builds the per-sequence mask itself
        why = "an encoder's bidirectional mask ignores position restarts" if _is_bidirectional(model) else (
            "with a cache (use_cache is on) transformers ignores the restarts")
    else:
        if mask.shape[-1] != pos.shape[-1]:
            return
        why = "with a 2D attention_mask transformers ignores the restarts"
    if not bool(restart_inside_rows(pos, None if mask is None else mask[..., -pos.shape[-1]:]).any()):
        return
    if _once("packed-positions"):
        warnings.warn(
            f"packed position_ids (they restart inside a row) given to a model on attn_implementation={impl!r}: "
            f"{why}, so the packed sequences attend to each other. {_FIX}; or, on sdpa/eager, pass "
            f"use_cache=False and no attention_mask.", PackmaskWarning, stacklevel=_caller_level())


def _additive_eager_mask(model, names, args, kwargs, mask):
    """transformers pitfall: ``eager`` *adds* a user's 4D mask to the scores, so a bool / 0-1 mask
    adds 1 or 0 instead of blocking (packed rows silently attend across sequences). Turn such a mask
    into the additive 0 / dtype-min form eager expects. Everything else is left untouched."""
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 4 and not mask.is_floating_point()):
        return None
    if not torch.compiler.is_compiling() and _once("eager-guard"):
        logger.info("packmask: rewrote a %s 4D attention_mask into eager's additive form for %s (eager adds the "
                    "mask to the scores; a bool mask would not block). packmask.configure(eager_mask_guard=False) "
                    "turns this off.", str(mask.dtype).replace("torch.", ""), type(model).__name__)
    dtype = model.dtype if model.dtype.is_floating_point else torch.float32
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask == 0, torch.finfo(dtype).min)
    if "attention_mask" in kwargs or "attention_mask" not in names:
        kwargs["attention_mask"] = additive
    else:
        index = names.index("attention_mask")
        args = args[:index] + (additive,) + args[index + 1:]
    return args, kwargs


def attention_classes_by_name(module) -> tuple[str, dict] | None:
    """``(name, table)`` of the ``*_ATTENTION_CLASSES`` dict a modeling module picks its attention
    classes from by ``config._attn_implementation`` (falcon up to transformers 5.24, gpt_neo, git,
    bark, ...), or None for a module that dispatches through transformers' AttentionInterface.

    >>> import transformers.models.llama.modeling_llama as llama
    >>> attention_classes_by_name(llama) is None
    True
    """
    for attr, table in vars(module).items() if module is not None else ():
        if attr.endswith("ATTENTION_CLASSES") and isinstance(table, dict) and "eager" in table:
            return attr, table
    return None


def check_construction(model, name: str) -> None:
    """Refuse, while ``model`` is being built, a family that picks attention classes by name.

    Such families (:func:`attention_classes_by_name`) index their ``*_ATTENTION_CLASSES`` dict with
    ``config._attn_implementation`` when they build their layers, so ``"packmask"`` would end in a
    raw ``KeyError``. Called when the model registers its first submodule (before its layers exist).
    """
    config = getattr(model, "config", None)
    impl = getattr(config, "_attn_implementation", None)
    if not (impl == name or (isinstance(impl, dict) and name in impl.values())):
        return
    found = attention_classes_by_name(sys.modules.get(type(model).__module__))
    if found is not None and name not in found[1]:
        attr, table = found
        model_type = getattr(config, "model_type", type(model).__name__)
        raise UnsupportedModelError(
            f"{model_type} ({type(model).__name__}) picks its attention classes by name ({attr}: "
            f"{', '.join(map(str, table))}) and computes attention in its own code, outside transformers' "
            f"AttentionInterface, so packmask cannot run it. Build it with attn_implementation='sdpa' or 'eager' "
            f"and train unpacked (one sequence per row with a 2D padding mask).")


def is_causal_model(model) -> bool:
    """Whether ``model``'s self-attention is causal: from its attention layers' ``is_causal`` flags
    (any True), else whether it can generate. Cached on the model."""
    cached = model.__dict__.get("_packmask_causal")
    if cached is None:
        flags = {m.is_causal for m in model.modules() if isinstance(getattr(m, "is_causal", None), bool)}
        if flags:
            cached = True in flags
        else:
            can_generate = getattr(model, "can_generate", None)
            cached = bool(can_generate()) if callable(can_generate) else "CausalLM" in type(model).__name__
        model.__dict__["_packmask_causal"] = cached
    return cached
