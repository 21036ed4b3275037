"""Which modules of a model mix tokens outside attention: the *mixers* packmask runs per sequence.

State-space, recurrent, linear-attention and short-convolution layers carry information from one
token to the next without going through attention, so an attention mask cannot stop them at a
packed sequence's boundary. They are found by capability, not by family name:

* a module class named like a recurrent mixer (:data:`RECURRENT_MODULE_PATTERN`: Mamba, gated
  delta net, lightning / linear attention, RG-LRU, RWKV, xLSTM, short convolution, ...), or
* a module that holds an ``nn.Conv1d`` over the sequence (kernel size > 1).

The unit that packmask wraps is the *highest* module that holds such a layer but no attention and
is not a whole model, a module list or a decoder layer (those are searched inside, so the wrapped
unit stays as small as the model allows)::

    Qwen3_5ForCausalLM                      model: searched inside
      model.layers.0  (DecoderLayer)        decoder layer: searched inside
        linear_attn  Qwen3_5GatedDeltaNet   mixer, no attention inside  -> wrapped
        mlp          Qwen3_5MLP             mixes no tokens             -> left alone
      model.layers.3  (DecoderLayer)
        self_attn    Qwen3_5Attention       attention: packmask's mask isolates it already

>>> from packmask.testing import tiny_model
>>> [name for name, _ in find_mixers(tiny_model("mamba"))]
['backbone.layers.0.mixer', 'backbone.layers.1.mixer']
>>> find_mixers(tiny_model("llama"))
[]
"""
from __future__ import annotations

import inspect
import re
from functools import lru_cache

import torch

__all__ = ["RECURRENT_MODULE_PATTERN", "recurrent_module_names", "find_mixers", "is_sequence_conv", "attention_free",
           "mixer_kind"]

#: class names of token-mixing layers other than attention (state-space, recurrent, linear attention)
RECURRENT_MODULE_PATTERN = re.compile(
    r"Mamba|Mixer$|GatedDeltaNet|DeltaAttention|DeltaNet|LinearAttention|LightningAttention|ShortConv|Rglru|"
    r"RecurrentBlock|Rwkv|xLSTM|mLSTM|sLSTM")
#: class names the pattern catches that mix no tokens (a family's norms, configs, outputs)
_NOT_A_MIXER = re.compile(r"Norm|Config$|Cache$|Output$|Embeddings?$")


def is_sequence_conv(module) -> bool:
    """An ``nn.Conv1d`` whose kernel spans more than one token (a convolution over the sequence)."""
    return isinstance(module, torch.nn.Conv1d) and module.kernel_size[0] > 1


@lru_cache(maxsize=None)
def calls_attention_interface(cls) -> bool:
    """Whether ``cls.forward`` dispatches through transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``): softmax attention that packmask's mask already isolates, whatever
    its name. Kimi Linear's MLA layer is ``KimiLinearAttention``: named like a linear-attention mixer,
    it was run once per packed sequence (exact, but a wasted split) until this check. Read from the
    source, by feature, as transformers releases differ."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    return "ALL_ATTENTION_FUNCTIONS" in source


def _named_like_mixer(module) -> bool:
    name = type(module).__name__
    return (bool(RECURRENT_MODULE_PATTERN.search(name)) and not _NOT_A_MIXER.search(name)
            and not calls_attention_interface(type(module)))


def recurrent_module_names(model) -> list[str]:
    """Sorted class names of the token-mixing layers in ``model`` (what :mod:`packmask.support` reports)."""
    found = []
    for module in model.modules():
        name = type(module).__name__
        if (RECURRENT_MODULE_PATTERN.search(name) and not name.endswith(("Config", "Cache", "Output"))
                and not calls_attention_interface(type(module))):
            found.append(name)
        elif is_sequence_conv(module):
            found.append(f"{name} (convolution over the sequence)")
    return sorted(set(found))


def _is_attention(module) -> bool:
    """A softmax-attention module (the kind packmask's mask isolates): transformers' attention
    classes carry an ``is_causal`` flag or are named ``...Attention``; recurrent ones are excluded."""
    if _named_like_mixer(module):
        return False
    return isinstance(getattr(module, "is_causal", None), bool) or type(module).__name__.endswith("Attention")


def attention_free(model) -> bool:
    """Whether ``model`` has no softmax-attention layer at all (mamba, rwkv, xlstm, ...).

    >>> from packmask.testing import tiny_model
    >>> attention_free(tiny_model("mamba")), attention_free(tiny_model("qwen3_5_text"))
    (True, False)
    """
    return not any(_is_attention(m) for m in model.modules())


def _mixes_tokens(module) -> bool:
    return any(_named_like_mixer(m) or is_sequence_conv(m) for m in module.modules())


def _search_inside(module) -> bool:
    from transformers import PreTrainedModel

    if isinstance(module, (PreTrainedModel, torch.nn.ModuleList, torch.nn.ModuleDict, torch.nn.Sequential)):
        return True
    if any(_is_attention(m) for m in module.modules()):
        return True  # holds attention: wrap its recurrent parts only
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:  # pragma: no cover - older transformers
        return False
    return isinstance(module, GradientCheckpointingLayer)  # a decoder layer: wrap the mixer inside it


def find_mixers(model) -> list[tuple[str, torch.nn.Module]]:
    """``(qualified name, module)`` of every mixer packmask wraps in ``model`` (see the module doc)."""
    found = []

    def visit(prefix, module):
        for name, child in module.named_children():
            if not _mixes_tokens(child):
                continue
            full = f"{prefix}.{name}" if prefix else name
            if _search_inside(child) and any(True for _ in child.children()):
                visit(full, child)
            else:
                found.append((full, child))

    visit("", model)
    return found


def mixer_kind(module) -> str:
    """How a mixer's PyTorch code runs over the tokens, which prices its calls (:mod:`.batched`):
    ``"vectorized"`` (every token at once: a convolution over the sequence, a short-convolution block, or
    Mamba2's state-space duality, whose modeling file defines ``segment_sum`` to scan all chunks in
    parallel) or ``"looped"`` (a Python loop over chunks or tokens: gated delta rules, Mamba1's selective
    scan, RG-LRU, RWKV, ...). Read by feature, not by family name, so a new family is priced by its code.

    >>> from packmask.testing import tiny_model
    >>> [mixer_kind(m) for _, m in find_mixers(tiny_model("mamba"))]
    ['looped', 'looped']
    >>> mixer_kind(torch.nn.Conv1d(4, 4, 3, groups=4))
    'vectorized'
    """
    import sys

    if isinstance(module, torch.nn.Conv1d) or "ShortConv" in type(module).__name__:
        return "vectorized"
    defining = sys.modules.get(type(module).__module__)
    return "vectorized" if callable(getattr(defining, "segment_sum", None)) else "looped"
