"""Installing the per-sequence path on one model instance (and taking it off again).

:func:`install` replaces the ``forward`` of every mixer :func:`~packmask.recurrent.detect.find_mixers`
finds *on this model instance only* (an instance attribute, as PEFT and Liger do; the class and
every other model stay untouched), and adds hooks:

* on every ``PreTrainedModel`` that holds a mixer, a forward hook that resets the layout after the
  forward, also when it raises (:func:`~packmask.recurrent.context.exit_forward`); packmask's
  input-deriving pre-hook sets it (:func:`~packmask.recurrent.context.enter_forward`);
* on every mixer and every decoder layer holding one, the activation-checkpointing replay hooks
  (:func:`~packmask.recurrent.context.replay_pre_hook`).

Models on ``attn_implementation="packmask"`` get it on their first forward;
``packmask.enable(model)`` installs it at once. On unpacked input every wrapped mixer calls its
original forward unchanged.

>>> from packmask.testing import tiny_model
>>> model = tiny_model("mamba")
>>> install(model)
['backbone.layers.0.mixer', 'backbone.layers.1.mixer']
>>> installed(model), uninstall(model), installed(model)
(['backbone.layers.0.mixer', 'backbone.layers.1.mixer'], 2, None)
"""
from __future__ import annotations

import torch

from .context import CHECKPOINTED, HOOKED, enter_forward, exit_forward, replay_exit_hook, replay_pre_hook
from .detect import find_mixers
from .segmented import SegmentedForward
from .settings import SETTINGS
from .varlen import MixerForward, varlen_refusal

__all__ = ["install", "installed", "uninstall", "ensure_installed", "enter_forward", "describe_paths"]

_INSTALLED = "_packmask_recurrent_mixers"
_HANDLES = "_packmask_recurrent_handles"
_CHECKED = "_packmask_recurrent_checked"


def installed(model) -> list[str] | None:
    """Names of the mixers running per sequence in ``model``, None when not installed."""
    return model.__dict__.get(_INSTALLED)


def _decoder_layers(model, mixer_names):
    """Modules between the model and its mixers that are decoder layers (checkpointed units)."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        GradientCheckpointingLayer = ()
    layers, modules = {}, dict(model.named_modules())
    for name in mixer_names:
        parts = name.split(".")
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            parent = modules.get(".".join(parts[:i - 1])) if i > 1 else model
            module = modules[prefix]
            if isinstance(module, GradientCheckpointingLayer) or isinstance(parent, torch.nn.ModuleList):
                layers[prefix] = module
    return layers


def install(model) -> list[str]:
    """Run every recurrent / convolutional mixer of ``model`` once per packed sequence (see the module
    docstring). Idempotent; returns the wrapped mixers' names ([] when the model has none)."""
    from transformers import PreTrainedModel

    done = installed(model)
    if done is not None:
        return done
    for sub in model.modules():
        sub.__dict__.pop(_CHECKED, None)
    mixers = find_mixers(model)
    names = [name for name, _ in mixers]
    handles = []
    if mixers:
        for name, module in mixers:
            module.forward = MixerForward(module, module.forward, name)
        for module in [m for _, m in mixers] + list(_decoder_layers(model, names).values()):
            handles.append(module.register_forward_pre_hook(replay_pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(replay_exit_hook, always_call=True))
        wrapped = {id(m) for _, m in mixers}
        checkpointed = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]
        for sub in model.modules():
            if isinstance(sub, PreTrainedModel) and any(id(m) in wrapped for m in sub.modules()):
                sub.__dict__[HOOKED] = True
                sub.__dict__[CHECKPOINTED] = checkpointed
                handles.append(sub.register_forward_hook(exit_forward, always_call=True))
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            sub.__dict__[_INSTALLED] = names
    model.__dict__[_HANDLES] = handles
    return names


def uninstall(model) -> int:
    """Restore the original forwards and remove the hooks; returns how many mixers were restored.
    The model then refuses packed input again (until :func:`install`)."""
    from transformers import PreTrainedModel

    restored = 0
    for module in model.modules():
        wrapper = module.__dict__.get("forward")
        if isinstance(wrapper, SegmentedForward):
            del module.__dict__["forward"]
            if getattr(wrapper.original, "__self__", None) is not module:
                module.forward = wrapper.original  # a forward someone else had replaced before packmask
            restored += 1
    for handle in model.__dict__.pop(_HANDLES, []):
        handle.remove()
    for sub in model.modules():
        if isinstance(sub, PreTrainedModel):
            for key in (_INSTALLED, HOOKED, CHECKPOINTED):
                sub.__dict__.pop(key, None)
            sub.__dict__[_CHECKED] = True  # stays off (packed input is refused again) until install(model)
    return restored


def ensure_installed(model) -> None:
    """Install on a model's first forward with packmask when it has mixers (checked once)."""
    if model.__dict__.get(_CHECKED) or installed(model) is not None:
        return
    model.__dict__[_CHECKED] = True
    if any(type(m).__name__.endswith("Indexer") for m in model.modules()):
        return  # sparse-attention indexers read the raw mask: refused by packmask.support, not ours
    if find_mixers(model):
        install(model)


def describe_paths(model, *, device=None, dtype=None) -> dict:
    """``{mixer name: {"path": ..., "why": ...}}`` for every mixer of ``model`` (installs packmask's
    mixers when needed) on tensors of ``device`` / ``dtype`` (default: the model's parameters')."""
    install(model)
    parameter = next(model.parameters())
    device = device if device is not None else parameter.device
    dtype = dtype if dtype is not None else parameter.dtype
    out = {}
    for module in model.modules():
        wrapper = module.__dict__.get("forward")
        if isinstance(wrapper, MixerForward):
            if SETTINGS["path"] == "generic":
                out[wrapper.name] = {"path": "generic", "why": "configure(path='generic')"}
                continue
            why = varlen_refusal(wrapper.plan(), device=device, dtype=dtype)
            out[wrapper.name] = {"path": "generic" if why else "varlen", "why": why or "kernels with boundaries"}
    return out
