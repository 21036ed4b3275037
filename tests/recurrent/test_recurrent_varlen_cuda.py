"""GPU: the varlen recurrent path on the real kernels (fla / mamba-ssm) against the generic path.

Skipped without a GPU (tests/conftest.py); on one, a family whose kernels do not import is skipped with
the reason (pip install 'packmask[fla]' / 'packmask[mamba]'), and a family that should run fails for real.
fla's gated-delta-rule backward refuses Hopper with Triton < 3.7.1: ``backward=False`` cases check the
forward there.
"""
import pytest
import torch

import packmask
from packmask.recurrent import configure, describe_paths
from packmask.reference import grad_rel_err, rel_err
from packmask.testing import tiny_model

pytestmark = pytest.mark.cuda

SEQ_LENGTHS = [[37, 5, 70, 16], [64, 63, 1]]


def _run(family, path, ids, backward, boundaries=True):
    model = tiny_model(family).cuda()
    previous = configure(path=path)
    try:
        kwargs = dict(seq_lengths=SEQ_LENGTHS) if boundaries else {}
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
        if backward:
            logits.float().square().mean().backward()
    finally:
        configure(**previous)
    return model, logits.detach().float()


@pytest.mark.parametrize("family", ["qwen3_5_text", "qwen3_next", "olmo_hybrid", "lfm2", "kimi_linear",
                                    "nemotron_h", "bamba"])
@pytest.mark.parametrize("backward", [False, True])
def test_varlen_matches_generic_on_cuda(family, backward):
    model = tiny_model(family).cuda()
    refused = {n: i["why"] for n, i in describe_paths(model).items() if i["path"] != "varlen"}
    if refused:
        pytest.skip(f"varlen path not available here: {next(iter(refused.values()))}")
    ids = torch.randint(3, 100, (2, 140), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    try:  # with fla importable, transformers' own per-sequence calls run fla's kernels too
        fast, fast_logits = _run(family, "varlen", ids, backward)
        slow, slow_logits = _run(family, "generic", ids, backward)
    except RuntimeError as error:
        if backward and "Triton" in str(error):
            pytest.skip(f"fla's backward refuses this machine: {str(error)[:200]}")
        raise
    assert rel_err(fast_logits, slow_logits) <= 1e-4
    if backward:
        worst, name = grad_rel_err(fast, slow)
        assert worst <= 1e-3, (name, worst)  # fp32 kernels vs transformers' torch fallback (decay grads ~3e-5)
    # control: the same rows unpacked (the kernels see no boundaries) differ
    _, mixed = _run(family, "varlen", ids, False, boundaries=False)
    assert rel_err(mixed, slow_logits) > 1e-2


def test_auto_takes_varlen_on_cuda_when_fla_imports():
    model = tiny_model("qwen3_5_text").cuda()
    info = describe_paths(model)
    pytest.importorskip("fla")
    assert all(i["path"] == "varlen" for i in info.values()), info
    assert packmask.recurrent.installed(model)


def test_varlen_under_gradient_checkpointing_on_cuda():
    model = tiny_model("nemotron_h").cuda().train()
    if any(i["path"] != "varlen" for i in describe_paths(model).values()):
        pytest.skip("varlen path not available here")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    previous = configure(path="varlen")
    try:
        report = packmask.verify(model, forms=("seq_lengths",), print_table=False)
    finally:
        configure(**previous)
    assert report.passed, report.summary()
