"""``packmask.verify``: prove, on any loaded model, that packed rows equal each sequence run alone.

It packs random token sequences into rows, runs them **packed** (in each requested input form)
and **one by one** (through ``reference_impl``, ``"eager"`` by default, on the *same* model
object: the attention implementation is switched back and forth, no weights are copied), and
compares per-token outputs (logits, or ``last_hidden_state`` for encoders), the loss and every
parameter gradient.

Worked example (a tiny random Llama, fp32 on CPU)::

    >>> import packmask
    >>> from packmask.testing import tiny_model
    >>> report = packmask.verify(tiny_model("llama"), print_table=False)
    >>> report.passed
    True
    >>> [row.form for row in report.rows]
    ['mask3d', 'mask4d', 'collator']

``report.table()`` is a rich table (printed by default)::

    verify llama (LlamaForCausalLM, attn=packmask vs eager alone), fp32, tol 1e-05
    form      max |Δ| out  rel err out  rel err loss  worst grad rel err  status
    mask3d        4.8e-07      1.1e-07       3.5e-08   2.9e-07 (model…)     pass
    ...

Input forms (``forms=``):

* ``"mask3d"`` — ``attention_mask=[B, N, N]`` block-diagonal bool mask, positions derived by packmask.
* ``"mask4d"`` — ``attention_mask=[B, 1, N, N]`` plus explicit per-document ``position_ids``.
* ``"collator"`` — the keys of ``transformers.DataCollatorWithFlattening``: one flattened row,
  ``position_ids`` restarting per sequence, ``cu_seq_lens_q/k``, ``max_length_q/k``.
* ``"position_ids"`` — packed ``position_ids`` alone, ``use_cache`` left at its default
  (a transformers pitfall: the stock implementations silently attend across sequences here).
* ``"position_ids_ones_2d"`` — packed ``position_ids`` plus an all-ones 2D ``attention_mask``.
* ``"seq_lengths"`` — packmask's ``seq_lengths=[[...], ...]`` keyword.

Encoders (attention layers with ``is_causal = False``: bert, roberta, modernbert, ... in their base or
masked-LM class) get bidirectional block-diagonal masks and are compared on ``last_hidden_state`` (the
masked-LM class: ``logits``) and a fixed random projection of it (for gradients). Decoders get causal
masks and are compared on logits and the loss. :func:`model_for` builds or loads the right class for a
family name or a saved folder (what ``packmask verify --model`` calls).

A form that raises is reported with its error (``row.error``), never hidden; a
:class:`~packmask.UnsupportedModelError` there is the guard doing its job for a model packmask
cannot isolate (see :mod:`packmask.support`).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import PackmaskError, UnsupportedModelError
from .families import is_causal_model, model_for
from .masks import block_diagonal_mask
from .support import position_offset
from .testing import pack_rows, rel_err, tiny_config, tiny_model

__all__ = ["verify", "model_for", "VerifyReport", "FormResult", "FORMS", "DEFAULT_SEQ_LENGTHS", "tiny_model", "tiny_config"]

#: every input form verify knows (see the module docstring)
FORMS = ("mask3d", "mask4d", "collator", "position_ids", "position_ids_ones_2d", "seq_lengths")
#: two rows of 18 tokens; documents longer than a sliding window of 4; one padding token ends row 1
DEFAULT_SEQ_LENGTHS = [[5, 9, 4], [11, 6]]
#: relative-error tolerance by dtype (fp32 exact up to rounding; half precision reorders sums)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2}


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
        verdict = "PASS" if self.passed else ("REFUSED" if self.refused else "FAIL")
        return (f"{verdict} {self.model_type}: {self.output_name} rel err {fmt(w['output'])}, loss {fmt(w['loss'])}, "
                f"grads {fmt(w['grad'])} (tol {self.tol:.0e})")

    def table(self):
        """A ``rich.table.Table`` of the rows."""
        from rich.table import Table

        t = Table(title=f"packmask verify — {self.model_type} ({self.model_class}, attn={self.attn_implementation} "
                        f"packed vs {self.reference_impl} alone), {self.dtype}, tol {self.tol:.0e}",
                  caption=f"documents per row: {self.seq_lengths}")
        for col in ("form", f"max |Δ| {self.output_name}", f"rel err {self.output_name}", "rel err loss",
                    "worst grad rel err", "parameter", "status"):
            t.add_column(col, justify="left" if col in ("form", "parameter") else "right")
        fmt = lambda v: "–" if v is None or v != v else f"{v:.1e}"  # noqa: E731
        style = {"pass": "green", "FAIL": "bold red", "error": "bold red", "refused": "yellow"}
        for r in self.rows:
            status = f"[{style[r.status]}]{r.status}[/]"
            if r.error is not None:
                t.add_row(r.form, "–", "–", "–", "–", r.error[:90], status)
            else:
                t.add_row(r.form, fmt(r.max_abs_err), fmt(r.output_rel_err), fmt(r.loss_rel_err),
                          fmt(r.grad_rel_err), r.grad_param, status)
        return t

    def __rich__(self):
        return self.table()


# ---------------------------------------------------------------------------------------------


def _accepts(model, name: str) -> bool:
    params = inspect.signature(type(model).forward).parameters
    return name in params


def _vocab_size(model) -> int:
    try:
        return int(model.get_input_embeddings().num_embeddings)
    except Exception:  # noqa: BLE001
        return int(model.config.get_text_config().vocab_size)


def _random_ids(model, shape, generator) -> torch.Tensor:
    """Token ids in the vocabulary, avoiding pad/bos/eos (some embeddings zero the pad row)."""
    vocab = _vocab_size(model)
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    special = set()
    for key in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = getattr(cfg, key, None)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(x, int):
                special.add(x)
    allowed = torch.tensor([i for i in range(min(vocab, 4096)) if i not in special])
    return allowed[torch.randint(0, len(allowed), shape, generator=generator)]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _output(out, name):
    if name == "last_hidden_state" and getattr(out, "last_hidden_state", None) is None:
        return out.logits  # an encoder's masked-LM class: compared on its (bidirectional) logits
    return out.logits if name == "logits" else out.last_hidden_state


def _param_grads(model) -> dict:
    return {n: (None if p.grad is None else p.grad.detach().clone()) for n, p in model.named_parameters()}


def _compare_grads(packed: dict, alone: dict, floor: float = 1e-4) -> tuple[float, str]:
    """Worst per-parameter relative gradient error.

    Each parameter's error is relative to its own reference gradient norm, floored at ``floor`` x
    the largest parameter-gradient norm: gradients that are exactly zero in exact arithmetic (a
    key-projection bias under softmax, which shifts every score of a query equally) are pure
    rounding noise of ~1e-9 and would otherwise give "relative errors" of order 1.
    """
    norms = [float(r.double().norm()) for r in alone.values() if r is not None]
    scale = floor * max(norms, default=0.0)
    worst, name = 0.0, ""
    for n, g in packed.items():
        r = alone.get(n)
        if g is None and r is None:
            continue
        if (g is None) != (r is None):
            return float("inf"), n
        denom = max(float(r.double().norm()), scale, 1e-30)
        e = float((g.double() - r.double()).norm()) / denom
        if not e <= worst:  # NaN propagates as the worst
            worst, name = e, n
    return worst, name


def _inputs(form, ids, labels, pos, seq_lengths, N, causal):
    """Keyword arguments of the packed forward for one form; the first element says if it is flattened."""
    B = ids.shape[0]
    mask = block_diagonal_mask(seq_lengths, N, causal_within=causal)
    if form == "mask3d":
        return False, dict(input_ids=ids, attention_mask=mask)
    if form == "mask4d":
        return False, dict(input_ids=ids, attention_mask=mask[:, None], position_ids=pos)
    if form == "collator":
        from .layout import DocumentLayout
        layout = DocumentLayout.from_position_ids(pos, causal=causal)
        return True, dict(input_ids=ids.reshape(1, -1), position_ids=pos.reshape(1, -1),
                          cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                          max_length_q=layout.max_seqlen, max_length_k=layout.max_seqlen)
    if form == "position_ids":
        return False, dict(input_ids=ids, position_ids=pos)
    if form == "position_ids_ones_2d":
        return False, dict(input_ids=ids, position_ids=pos, attention_mask=torch.ones(B, N, dtype=torch.long))
    if form == "seq_lengths":
        return False, dict(input_ids=ids, seq_lengths=seq_lengths)
    raise PackmaskError(f"unknown verify form {form!r}; choose from {FORMS}.")


def verify(model, *, seq_lengths: Sequence[Sequence[int]] | None = None,
           forms: Sequence[str] = ("mask3d", "mask4d", "collator"), seed: int = 0, reference_impl: str = "eager",
           print_table: bool = True, tol: float | None = None) -> VerifyReport:
    """Run ``model`` on packed rows and on each sequence alone; report every difference.

    Args:
        model: any transformers model — a causal LM (compared on logits and loss) or an encoder
            (``AutoModel``; compared on ``last_hidden_state``). Usually built or loaded with
            ``attn_implementation="packmask"``; it is tested *as configured*, so a model on
            ``"sdpa"`` shows what the stock path does with packed rows.
        seq_lengths: documents per row, e.g. ``[[5, 9, 4], [11, 6]]`` (each ≥ 2 tokens; a row
            shorter than the longest ends in padding). Default :data:`DEFAULT_SEQ_LENGTHS`.
        forms: which packed input forms to try (see :data:`FORMS`).
        seed: seeds the random token ids (and the projection used for encoder gradients).
        reference_impl: the attention implementation each sequence runs alone with.
        print_table: print the rich table to the terminal.
        tol: relative-error tolerance; default by dtype (1e-5 for fp32, 3e-2 for bf16).

    Returns:
        :class:`VerifyReport`. The model is left in the attention implementation and train/eval
        mode it came in; its parameter ``.grad`` are reset to None.

    >>> from packmask.testing import tiny_model
    >>> verify(tiny_model("qwen2"), forms=("collator",), print_table=False).passed
    True
    """
    from .multimodal.families import FAMILIES as VLM_RULES  # multimodal: packed by MultimodalCollator instead
    if getattr(model.config, "model_type", None) in VLM_RULES:
        from .multimodal.verify import verify_multimodal
        return verify_multimodal(model, seed=seed, reference_impl=reference_impl, print_table=print_table, tol=tol)
    seq_lengths = [list(map(int, r)) for r in (seq_lengths or DEFAULT_SEQ_LENGTHS)]
    if any(x < 2 for r in seq_lengths for x in r):
        raise PackmaskError("verify needs documents of at least 2 tokens (a 1-token document has no loss term).")
    for f in forms:
        if f not in FORMS:
            raise PackmaskError(f"unknown verify form {f!r}; choose from {FORMS}.")
    N = max(sum(r) for r in seq_lengths)
    B = len(seq_lengths)
    param = next(model.parameters())
    device, dtype = param.device, param.dtype
    tol = TOLERANCE.get(dtype, 1e-5) if tol is None else tol
    causal = is_causal_model(model)
    output_name = "logits" if causal else "last_hidden_state"
    impl = model.config._attn_implementation
    report = VerifyReport(model_type=getattr(model.config, "model_type", "?"), model_class=type(model).__name__,
                          attn_implementation=str(impl), reference_impl=reference_impl, dtype=str(dtype).replace(
                              "torch.", ""), tol=tol, seq_lengths=seq_lengths, output_name=output_name)

    g = torch.Generator().manual_seed(seed)
    slices, pos = pack_rows(seq_lengths, N)
    ids = _random_ids(model, (B, N), g)
    labels = torch.full_like(ids, -100)
    real = torch.zeros(B, N, dtype=torch.bool)
    for b, s, length in slices:
        labels[b, s + 1:s + length] = ids[b, s + 1:s + length]  # -100 at each document's first token
        real[b, s:s + length] = True
    pos = pos + position_offset(model)  # RoBERTa-style models number positions from padding_idx + 1
    ids, labels, pos, real = ids.to(device), labels.to(device), pos.to(device), real.to(device)
    with_labels = causal and _accepts(model, "labels")
    no_cache = dict(use_cache=False) if _accepts(model, "use_cache") else {}
    projection = None  # encoders: gradients of a fixed random projection of the hidden states

    was_training = model.training
    model.eval()  # dropout off: exact comparisons need deterministic forwards
    try:
        # ---- each sequence alone: once, shared by every form ------------------------------------
        try:
            model.zero_grad(set_to_none=True)
            model.set_attn_implementation(reference_impl)
            expected, n_loss = None, 0
            loss_terms = []
            outs = []
            with torch.enable_grad():
                for b, s, length in slices:
                    kw = dict(input_ids=ids[b:b + 1, s:s + length], **no_cache)
                    if with_labels:
                        kw["labels"] = labels[b:b + 1, s:s + length]
                    out = model(**kw)
                    if output_name == "last_hidden_state" and getattr(out, "last_hidden_state", None) is None:
                        output_name = report.output_name = "logits"  # a masked-LM head: its logits
                    outs.append(_output(out, output_name)[0])
                    if with_labels and out.loss is not None:
                        loss_terms.append(out.loss * (length - 1))
                        n_loss += length - 1
                width = outs[0].shape[-1]
                expected = outs[0].new_zeros(B, N, width)
                for (b, s, length), o in zip(slices, outs):
                    expected = expected.index_put((torch.tensor([b], device=device),
                                                   torch.arange(s, s + length, device=device)), o)
                if not causal or not loss_terms:
                    projection = torch.randn(B, N, width, generator=g).to(device, expected.dtype) * real[..., None]
                ref_loss = sum(loss_terms) / n_loss if loss_terms else None
                objective = ref_loss if projection is None else (expected * projection).sum()
                objective.backward()
            ref_grads = _param_grads(model)
            expected = expected.detach()
            ref_loss = None if ref_loss is None else ref_loss.detach()
        except Exception as e:  # noqa: BLE001 — e.g. a model packmask refuses even unpacked
            for form in forms:
                report.rows.append(FormResult(form=form, tol=tol, error_type=type(e).__name__,
                                              error=f"{type(e).__name__}: {_first_line(e)} (running each sequence alone)"))
            forms = ()
        model.set_attn_implementation(impl)

        # ---- packed, per form -------------------------------------------------------------------
        for form in forms:
            row = FormResult(form=form, tol=tol)
            report.rows.append(row)
            model.zero_grad(set_to_none=True)
            try:
                flat, kw = _inputs(form, ids, labels, pos, seq_lengths, N, causal)
                if with_labels:
                    kw["labels"] = labels.reshape(1, -1) if flat else labels
                with torch.enable_grad():
                    out = model(**kw)
                    got = _output(out, output_name)
                    got = got.reshape(B, N, -1)
                    loss = out.loss if with_labels else None

                    objective = loss if projection is None else (got * projection).sum()
                    objective.backward()
            except Exception as e:  # noqa: BLE001 — reported, never swallowed: the row fails
                row.error_type = type(e).__name__
                row.error = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
                continue
            got = got.detach()
            loss = None if loss is None else loss.detach()
            row.max_abs_err = float((got[real] - expected[real]).abs().max())
            row.output_rel_err = rel_err(got[real], expected[real])
            if ref_loss is not None and loss is not None:
                row.loss_rel_err = abs(float(loss) - float(ref_loss)) / max(abs(float(ref_loss)), 1e-30)
            row.grad_rel_err, row.grad_param = _compare_grads(_param_grads(model), ref_grads)
    finally:
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    if print_table:
        from rich.console import Console
        Console().print(report.table())
    return report
