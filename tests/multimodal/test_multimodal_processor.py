"""Samples from the families' real image processors (built offline, tiny sizes) pack exactly: the pixel
layout the collator concatenates is the processor's, not only the tiny builders'."""
import numpy as np
import pytest
import torch
import transformers
from PIL import Image

from packmask.multimodal.tiny import IMG, VE, VS, tiny_vlm
from packmask.multimodal.verify import compare_packed

TOL = 1e-5


def _processor(*names, **kwargs):
    cls = next(getattr(transformers, n) for n in names if hasattr(transformers, n))  # the PIL one needs no torchvision
    return cls(**kwargs)


def _image(rng, h, w):
    return Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8"))


def _sample(pixels, tokens_per_image, text, rng, token_type_key):
    ids, types = [], []
    for count in tokens_per_image:
        ids += rng.integers(3, 96, 3).tolist() + [VS] + [IMG] * count + [VE]
        types += [0] * 4 + [1] * count + [0]
    ids += rng.integers(3, 96, text).tolist()
    types += [0] * text
    sample = dict(pixels, input_ids=torch.tensor([ids]))
    sample[token_type_key] = torch.tensor([types])
    sample["labels"] = sample["input_ids"].masked_fill(sample["input_ids"] == IMG, -100)
    return sample


def test_qwen2_5_vl_image_processor_samples():
    model = tiny_vlm("qwen2_5_vl")
    processor = _processor("Qwen2VLImageProcessorPil", "Qwen2VLImageProcessor", patch_size=4, merge_size=2,
                           temporal_patch_size=2, min_pixels=16 * 16, max_pixels=40 * 40)
    rng = np.random.default_rng(0)
    samples = []
    for sizes in ([(24, 32)], [], [(40, 20), (16, 16)]):  # 6x8, 10x4 patches: windows cut off at the edges
        if sizes:
            pixels = dict(processor(images=[_image(rng, h, w) for h, w in sizes], return_tensors="pt"))
            counts = [int(g.prod()) // 4 for g in pixels["image_grid_thw"]]
        else:
            pixels, counts = {}, []
        samples.append(_sample(pixels, counts, 5, rng, "mm_token_type_ids"))
    assert samples[0]["pixel_values"].shape == (48, 96)
    result = compare_packed(model, samples, control=True)
    assert result["logits"] <= TOL and result["loss"] <= TOL and result["grad"] <= TOL, result
    assert result["control"] > 1e-2


def test_gemma3_image_processor_samples():
    model = tiny_vlm("gemma3")
    processor = _processor("Gemma3ImageProcessorPil", "Gemma3ImageProcessor", size={"height": 16, "width": 16})
    rng = np.random.default_rng(1)
    samples = []
    for n_images in (1, 0, 2):
        pixels = dict(processor(images=[_image(rng, 20, 28) for _ in range(n_images)], return_tensors="pt")) \
            if n_images else {}
        pixels.pop("num_crops", None)
        samples.append(_sample(pixels, [model.config.mm_tokens_per_image] * n_images, 6, rng, "token_type_ids"))
    assert samples[2]["pixel_values"].shape == (2, 3, 16, 16)
    result = compare_packed(model, samples, control=True)
    assert result["logits"] <= TOL and result["loss"] <= TOL and result["grad"] <= TOL, result
    assert result["control"] > 1e-2
