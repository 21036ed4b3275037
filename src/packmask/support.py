"""Which models packmask can isolate per sequence, and the guard for those it cannot.

Packing is exact when the *only* way tokens exchange information is attention (which packmask
masks per document) and the only per-token input that depends on the document is the position
(which packmask restarts per document). Models that mix tokens some other way cannot be made
exact by a mask; packmask refuses them **on packed input** with
:class:`~packmask.UnsupportedModelError` instead of returning a silently wrong result. An
ordinary unpacked batch is never refused. Recurrent: state-space / recurrent / convolution layers are
the exception once :mod:`packmask.recurrent` runs them once per packed sequence (automatic on
``attn_implementation="packmask"``, or ``packmask.enable``): such models are accepted on packed input;
:func:`unsupported_reason` still names their layers (context parallelism, for one, cannot split them).

Detection is by capability, not by name, so a new family with the same feature is caught too:

==========================  =====================================================================
capability                  how it is detected
==========================  =====================================================================
state-space / recurrent /   a sub-module whose class is a Mamba mixer, a gated-delta-net, linear /
linear-attention layers     lightning attention, RG-LRU, RWKV, xLSTM or short convolution, or a
                            ``nn.Conv1d`` over the sequence (mamba, mamba2, jamba, zaya,
                            bamba, falcon_h1, zamba, zamba2, granitemoehybrid, nemotron_h, lfm2,
                            qwen3_next, qwen3_5, olmo_hybrid, kimi_linear, minimax,
                            recurrent_gemma, rwkv, xlstm, …): their state flows across document
                            boundaries whatever the mask says.
attention outside           no module of the model comes from a file that uses transformers'
transformers' interface     ``ALL_ATTENTION_FUNCTIONS``: its own attention code never calls packmask
                            (bloom and mpt with ALiBi, gpt_neo, xglm, reformer, xlnet, …), so a
                            packed mask would not reach it. Refused on every call with packmask.
sparse-attention indexer    a sub-module class ending in ``Indexer`` (deepseek_v32, glm_moe_dsa, …):
                            it reads the raw mask outside the attention function.
==========================  =====================================================================

>>> from packmask.testing import tiny_model
>>> unsupported_reason(tiny_model("llama")) is None
True
>>> print(unsupported_reason(tiny_model("mamba")))     # doctest: +ELLIPSIS
mamba has state-space / recurrent layers (...) whose state flows from one packed sequence into the next; ...
"""
from __future__ import annotations

import sys

import torch

from .errors import UnsupportedModelError
from .inputs import is_packed, layout_from_mask, resolve_layout
# recurrent: the detection is shared with packmask.recurrent
from .recurrent.detect import RECURRENT_MODULE_PATTERN, recurrent_module_names
from .segments import starts_from_position_ids

__all__ = ["unsupported_reason", "alibi_setting", "check_packed_input", "is_packed_input", "RECURRENT_MODULE_PATTERN"]

_FIX = ("Train this model unpacked (one sequence per row with a 2D padding mask), or pick a model whose "
        "sequence mixing is attention only (check with packmask.verify(model)).")


def _recurrent_modules(model) -> list[str]:
    return recurrent_module_names(model)  # recurrent: moved to packmask.recurrent.detect


def _uses_attention_interface(model) -> bool:
    """Whether any module of ``model`` is defined next to transformers' ``ALL_ATTENTION_FUNCTIONS``
    (the attention-interface dispatch that calls packmask); models with their own attention code
    (bloom, mpt, gpt_neo, xglm, …) never import it."""
    seen = set()
    for module in model.modules():
        name = type(module).__module__
        if name in seen or not name.startswith("transformers.models."):
            continue
        seen.add(name)
        if hasattr(sys.modules.get(name), "ALL_ATTENTION_FUNCTIONS"):
            return True
    return not seen  # not a transformers model: assume it follows the interface


def alibi_setting(model) -> str | None:
    """What turns ALiBi on in ``model`` (None when it is off): a config flag (``alibi=True`` as in falcon,
    ``attn_config.alibi=True`` as in mpt, ``position_embedding_type="alibi"``), or, for a family
    with no flag (bloom), an ALiBi builder in its modeling module.

    >>> from transformers import FalconConfig, FalconForCausalLM
    >>> alibi_setting(FalconForCausalLM(FalconConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2,
    ...                                              vocab_size=16, alibi=True)))
    'config.alibi=True'
    """
    config = getattr(model, "config", None)
    if getattr(config, "position_embedding_type", None) == "alibi":
        return "config.position_embedding_type='alibi'"
    flags = [("config.alibi", getattr(config, "alibi", None)),
             ("config.attn_config.alibi", getattr(getattr(config, "attn_config", None), "alibi", None))]
    flags = [(name, value) for name, value in flags if isinstance(value, bool)]
    if flags:
        return next((f"{name}=True" for name, value in flags if value), None)
    for name in dict.fromkeys(type(m).__module__ for m in model.modules()):
        source = sys.modules.get(name) if name.startswith("transformers.models.") else None
        builders = sorted((a for a in vars(source) if "alibi" in a.lower()) if source else (),
                          key=lambda a: (a.startswith("_"), a))  # a public builder names it best
        if builders:
            return f"{builders[0]} in {name}"
    return None


def unsupported_reason(model) -> str | None:
    """Why packed rows cannot be exact for ``model`` (None when they can). Cached on the model."""
    return _diagnose(model)[1] or None


def _diagnose(model) -> tuple[str, str]:
    """``(kind, reason)``: kind is "" (supported), "recurrent" or "interface"."""
    cached = model.__dict__.get("_packmask_unsupported")
    if cached is not None:
        return cached
    model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    kind, reason = "", ""
    recurrent = _recurrent_modules(model)
    if any(type(m).__name__.endswith("Indexer") for m in model.modules()):  # recurrent: named before recurrent layers
        kind = "recurrent"  # refused on packed input, like recurrent layers
        reason = (f"{model_type} has a sparse-attention indexer (DeepSeek sparse attention) that selects keys from the "
                  f"raw attention mask itself, outside the attention function packmask replaces.")
    elif recurrent:
        kind = "recurrent"
        reason = (f"{model_type} has state-space / recurrent layers ({', '.join(recurrent[:3])}) whose state flows "
                  f"from one packed sequence into the next; an attention mask cannot isolate them.")
    elif (alibi := alibi_setting(model)) is not None:
        kind = "interface"  # refused on every call: the bias rides on the attention mask packmask replaces
        reason = (f"{model_type} ({type(model).__name__}) uses ALiBi ({alibi}): the model adds its "
                  f"distance bias to the attention scores in its own code, outside transformers' AttentionInterface, "
                  f"where packmask's per-sequence mask cannot reach it.")
    elif not _uses_attention_interface(model):
        kind = "interface"
        reason = (f"{model_type} ({type(model).__name__}) uses its own attention code, which does not go through "
                  f"transformers' AttentionInterface, so packmask's per-sequence mask never reaches it.")
    model.__dict__["_packmask_unsupported"] = (kind, reason)
    return kind, reason


def is_packed_input(mask=None, position_ids=None, cu_seq_lens=None, seq_lengths=None, batch_size=None) -> bool:
    """Whether a forward's inputs put more than one sequence in a row.

    A ``[B, N, N]`` / ``[B, 1, N, N]`` mask that is not plain causal or full, ``cu_seq_lens`` or
    ``seq_lengths`` with more sequences than rows, or ``position_ids`` that restart inside a row (the
    restart rule of :mod:`packmask.segments`). Read by :func:`packmask.inputs.resolve_layout`, so the
    analysis is shared with the forward that follows. Row padding after the last of ``seq_lengths``
    does not count as a sequence.

    >>> is_packed_input(position_ids=torch.tensor([[0, 1, 2, 0, 1]])), is_packed_input(seq_lengths=[[3], [4]])
    (True, False)
    """
    if seq_lengths is not None:
        return any(sum(int(x) > 0 for x in r) > 1 for r in seq_lengths)  # empty documents vanish
    if isinstance(mask, torch.Tensor) and mask.dim() in (3, 4) and mask.shape[-1] == mask.shape[-2]:
        return is_packed(layout_from_mask(mask))
    if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 3:  # multimodal RoPE: [3, B, N]
        return bool(starts_from_position_ids(position_ids)[..., 1:].any())
    if cu_seq_lens is None and not (isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2
                                    and position_ids.shape[-1] > 1):
        return False
    B = batch_size or (position_ids.shape[0] if position_ids is not None else 1)
    N = position_ids.shape[-1] if position_ids is not None else (int(cu_seq_lens.reshape(-1)[-1]) // max(B, 1))
    return is_packed(resolve_layout(B, N, position_ids=position_ids, cu_seq_lens_q=cu_seq_lens))


def check_packed_input(model, **inputs) -> None:
    """Raise :class:`UnsupportedModelError` when ``model`` cannot run ``inputs`` exactly with packmask.

    Models with recurrent / state-space layers are refused only when ``inputs`` are packed (see
    :func:`is_packed_input`); models whose attention bypasses transformers' AttentionInterface are
    refused on every call, because packmask's attention never runs inside them (their own code would
    otherwise fail on packmask's mask object with an unrelated TypeError).
    """
    kind, reason = _diagnose(model)
    if kind == "interface":
        raise UnsupportedModelError(
            f"packmask cannot run this model: {reason} Use attn_implementation='eager' (or 'sdpa') for it and "
            f"train unpacked (one sequence per row with a 2D padding mask).")
    # recurrent: models whose mixers run per packed sequence (packmask.recurrent) are exact on packed input
    if kind == "recurrent" and is_packed_input(**inputs) and not _runs_per_sequence(model):
        raise UnsupportedModelError(f"packmask cannot pack this model: {reason} {_FIX}")


def _runs_per_sequence(model) -> bool:  # recurrent:
    from .recurrent import installed
    return bool(installed(model)) and not any(type(m).__name__.endswith("Indexer") for m in model.modules())


def position_offset(model) -> int:
    """The first position id of a sequence in ``model`` (0 for almost every model).

    RoBERTa-style embeddings (roberta, xlm-roberta, camembert, data2vec-text, …) number real
    tokens from ``padding_idx + 1`` (``create_position_ids_from_input_ids``); position ids that
    packmask derives for packed sequences must start there too to equal each sequence alone.
    Cached on the model.

    >>> from transformers import AutoModel
    >>> from packmask.testing import tiny_config
    >>> position_offset(AutoModel.from_config(tiny_config("roberta", pad_token_id=1)))
    2
    """
    cached = model.__dict__.get("_packmask_position_offset")
    if cached is not None:
        return cached
    offset = 0
    for module in model.modules():
        if hasattr(type(module), "create_position_ids_from_input_ids") and isinstance(
                getattr(module, "padding_idx", None), int):
            offset = module.padding_idx + 1
            break
    model.__dict__["_packmask_position_offset"] = offset
    return offset
