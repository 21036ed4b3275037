"""Prove vision-language tree rows exact: :class:`~packmask.multimodal.tree.MultimodalTreeCollator`
rows against every ``prompt + answer`` path run alone (the unshared reference: the prompt and its
images repeated per answer), comparing the answer tokens' log-probabilities, the per-answer sums,
the loss (DPO's sigmoid loss for pairs, an advantage-weighted loss for groups) and every parameter
gradient, vision tower included. Two controls must differ: ``"siblings"`` (an answer also sees the
answers before it in its tree) and ``"positions"`` (an answer's positions restart at 0 instead of
continuing from its prompt).

>>> from packmask.multimodal.tiny import tiny_vlm
>>> model = tiny_vlm("qwen2_5_vl")
>>> result = compare_tree(model, random_preference_examples(model, 2))
>>> result["logits"] < 1e-5 and result["loss"] < 1e-5 and result["grad"] < 1e-5
True
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..data.logps import branch_logps
from ..reference import rel_err
from .tree import ANSWER_KEYS, MultimodalTreeCollator, model_inputs
from .verify import grad_dict_rel_err, param_grads

__all__ = ["path_features", "random_preference_examples", "compare_tree", "control_batch", "CONTROLS"]

CONTROLS = ("siblings", "positions")


def path_features(example: dict, answer: list[int], answer_type: int = 0) -> dict:
    """One ``prompt + answer`` path alone: the prompt's features with the answer appended (its token
    types ``answer_type``: PaliGemma's suffix is 1), as the processor would give the whole sequence."""
    path = {k: v for k, v in example.items() if k not in ANSWER_KEYS and k not in ("labels", "attention_mask")
            and not k.startswith("ref_")}
    tail = torch.tensor([answer], dtype=example["input_ids"].dtype, device=example["input_ids"].device)
    path["input_ids"] = torch.cat([example["input_ids"], tail], 1)
    for key in ("token_type_ids", "mm_token_type_ids"):
        if key in example:
            path[key] = torch.cat([example[key], torch.full_like(tail, answer_type)], 1)
    return path


def random_preference_examples(model, count: int = 3, seed: int = 0, group: int | None = None) -> list[dict]:
    """``count`` tiny examples for ``model`` (:func:`~packmask.multimodal.tiny.tiny_sample` prompts with
    0-2 images, PaliGemma 1): ``chosen_ids`` / ``rejected_ids`` of 1-6 tokens, or ``group``
    completions (``completion_ids``)."""
    from .tiny import TEXT_IDS, tiny_sample

    g = torch.Generator().manual_seed(seed)
    paligemma = model.config.model_type == "paligemma"
    out = []
    for i in range(count):
        prompt = tiny_sample(model, n_text=int(torch.randint(2, 7, (1,), generator=g)),
                             n_images=1 if paligemma else (i + 1) % 3, generator=g)
        prompt.pop("labels")
        if paligemma:  # the whole prompt is the prefix; the answers are the suffix
            prompt["token_type_ids"] = torch.zeros_like(prompt["token_type_ids"])
        answer = lambda: torch.randint(3, TEXT_IDS, (int(torch.randint(1, 7, (1,), generator=g)),),  # noqa: E731
                                       generator=g).tolist()
        if group:
            out.append(dict(prompt, completion_ids=[answer() for _ in range(group)]))
        else:
            out.append(dict(prompt, chosen_ids=answer(), rejected_ids=answer()))
    return out


def _answers(examples) -> list[tuple[int, list[int]]]:
    """``(example, answer)`` in the collator's branch order: chosen of every example, then rejected;
    or every example's completions in turn."""
    if "completion_ids" in examples[0]:
        return [(e, list(c)) for e, ex in enumerate(examples) for c in ex["completion_ids"]]
    return [(e, list(ex[k])) for k in ("chosen_ids", "rejected_ids") for e, ex in enumerate(examples)]


def _loss(sums: torch.Tensor, examples, beta: float) -> torch.Tensor:
    """DPO's sigmoid loss (reference log-probs: fixed numbers) for pairs; for groups a fixed-advantage
    policy-gradient surrogate. The same function of the per-answer sums for both sides."""
    E = len(examples)
    if "completion_ids" in examples[0]:
        adv = torch.linspace(-1.0, 1.0, sums.shape[0], dtype=sums.dtype, device=sums.device)
        return -(adv * sums).mean()
    ref = torch.linspace(-3.0, -1.0, 2 * E, dtype=sums.dtype, device=sums.device)
    margin = (sums[:E] - ref[:E]) - (sums[E:] - ref[E:])
    return -F.logsigmoid(beta * margin).mean()


def control_batch(batch: dict, control: str, first_position: int = 0) -> dict:
    """The same rows made wrong on purpose: ``"siblings"`` -- an answer also sees every earlier token
    of its tree (the answers before it); ``"positions"`` -- every answer's positions restart at 0 (on every
    position row) instead of continuing from its prompt."""
    mask = batch["attention_mask"]
    N = mask.shape[-1]
    out = dict(batch)
    if control == "siblings":
        idx = torch.arange(N, device=mask.device)
        first = mask.to(torch.uint8).argmax(-1)  # every token of a tree sees its root's first token
        out["attention_mask"] = mask | ((first[:, :, None] == first[:, None, :]) & (idx[:, None] >= idx[None, :]))
    elif control == "positions":
        pos = batch["position_ids"]
        flat = pos.reshape(-1, mask.shape[0] * N).clone()  # every row: text (+ mRoPE), tokens flattened
        flat[:, batch["logp_target"].to(pos.device)] = batch["branch_offset"].to(pos.device) + first_position
        out["position_ids"] = flat.reshape(pos.shape)
    else:
        raise ValueError(f"unknown control {control!r}; choose from {CONTROLS}.")
    return out


def _reference(model, examples, answer_type: int, beta: float):
    model.zero_grad(set_to_none=True)
    per_token, sums, rows = [], [], []
    for e, answer in _answers(examples):
        P = examples[e]["input_ids"].shape[1]
        logits = model(**path_features(examples[e], answer, answer_type), use_cache=False).logits[0, P - 1:-1]
        target = torch.tensor(answer, device=logits.device)
        logp = logits.float().log_softmax(-1).gather(1, target[:, None])[:, 0]
        per_token.append(logp)
        sums.append(logp.sum())
        rows.append(logits.detach())
    sums = torch.stack(sums)
    loss = _loss(sums, examples, beta)
    loss.backward()
    return torch.cat(per_token).detach(), sums.detach(), loss.detach(), param_grads(model), torch.cat(rows)


def _packed(model, examples, batch, beta: float):
    model.zero_grad(set_to_none=True)
    logits = model(**model_inputs(batch)).logits
    out = branch_logps(logits, batch)
    loss = _loss(out.sums, examples, beta)
    loss.backward()
    return out.per_token.detach(), out.sums.detach(), loss.detach(), param_grads(model), _scoring_logits(logits, batch)


def _scoring_logits(logits: torch.Tensor, batch: dict) -> torch.Tensor:
    """The logits that predict every answer token (``[T, V]``, the collator's branch order)."""
    return logits.detach().reshape(-1, logits.shape[-1]).index_select(0, batch["logp_source"].to(logits.device))


def compare_tree(model, examples, *, row_length: int | None = None, reference_impl: str = "eager",
                 beta: float = 0.1, controls: tuple[str, ...] = ()) -> dict:
    """Relative errors of the tree rows against each path alone: ``logits`` (those predicting every
    answer token), ``logps`` (every answer token),
    ``sums`` (per answer), ``loss``, ``grad`` (worst parameter, named in ``grad_param``), and for each
    of ``controls`` the control's ``logits`` error (must be large). ``grad_params`` counts the
    parameters with a gradient; ``vision_grads`` those of the vision tower."""
    impl = model.config._attn_implementation
    device = next(model.parameters()).device
    examples = [{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in ex.items()} for ex in examples]
    collator = MultimodalTreeCollator(model, row_length)
    batch = collator(examples)
    try:
        model.set_attn_implementation(reference_impl)
        ref = _reference(model, examples, collator.answer_type, beta)
        model.set_attn_implementation(impl)
        got = _packed(model, examples, batch, beta)
        result = dict(logits=rel_err(got[4], ref[4]), logps=rel_err(got[0], ref[0]), sums=rel_err(got[1], ref[1]), loss=rel_err(got[2], ref[2]),
                      rows=int(batch["input_ids"].shape[0]), tokens=int(batch["input_ids"].numel()),
                      unpacked_tokens=int(batch["unpacked_tokens"]), grad_params=len(ref[3]),
                      vision_grads=sum(1 for n in ref[3] if "visual" in n or "vision" in n))
        result["grad"], result["grad_param"] = grad_dict_rel_err(got[3], ref[3])
        with torch.no_grad():
            for control in controls:
                wrong = control_batch(batch, control, collator.family.first_position)
                result[control] = rel_err(_scoring_logits(model(**model_inputs(wrong)).logits, wrong), ref[4])
    finally:
        model.set_attn_implementation(impl)
        model.zero_grad(set_to_none=True)
    return result
