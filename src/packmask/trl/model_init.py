"""A TRL trainer given a model *name or path* loads it with ``attn_implementation="packmask"`` itself.

TRL's trainers load a model given as a string through ``args.model_init_kwargs`` (and the DPO
reference model from the same keyword arguments). Packed tree rows need packmask's attention, so the
packmask trainers put ``attn_implementation="packmask"`` there before TRL loads anything -- through
TRL's own argument, no patching -- and refuse, naming the fix, a ``model_init_kwargs`` that asks for
another implementation.

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(model_init_kwargs={"dtype": "float32"})
    >>> packmask_model_init_kwargs("path/to/model", args, "PackedDPOTrainer").model_init_kwargs
    {'dtype': 'float32', 'attn_implementation': 'packmask'}
"""
from __future__ import annotations

from ..errors import PackmaskError
from ..integration import NAME

__all__ = ["packmask_model_init_kwargs"]


def packmask_model_init_kwargs(model, args, trainer: str):
    """``args`` with ``model_init_kwargs["attn_implementation"] = "packmask"`` when ``model`` is a string.

    A model instance is left alone (the trainer checks its attention after loading). ``args`` is
    updated in place (TRL reads ``args.model_init_kwargs``) and returned.
    """
    if not isinstance(model, str) or args is None:
        return args
    kwargs = dict(getattr(args, "model_init_kwargs", None) or {})
    chosen = kwargs.get("attn_implementation", NAME)
    if chosen != NAME:
        raise PackmaskError(f"{trainer}(model={model!r}): model_init_kwargs asks for attn_implementation={chosen!r}, but "
                            f"packed tree rows need {NAME!r}; leave attn_implementation out of model_init_kwargs "
                            f"({trainer} sets it).")
    kwargs["attn_implementation"] = NAME
    args.model_init_kwargs = kwargs
    return args
