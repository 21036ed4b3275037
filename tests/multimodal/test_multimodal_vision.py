"""varlen_vision: the Qwen vision towers in one varlen packmask call per layer equal their own per-image /
per-window loop on unpacked input, and packed rows stay exact with it."""
import pytest
import torch
from transformers import AttentionInterface

from packmask import PackmaskError
from packmask.integration import packmask_attention
from packmask.multimodal import varlen_vision
from packmask.multimodal.tiny import tiny_vlm
from packmask.multimodal.verify import compare_packed, random_samples
from packmask.testing import tiny_model

TOL = 1e-5


def _vision_out(model, sample, **kwargs):
    pixels, grid = sample["pixel_values"], sample["image_grid_thw"]
    model.zero_grad(set_to_none=True)
    out = model.model.visual(pixels, grid_thw=grid, **kwargs)
    feats = out.pooler_output if hasattr(out, "pooler_output") else out
    feats = torch.cat(list(feats)) if isinstance(feats, (tuple, list)) else feats
    feats.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.model.visual.named_parameters() if p.grad is not None}
    return feats.detach(), grads


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def test_varlen_vision_equals_the_stock_loop(family, monkeypatch):
    model = tiny_vlm(family, attn_implementation="sdpa")  # the stock per-piece loop (sdpa)
    sample = next(s for s in random_samples(model, 4, seed=2) if len(s.get("image_grid_thw", [])) == 2)
    ref, ref_grads = _vision_out(model, sample)
    calls = []

    def counting(module, *args, **kwargs):
        calls.append(kwargs.get("cu_seq_lens_q") is not None)
        return packmask_attention(module, *args, **kwargs)
    assert varlen_vision(model) == 2
    monkeypatch.setitem(AttentionInterface._global_mapping, "packmask_flash_varlen", counting)
    got, got_grads = _vision_out(model, sample)
    assert calls and all(calls) and len(calls) == 2  # one varlen call per vision layer
    assert ((got - ref).norm() / ref.norm()).item() <= TOL
    for n, r in ref_grads.items():
        assert ((got_grads[n] - r).norm() / r.norm().clamp_min(1e-12)).item() <= 1e-4, n
    # control: one piece over both images (precomputed cu_seqlens, which the tower pops from its kwargs)
    total = sample["pixel_values"].shape[0]
    mixed, _ = _vision_out(model, sample, cu_seqlens=torch.tensor([0, total], dtype=torch.int32))
    assert ((mixed - ref).norm() / ref.norm()).item() > 1e-3  # 100x the tolerance (a random tiny tower mixes little)
    assert varlen_vision(model, enable=False) == 2
    calls.clear()
    _vision_out(model, sample)
    assert not calls  # restored: the stock loop again


def test_packed_rows_exact_with_varlen_vision():
    model = tiny_vlm("qwen2_5_vl")
    varlen_vision(model)
    result = compare_packed(model, random_samples(model, 4), control=True)
    assert result["logits"] <= TOL and result["loss"] <= TOL and result["grad"] <= TOL, result


def test_varlen_vision_refuses_a_model_without_one():
    with pytest.raises(PackmaskError, match="no vision attention that takes cu_seqlens"):
        varlen_vision(tiny_model("llama"))
