"""GPU: the per-sequence recurrent path on CUDA (fp32 and bf16), on whatever kernels the machine has.

Skipped without a GPU (tests/conftest.py), failing for real on one.
"""
import pytest
import torch

import packmask
from packmask.testing import tiny_model

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("family", ["qwen3_5_text", "nemotron_h", "mamba", "lfm2", "falcon_h1"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_equals_alone_on_cuda(family, dtype):
    model = tiny_model(family, dtype=dtype).cuda()
    report = packmask.verify(model, seq_lengths=[[20, 3, 9], [14, 13, 4]], forms=("mask3d", "position_ids",
                                                                                 "seq_lengths"), print_table=False)
    assert report.passed, report.summary()


def test_gradient_checkpointing_on_cuda():
    model = tiny_model("nemotron_h").cuda().train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    report = packmask.verify(model, forms=("seq_lengths",), print_table=False)
    assert report.passed, report.summary()


@pytest.mark.parametrize("family", ["qwen3_5_text", "nemotron_h", "mamba", "lfm2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_rows_equal_each_path_alone_on_cuda(family, dtype):
    """Shared-prefix tree rows (a DPO tree and a 3-level tree) on CUDA: every token's logits are its
    root-to-leaf path's alone, and the gradient flows (packmask.recurrent.tree_paths). Control: a branch
    without its prompt differs."""
    model = tiny_model(family, dtype=dtype).cuda()
    rows = [[(0, 9, -1), (9, 5, 0), (14, 7, 0)], [(0, 4, -1), (4, 6, 0), (10, 3, 1), (13, 8, 1), (21, 3, 0)]]
    paths = [(0, list(range(14))), (0, list(range(9)) + list(range(14, 21))),
             (1, list(range(13))), (1, list(range(10)) + list(range(13, 21))), (1, list(range(4)) + [21, 22, 23])]
    N = 24
    mask, pos = packmask.tree_mask_from_segments(rows, N, device="cuda")
    ids = torch.randint(3, 100, (2, N), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits
    out.float().square().mean().backward()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    with torch.no_grad():
        for b, tokens in paths:
            alone = model(input_ids=ids[b:b + 1, tokens], use_cache=False).logits[0].float()
            err = ((out[b, tokens].float() - alone).norm() / alone.norm()).item()
            assert err <= tol, (family, dtype, b, err)
        # control: the rejected branch of row 0 run without its prompt (a zero state, as per-segment packing
        # would) differs, so the comparison above can fail
        branch = list(range(14, 21))
        forgetful = model(input_ids=ids[:1, branch], use_cache=False).logits[0].float()
        control = ((out[0, branch].float() - forgetful).norm() / forgetful.norm()).item()
        assert control > 0.1, (family, dtype, control)  # CPU fp32: 0.32 (mamba) .. 0.61 (nemotron_h)
    # gradients are compared with each path alone on CPU (tests/recurrent/test_recurrent_trees.py); here: they flow
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)
