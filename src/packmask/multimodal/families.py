"""How each vision-language family runs ONE sample, learned from the model: its positions, its attention
rule, where its images go. :class:`~packmask.multimodal.MultimodalCollator` repeats that per sample.

==============================  ==================  ===========================  ========================
family (``model_type``)         positions           attention inside a sample    image tensors
==============================  ==================  ===========================  ========================
qwen2_vl, qwen2_5_vl, qwen3_vl  the model's own     causal                       concatenated on dim 0
                                ``get_rope_index``                               (patches, grids)
                                (mRoPE), text row
                                first: ``[4, B, L]``
gemma3                          0, 1, ...           causal + bidirectional       dim 0 (images)
                                                    inside each image
paligemma                       1, 2, ... (its      prefix-LM: image + prompt    dim 0
                                positions start     bidirectional, the suffix
                                at 1)               causal
llava, llava_next, mistral3     0, 1, ...           causal                       dim 0 (padded to the
                                                                                 largest image / tile
                                                                                 count; ``image_sizes``
                                                                                 crops)
idefics3, smolvlm               0, 1, ...           causal                       dim 1 (images of a row;
                                                                                 rows padded with blank
                                                                                 images, which the model
                                                                                 drops)
==============================  ==================  ===========================  ========================

A causal family is packed by positions alone: they restart in every sample, and packmask reads the
samples from them (block-diagonal, the fast varlen kernels). The other rules need a per-sample
``[B, N, N]`` mask. Any other family is refused with :class:`~packmask.UnsupportedModelError`.

>>> from packmask.multimodal.tiny import tiny_vlm
>>> family_of(tiny_vlm("gemma3")).attention
'image_bidirectional'
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

from ..errors import PackmaskError, UnsupportedModelError

__all__ = ["VisionFamily", "FAMILIES", "family_of", "rope_index_function", "takes_text_row", "uses_packmask"]

#: per-token keys: concatenated along the row; the rest of a sample's tensors are vision inputs
TOKEN_KEYS = ("input_ids", "labels", "token_type_ids", "mm_token_type_ids")


@dataclass(frozen=True)
class VisionFamily:
    """The packing rule of one family.

    Attributes:
        positions: ``"mrope"`` (the model's ``get_rope_index`` per sample) or ``"text"`` (``0, 1, ...``).
        attention: ``"causal"``, ``"image_bidirectional"`` (image tokens, ``token_type_ids == 1``, see
            their whole image) or ``"prefix"`` (tokens with ``token_type_ids == 0`` see each other).
        first_position: the position of a sample's first token (PaliGemma numbers from 1).
        image_dim: the dimension image tensors are concatenated on (1 where dim 0 is the batch).
    """

    positions: str = "text"
    attention: str = "causal"
    first_position: int = 0
    image_dim: int = 0


FAMILIES = {
    "qwen2_vl": VisionFamily(positions="mrope"),
    "qwen2_5_vl": VisionFamily(positions="mrope"),
    "qwen3_vl": VisionFamily(positions="mrope"),
    "gemma3": VisionFamily(attention="image_bidirectional"),
    "paligemma": VisionFamily(attention="prefix", first_position=1),
    "llava": VisionFamily(),
    "llava_next": VisionFamily(),
    "mistral3": VisionFamily(),
    "idefics3": VisionFamily(image_dim=1),
    "smolvlm": VisionFamily(image_dim=1),
}


def uses_packmask(model) -> bool:
    impl = getattr(model.config, "_attn_implementation", None)
    return "packmask" in impl.values() if isinstance(impl, dict) else impl == "packmask"


def family_of(model) -> VisionFamily:
    """The packing rule of ``model``; raises :class:`UnsupportedModelError` for a family without one."""
    model_type = getattr(model.config, "model_type", type(model).__name__)
    family = FAMILIES.get(model_type)
    if family is None:
        raise UnsupportedModelError(
            f"{model_type} ({type(model).__name__}) has no multimodal packing rule in packmask (supported: "
            f"{', '.join(FAMILIES)}); its per-sample positions and attention are unknown, so packing could be "
            f"silently wrong. Train it unpacked (one sample per row).")
    if family.positions == "mrope" and rope_index_function(model) is None:
        raise UnsupportedModelError(
            f"{model_type}: this transformers version exposes no get_rope_index on {type(model).__name__} or its "
            f".model, so packmask cannot compute each sample's multimodal positions. Train it unpacked.")
    if family.attention == "image_bidirectional" and getattr(model.config.get_text_config(),
                                                             "use_bidirectional_attention", False):
        raise UnsupportedModelError(f"{model_type} with use_bidirectional_attention=True (an embedding model) has no "
                                    f"causal per-sample rule packmask knows; train it unpacked.")
    return family


def rope_index_function(model):
    """The model's own public per-sample mRoPE function (``model.model.get_rope_index`` in transformers
    5.x; ``model.get_rope_index`` on some versions), or None."""
    for owner in (getattr(model, "model", None), model):
        fn = getattr(owner, "get_rope_index", None)
        if callable(fn):
            return fn
    return None


def call_rope_index(fn, **inputs):
    """Call ``get_rope_index`` with the inputs its signature takes (``mm_token_type_ids`` appeared in
    transformers 5.x; ``second_per_grid_ts`` is Qwen2.5-VL's); returns the ``[3, 1, n]`` positions."""
    params = inspect.signature(fn).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params.values())
    if "mm_token_type_ids" in params and inputs.get("mm_token_type_ids") is None:
        raise PackmaskError(f"a sample has no mm_token_type_ids, which {fn.__qualname__} needs for its positions: call "
                            f"the processor with return_mm_token_type_ids=True (0 text, 1 image, 2 video per token).")
    given = {k: v for k, v in inputs.items() if v is not None and (k in params or takes_any)}
    missing = [k for k, v in inputs.items() if v is not None and k not in given and k != "second_per_grid_ts"]
    if missing and "mm_token_type_ids" not in missing:
        raise PackmaskError(f"{fn.__qualname__} takes none of {missing}; packmask cannot compute this model's "
                            f"positions with it. Train it unpacked.")
    out = fn(**given)
    return out[0] if isinstance(out, tuple) else out


def takes_text_row(model) -> bool:
    """Whether the language model reads a text row before the 3 mRoPE rows (``[4, B, L]`` position ids;
    the row packmask reads the samples from). Read from its forward's source, by feature not version."""
    language_model = getattr(getattr(model, "model", model), "language_model", None)
    try:
        source = inspect.getsource(type(language_model).forward)
    except (OSError, TypeError):
        return False
    return "text_position_ids" in source
