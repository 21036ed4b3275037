"""Vision-language preference data as shared-prefix trees (MultimodalTreeCollator): the prompt and its
images once, each answer a branch. Every answer's logits / log-probs, the DPO (or group) loss and every
parameter gradient, vision tower included, equal each prompt+answer path run alone (fp32 CPU, 1e-5);
two controls (answers seeing their siblings, answer positions restarting) must differ."""
import pytest
import torch

from packmask import PackmaskError, UnsupportedModelError
from packmask.layout import position_ids_from_mask
from packmask.masks import tree_mask_from_segments
from packmask.multimodal.families import call_rope_index, rope_index_function
from packmask.multimodal.tiny import IMG, VE, VLM_FAMILIES, VS, tiny_vlm
from packmask.multimodal.tree import MultimodalTreeCollator, model_inputs
from packmask.multimodal.tree_verify import compare_tree, random_preference_examples

TOL = 1e-5


def sharpened(family):
    """A tiny model whose attention matters: random-init tiny models barely use it (logits are mostly
    the token's own embedding), so a wrong mask or position moves logits by < 1e-2. Scaling the text
    attention's q/k/o projections x4 makes the controls' errors clear; exactness is unchanged."""
    model = tiny_vlm(family)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "language_model" in name and any(k in name for k in ("q_proj", "k_proj", "o_proj")):
                p.mul_(4)
    return model


def check(result, controls=("siblings", "positions")):
    for key in ("logits", "logps", "sums", "loss", "grad"):
        assert result[key] <= TOL, (key, result)
    assert result["vision_grads"] > 0, result  # the vision tower's gradients are compared too
    for control in controls:
        assert result[control] > 1e-2, (control, result)


@pytest.mark.parametrize("family", VLM_FAMILIES)
def test_preference_tree_exact(family):
    model = sharpened(family)
    # idefics3 / smolvlm: restarted answer positions move their logits by ~7e-3 only (still 700x the tolerance)
    controls = ("siblings",) if family in ("idefics3", "smolvlm") else ("siblings", "positions")
    result = compare_tree(model, random_preference_examples(model, 3), controls=("siblings", "positions"))
    check(result, controls)
    assert result["positions"] > 1e-3, result


@pytest.mark.parametrize("family", ["qwen2_5_vl", "gemma3"])
def test_group_tree_exact(family):
    model = sharpened(family)
    result = compare_tree(model, random_preference_examples(model, 2, seed=3, group=3), controls=("siblings",))
    check(result, ("siblings",))
    assert result["tokens"] < result["unpacked_tokens"]  # the prompts (and their images) are stored once


def test_two_rows_exact():
    """Best fit over several rows: the vision inputs follow the prompts in row order."""
    model = tiny_vlm("qwen2_5_vl")
    result = compare_tree(model, random_preference_examples(model, 4, seed=1), row_length=60)
    assert result["rows"] >= 2
    check(result, ())


def test_mrope_branch_positions_are_the_models_own():
    """Each answer's mRoPE rows are get_rope_index of prompt + answer, its answer part; the text row is
    the tree's depth (an answer continues its prompt, not its sibling)."""
    model = tiny_vlm("qwen2_5_vl")
    prompt = dict(input_ids=torch.tensor([[5, VS, IMG, IMG, IMG, IMG, VE]]),
                  mm_token_type_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 0]]),
                  pixel_values=torch.randn(16, 96), image_grid_thw=torch.tensor([[1, 4, 4]]))
    batch = MultimodalTreeCollator(model)([dict(prompt, chosen_ids=[7, 8], rejected_ids=[9])])
    pos = batch["position_ids"][:, 0]
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 7]
    rope = rope_index_function(model)
    for answer, cols in (([7, 8], [7, 8]), ([9], [9])):
        ids = torch.cat([prompt["input_ids"], torch.tensor([answer])], 1)
        types = torch.cat([prompt["mm_token_type_ids"], torch.zeros(1, len(answer), dtype=torch.long)], 1)
        alone = call_rope_index(rope, input_ids=ids, mm_token_type_ids=types, image_grid_thw=prompt["image_grid_thw"],
                                attention_mask=torch.ones_like(ids))[:, 0]
        assert torch.equal(pos[1:, cols], alone[:, 7:])
    assert pos[1:, 9].tolist() == [5, 5, 5]  # r0 right after the image's last position, like c0
    assert batch["attention_mask"][0, 9].int().tolist() == [1] * 7 + [0, 0, 1]


def test_gemma3_image_block_kept_in_tree_mask():
    model = tiny_vlm("gemma3")
    prompt = dict(input_ids=torch.tensor([[5, VS, IMG, IMG, IMG, IMG, VE]]),
                  token_type_ids=torch.tensor([[0, 0, 1, 1, 1, 1, 0]]), pixel_values=torch.randn(1, 3, 16, 16))
    mask = MultimodalTreeCollator(model)([dict(prompt, chosen_ids=[7, 8], rejected_ids=[9])])["attention_mask"][0]
    assert mask[2, 2:6].all() and not mask[2, 6]            # an image token sees its whole image, nothing after
    assert mask[9].int().tolist() == [1] * 7 + [0, 0, 1]    # the rejected answer: prompt + itself


def test_positions_from_a_tree_mask_with_a_bidirectional_block():
    """A sliding window is measured in the mask's positions: over a tree with an image block they are
    the tree's depths (not the token index), else the rejected answer's window is off by len(chosen)."""
    mask, depth = tree_mask_from_segments([[(0, 4, -1), (4, 3, 0), (7, 2, 0)]], 9)
    mask = mask.clone()
    mask[0, 1:3, 1:3] = True  # tokens 1-2: one image, bidirectional
    assert position_ids_from_mask(mask).tolist() == depth.tolist() == [[0, 1, 2, 3, 4, 5, 6, 4, 5]]


def test_model_inputs_run_and_refusals():
    model = tiny_vlm("qwen2_5_vl")
    examples = random_preference_examples(model, 2)
    collator = MultimodalTreeCollator(model)
    with torch.no_grad():
        model(**model_inputs(collator(examples)))
    bad = dict(examples[0], rejected_ids=[IMG, 5])
    with pytest.raises(PackmaskError, match="example 1 of the batch, answer 1 holds image/video tokens"):
        collator([examples[1], bad])
    with pytest.raises(PackmaskError, match="example 0 of the batch: chosen_ids is empty"):
        collator([dict(examples[0], chosen_ids=[])])
    with pytest.raises(PackmaskError, match="lacks"):
        collator([{k: v for k, v in examples[0].items() if k != "rejected_ids"}])
    with pytest.raises(PackmaskError, match="one kind per batch"):
        collator([examples[0], dict(examples[1], completion_ids=[[5], [6]])])
    padded = dict(examples[0], attention_mask=torch.zeros_like(examples[0]["input_ids"]))
    with pytest.raises(PackmaskError, match="padding"):
        collator([padded])
    with pytest.raises(PackmaskError, match="more than a row"):
        MultimodalTreeCollator(model, row_length=8)(examples)
    with pytest.raises(PackmaskError, match="attn_implementation"):
        MultimodalTreeCollator(tiny_vlm("qwen2_5_vl", attn_implementation="eager"))


def test_paligemma_prompt_with_suffix_refused():
    model = tiny_vlm("paligemma")
    example = random_preference_examples(model, 1)[0]
    example["token_type_ids"] = torch.ones_like(example["token_type_ids"])
    with pytest.raises(PackmaskError, match="suffix"):
        MultimodalTreeCollator(model)([example])


def test_unsupported_family_refused():
    from packmask.testing import tiny_model

    with pytest.raises(UnsupportedModelError):
        MultimodalTreeCollator(tiny_model("llama"))


def test_video_prompts_exact():
    """Qwen2.5-VL prompts with a video (and an image): second_per_grid_ts reaches get_rope_index per path."""
    from packmask.multimodal.tiny import tiny_sample

    model = tiny_vlm("qwen2_5_vl")
    g = torch.Generator().manual_seed(5)
    examples = []
    for n_images in (0, 1):
        prompt = tiny_sample(model, 4, n_images, g, n_videos=1)
        prompt.pop("labels")
        examples.append(dict(prompt, chosen_ids=[5, 6, 7], rejected_ids=[8, 9]))
    check(compare_tree(model, examples), ())
