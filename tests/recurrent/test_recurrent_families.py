"""Every hybrid / recurrent family: packed rows == each sequence run alone (logits, loss, every gradient).

The comparison is :func:`packmask.verify` (fp32, CPU, relative error <= 1e-5) in the 3D-mask and
packed-``position_ids`` forms for every family, plus ``seq_lengths`` and the
``DataCollatorWithFlattening`` keys on a few. The control runs the same packed rows with the
mixers' original forwards (no reset at the boundaries): it must differ by more than 1e-3.
"""
import pytest
import torch
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import packmask
from packmask import support
from packmask.recurrent import find_mixers, installed, uninstall
from packmask.tiny_hybrid import HYBRID_FAMILIES
from packmask.testing import pack_rows, rel_err, run_alone, tiny_model

#: three documents of 5-9 tokens in row 0, two in row 1 (ends in one padding token)
SEQ_LENGTHS = [[5, 9, 4], [8, 6]]
#: families refused with a reason (docs/model-support.md): their attention itself cannot take a packed mask
REFUSED = {"qwen4_exp_text": "sparse-attention indexer", "inkling_text": "position_bias",
           "inkling2_text": "position_bias", "inkling2_loop_text": "position_bias"}
PASSING = sorted(f for f in HYBRID_FAMILIES if f in CONFIG_MAPPING_NAMES and f not in REFUSED)
#: families also checked in the seq_lengths and collator forms
ALL_FORMS = {"qwen3_5_text", "nemotron_h", "mamba", "lfm2"}


@pytest.mark.parametrize("family", PASSING)
def test_packed_equals_each_sequence_alone(family, monkeypatch):
    model = tiny_model(family)
    assert find_mixers(model), f"{family}: no recurrent mixer found"
    forms = ("mask3d", "position_ids") + (("seq_lengths", "collator") if family in ALL_FORMS else ())
    report = packmask.verify(model, seq_lengths=SEQ_LENGTHS, forms=forms, print_table=False)
    assert report.passed, f"{family}: {report.summary()} {[(r.form, r.error) for r in report.rows if not r.passed]}"
    assert installed(model), "the mixers run per sequence"
    for row in report.rows:
        assert row.grad_rel_err <= 1e-5 and row.loss_rel_err is not None

    # control: the same packed rows through the mixers' original forwards (state flows across boundaries)
    with torch.no_grad():  # random-init short convolutions barely mix (lfm2: 9e-4): make their reach visible
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.weight.mul_(4)
    N = max(sum(r) for r in SEQ_LENGTHS)
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    ids = torch.randint(3, 100, (2, N), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        alone = run_alone(model, ids, slices)
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        assert uninstall(model) > 0
        monkeypatch.setattr(support, "_runs_per_sequence", lambda m: True)  # let the packed input through
        contaminated = model(input_ids=ids, position_ids=pos, use_cache=False).logits
    # per token: a short convolution reaches only the first few tokens of the next sequence
    worst = lambda out: max(rel_err(out[b, i], alone[b, i]) for b, s, n in slices for i in range(s, s + n))  # noqa
    assert worst(packed) <= 1e-5
    assert worst(contaminated) > 1e-3, f"{family}: contamination not visible ({worst(contaminated):.1e})"


@pytest.mark.parametrize("family", sorted(REFUSED))
def test_refused_families_raise_on_packed_input(family):
    if family not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"{family} is not in this transformers")
    model = tiny_model(family)
    ids = torch.randint(3, 100, (2, 18))
    with pytest.raises(packmask.UnsupportedModelError, match=REFUSED[family]):
        model(input_ids=ids, attention_mask=packmask.block_diagonal_mask([[5, 9, 4], [11, 6]], 18), use_cache=False)


def test_softmax_attention_named_like_a_mixer_is_left_to_the_mask():
    """Kimi Linear's MLA layer (``KimiLinearAttention``) dispatches through transformers' attention interface:
    packmask's mask isolates it, so it is not wrapped as a recurrent mixer; its delta-attention layer is.
    Control: without the interface check (a class of the same name whose forward does not dispatch) it
    would be wrapped."""
    from packmask.recurrent.detect import calls_attention_interface

    model = tiny_model("kimi_linear")
    wrapped = {type(m).__name__ for _, m in find_mixers(model)}
    assert wrapped == {"KimiLinearDeltaAttention"}
    assert any(type(m).__name__ == "KimiLinearAttention" for m in model.modules())

    class KimiLinearAttention(torch.nn.Module):  # the name alone: no attention interface in its forward
        def forward(self, x):
            return torch.cumsum(x, dim=1)

    assert not calls_attention_interface(KimiLinearAttention)
    holder = torch.nn.Module()
    holder.mixer = KimiLinearAttention()
    assert [name for name, _ in find_mixers(holder)] == ["mixer"]
