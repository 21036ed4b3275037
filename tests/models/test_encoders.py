"""Encoders (BERT family) on packed rows with a bidirectional block-diagonal mask equal each sequence alone.

Per-token hidden states, per-sequence pooled outputs (CLS token, mean, and the model's own pooler
applied to each document's CLS) and parameter gradients, fp32 CPU, relative error <= 1e-5.
"""
import pytest
import torch
from transformers import AutoModel

import packmask
from packmask.testing import pack_rows, rel_err, tiny_config

SEQ_LENGTHS = [[5, 9, 4], [11, 6]]  # longer than ModernBERT's local window below; row 1 ends in padding
N = 18
TOL = 1e-5
ENCODERS = ["bert", "roberta", "xlm-roberta", "camembert", "distilbert", "electra", "modernbert"]


def _models(family):
    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config(family), attn_implementation="packmask").eval()
    ref = AutoModel.from_config(tiny_config(family), attn_implementation="eager").eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _pool(hidden, model):
    """CLS, mean and (when the model has one) the model's pooler of one document's hidden states."""
    pooled = [hidden[:, 0], hidden.mean(1)]
    pooler = getattr(model, "pooler", None)
    if pooler is not None:
        pooled.append(pooler(hidden))
    return torch.cat(pooled, -1)


@pytest.mark.parametrize("family", ENCODERS)
@pytest.mark.parametrize("form", ["mask3d", "mask4d"])
def test_encoder_packed_equals_each_sequence_alone(family, form):
    model, ref = _models(family)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 128, (len(SEQ_LENGTHS), N), generator=g)
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N, causal_within=False)
    if form == "mask3d":  # position_ids derived from the mask (RoBERTa-style offsets included)
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    else:
        from packmask.support import position_offset
        out = model(input_ids=ids, attention_mask=mask[:, None],
                    position_ids=pos + position_offset(model)).last_hidden_state
    weights = torch.randn(len(slices), 3 * out.shape[-1], generator=g)
    packed_obj, alone_obj = 0.0, 0.0
    for i, (b, s, length) in enumerate(slices):
        alone = ref(input_ids=ids[b:b + 1, s:s + length]).last_hidden_state
        got = out[b:b + 1, s:s + length]
        assert rel_err(got, alone) <= TOL, f"{family}/{form}: hidden states of document {i}"
        p_got, p_alone = _pool(got, model), _pool(alone, ref)
        assert rel_err(p_got, p_alone) <= TOL, f"{family}/{form}: pooled outputs of document {i}"
        k = p_got.shape[-1]
        packed_obj = packed_obj + (p_got * weights[i, :k]).sum() + got.sum() * 1e-2
        alone_obj = alone_obj + (p_alone * weights[i, :k]).sum() + alone.sum() * 1e-2
    packed_obj.backward()
    alone_obj.backward()
    from packmask.verification import _compare_grads, _param_grads
    err, name = _compare_grads(_param_grads(model), _param_grads(ref))
    assert err <= TOL, f"{family}/{form}: grad rel err {err:.1e} in {name}"


def test_modernbert_local_layers_use_a_symmetric_window_per_document():
    """ModernBERT's local layers see |i - j| < window inside the document only; documents longer than
    the window prove both the window and the document boundary are honoured."""
    model, _ = _models("modernbert")
    assert model.config.local_attention == 4 and max(max(r) for r in SEQ_LENGTHS) > 4
    report = packmask.verify(model, print_table=False)
    assert report.passed, report.summary()


def test_collator_keys_on_an_encoder():
    model, _ = _models("bert")
    report = packmask.verify(model, forms=("collator", "seq_lengths"), print_table=False)
    assert report.passed, report.summary()
