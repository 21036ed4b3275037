"""On a GPU: vision-language preference trees equal each prompt+answer path alone (fp32 and bf16), through
the GPU kernels (tree layouts for causal families, the general mask for Gemma 3 / PaliGemma)."""
import pytest
import torch

from packmask.multimodal import varlen_vision
from packmask.multimodal.tiny import tiny_vlm
from packmask.multimodal.tree_verify import compare_tree, random_preference_examples

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "gemma3", "paligemma", "llava_next", "idefics3"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 3e-2)])
def test_tree_equals_paths_alone_on_cuda(family, dtype, tol):
    model = tiny_vlm(family, dtype=dtype).cuda()
    with torch.no_grad():  # attention that matters, so the control differs clearly (test_multimodal_tree.py)
        for name, p in model.named_parameters():
            if "language_model" in name and any(k in name for k in ("q_proj", "k_proj", "o_proj")):
                p.mul_(4)
    if family.startswith("qwen"):
        varlen_vision(model)
    examples = [{k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in ex.items()}
                for ex in random_preference_examples(model, 4)]
    result = compare_tree(model, examples, reference_impl="sdpa", controls=("siblings",))
    assert result["logits"] <= tol and result["loss"] <= tol, result
    if dtype == torch.float32:  # (in bf16 a sibling's effect on tiny PaliGemma is near the tolerance)
        assert result["grad"] <= 10 * tol, result
        assert result["siblings"] > 10 * tol, result
