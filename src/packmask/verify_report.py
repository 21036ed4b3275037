"""What :func:`packmask.verify` found: one :class:`FormResult` per input form in a :class:`VerifyReport`,
with its one-line summary and rich table.

    >>> row = FormResult("mask3d", output_rel_err=1e-7, loss_rel_err=3e-8, grad_rel_err=2e-7, tol=1e-5)
    >>> row.passed, row.status
    (True, 'pass')
    >>> FormResult("seq_lengths", error="PackmaskError: ...", error_type="PackmaskError").status
    'refused'
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["FormResult", "VerifyReport"]


@dataclass
class FormResult:
    """The comparison of one input form against each sequence run alone."""

    form: str
    max_abs_err: float = float("nan")  #: largest |packed - alone| over the real tokens' outputs
    output_rel_err: float = float("nan")  #: ||packed - alone|| / ||alone|| of logits / hidden states
    loss_rel_err: float | None = None  #: relative error of the loss (None for models without labels)
    #: the worst per-parameter relative gradient error; each parameter's denominator is its reference
    #: gradient norm, floored at 1e-4 x the largest one (exactly-zero gradients are rounding noise)
    grad_rel_err: float = float("nan")
    grad_param: str = ""  #: the parameter with that worst gradient error
    tol: float = 1e-5
    error: str | None = None  #: ``"ErrorType: message"`` when the packed run raised
    error_type: str | None = None

    @property
    def raised_packmask_error(self) -> bool:
        """The packed run refused with a clear :class:`~packmask.PackmaskError` (not a wrong result)."""
        return self.error_type in ("PackmaskError", "UnsupportedModelError")

    @property
    def passed(self) -> bool:
        if self.error is not None:
            return False
        errs = [self.output_rel_err, self.grad_rel_err] + ([self.loss_rel_err] if self.loss_rel_err is not None else [])
        return all(e == e and e <= self.tol for e in errs)  # e == e: NaN fails

    @property
    def status(self) -> str:
        if self.error is not None:
            return "refused" if self.raised_packmask_error else "error"
        return "pass" if self.passed else "FAIL"


@dataclass
class VerifyReport:
    """What :func:`verify` found: one :class:`FormResult` per input form.

    ``passed`` is True only when every form ran and every error is within ``tol``.
    """

    model_type: str
    model_class: str
    attn_implementation: str
    reference_impl: str
    dtype: str
    tol: float
    seq_lengths: list
    output_name: str
    rows: list = field(default_factory=list)
    has_attention: bool = True  #: False for models without attention layers (mamba): no implementation to compare

    @property
    def passed(self) -> bool:
        return bool(self.rows) and all(r.passed for r in self.rows)

    @property
    def refused(self) -> bool:
        """Every form was refused with a clear packmask error (an unsupported model, guarded)."""
        return bool(self.rows) and all(r.raised_packmask_error for r in self.rows)

    def worst(self) -> dict:
        """Largest errors over the forms that ran: ``{"output": ..., "loss": ..., "grad": ...}``."""
        ran = [r for r in self.rows if r.error is None]
        def mx(vals):
            vals = [v for v in vals if v is not None]
            return max(vals) if vals else None
        return {"output": mx(r.output_rel_err for r in ran), "loss": mx(r.loss_rel_err for r in ran),
                "grad": mx(r.grad_rel_err for r in ran)}

    def summary(self) -> str:
        w = self.worst()
        fmt = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        if self.refused:  # the reason in full (a table cell cuts it)
            return f"REFUSED {self.model_type}: {self.rows[0].error}"
        verdict = "PASS" if self.passed else "FAIL"
        return (f"{verdict} {self.model_type}: {self.output_name} rel err {fmt(w['output'])}, loss {fmt(w['loss'])}, "
                f"grads {fmt(w['grad'])} (tol {self.tol:.0e})")

    def header(self) -> str:
        """The table's title: what was compared with what (:mod:`packmask.verification_table`)."""
        from .verification_table import report_header
        return report_header(self)

    def reasons(self) -> list[str]:
        """``"mask3d, mask4d: <the whole error>"``: each distinct error once, with the forms it stopped."""
        from .verification_table import report_reasons
        return report_reasons(self)

    def table(self):
        """A ``rich.table.Table`` of the rows, reasons written out whole under it (:mod:`packmask.verification_table`)."""
        from .verification_table import report_table
        return report_table(self)

    def __rich__(self):
        return self.table()
