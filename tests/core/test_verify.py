"""packmask.verify: passes on a model packmask isolates, and reports — never hides — one it does not."""
import io

import pytest
import torch
from rich.console import Console

import packmask
from packmask.testing import families_choosing_attention_by_name, tiny_model
from packmask.verification import FORMS, VerifyReport, model_for


def test_verify_passes_on_llama_every_form():
    model = tiny_model("llama")
    report = packmask.verify(model, forms=FORMS, print_table=False)
    assert isinstance(report, VerifyReport) and report.passed, report.summary()
    assert [r.form for r in report.rows] == list(FORMS)
    for row in report.rows:
        assert row.output_rel_err <= 1e-5 and row.grad_rel_err <= 1e-5 and row.loss_rel_err <= 1e-5
        assert row.max_abs_err < 1e-4
    # the model comes back as it went in
    assert model.config._attn_implementation == "packmask" and not model.training
    assert all(p.grad is None for p in model.parameters())


def test_verify_fails_loudly_on_a_contaminating_setup():
    """sdpa with packed position_ids and use_cache left at its default attends across sequences."""
    from packmask import guards

    guards._ONCE.clear()
    with pytest.warns(packmask.PackmaskWarning, match="use_cache"):  # ...and packmask says so (issue 10)
        report = packmask.verify(tiny_model("llama", "sdpa"), forms=("position_ids", "collator"), print_table=False)
    assert not report.passed
    for row in report.rows:
        assert row.status == "FAIL" and row.output_rel_err > 1e-2 and row.grad_rel_err > 1e-2
    assert report.summary().startswith("FAIL")


def test_a_form_that_raises_is_reported_as_failed():
    report = packmask.verify(tiny_model("llama", "sdpa"), forms=("mask3d", "mask4d"), print_table=False)
    mask3d, mask4d = report.rows
    # sdpa cannot take a [B, N, N] mask: refused with packmask's error naming the fix, not a crash deep inside
    assert mask3d.status == "refused" and not mask3d.passed and 'attn_implementation="packmask"' in mask3d.error
    assert mask4d.passed  # sdpa honours a 4D bool mask
    assert not report.passed


def test_table_renders_every_form():
    report = packmask.verify(tiny_model("qwen2"), forms=("mask3d", "collator"), print_table=False)
    buf = io.StringIO()
    Console(file=buf, width=160).print(report.table())
    text = buf.getvalue()
    assert "mask3d" in text and "collator" in text and "pass" in text


def test_verify_on_an_encoder_compares_hidden_states():
    from transformers import AutoModel

    from packmask.testing import tiny_config

    torch.manual_seed(0)
    model = AutoModel.from_config(tiny_config("bert"), attn_implementation="packmask")
    report = packmask.verify(model, print_table=False)
    assert report.output_name == "last_hidden_state" and report.passed, report.summary()
    assert all(r.loss_rel_err is None for r in report.rows)


def test_bad_arguments_are_clear_errors():
    model = tiny_model("llama")
    with pytest.raises(packmask.PackmaskError, match="unknown verify form"):
        packmask.verify(model, forms=("mask5d",), print_table=False)
    with pytest.raises(packmask.PackmaskError, match="at least 2 tokens"):
        packmask.verify(model, seq_lengths=[[3, 1]], print_table=False)


def test_verify_is_a_function_and_its_module_is_not_callable():
    import packmask.verification as module

    assert callable(packmask.verify) and packmask.verify is module.verify
    assert not callable(module)
    assert packmask.verify(tiny_model("llama"), forms=("mask4d",), print_table=False).passed


@pytest.mark.parametrize("family, cls", [("bert", "BertModel"), ("roberta", "RobertaModel"),
                                         ("modernbert", "ModernBertModel"), ("llama", "LlamaForCausalLM")])
def test_model_for_a_family_picks_its_class_and_verify_passes(family, cls):
    """issue 9: `packmask verify --model bert` built BertLMHeadModel, checked it causally, and failed."""
    model = model_for(family)
    assert type(model).__name__ == cls
    report = packmask.verify(model, forms=("mask3d", "collator"), print_table=False)
    assert report.passed, report.summary()
    assert report.output_name == ("logits" if family == "llama" else "last_hidden_state")


def test_encoder_with_a_causal_lm_head_class_is_checked_bidirectionally():
    model = tiny_model("bert")  # BertLMHeadModel with is_decoder=False: still a bidirectional encoder
    assert type(model).__name__ == "BertLMHeadModel"
    assert packmask.verify(model, forms=("mask3d",), print_table=False).passed


@pytest.mark.parametrize("cls", ["BertModel", "BertForMaskedLM"])
def test_saved_encoder_folder_loads_its_class_and_passes(tmp_path, cls):
    import transformers

    from packmask.testing import tiny_config

    getattr(transformers, cls)(tiny_config("bert")).save_pretrained(tmp_path)
    model = model_for(str(tmp_path))
    assert type(model).__name__ == cls and model.config._attn_implementation == "packmask"
    report = packmask.verify(model, forms=("mask4d",), print_table=False)
    assert report.passed, report.summary()
    assert report.output_name == ("last_hidden_state" if cls == "BertModel" else "logits")


def test_cli_verify_passes_on_encoders(tmp_path, capsys):
    from packmask.cli.main import main
    from packmask.testing import tiny_config
    from transformers import BertModel

    BertModel(tiny_config("bert")).save_pretrained(tmp_path)
    for spec in ("bert", str(tmp_path)):
        assert main(["verify", "--model", spec]) == 0, capsys.readouterr().out[-2000:]


def test_model_for_refusals_are_packmask_errors(tmp_path):
    for family in families_choosing_attention_by_name()[:1]:  # falcon up to transformers 5.24, gpt_neo, ...
        with pytest.raises(packmask.UnsupportedModelError, match="_ATTENTION_CLASSES"):
            model_for(family)
    with pytest.raises(packmask.PackmaskError, match="encoder-decoder"):
        model_for("t5")
    with pytest.raises(packmask.PackmaskError, match="unknown model family"):
        model_for("llamma")
    with pytest.raises(packmask.PackmaskError, match="config.json"):
        model_for(str(tmp_path))  # an empty folder
