"""ALiBi in every configuration (bloom, mpt, falcon with ``alibi=True``, any config flag) is refused with
:class:`packmask.UnsupportedModelError` naming the setting, on unpacked and packed input alike: the
distance bias is added to the attention scores in the model's own code, where packmask's
per-sequence mask cannot reach it. Before this, falcon with ALiBi crashed inside transformers
(``AttributeError: 'PackmaskMask' object has no attribute 'dtype'`` unpacked, ``ValueError: too many
values to unpack`` packed) and ``verify`` said FAIL."""
import pytest
import torch

import packmask
from packmask.support import alibi_setting, unsupported_reason
from packmask.testing import families_choosing_attention_by_name, pack_rows, rel_err, run_alone, tiny_model

SEQ_LENGTHS = [[5, 7]]
N = 12

ALIBI = [("falcon", dict(alibi=True, new_decoder_architecture=False), "config.alibi=True"),
         ("falcon", dict(alibi=True, new_decoder_architecture=True), "config.alibi=True"),
         ("bloom", {}, "build_alibi_tensor"),
         ("mpt", {}, "config.attn_config.alibi=True")]


def _build(family, overrides, attn="packmask"):
    if family in families_choosing_attention_by_name():  # e.g. falcon up to transformers 5.24
        pytest.skip(f"{family} picks attention classes by name in this transformers: refused when built "
                    f"(tests/test_guards.py)")
    return tiny_model(family, attn, **overrides)


def _packed_inputs():
    ids = torch.randint(3, 100, (1, N), generator=torch.Generator().manual_seed(0))
    _, pos = pack_rows(SEQ_LENGTHS, N)
    return ids, [dict(), dict(attention_mask=torch.ones(1, N, dtype=torch.long)),       # unpacked
                 dict(attention_mask=packmask.block_diagonal_mask(SEQ_LENGTHS, N)),     # packed, three forms
                 dict(position_ids=pos), dict(seq_lengths=SEQ_LENGTHS)]


@pytest.mark.parametrize("family,overrides,setting", ALIBI, ids=["falcon-old", "falcon-new", "bloom", "mpt"])
def test_alibi_is_refused_on_unpacked_and_packed_input(family, overrides, setting):
    model = _build(family, overrides)
    assert setting in alibi_setting(model)
    ids, calls = _packed_inputs()
    for kwargs in calls:
        with pytest.raises(packmask.UnsupportedModelError, match=f"ALiBi \\({setting}.*attn_implementation='eager'"):
            model(input_ids=ids, use_cache=False, **kwargs)
    report = packmask.verify(model, print_table=False)
    assert report.refused and not report.passed and "ALiBi" in report.rows[0].error
    eager = _build(family, overrides, "eager")  # the fix the message names runs
    assert eager(input_ids=ids, use_cache=False).logits.shape == (1, N, 128)


def test_alibi_flag_off_is_not_called_alibi():
    """mpt with ``attn_config.alibi=False`` is still refused (own attention code), but not for ALiBi."""
    model = _build("mpt", dict(attn_config=dict(alibi=False)))
    assert alibi_setting(model) is None and "ALiBi" not in unsupported_reason(model)
    assert alibi_setting(tiny_model("llama")) is None
    flagged = tiny_model("llama", position_embedding_type="alibi")
    assert alibi_setting(flagged) == "config.position_embedding_type='alibi'"


def test_falcon_without_alibi_equals_each_sequence_alone():
    """Control: the same family without ALiBi goes through the interface (transformers >= 5.25) and is
    exact, so the refusal above is about ALiBi, not falcon."""
    model = _build("falcon", dict(alibi=False))
    assert unsupported_reason(model) is None
    report = packmask.verify(model, forms=("mask3d", "seq_lengths"), print_table=False)
    assert report.passed, report.summary()
    ids, calls = _packed_inputs()
    slices, _ = pack_rows(SEQ_LENGTHS, N)
    with torch.no_grad():
        packed = model(input_ids=ids, use_cache=False, **calls[2]).logits
        causal = model(input_ids=ids, use_cache=False).logits  # one row, plain causal: documents see each other
        alone = run_alone(model, ids, slices)
    assert rel_err(packed, alone) <= 1e-5
    assert rel_err(causal, alone) > 1e-2


def test_cli_verify_says_refused_with_the_reason(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from packmask.cli.main import main
    from packmask.testing import tiny_config

    _build("falcon", dict(alibi=True))
    AutoModelForCausalLM.from_config(tiny_config("falcon", alibi=True, new_decoder_architecture=False),
                                     attn_implementation="eager").save_pretrained(tmp_path)
    code = main(["verify", "--model", str(tmp_path)])
    out = " ".join(capsys.readouterr().out.split())
    assert code != 0 and "REFUSED" in out and "ALiBi" in out, out[-2000:]
