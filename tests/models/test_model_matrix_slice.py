"""CI slice of the coverage matrix (docs/model-support.md; full matrix: python3 scripts/model_support.py).

Families beyond tests/core/test_integration.py, each chosen for a feature: packmask.verify must pass
(logits, loss, parameter gradients vs each sequence alone, fp32, 1e-5) or — for families packmask
cannot isolate — every packed form must be refused with UnsupportedModelError.
"""
import pytest

import packmask
from packmask.testing import families_choosing_attention_by_name, tiny_model

PASSING = {
    "gemma3_text": "sliding-window + global layers, query_pre_attn_scalar",
    "cohere2": "interleaved sliding-window layers, parallel residual",
    "starcoder2": "biases, sliding window",
    "gptj": "partial rotary (rotary_dim < head_dim), interleaved rotation",
    "gpt_bigcode": "multi-query attention, learned absolute positions",
    "gpt_oss": "attention sinks (s_aux) with sliding windows",
    "deepseek_v3": "multi-head latent attention, MoE",
    "ctrl": "reshapes any mask below 4D (packmask hands it the 4D view)",
    "biogpt": "scaled learned positions",
    "mamba": "state-space layers, run per packed sequence (packmask.recurrent)",
    "qwen3_next": "gated delta-net + attention layers, the delta net run per packed sequence",
    "zaya": "convolution over the sequence inside attention, its projection run per packed sequence",
}
REFUSED = {
    "deepseek_v32": "sparse-attention indexer reads the raw mask",
}


@pytest.mark.parametrize("family", sorted(PASSING))
def test_family_passes_verify(family):
    if family in families_choosing_attention_by_name():  # gptj before transformers 5.2x: refused when built
        with pytest.raises(packmask.UnsupportedModelError, match="ATTENTION_CLASSES"):
            tiny_model(family)
        return
    report = packmask.verify(tiny_model(family), print_table=False)
    assert report.passed, f"{family} ({PASSING[family]}): {report.summary()} {[r.error for r in report.rows]}"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_family_is_refused_on_packed_input(family):
    report = packmask.verify(tiny_model(family), print_table=False)
    assert report.refused, f"{family} ({REFUSED[family]}): {report.summary()}"
    assert all(r.error_type == "UnsupportedModelError" for r in report.rows)
