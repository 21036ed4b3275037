"""``verify``'s table at 80 columns (issue 21, item 7): refusal reasons are written out whole (wrapped),
and the header says what was compared for models with and without attention."""
from __future__ import annotations

from rich.console import Console

import packmask
from packmask.families import model_for
from packmask.testing import tiny_model
from packmask.verification import FormResult, VerifyReport

LONG = ("UnsupportedModelError: packmask cannot pack this model: it has state-space / recurrent layers whose state "
        "flows from one packed sequence into the next; an attention mask cannot isolate them. Train it unpacked.")
OTHER = "RuntimeError: something else went wrong in the packed forward, also longer than any cell of the table"


def _render(report, width=80) -> list[str]:
    console = Console(width=width, record=True, color_system=None)
    console.print(report.table())
    return console.export_text().splitlines()


def _report(rows, has_attention=True):
    return VerifyReport(model_type="demo", model_class="DemoForCausalLM", attn_implementation="packmask",
                        reference_impl="eager", dtype="float32", tol=1e-5, seq_lengths=[[3, 2]], output_name="logits",
                        rows=rows, has_attention=has_attention)


def test_reasons_are_wrapped_whole_at_80_columns():
    rows = [FormResult("mask3d", error=LONG, error_type="UnsupportedModelError"),
            FormResult("mask4d", error=LONG, error_type="UnsupportedModelError"),
            FormResult("collator", error=OTHER, error_type="RuntimeError")]
    lines = _render(_report(rows))
    assert max(map(len, lines)) <= 80
    text = " ".join(" ".join(lines).split())
    assert f"why (1) mask3d, mask4d: {LONG}" in text, text  # the whole reason, once for both forms
    assert f"why (2) collator: {OTHER}" in text, text
    assert "…" not in text  # nothing cut
    # control: the same reason is cut in a cell narrower than it (what the table used to do)
    assert LONG not in " ".join(" ".join(_render(_report(rows), width=40)[:8]).split())


def test_header_is_honest_per_model():
    llama = packmask.verify(tiny_model("llama"), forms=("mask3d",), print_table=False)
    assert llama.has_attention and "attn=packmask packed vs eager alone" in " ".join(" ".join(_render(llama)).split())
    mamba = packmask.verify(model_for("mamba"), forms=("mask3d",), print_table=False)
    text = " ".join(" ".join(_render(mamba)).split())
    assert not mamba.has_attention and "no attention layers: packed vs each sequence alone" in text, text
    assert "vs eager alone" not in text
    assert mamba.rows[0].error and " ".join(mamba.rows[0].error.split()) in text  # the reason, whole
