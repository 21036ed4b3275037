"""Prove a vision-language model packs exactly: samples packed by :class:`MultimodalCollator` against
each sample run alone (logits of every token, the loss, every parameter gradient, vision tower
included), and a control that must differ (the same row run as one sequence).

``packmask verify --model qwen2_5_vl`` (any family of :data:`~packmask.multimodal.tiny.VLM_FAMILIES`)
builds a tiny random model and runs :func:`verify_multimodal` on random samples with 0-2 images.

>>> from packmask.multimodal.tiny import tiny_vlm
>>> model = tiny_vlm("qwen2_5_vl")
>>> report = verify_multimodal(model, samples=random_samples(model, 3), print_table=False)
>>> report.passed, [row.form for row in report.rows]
(True, ['collator', 'collator, 2 rows'])
"""
from __future__ import annotations

import torch

from ..reference import rel_err
from .collator import MultimodalCollator, pad_cat
from .families import TOKEN_KEYS, family_of

__all__ = ["compare_packed", "verify_multimodal", "random_samples", "naive_batch", "grad_dict_rel_err", "param_grads"]


def random_samples(model, count: int = 4, seed: int = 0, max_images: int = 2) -> list[dict]:
    """``count`` tiny samples for ``model`` (:func:`~packmask.multimodal.tiny.tiny_sample`): image
    counts cycle through 0..``max_images`` (PaliGemma: always 1), text lengths 3-9."""
    from .tiny import tiny_sample

    g = torch.Generator().manual_seed(seed)
    one_image = model.config.model_type == "paligemma"
    return [tiny_sample(model, n_text=int(torch.randint(3, 10, (1,), generator=g)),
                        n_images=1 if one_image else (i + 1) % (max_images + 1), generator=g) for i in range(count)]


def _n_scored(labels: torch.Tensor) -> int:
    return int((labels[..., 1:] != -100).sum())


def param_grads(model) -> dict:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _alone(model, samples):
    model.zero_grad(set_to_none=True)
    logits, total, count = [], 0.0, 0
    for s in samples:
        kw = {k: v for k, v in s.items() if k != "attention_mask"}
        out = model(**kw, use_cache=False)
        n = _n_scored(s["labels"])
        total, count = total + out.loss * n, count + n
        logits.append(out.logits[0])
    loss = total / count
    loss.backward()
    return [x.detach() for x in logits], loss.detach(), param_grads(model)


def _packed(model, batch, rows_of):
    model.zero_grad(set_to_none=True)
    out = model(**batch)
    out.loss.backward()
    logits = [out.logits[b, s:s + n].detach() for b, s, n in rows_of]
    return logits, out.loss.detach(), param_grads(model)


def _spans(collator, samples):
    spans = []
    for b, row in enumerate(collator.rows(samples)):
        start = 0
        for s in row:
            n = s["input_ids"].shape[1]
            spans.append((b, start, n))
            start += n
    return spans


def grad_dict_rel_err(got: dict, ref: dict, floor: float = 1e-4) -> tuple[float, str]:
    """Worst per-parameter relative gradient error (denominator floored at ``floor`` x the largest
    reference gradient norm: exactly-zero gradients are rounding noise), over two ``{name: tensor}``
    dicts (:func:`param_grads`); :func:`packmask.reference.grad_rel_err` compares two models' ``.grad``."""
    if set(got) != set(ref):
        return float("inf"), sorted(set(got) ^ set(ref))[0]
    scale = floor * max((float(r.double().norm()) for r in ref.values()), default=0.0)
    worst, name = 0.0, ""
    for n, r in ref.items():
        e = float((got[n].double() - r.double()).norm()) / max(float(r.double().norm()), scale, 1e-30)
        if not e <= worst:
            worst, name = e, n
    return worst, name


def naive_batch(model, samples) -> dict:
    """The control: the samples concatenated into one row and run as ONE sequence (the model's own
    positions and mask over the whole row: what a plain concatenation does)."""
    image_dim = family_of(model).image_dim
    keys = {k for s in samples for k in s if k != "attention_mask"}
    batch = {k: pad_cat([s[k] for s in samples if k in s], 1 if k in TOKEN_KEYS else image_dim) for k in keys}
    return dict(batch, use_cache=False)


def compare_packed(model, samples, *, max_length: int | None = None, reference_impl: str = "eager",
                   control: bool = False, training: bool = False) -> dict:
    """Pack ``samples`` with :class:`MultimodalCollator` and compare against each run alone (on
    ``reference_impl``); a list among ``samples`` is one row, packed as given. Returns ``{"logits", "loss", "grad", "grad_param", "control"}`` relative errors;
    ``control``: also the naive concatenation's logits error (must be large). ``training`` runs both in
    train mode (activation checkpointing, if enabled, recomputes layers in backward)."""
    impl = model.config._attn_implementation
    device = next(model.parameters()).device

    def moved(s):
        return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in s.items()}

    # a list is one row as given (PackedImageText's items); the reference runs every sample alone
    samples = [[moved(s) for s in f] if isinstance(f, (list, tuple)) else moved(f) for f in samples]
    collator = MultimodalCollator(model, max_length=max_length)
    batch = collator(samples)
    spans = _spans(collator, samples)
    samples = [s for f in samples for s in (f if isinstance(f, list) else [f])]
    was_training = model.training
    model.train(training)
    try:
        model.set_attn_implementation(reference_impl)
        ref = _alone(model, samples)
        model.set_attn_implementation(impl)
        got = _packed(model, batch, spans)
        result = dict(logits=rel_err(torch.cat(got[0]), torch.cat(ref[0])), loss=rel_err(got[1], ref[1]),
                      max_abs=float((torch.cat(got[0]) - torch.cat(ref[0])).abs().max()))
        result["grad"], result["grad_param"] = grad_dict_rel_err(got[2], ref[2])
        if control:
            with torch.no_grad():
                naive = model(**naive_batch(model, samples)).logits[0]
            result["control"] = rel_err(naive, torch.cat(ref[0]))
    finally:
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return result


def verify_multimodal(model, *, samples=None, seed: int = 0, reference_impl: str = "eager", tol: float | None = None,
                      print_table: bool = True):
    """:func:`packmask.verify` for a vision-language model: forms ``"collator"`` (one row) and
    ``"collator, 2 rows"`` (``max_length`` splits the samples over two padded rows)."""
    from ..verify_report import TOLERANCE, FormResult, VerifyReport

    family_of(model)  # refuses a family without a packing rule
    samples = samples if samples is not None else random_samples(model, seed=seed)
    dtype = next(model.parameters()).dtype
    tol = TOLERANCE.get(dtype, 1e-5) if tol is None else tol
    total = sum(s["input_ids"].shape[1] for s in samples)
    longest = max(s["input_ids"].shape[1] for s in samples)
    report = VerifyReport(model_type=model.config.model_type, model_class=type(model).__name__,
                          attn_implementation=str(model.config._attn_implementation), reference_impl=reference_impl,
                          dtype=str(dtype).replace("torch.", ""), tol=tol,
                          seq_lengths=[[s["input_ids"].shape[1] for s in samples]], output_name="logits")
    for form, max_length in (("collator", None), ("collator, 2 rows", max(longest, -(-total // 2)))):
        row = FormResult(form=form, tol=tol)
        report.rows.append(row)
        try:
            r = compare_packed(model, samples, max_length=max_length, reference_impl=reference_impl)
        except Exception as e:  # noqa: BLE001 -- reported, never swallowed: the row fails or is refused
            row.error_type = type(e).__name__
            row.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            continue
        row.output_rel_err, row.loss_rel_err = r["logits"], r["loss"]
        row.grad_rel_err, row.grad_param = r["grad"], r["grad_param"]
        row.max_abs_err = r["max_abs"]
    if print_table:
        from rich.console import Console
        Console().print(report.table())
    return report
