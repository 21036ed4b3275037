"""The rich table of a :class:`packmask.verification.VerifyReport`, readable at 80 columns.

Numbers stay in narrow columns; a refused or failed form's row says ``see why below`` and the whole
reason is written under the table (each distinct reason once, with the forms it stopped), where rich
wraps it to the terminal's width instead of cutting it to fit a cell::

    ┃ form     ┃ max |Δ| ┃ rel err ┃ loss ┃ grads ┃ worst parameter ┃  status ┃
    │ mask3d   │       – │       – │    – │     – │ see why below   │ refused │
    documents per row: [[5, 9, 4], [11, 6]]; ...
    why mask3d: UnsupportedModelError: packmask cannot pack this model: mamba has state-space /
    recurrent layers ...

The title says what was compared: ``attn=packmask packed vs eager alone``, or, for a model without
attention layers (mamba), ``no attention layers: packed vs each sequence alone``.
"""
from __future__ import annotations

__all__ = ["report_header", "report_reasons", "report_table"]

_STYLE = {"pass": "green", "FAIL": "bold red", "error": "bold red", "refused": "yellow"}


def report_header(report) -> str:
    """What was compared with what, honest per model (no attention layers: nothing to compare but
    packed against each sequence alone)."""
    compared = (f"attn={report.attn_implementation} packed vs {report.reference_impl} alone" if report.has_attention
                else "no attention layers: packed vs each sequence alone")
    return f"packmask verify — {report.model_type} ({report.model_class}, {compared}), {report.dtype}, tol {report.tol:.0e}"


def report_reasons(report) -> list[str]:
    """Each distinct error once, with the forms it stopped: ``["mask3d, mask4d: <the whole error>"]``."""
    grouped: dict[str, list[str]] = {}
    for row in report.rows:
        if row.error is not None:
            grouped.setdefault(row.error, []).append(row.form)
    return [f"{', '.join(forms)}: {error}" for error, forms in grouped.items()]


def _number(value) -> str:
    return "–" if value is None or value != value else f"{value:.1e}"


def report_table(report):
    """A ``rich.table.Table`` of the report's rows, the reasons of refused / failed forms in the caption."""
    from rich.table import Table

    reasons = report_reasons(report)
    caption = (f"documents per row: {report.seq_lengths}; max |Δ|, rel err: {report.output_name}; loss, grads: "
               "relative error; worst parameter: the largest gradient error")
    if reasons:
        caption += "\n" + "\n".join(f"{'why' if len(reasons) == 1 else f'why ({i})'} {reason}"
                                    for i, reason in enumerate(reasons, 1))
    table = Table(title=report_header(report), caption=caption, caption_justify="left")
    for column in ("form", "max |Δ|", "rel err", "loss", "grads", "worst parameter", "status"):
        table.add_column(column, justify="left" if column in ("form", "worst parameter") else "right",
                         overflow="fold", no_wrap=column != "worst parameter")
    numbered = {error: i for i, error in enumerate(dict.fromkeys(r.error for r in report.rows if r.error), 1)}
    for row in report.rows:
        status = f"[{_STYLE[row.status]}]{row.status}[/]"
        if row.error is not None:
            see = "see why below" if len(numbered) == 1 else f"see why ({numbered[row.error]})"
            table.add_row(row.form, "–", "–", "–", "–", see, status)
        else:
            table.add_row(row.form, _number(row.max_abs_err), _number(row.output_rel_err), _number(row.loss_rel_err),
                          _number(row.grad_rel_err), row.grad_param, status)
    return table
