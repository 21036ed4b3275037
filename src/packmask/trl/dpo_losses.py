"""DPO-family losses from per-branch sums, written after ``trl.DPOTrainer._compute_loss`` (TRL 1.16).

Every loss TRL 1.16 offers needs only, per example, the summed log-probs of the chosen and rejected
answers under the policy and the reference, and their token counts; ``sft`` needs the chosen tokens'
log-probs summed and counted. So all of them run on packed rows. What needs per-token positions inside
an answer (``ld_alpha``) or extra per-token outputs (``use_weighting``, WPO) is refused by the trainer.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import PackmaskError

__all__ = ["SUPPORTED_DPO_LOSSES", "f_divergence_scores", "dpo_per_sequence_loss"]

SUPPORTED_DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                        "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def f_divergence_scores(logratios: torch.Tensor, kind: str, alpha: float) -> torch.Tensor:
    """TRL's score of a log-ratio under the f-divergence ``kind``."""
    if kind == "reverse_kl":
        return logratios
    if kind == "forward_kl":
        return 1 - torch.exp(-logratios)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratios)
    if kind == "alpha_divergence":
        if abs(alpha - 1.0) < 1e-6:
            return logratios
        coef = 1.0 / (alpha - 1.0)
        t = (alpha - 1.0) * logratios
        clamp_max = {torch.float16: 11.0, torch.bfloat16: 80.0, torch.float32: 80.0}.get(t.dtype, 80.0)
        return (torch.exp(torch.clamp(t.float(), max=clamp_max)) - 1.0).to(t.dtype) * coef
    raise PackmaskError(f"unknown f_divergence_type {kind!r}.")


def dpo_per_sequence_loss(loss_type: str, *, beta: float, label_smoothing: float, discopop_tau: float,
                          chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                          chosen_scores, rejected_scores, chosen_tokens, rejected_tokens,
                          chosen_token_logp_sum, chosen_token_count) -> torch.Tensor:
    """One loss type's per-example loss ``[E]`` (TRL's formulas; ``*_tokens`` are answer lengths,
    ``chosen_token_logp_sum / chosen_token_count`` the scored chosen tokens of the batch, for ``sft``)."""
    chosen_logratios = chosen_logps - ref_chosen_logps
    rejected_logratios = rejected_logps - ref_rejected_logps
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * delta)
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / chosen_tokens.clamp(min=1.0) - rejected_scores / rejected_tokens.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "exo_pair":
        epsilon = torch.tensor(label_smoothing, device=delta.device)
        qw, log_qw = torch.sigmoid(beta * delta), F.logsigmoid(beta * delta)
        ql, log_ql = torch.sigmoid(-beta * delta), F.logsigmoid(-beta * delta)
        return qw * (log_qw - torch.log1p(-epsilon)) + ql * (log_ql - torch.log(epsilon))
    if loss_type == "nca_pair":
        cr, rr = beta * chosen_logratios, beta * rejected_logratios
        return -F.logsigmoid(cr) - 0.5 * F.logsigmoid(-cr) - 0.5 * F.logsigmoid(-rr)
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
    if loss_type == "sppo_hard":
        return (chosen_logratios - 0.5 / beta) ** 2 + (rejected_logratios + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            d = torch.sort(chosen_logps - rejected_logps, dim=0)[0] - torch.sort(ref_chosen_logps - ref_rejected_logps, dim=0)[0]
        else:
            d = torch.sort(chosen_logratios, dim=0)[0] - torch.sort(rejected_logratios, dim=0)[0]
        return -F.logsigmoid(beta * d) * (1 - label_smoothing) - F.logsigmoid(-beta * d) * label_smoothing
    if loss_type == "apo_zero":
        return (1 - torch.sigmoid(beta * chosen_logratios)) + torch.sigmoid(beta * rejected_logratios)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * chosen_logratios) + (1 - torch.sigmoid(beta * (chosen_logratios - rejected_logratios)))
    if loss_type == "discopop":
        logits = delta * beta
        modulation = torch.sigmoid(logits / discopop_tau)
        return -F.logsigmoid(logits) * (1 - modulation) + torch.exp(-logits) * modulation
    if loss_type == "sft":
        return (-chosen_token_logp_sum / chosen_token_count).expand(chosen_logps.shape[0])
    if loss_type == "sigmoid_norm":
        d = chosen_scores / chosen_tokens.clamp(min=1.0) - rejected_scores / rejected_tokens.clamp(min=1.0)
        return -F.logsigmoid(beta * d)
    raise PackmaskError(f"loss_type {loss_type!r} is not supported on packed rows; supported: {SUPPORTED_DPO_LOSSES}.")
