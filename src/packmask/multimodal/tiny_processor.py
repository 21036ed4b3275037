"""Tiny processors for the tiny vision-language models of :mod:`packmask.multimodal.tiny`, built offline:
a word-level tokenizer (``w3`` ... ``w95`` are tokens 3-95, the special tokens sit at the ids the tiny
configs use) and the family's real image processor at tiny sizes, assembled into the family's
``*Processor`` class, with a ChatML-like chat template.

    >>> processor = tiny_processor("gemma3")
    >>> processor(text=["w5 <start_of_image> w7"], images=[tiny_image(20, 28)], return_tensors="pt")["input_ids"]
    tensor([[  5, 101, 100, 100, 100, 100, 102,   7]])

The Qwen and SmolVLM processors require a video processor, which transformers builds only with
``torchvision``; without it, :func:`tiny_processor` returns the family's processor class with the
video slot left empty (videos then are refused by the processor; images and text run the family's
own code). Two processors cannot be built without an optional package (:func:`processor_unavailable`
says which): Mistral3's ``PixtralProcessor`` imports ``torchvision``, SmolVLM's needs ``num2words``.
"""
from __future__ import annotations

from ..errors import PackmaskError
from .tiny import IMG, VE, VID, VS

__all__ = ["tiny_processor", "tiny_tokenizer", "tiny_image", "processor_unavailable", "PROCESSOR_FAMILIES"]

PROCESSOR_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "llava", "llava_next", "idefics3",
                      "smolvlm", "mistral3")
_TURN = "<|im_start|>", "<|im_end|>"
_QWEN = ({"<|image_pad|>": IMG, "<|vision_start|>": VS, "<|vision_end|>": VE, "<|video_pad|>": VID},
         {"image_token": "<|image_pad|>", "video_token": "<|video_pad|>", "vision_start_token": "<|vision_start|>",
          "vision_end_token": "<|vision_end|>"},
         "<|vision_start|><|image_pad|><|vision_end|>")
_LLAVA = ({"<image>": IMG}, {"image_token": "<image>"}, "<image>")
# Idefics3 / SmolVLM: images split into at most 2 x 2 crops (+ the global image), so rows/cols 1-2 suffice
_IDEFICS = ({"<image>": IMG, "<fake_token_around_image>": 106, "<global-img>": 107, "<end_of_utterance>": 108,
             **{f"<row_{r}_col_{c}>": 106 + 2 * r + c for r in (1, 2) for c in (1, 2)}},
            {"image_token": "<image>"}, "<image>")
_SPECIAL = {
    "qwen2_vl": _QWEN, "qwen2_5_vl": _QWEN, "qwen3_vl": _QWEN,
    "gemma3": ({"<image_soft_token>": IMG, "<start_of_image>": VS, "<end_of_image>": VE},
               {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>", "eoi_token": "<end_of_image>"},
               "<start_of_image>"),
    "paligemma": _LLAVA, "llava": _LLAVA, "llava_next": _LLAVA, "idefics3": _IDEFICS, "smolvlm": _IDEFICS,
    "mistral3": ({"[IMG]": IMG, "[IMG_BREAK]": 106, "[IMG_END]": 107}, {"image_token": "[IMG]"}, "[IMG]"),
}
#: what each family's processor needs that may be absent (an optional package), for :func:`processor_unavailable`
_NEEDS = {"smolvlm": ("num2words", "is_num2words_available"), "mistral3": ("torchvision", "is_torchvision_available")}


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


def _missing_package(family: str) -> str | None:
    if family not in _NEEDS:
        return None
    import transformers.utils as tu

    package, check = _NEEDS[family]
    found = getattr(tu, check, None)
    if found is not None and found():
        return None
    owner = {"smolvlm": "SmolVLMProcessor", "mistral3": "PixtralProcessor"}[family]
    return f"transformers' {owner} ({family}) needs {package}, which is not installed (pip install {package})"


def processor_unavailable(family: str) -> str | None:
    """Why :func:`tiny_processor` cannot build ``family``'s processor here (a missing optional package
    its transformers processor needs), or None.

    >>> processor_unavailable("gemma3") is None
    True
    """
    missing = _missing_package(family)
    if missing is not None:
        return missing
    try:  # some versions gate a PIL image processor behind torchvision too (Idefics3 on transformers 5.17)
        tiny_processor(family)
    except PackmaskError as error:
        return str(error)
    return None


def tiny_processor(family: str):
    """The ``family``'s processor at the tiny sizes of :func:`~packmask.multimodal.tiny.tiny_vlm`: the
    same image token ids, patch sizes and tokens per image as the tiny model.

    Qwen2-VL / Qwen2.5-VL / Qwen3-VL: 4-pixel patches merged 2x2, 16-40 pixel sides; Gemma 3: 16x16
    images, 4 tokens each; PaliGemma: 16x16, 16 tokens; LLaVA: 16x16 crops, 16 tokens; LLaVA-NeXT:
    anyres tiles of 16x16 over the pinpoints 16x32, 32x16, 32x32; Idefics3 / SmolVLM: the longest side
    resized to 32, split into 16x16 crops plus the global image, 4 tokens each; Mistral3 (Pixtral):
    at most 32 pixels a side, one token per 8x8 pixels, ``[IMG_BREAK]`` after each row.
    """
    import transformers as tf

    if family not in _SPECIAL:
        raise PackmaskError(f"no tiny processor for family {family!r}: pass one of {', '.join(PROCESSOR_FAMILIES)}.")
    missing = _missing_package(family)
    if missing is not None:
        raise PackmaskError(f"cannot build the tiny {family} processor: {missing}.")
    try:
        return _build(tf, family)
    except ImportError as error:  # transformers' own backend gate (a placeholder class): its first line names it
        first = (str(error).strip().splitlines() or [type(error).__name__])[0].split(". ")[0]
        raise PackmaskError(f"cannot build the tiny {family} processor with transformers {tf.__version__}: "
                            f"{first.rstrip('.')}.") from None


def _build(tf, family: str):
    tokenizer = tiny_tokenizer(family)
    template = _template(_SPECIAL[family][2])
    if family == "gemma3":
        cls = _pil(tf, "Gemma3ImageProcessor")
        return tf.Gemma3Processor(image_processor=cls(size={"height": 16, "width": 16}), tokenizer=tokenizer,
                                  image_seq_length=4, chat_template=template)
    if family == "paligemma":  # SigLIP 16x16, 4-pixel patches: 16 tokens; samples are a prefix and a suffix
        images = _pil(tf, "SiglipImageProcessor")(size={"height": 16, "width": 16})
        images.image_seq_length = 16
        return tf.PaliGemmaProcessor(image_processor=images, tokenizer=tokenizer)
    if family in ("llava", "llava_next"):  # CLIP-style 16x16 crops, 4-pixel patches: 16 tokens (class token dropped)
        common = dict(tokenizer=tokenizer, patch_size=4, chat_template=template,
                      vision_feature_select_strategy="default", num_additional_image_tokens=1)
        if family == "llava":
            images = _pil(tf, "CLIPImageProcessor")(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
            return tf.LlavaProcessor(image_processor=images, **common)
        images = _pil(tf, "LlavaNextImageProcessor")(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
                                                     size={"shortest_edge": 16},
                                                     crop_size={"height": 16, "width": 16})
        return tf.LlavaNextProcessor(image_processor=images, **common)
    if family in ("idefics3", "smolvlm"):  # crops of 16 (the vision image_size), 16 patches -> 4 after scale 2
        name = "Idefics3" if family == "idefics3" else "SmolVLM"
        images = _pil(tf, f"{name}ImageProcessor")(size={"longest_edge": 32}, max_image_size={"longest_edge": 16})
        if family == "idefics3":
            return tf.Idefics3Processor(image_processor=images, tokenizer=tokenizer, image_seq_len=4,
                                        chat_template=template)
        processor = _without_video(tf.SmolVLMProcessor, images, tokenizer, template, image_seq_len=4)
        if processor.video_processor is None:  # its apply_chat_template reads the video defaults: none (no videos)
            processor.video_processor = _NoVideos()
        return processor
    if family == "mistral3":  # Pixtral: 4-pixel patches merged 2x2, so one token per 8x8 pixels
        images = _pil(tf, "PixtralImageProcessor")(size={"longest_edge": 32}, patch_size=8)
        return tf.PixtralProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, spatial_merge_size=2,
                                   chat_template=template)
    images = _pil(tf, "Qwen2VLImageProcessor")(patch_size=4, merge_size=2, temporal_patch_size=2,
                                              min_pixels=16 * 16, max_pixels=40 * 40)
    cls = {"qwen2_vl": tf.Qwen2VLProcessor, "qwen2_5_vl": tf.Qwen2_5_VLProcessor, "qwen3_vl": tf.Qwen3VLProcessor}
    return _without_video(cls[family], images, tokenizer, template)


def _pil(tf, name: str):
    """The PIL backend of an image processor (``<name>Pil``, transformers >= 5.x), else the class itself."""
    return getattr(tf, f"{name}Pil", None) or getattr(tf, name)


def _without_video(cls, images, tokenizer, template, **kwargs):
    """``cls`` (a processor with a video slot) for images, its video slot empty: ``cls`` itself where it
    accepts that, else the subclass below, which skips only that slot's class check (the video
    processor classes need torchvision)."""
    try:
        return cls(image_processor=images, tokenizer=tokenizer, chat_template=template, **kwargs)
    except (AttributeError, ValueError, TypeError, ImportError):  # no torchvision: no video processor class
        return _images_only(cls)(image_processor=images, tokenizer=tokenizer, video_processor=None,
                                 chat_template=template, **kwargs)


class _NoVideos:
    """The empty video slot where a processor reads frame defaults even for image-only chats (SmolVLM)."""

    num_frames = fps = None


def _images_only(cls):
    class ImagesOnly(cls):
        """The family's processor without a video processor (whose class needs torchvision): only the
        class check of the empty video slot is skipped; images and text run the family's own code."""

        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and (argument is None or isinstance(argument, _NoVideos)):
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImagesOnly.__name__ = ImagesOnly.__qualname__ = f"ImagesOnly{cls.__name__}"
    return ImagesOnly


def tiny_image(height: int, width: int, seed: int = 0):
    """A random RGB ``PIL.Image`` of ``height`` x ``width`` pixels."""
    import numpy as np
    from PIL import Image

    return Image.fromarray((np.random.default_rng(seed).random((height, width, 3)) * 255).astype("uint8"))
