"""``packmask.verify``: prove, on any loaded model, that packed rows equal each sequence run alone.

It packs random token sequences into rows, runs them **packed** (in each requested input form)
and **one by one** (through ``reference_impl``, ``"eager"`` by default, on the *same* model
object: the attention implementation is switched back and forth, no weights are copied), and
compares per-token outputs (logits, or ``last_hidden_state`` for encoders), the loss and every
parameter gradient.

Worked example (a tiny random Llama, fp32 on CPU)::

    >>> import packmask
    >>> from packmask.tiny import tiny_model
    >>> report = packmask.verify(tiny_model("llama"), print_table=False)
    >>> report.passed
    True
    >>> [row.form for row in report.rows]
    ['mask3d', 'mask4d', 'collator']

``report.table()`` is a rich table (printed by default)::

    packmask verify — llama (LlamaForCausalLM, attn=packmask packed vs eager alone), float32, tol 1e-05
    form      max |Δ|  rel err     loss    grads  worst parameter                         status
    mask3d    1.6e-07  2.1e-07  0.0e+00  3.8e-07  model.layers.1.self_attn.q_proj.weight    pass
    ...

A refused or failed form shows ``see why below``; its whole reason is written under the table
(:meth:`VerifyReport.reasons`), wrapped, never cut to fit a cell.

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
from dataclasses import dataclass
from typing import Sequence

import torch

from .errors import PackmaskError, UnsupportedModelError
from .families import is_causal_model, model_for
from .masks import block_diagonal_mask
from .reference import pack_rows, rel_err
from .support import position_offset
from .tiny import tiny_config, tiny_model
from .verify_report import TOLERANCE, FormResult, VerifyReport

__all__ = ["verify", "model_for", "VerifyReport", "FormResult", "FORMS", "DEFAULT_SEQ_LENGTHS", "tiny_model", "tiny_config",
           "has_attention_layers"]

#: every input form verify knows (see the module docstring)
FORMS = ("mask3d", "mask4d", "collator", "position_ids", "position_ids_ones_2d", "seq_lengths")
#: two rows of 18 tokens; documents longer than a sliding window of 4; one padding token ends row 1
DEFAULT_SEQ_LENGTHS = [[5, 9, 4], [11, 6]]
#: relative-error tolerance by dtype (fp32 exact up to rounding; half precision reorders sums)


# ---------------------------------------------------------------------------------------------


def has_attention_layers(model) -> bool:
    """Whether any submodule is an attention layer (by class name, as transformers names them:
    ``LlamaAttention``, ``BertSelfAttention``, ...); a mamba model has none.

    >>> from packmask.testing import tiny_model
    >>> has_attention_layers(tiny_model("llama")), has_attention_layers(torch.nn.Linear(2, 2))
    (True, False)
    """
    return any("attention" in type(module).__name__.lower() for module in model.modules())


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
    mask = block_diagonal_mask(seq_lengths, N, causal_within=causal).to(ids.device)
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
        return False, dict(input_ids=ids, position_ids=pos, attention_mask=torch.ones(B, N, dtype=torch.long, device=ids.device))
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

    >>> from packmask.tiny import tiny_model
    >>> verify(tiny_model("qwen2"), forms=("collator",), print_table=False).passed
    True
    """
    from .multimodal.families import FAMILIES as VLM_RULES  # multimodal: packed by MultimodalCollator instead
    if getattr(model.config, "model_type", None) in VLM_RULES:
        from .multimodal.verify import verify_multimodal
        return verify_multimodal(model, seed=seed, reference_impl=reference_impl, print_table=print_table, tol=tol)
    seq_lengths = _check_args(seq_lengths, forms)
    param = next(model.parameters())
    tol = TOLERANCE.get(param.dtype, 1e-5) if tol is None else tol
    causal = is_causal_model(model)
    impl = model.config._attn_implementation
    report = VerifyReport(model_type=getattr(model.config, "model_type", "?"), model_class=type(model).__name__,
                          attn_implementation=str(impl), reference_impl=reference_impl,
                          dtype=str(param.dtype).replace("torch.", ""), tol=tol, seq_lengths=seq_lengths,
                          output_name="logits" if causal else "last_hidden_state",
                          has_attention=has_attention_layers(model))
    g = torch.Generator().manual_seed(seed)
    batch = _packed_batch(model, seq_lengths, g, causal)

    was_training = model.training
    model.eval()  # dropout off: exact comparisons need deterministic forwards
    try:
        try:
            model.set_attn_implementation(reference_impl)
            reference = _run_alone(model, batch, report, g)  # once, shared by every form
        except Exception as e:  # noqa: BLE001 — e.g. a model packmask refuses even unpacked
            report.rows += [FormResult(form=form, tol=tol, error_type=type(e).__name__,
                                       error=f"{type(e).__name__}: {_first_line(e)} (running each sequence alone)")
                            for form in forms]
            forms = ()
        model.set_attn_implementation(impl)
        for form in forms:
            report.rows.append(_run_form(model, form, batch, reference, report.output_name, tol))
    finally:
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    from .recurrent import installed  # recurrent: what ran per sequence, for the header
    report.recurrent = list(installed(model) or [])
    if print_table:
        from rich.console import Console
        Console().print(report.table())
    return report


# ---- the steps of verify -------------------------------------------------------------------------

def _check_args(seq_lengths, forms) -> list[list[int]]:
    seq_lengths = [list(map(int, r)) for r in (seq_lengths or DEFAULT_SEQ_LENGTHS)]
    if any(x < 2 for r in seq_lengths for x in r):
        raise PackmaskError("verify needs documents of at least 2 tokens (a 1-token document has no loss term).")
    for f in forms:
        if f not in FORMS:
            raise PackmaskError(f"unknown verify form {f!r}; choose from {FORMS}.")
    return seq_lengths


@dataclass
class _Batch:
    """The packed rows every form and the reference run: tokens, labels (-100 at each document's
    first token), positions, which tokens are real (not padding), and where each document lies."""

    seq_lengths: list
    slices: list
    ids: torch.Tensor
    labels: torch.Tensor
    pos: torch.Tensor
    real: torch.Tensor
    causal: bool
    with_labels: bool
    no_cache: dict


def _packed_batch(model, seq_lengths, g, causal) -> _Batch:
    N = max(sum(r) for r in seq_lengths)
    B = len(seq_lengths)
    device = next(model.parameters()).device
    slices, pos = pack_rows(seq_lengths, N)
    ids = _random_ids(model, (B, N), g)
    labels = torch.full_like(ids, -100)
    real = torch.zeros(B, N, dtype=torch.bool)
    for b, s, length in slices:
        labels[b, s + 1:s + length] = ids[b, s + 1:s + length]  # -100 at each document's first token
        real[b, s:s + length] = True
    pos = pos + position_offset(model)  # RoBERTa-style models number positions from padding_idx + 1
    return _Batch(seq_lengths, slices, ids.to(device), labels.to(device), pos.to(device), real.to(device), causal,
                  causal and _accepts(model, "labels"), dict(use_cache=False) if _accepts(model, "use_cache") else {})


@dataclass
class _Reference:
    """Each sequence run alone: outputs scattered into the packed grid, the loss, every gradient, and
    (encoders, or models without a loss) the fixed random projection whose gradients are compared."""

    expected: torch.Tensor
    loss: torch.Tensor | None
    grads: dict
    projection: torch.Tensor | None


def _run_alone(model, batch: _Batch, report: VerifyReport, g) -> _Reference:
    model.zero_grad(set_to_none=True)
    B, N = batch.ids.shape
    device = batch.ids.device
    loss_terms, n_loss, outs = [], 0, []
    projection = None
    with torch.enable_grad():
        for b, s, length in batch.slices:
            kw = dict(input_ids=batch.ids[b:b + 1, s:s + length], **batch.no_cache)
            if batch.with_labels:
                kw["labels"] = batch.labels[b:b + 1, s:s + length]
            out = model(**kw)
            if report.output_name == "last_hidden_state" and getattr(out, "last_hidden_state", None) is None:
                report.output_name = "logits"  # a masked-LM head: its logits
            outs.append(_output(out, report.output_name)[0])
            if batch.with_labels and out.loss is not None:
                loss_terms.append(out.loss * (length - 1))
                n_loss += length - 1
        width = outs[0].shape[-1]
        expected = outs[0].new_zeros(B, N, width)
        for (b, s, length), o in zip(batch.slices, outs):
            expected = expected.index_put((torch.tensor([b], device=device),
                                           torch.arange(s, s + length, device=device)), o)
        if not batch.causal or not loss_terms:
            projection = torch.randn(B, N, width, generator=g).to(device, expected.dtype) * batch.real[..., None]
        ref_loss = sum(loss_terms) / n_loss if loss_terms else None
        objective = ref_loss if projection is None else (expected * projection).sum()
        objective.backward()
    return _Reference(expected.detach(), None if ref_loss is None else ref_loss.detach(), _param_grads(model),
                      projection)


def _run_form(model, form: str, batch: _Batch, reference: _Reference, output_name: str, tol: float) -> FormResult:
    """One packed input form, compared with the reference; an error is reported in the row, never raised."""
    row = FormResult(form=form, tol=tol)
    B, N = batch.ids.shape
    model.zero_grad(set_to_none=True)
    try:
        flat, kw = _inputs(form, batch.ids, batch.labels, batch.pos, batch.seq_lengths, N, batch.causal)
        if batch.with_labels:
            kw["labels"] = batch.labels.reshape(1, -1) if flat else batch.labels
        with torch.enable_grad():
            out = model(**kw)
            got = _output(out, output_name).reshape(B, N, -1)
            loss = out.loss if batch.with_labels else None
            objective = loss if reference.projection is None else (got * reference.projection).sum()
            objective.backward()
    except Exception as e:  # noqa: BLE001 — reported, never swallowed: the row fails
        row.error_type = type(e).__name__
        row.error = f"{type(e).__name__}: {_first_line(e)}"
        return row
    got, real, expected = got.detach(), batch.real, reference.expected
    row.max_abs_err = float((got[real] - expected[real]).abs().max())
    row.output_rel_err = rel_err(got[real], expected[real])
    if reference.loss is not None and loss is not None:
        loss = loss.detach()
        row.loss_rel_err = abs(float(loss) - float(reference.loss)) / max(abs(float(reference.loss)), 1e-30)
    row.grad_rel_err, row.grad_param = _compare_grads(_param_grads(model), reference.grads)
    return row
