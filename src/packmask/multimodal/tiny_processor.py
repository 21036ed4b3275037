"""Tiny processors for the tiny vision-language models of :mod:`packmask.multimodal.tiny`, built offline:
a word-level tokenizer (``w3`` ... ``w95`` are tokens 3-95, the special tokens sit at the ids the tiny
configs use) and the family's real image processor at tiny sizes, assembled into the family's
``*Processor`` class, with a ChatML-like chat template.

    >>> processor = tiny_processor("gemma3")
    >>> processor(text=["w5 <start_of_image> w7"], images=[tiny_image(20, 28)], return_tensors="pt")["input_ids"]
    tensor([[  5, 101, 100, 100, 100, 100, 102,   7]])

The Qwen processors require a video processor, which transformers builds only with ``torchvision``;
without it, :func:`tiny_processor` returns the family's processor class with the video slot left
empty (videos then are refused by the processor; images and text run the family's own code).
"""
from __future__ import annotations

from .tiny import IMG, VE, VID, VS

__all__ = ["tiny_processor", "tiny_tokenizer", "tiny_image", "PROCESSOR_FAMILIES"]

PROCESSOR_FAMILIES = ("qwen2_5_vl", "gemma3", "llava")
_TURN = "<|im_start|>", "<|im_end|>"
_SPECIAL = {
    "qwen2_5_vl": ({"<|image_pad|>": IMG, "<|vision_start|>": VS, "<|vision_end|>": VE, "<|video_pad|>": VID},
                   {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>",
                    "vision_start_token": "<|vision_start|>", "vision_end_token": "<|vision_end|>"},
                   "<|vision_start|><|image_pad|><|vision_end|>"),
    "gemma3": ({"<image_soft_token>": IMG, "<start_of_image>": VS, "<end_of_image>": VE},
               {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
               "<start_of_image>"),
    "llava": ({"<image>": IMG}, {"image_token": "<image>"}, "<image>"),
}


def _template(image: str) -> str:
    start, end = _TURN
    return ("{% for m in messages %}" + start + "{{ m.role }} {% if m.content is string %}{{ m.content }}{% else %}"
            "{% for p in m.content %}{% if p.type == 'image' %}" + image + " {% else %}{{ p.text }} {% endif %}"
            "{% endfor %}{% endif %}" + end + " {% endfor %}{% if add_generation_prompt %}" + start
            + "assistant {% endif %}")


def tiny_tokenizer(family: str):
    """A word-level fast tokenizer: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``w3``..``w95``, ``user`` /
    ``assistant`` / ``system`` 96-98, the family's image tokens at 100-103, chat turns at 104-105."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    ids, named, _ = _SPECIAL[family]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, 96)}, "user": 96, "assistant": 97,
             "system": 98, **ids, _TURN[0]: 104, _TURN[1]: 105}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens=named)
    others = [t for t in [*ids, *_TURN] if t not in named.values()]
    tokenizer.add_special_tokens({"additional_special_tokens": others}, replace_extra_special_tokens=False)
    return tokenizer


def tiny_processor(family: str):
    """The ``family``'s processor at the tiny sizes of :func:`~packmask.multimodal.tiny.tiny_vlm`
    (Qwen2.5-VL: 4-pixel patches merged 2x2, 16-40 pixel sides; Gemma 3: 16x16 images, 4 tokens each;
    LLaVA: 16x16 crops, 16 tokens each)."""
    import transformers as tf

    tokenizer = tiny_tokenizer(family)
    template = _template(_SPECIAL[family][2])
    if family == "gemma3":
        cls = getattr(tf, "Gemma3ImageProcessorPil", None) or tf.Gemma3ImageProcessor
        return tf.Gemma3Processor(image_processor=cls(size={"height": 16, "width": 16}), tokenizer=tokenizer,
                                  image_seq_length=4, chat_template=template)
    if family == "llava":  # CLIP-style 16x16 images, 4-pixel patches: 16 tokens (the class token dropped)
        cls = getattr(tf, "CLIPImageProcessorPil", None) or tf.CLIPImageProcessor
        images = cls(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        return tf.LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, chat_template=template,
                                 vision_feature_select_strategy="default", num_additional_image_tokens=1)
    if family == "qwen2_5_vl":
        cls = getattr(tf, "Qwen2VLImageProcessorPil", None) or tf.Qwen2VLImageProcessor
        images = cls(patch_size=4, merge_size=2, temporal_patch_size=2, min_pixels=16 * 16, max_pixels=40 * 40)
        try:
            return tf.Qwen2_5_VLProcessor(image_processor=images, tokenizer=tokenizer, chat_template=template)
        except (AttributeError, ValueError, TypeError):  # no torchvision: no video processor class to check against
            return _images_only_qwen()(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                       chat_template=template)
    raise ValueError(f"no tiny processor for {family!r}; choose from {', '.join(PROCESSOR_FAMILIES)}")


def _images_only_qwen():
    import transformers as tf

    class ImagesOnlyQwen2_5_VLProcessor(tf.Qwen2_5_VLProcessor):
        """Qwen2.5-VL's processor without a video processor (whose class needs torchvision): only the
        class check of the empty video slot is skipped."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImagesOnlyQwen2_5_VLProcessor



def tiny_image(height: int, width: int, seed: int = 0):
    """A random RGB ``PIL.Image`` of ``height`` x ``width`` pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))
