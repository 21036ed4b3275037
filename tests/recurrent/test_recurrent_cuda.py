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
