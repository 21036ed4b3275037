"""Tiny random vision-language models and per-sample features, built offline (no processor, no download).

Every family here gets a config small enough for a CPU test (text: 2 layers, hidden 64; vision:
1-2 layers, hidden 32, 16-32 pixel images) and a sample builder that writes what the family's
processor returns for ONE sample (batch dimension 1): ``input_ids`` with the right number of image
tokens around each image, the pixel tensors in the family's layout, its token-type ids, and
``labels`` (``-100`` on image tokens and, for PaliGemma, on the prefix).

    qwen2_5_vl sample, one 8x8-patch image (merge 2 -> 16 image tokens), then 5 text tokens:
    input_ids          t t t <vs> <img> x16 <ve> t t t t t
    mm_token_type_ids  0 0 0  0    1 x16   0   0 0 0 0 0
    pixel_values       [64, 96]   (8x8 patches of 3 x 2 x 4 x 4 values)
    image_grid_thw     [[1, 8, 8]]

>>> model = tiny_vlm("qwen2_5_vl")
>>> s = tiny_sample(model, n_text=5, n_images=1, generator=torch.Generator().manual_seed(0))
>>> sorted(s), s["input_ids"].shape[0]
(['image_grid_thw', 'input_ids', 'labels', 'mm_token_type_ids', 'pixel_values'], 1)
"""
from __future__ import annotations

import torch

from ..errors import PackmaskError
from .collator import pad_cat

__all__ = ["VLM_FAMILIES", "tiny_vlm_config", "tiny_vlm", "tiny_sample"]

IMG, VS, VE, VID = 100, 101, 102, 103  # special ids inside the tiny 128-token vocabulary
TEXT_IDS = 96  # ordinary text tokens are drawn from [3, TEXT_IDS)

_TEXT = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=1024, pad_token_id=0, bos_token_id=1, eos_token_id=2,
             attention_dropout=0.0)
_MROPE = dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=10000.0)  # head_dim 16 -> 8 frequencies
_SIGLIP = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2, image_size=16,
               patch_size=4)
_QWEN_IDS = dict(image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)


def _config(family: str):
    import transformers as tf

    if family == "qwen2_vl":
        return tf.Qwen2VLConfig(text_config=dict(_TEXT, rope_parameters=_MROPE),
                                vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2,
                                                   patch_size=4, spatial_merge_size=2, temporal_patch_size=2),
                                **_QWEN_IDS)
    if family == "qwen2_5_vl":
        return tf.Qwen2_5_VLConfig(text_config=dict(_TEXT, rope_parameters=_MROPE),
                                   vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                                      out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                                      temporal_patch_size=2, window_size=16,
                                                      fullatt_block_indexes=[1]),
                                   **_QWEN_IDS)
    if family == "qwen3_vl":
        return tf.Qwen3VLConfig(text_config=dict(_TEXT, head_dim=16,
                                                 rope_parameters=dict(_MROPE, mrope_interleaved=True)),
                                vision_config=dict(depth=2, hidden_size=32, intermediate_size=48, num_heads=2,
                                                   out_hidden_size=64, patch_size=4, spatial_merge_size=2,
                                                   temporal_patch_size=2, num_position_embeddings=16,
                                                   deepstack_visual_indexes=[0]),
                                **_QWEN_IDS)
    if family == "gemma3":
        # sliding window 6 < an image span of 4 tokens + text: the local layers' window meets the image blocks
        return tf.Gemma3Config(text_config=dict(_TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=6,
                                                layer_types=["sliding_attention", "full_attention"]),
                               vision_config=_SIGLIP, mm_tokens_per_image=4, image_token_index=IMG,
                               boi_token_index=VS, eoi_token_index=VE)
    if family == "paligemma":
        return tf.PaliGemmaConfig(text_config=dict(_TEXT, model_type="gemma", head_dim=16),
                                  vision_config=dict(_SIGLIP, projection_dim=64), projection_dim=64, hidden_size=64,
                                  image_token_index=IMG, vocab_size=128)
    if family in ("llava", "llava_next"):
        cls = tf.LlavaConfig if family == "llava" else tf.LlavaNextConfig
        extra = dict(image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]]) if family == "llava_next" else {}
        return cls(text_config=dict(_TEXT, model_type="llama"),
                   vision_config=dict(_SIGLIP, model_type="clip_vision_model", num_hidden_layers=2, projection_dim=32),
                   image_token_index=IMG, vision_feature_layer=-1, **extra)
    if family in ("idefics3", "smolvlm"):
        cls = tf.Idefics3Config if family == "idefics3" else tf.SmolVLMConfig
        return cls(text_config=dict(_TEXT, model_type="llama"), vision_config=_SIGLIP, scale_factor=2,
                   image_token_id=IMG, pad_token_id=0)
    if family == "mistral3":
        return tf.Mistral3Config(text_config=dict(_TEXT, model_type="mistral", head_dim=16, sliding_window=None),
                                 vision_config=dict(_SIGLIP, model_type="pixtral", head_dim=16, image_size=32),
                                 spatial_merge_size=2, image_token_index=IMG)
    raise PackmaskError(f"no tiny vision-language model for {family!r}; choose from {', '.join(VLM_FAMILIES)}.")


VLM_FAMILIES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "llava", "llava_next", "idefics3",
                "smolvlm", "mistral3")


def tiny_vlm_config(family: str):
    """The tiny config of a vision-language ``family`` (a transformers ``model_type``)."""
    return _config(family)


def tiny_vlm(family: str, attn_implementation: str = "packmask", seed: int = 0, dtype=torch.float32):
    """A tiny random-init ``*ForConditionalGeneration`` of ``family`` (same weights for the same seed), in eval mode."""
    from transformers import AutoModelForImageTextToText

    config = _config(family)
    torch.manual_seed(seed)
    return AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation,
                                                   dtype=dtype).eval()


# ---- one image, as the family's image processor emits it: (features to concatenate, image token count) ----
def _image(model, size, g):
    family = model.config.model_type
    vc = model.config.vision_config
    if family.startswith("qwen"):
        h, w = size
        p, tp = vc.patch_size, vc.temporal_patch_size
        merge = vc.spatial_merge_size
        return (dict(pixel_values=torch.randn(h * w, vc.in_channels * tp * p * p, generator=g),
                     image_grid_thw=torch.tensor([[1, h, w]])), h * w // merge ** 2)
    s = vc.image_size
    if family == "gemma3":
        return dict(pixel_values=torch.randn(1, 3, s, s, generator=g)), model.config.mm_tokens_per_image
    if family in ("paligemma", "llava"):
        return dict(pixel_values=torch.randn(1, 3, s, s, generator=g)), (s // vc.patch_size) ** 2
    if family in ("idefics3", "smolvlm"):
        return (dict(pixel_values=torch.randn(1, 1, 3, s, s, generator=g),
                     pixel_attention_mask=torch.ones(1, 1, s, s, dtype=torch.bool)),
                (s // vc.patch_size) ** 2 // model.config.scale_factor ** 2)
    if family == "mistral3":
        h, w = size  # in pixels, multiples of patch x merge
        unit = vc.patch_size * model.config.spatial_merge_size
        return (dict(pixel_values=torch.randn(1, 3, h, w, generator=g), image_sizes=torch.tensor([[h, w]])),
                (h // unit) * (w // unit))
    if family == "llava_next":
        h, w = size  # the original image size; the processor tiles it into base + grid patches of s x s
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
        n = image_size_to_num_patches((h, w), model.config.image_grid_pinpoints, s)
        pixels = dict(pixel_values=torch.randn(1, n, 3, s, s, generator=g), image_sizes=torch.tensor([[h, w]]))
        with torch.no_grad():  # the token count of anyres tiling (unpadding, newlines): ask the model itself
            device = next(model.parameters()).device
            out = model.model.get_image_features(**{k: v.to(device) for k, v in pixels.items()})
        feats = getattr(out, "pooler_output", out)
        feats = feats[0] if isinstance(feats, (tuple, list)) and isinstance(feats[0], (tuple, list)) else feats
        return pixels, sum(int(f.shape[0]) for f in feats)
    raise PackmaskError(f"no tiny image builder for {family!r}.")


_SIZES = {"qwen": [(4, 4), (4, 8), (8, 4), (8, 8)], "mistral3": [(16, 16), (16, 24), (24, 16), (32, 32)],
          "llava_next": [(16, 16), (16, 32), (32, 16), (32, 32)]}


def _sizes(family):
    return _SIZES["qwen"] if family.startswith("qwen") else _SIZES.get(family, [None])


def _video(model, g):
    """A 2-frame-group Qwen video of 4x4 patches: (features, token count)."""
    vc = model.config.vision_config
    t, h, w = 2, 4, 4
    patch = vc.in_channels * vc.temporal_patch_size * vc.patch_size ** 2
    feats = dict(pixel_values_videos=torch.randn(t * h * w, patch, generator=g),
                 video_grid_thw=torch.tensor([[t, h, w]]))
    if model.config.model_type == "qwen2_5_vl":
        feats["second_per_grid_ts"] = torch.tensor([1.0])
    return feats, t * h * w // vc.spatial_merge_size ** 2


def tiny_sample(model, n_text: int, n_images: int, generator: torch.Generator, n_videos: int = 0) -> dict:
    """One sample's features (batch dimension 1) for ``model`` built by :func:`tiny_vlm`: ``n_images``
    images of random sizes (then ``n_videos`` videos, Qwen2-VL / Qwen2.5-VL), each after 3 text
    tokens, then ``n_text`` text tokens."""
    if n_videos and model.config.model_type not in ("qwen2_vl", "qwen2_5_vl"):
        raise PackmaskError("tiny videos are built for qwen2_vl and qwen2_5_vl only.")
    family = model.config.model_type
    if family == "paligemma" and n_images != 1:
        raise PackmaskError("a PaliGemma sample holds exactly one image (its processor requires it).")
    g = generator
    sizes = _sizes(family)
    ids, types, pieces = [], [], []
    for _ in range(n_images):
        size = sizes[int(torch.randint(len(sizes), (1,), generator=g))]
        feats, count = _image(model, size, g)
        pieces.append(feats)
        if family == "paligemma":  # image first, then bos + prompt; token_type_ids 0 = prefix
            ids += [IMG] * count + [1]
            types += [0] * (count + 1)
            continue
        before = torch.randint(3, TEXT_IDS, (3,), generator=g).tolist()
        ids += before + [VS] + [IMG] * count + [VE]
        types += [0] * 4 + [1] * count + [0]
    for _ in range(n_videos):
        feats, count = _video(model, g)
        pieces.append(feats)
        ids += torch.randint(3, TEXT_IDS, (3,), generator=g).tolist() + [VS] + [VID] * count + [VE]
        types += [0] * 4 + [2] * count + [0]
    text = torch.randint(3, TEXT_IDS, (n_text,), generator=g).tolist()
    ids += text
    if family == "paligemma":  # the prompt's second half is prefix too; the rest is the suffix (scored)
        half = n_text // 2
        types += [0] * half + [1] * (n_text - half)
    else:
        types += [0] * n_text
    sample = dict(input_ids=torch.tensor([ids]))
    types = torch.tensor([types])
    labels = sample["input_ids"].clone()
    if family == "paligemma":
        sample["token_type_ids"] = types
        labels[types == 0] = -100
    else:
        labels[(sample["input_ids"] == IMG) | (sample["input_ids"] == VID)] = -100
        key = "token_type_ids" if family == "gemma3" else "mm_token_type_ids" if family.startswith("qwen") else None
        if key is not None:
            sample[key] = types
    sample["labels"] = labels
    for key in dict.fromkeys(k for p in pieces for k in p):
        sample[key] = pad_cat([p[key] for p in pieces if key in p], 1 if family in ("idefics3", "smolvlm") else 0)
    return sample
