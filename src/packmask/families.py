"""Which model to build or load for a family name or a saved folder, and whether it is an encoder.

``packmask verify --model bert`` used to build ``BertLMHeadModel`` (a causal-LM head on an encoder)
and check it with causal masks, so it failed although encoders work. Here the choice follows the
family:

=================================  ====================================  ==================
family / folder                    class                                 masks verify uses
=================================  ====================================  ==================
decoder (llama, qwen2, gpt2, ...)  ``AutoModelForCausalLM``              causal per document
encoder (bert, roberta,            ``AutoModel`` (the base class) for a  bidirectional per
modernbert, ...)                   family name; a saved folder loads     document
                                   the class its config names
                                   (``BertModel``, ``BertForMaskedLM``)
=================================  ====================================  ==================

An *encoder* is a family with a masked-LM class whose config is not set up as a decoder
(``is_decoder``) nor as an encoder-decoder. Whether a *built* model attends causally is read from
its attention layers (:func:`is_causal_model`), so a ``BertLMHeadModel`` with ``is_decoder=False``
is treated as the encoder it is.

>>> from packmask.tiny import tiny_config
>>> is_encoder_config(tiny_config("bert")), is_encoder_config(tiny_config("llama"))
(True, False)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import PackmaskError
from .guards import is_causal_model  # noqa: F401  (re-exported: families.is_causal_model)

__all__ = ["model_for", "is_encoder_config", "is_causal_model"]


def is_encoder_config(config) -> bool:
    """A bidirectional encoder family (bert, roberta, modernbert, ...), not set up as a decoder."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

    if getattr(config, "is_decoder", False) or getattr(config, "is_encoder_decoder", False):
        return False
    return getattr(config, "model_type", None) in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def model_for(spec: str, *, attn_implementation: str = "packmask", seed: int = 0, dtype=torch.float32):
    """The model to verify for ``spec``: a transformers ``model_type`` (a tiny random model, built
    offline from its config) or the path of a folder written by ``save_pretrained``.

    Raises :class:`PackmaskError` naming the fix for an unknown family, a family that is neither a
    decoder nor an encoder (t5, bark, ...), or a folder that does not load; and
    :class:`~packmask.UnsupportedModelError` for a family packmask refuses (gpt_neo, ...).

    >>> type(model_for("bert")).__name__, type(model_for("llama")).__name__
    ('BertModel', 'LlamaForCausalLM')
    """
    path = Path(spec)
    if path.exists():
        return _load_folder(path, attn_implementation, dtype)
    from transformers import AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    from .tiny import tiny_config

    from .multimodal.tiny import VLM_FAMILIES  # multimodal: a tiny vision-language model of the family
    if spec in VLM_FAMILIES:
        from .multimodal.tiny import tiny_vlm
        return tiny_vlm(spec, attn_implementation=attn_implementation, seed=seed, dtype=dtype)
    config = tiny_config(spec)
    if is_encoder_config(config):
        auto = AutoModel
    elif spec in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        auto = AutoModelForCausalLM
    else:
        kind = "an encoder-decoder" if getattr(config, "is_encoder_decoder", False) else "not a causal LM nor an encoder"
        raise PackmaskError(f"{spec!r} is {kind}; packmask verifies causal LMs (llama, qwen2, ...) and encoders "
                            f"(bert, roberta, modernbert, ...). Pass one of those, or a saved model folder.")
    torch.manual_seed(seed)
    return auto.from_config(config, attn_implementation=attn_implementation, dtype=dtype).eval()


def _load_folder(path: Path, attn_implementation: str, dtype):
    import transformers
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PackmaskError(f"could not read a model config from {path}: {first_line}. Point at a folder written by "
                            f"model.save_pretrained (it holds config.json), or pass a family name such as llama.") from None
    named = [getattr(transformers, a, None) for a in (getattr(config, "architectures", None) or [])]
    cls = next((c for c in named if c is not None), None)
    if cls is None:
        cls = AutoModel if is_encoder_config(config) else AutoModelForCausalLM
    try:
        model = cls.from_pretrained(str(path), attn_implementation=attn_implementation, dtype=dtype,
                                    local_files_only=True)
    except (OSError, ValueError) as error:
        if isinstance(error, PackmaskError):
            raise
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise PackmaskError(f"could not load {getattr(cls, '__name__', cls)} from {path}: {first_line}. Point at a "
                            f"folder written by model.save_pretrained, or pass a family name such as llama.") from None
    return model.eval()
