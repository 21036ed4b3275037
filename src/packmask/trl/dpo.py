"""``PackedDPOTrainer``: ``trl.DPOTrainer`` on shared-prefix tree rows.

Same arguments as ``trl.DPOTrainer`` (plus ``row_length``). Each batch of ``per_device_train_batch_size``
examples is truncated exactly as TRL's collator does (``max_length``, ``truncation_mode``, per sequence)
and then laid out as trees -- ``prompt | chosen | rejected``, the prompt once -- packed into rows of at
most ``row_length`` tokens (default: the whole batch in one row). The policy forward+backward and the
reference forward (or TRL's precomputed reference log-probs, themselves computed on packed rows) run
on those rows; losses, metrics and gradients equal the unpadded trainer's.

Recipe (a model name or path is loaded with ``attn_implementation="packmask"`` by the trainer
itself, through ``args.model_init_kwargs``: :mod:`packmask.trl.model_init`)::

    from packmask.trl import PackedDPOTrainer
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="packmask")   # or model = name
    trainer = PackedDPOTrainer(model=model, args=DPOConfig(..., loss_type=["sigmoid"]),
                               train_dataset=ds, processing_class=tokenizer)
    trainer.train()

Metrics are TRL's; ``num_tokens`` counts the tokens TRL's padded batch would hold (unpadded), so runs
compare; ``packed_tokens`` counts the tokens the packed rows hold.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.utils import is_peft_model
from trl import DPOTrainer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.utils import use_adapter

from ..data.logps import branch_logps
from ..data.tree import Forest, pack_forest
from ..data.tree_collator import collate_forest
from ..errors import PackmaskError
from ..multimodal.tree import TREE_BOOKKEEPING, MultimodalTreeCollator, is_vlm_tree_dataset
from .dpo_losses import SUPPORTED_DPO_LOSSES, dpo_per_sequence_loss, f_divergence_scores
from .model_init import packmask_model_init_kwargs

__all__ = ["PackedDPOTrainer", "PackedPreferenceCollator"]

_NON_MODEL = frozenset(TREE_BOOKKEEPING)  # a tree batch's bookkeeping (text or vision-language): not model arguments


def _truncate(prompt: list, answer: list, max_length: int | None, mode: str) -> tuple[list, list]:
    """TRL's per-sequence truncation of ``prompt + answer`` (DataCollatorForPreference)."""
    if max_length is None or len(prompt) + len(answer) <= max_length:
        return prompt, answer
    if mode == "keep_start":
        return prompt[:max_length], answer[:max(0, max_length - len(prompt))]
    if mode == "keep_end":
        keep_prompt = max(0, max_length - len(answer))
        return (prompt[len(prompt) - keep_prompt:] if keep_prompt else []), answer[-max_length:]
    raise PackmaskError(f"unsupported truncation_mode {mode!r}; use 'keep_start' or 'keep_end'.")


@dataclass
class PackedPreferenceCollator:
    """TRL's ``prompt_ids / chosen_ids / rejected_ids`` examples -> shared-prefix tree rows.

    When truncation leaves chosen and rejected with different prompts (``keep_end`` with answers of
    different lengths), that example is laid out as two separate sequences, as TRL runs it.
    """

    pad_token_id: int = 0
    max_length: int | None = None
    truncation_mode: str = "keep_start"
    row_length: int | None = None
    pad_to_multiple_of: int | None = None

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        segments, parents, example, kind, scored = [], [], [], [], []
        answer_tokens, unpacked = [], 0
        for e, ex in enumerate(examples):   # one loop per example (the batch), none per token
            prompt = list(ex["prompt_ids"])
            (pc, c), (pr, r) = (_truncate(prompt, list(ex[k]), self.max_length, self.truncation_mode)
                                for k in ("chosen_ids", "rejected_ids"))
            unpacked += len(pc) + len(c) + len(pr) + len(r)
            answer_tokens.append((len(c), len(r)))
            if not c or not r:
                raise PackmaskError(f"example {e}: the chosen or rejected answer is empty after truncation to "
                                    f"max_length={self.max_length}; raise max_length or filter the example.")
            if pc == pr and pc:
                segments += [pc, c, r]
                parents += [-1, 0, 0]
                kind += [0, 1, 2]
            else:  # no common context: two sequences (a missing prompt makes the answer a root)
                for p, a, k in ((pc, c, 1), (pr, r, 2)):
                    if p:
                        base = len(segments) - len(example)   # example-local index of this prompt segment
                        segments += [p, a]
                        parents += [-1, base]
                        kind += [0, k]
                    else:
                        segments.append(a)
                        parents.append(-1)
                        kind.append(k)
            example += [e] * (len(segments) - len(example))
        scored = [k != 0 for k in kind]
        forest = Forest.from_segments(segments, parents, example, kind, scored)
        sizes = forest.example_sizes()[1]
        row_length = max(self.row_length or int(sizes.sum()), int(sizes.max()))
        batch = collate_forest(pack_forest(forest, row_length), pad_token_id=self.pad_token_id,
                               pad_to_multiple_of=self.pad_to_multiple_of)
        batch["num_examples"] = torch.tensor(len(examples))
        counts = torch.tensor(answer_tokens, dtype=torch.long)
        batch["branch_tokens"] = torch.cat([counts[:, 0], counts[:, 1]])   # answer lengths, TRL's completion_mask sums
        batch["unpacked_tokens"] = torch.tensor(unpacked)
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            if key in examples[0]:
                batch[key] = torch.tensor([float(ex[key]) for ex in examples])
        return batch


def _pad_token_id(processing_class, args) -> int:
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    if tokenizer is None:
        return 0
    if getattr(args, "pad_token", None):
        return int(tokenizer.convert_tokens_to_ids(args.pad_token))
    for name in ("pad_token_id", "eos_token_id"):
        if getattr(tokenizer, name, None) is not None:
            return int(getattr(tokenizer, name))
    return 0


class PackedDPOTrainer(DPOTrainer):
    """``trl.DPOTrainer`` on shared-prefix packed rows (module docstring). Extra argument:
    ``row_length`` -- tokens per packed row (``None``: each batch in one row)."""

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, *extra, row_length: int | None = None, **kwargs):
        if args is None:   # TRL's default, made here so the packed collator can read it
            from trl import DPOConfig
            name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "") or "model"
            args = DPOConfig(f"{name.split('/')[-1]}-DPO")
        args = packmask_model_init_kwargs(model, args, "PackedDPOTrainer")  # a name / path loads with packmask
        if args is not None:
            unsupported = [t for t in args.loss_type if t not in SUPPORTED_DPO_LOSSES]
            if unsupported:
                raise PackmaskError(f"PackedDPOTrainer: loss_type {unsupported} is not supported on packed rows; "
                                    f"supported: {SUPPORTED_DPO_LOSSES}. Use trl.DPOTrainer for it.")
            if args.ld_alpha is not None:
                raise PackmaskError("PackedDPOTrainer: ld_alpha needs per-token positions inside each answer and is not "
                                    "supported on packed rows; set ld_alpha=None or use trl.DPOTrainer.")
            if args.use_weighting:
                raise PackmaskError("PackedDPOTrainer: use_weighting (WPO) is not supported on packed rows; set "
                                    "use_weighting=False or use trl.DPOTrainer.")
        first = next(iter(train_dataset), None) if train_dataset is not None else None
        if isinstance(first, dict) and ("image" in first or "images" in first):
            raise PackmaskError("PackedDPOTrainer: raw image datasets ('image'/'images' columns, processed on the fly by "
                                "TRL) are not packed; process each prompt with its images first and train on those "
                                "examples (docs/preference.md, 'Vision-language models'), or use trl.DPOTrainer.")
        vlm = train_dataset is not None and is_vlm_tree_dataset(train_dataset)
        if vlm and getattr(args, "max_length", None) is not None and getattr(args, "truncation_mode", None) == "keep_end":
            raise PackmaskError("PackedDPOTrainer: truncation_mode='keep_end' would cut a vision-language prompt "
                                "(its image tokens) as TRL refuses too; MultimodalTreeCollator cuts answers at their "
                                "end: use truncation_mode='keep_start' or max_length=None.")
        if vlm and data_collator is None:  # processed vision-language examples: the prompt + images once per tree
            if isinstance(model, str):
                raise PackmaskError("PackedDPOTrainer: vision-language examples need data_collator="
                                    "packmask.multimodal.MultimodalTreeCollator(model) with a loaded model object.")
            data_collator = MultimodalTreeCollator(model, row_length, max_length=getattr(args, "max_length", None),
                                                   pad_to_multiple_of=getattr(args, "pad_to_multiple_of", None))
        if data_collator is None and args is not None:
            data_collator = PackedPreferenceCollator(pad_token_id=_pad_token_id(processing_class, args),
                                                     max_length=args.max_length, truncation_mode=args.truncation_mode,
                                                     row_length=row_length, pad_to_multiple_of=args.pad_to_multiple_of)
        super().__init__(model, ref_model, args, data_collator, train_dataset, eval_dataset, processing_class,
                         *extra, **kwargs)
        if self.aux_loss_enabled:
            raise PackmaskError("PackedDPOTrainer: the MoE router aux loss depends on which (padding) tokens the router "
                                "sees, so it cannot match the padded trainer; set router_aux_loss_coef=0.0.")
        for m in (self.model, self.ref_model):
            impl = getattr(getattr(m, "config", None), "_attn_implementation", "packmask")
            if m is not None and impl != "packmask":
                raise PackmaskError(f"PackedDPOTrainer: the model uses attn_implementation={impl!r}; packed tree rows need "
                                    "a [B, N, N] mask: load it with attn_implementation='packmask' (after import packmask), "
                                    "or pass the model's name or path and the trainer loads it so.")

    # -- forward on packed rows ----------------------------------------------------------------------
    @staticmethod
    def _model_inputs(inputs: dict) -> dict:
        # vision-language rows carry their pixel values, grids and token types beside the tree inputs
        extra = {k: v for k, v in inputs.items() if k not in _NON_MODEL and k not in ("input_ids", "attention_mask",
                                                                                      "position_ids", "use_cache")}
        return dict(extra, input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                    position_ids=inputs["position_ids"], use_cache=False, logits_to_keep=inputs["logits_to_keep"])

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        if is_vlm_tree_dataset(dataset):  # already processed (the prompt's processor output + answer ids)
            return dataset
        return super()._prepare_dataset(dataset, processing_class, args, dataset_name)

    def _packed_logps(self, model, inputs: dict, with_stats: bool = False):
        logits = model(**self._model_inputs(inputs)).logits
        return branch_logps(logits, inputs, with_stats=with_stats)

    def _ref_logps(self, inputs: dict):
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs):
            if is_peft_model(self.model) and self.ref_model is None:
                unwrapped = self.accelerator.unwrap_model(self.model)
                with use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None):
                    return self._packed_logps(self.model, inputs).sums
            return self._packed_logps(self.ref_model, inputs).sums

    def compute_ref_log_probs(self, model, inputs):
        """Reference log-probs ``(chosen [E], rejected [E])`` of one packed batch (used by TRL's precompute)."""
        E = int(inputs["num_examples"])
        adapter = contextlib.nullcontext()
        if self.ref_model is None and is_peft_model(self.model):
            unwrapped = self.accelerator.unwrap_model(self.model)
            adapter = use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config else None)
        with torch.no_grad(), disable_gradient_checkpointing(self.model, self.args.gradient_checkpointing_kwargs), \
                adapter, self.accelerator.autocast():
            sums = self._packed_logps(model, inputs).sums
        return sums[:E], sums[E:]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if return_outputs:
            raise PackmaskError("PackedDPOTrainer does not return logits (return_outputs=True): packed rows have no "
                                "per-example logits; evaluate with prediction_loss_only=True.")
        if "logp_source" not in inputs:
            raise PackmaskError("PackedDPOTrainer got a batch without tree bookkeeping; leave data_collator=None (or pass "
                                "a packmask.trl.PackedPreferenceCollator).")
        mode = "train" if self.model.training else "eval"
        E = int(inputs["num_examples"])
        policy = self._packed_logps(model, inputs, with_stats=True)
        chosen_logps, rejected_logps = policy.sums[:E], policy.sums[E:]
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref = self._ref_logps(inputs)
            ref_chosen, ref_rejected = ref[:E], ref[E:]
        chosen_logratios, rejected_logratios = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        chosen_scores = f_divergence_scores(chosen_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)
        rejected_scores = f_divergence_scores(rejected_logratios, self.f_divergence_type, self.f_alpha_divergence_coef)
        tokens = inputs["branch_tokens"].to(chosen_logps.dtype)
        is_chosen = inputs["logp_branch"] < E
        chosen_sum = policy.per_token[is_chosen].sum()
        chosen_count = is_chosen.sum()
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            per_example = dpo_per_sequence_loss(
                loss_type, beta=self.beta, label_smoothing=self.label_smoothing, discopop_tau=self.args.discopop_tau,
                chosen_logps=chosen_logps, rejected_logps=rejected_logps, ref_chosen_logps=ref_chosen,
                ref_rejected_logps=ref_rejected, chosen_scores=chosen_scores, rejected_scores=rejected_scores,
                chosen_tokens=tokens[:E], rejected_tokens=tokens[E:], chosen_token_logp_sum=chosen_sum,
                chosen_token_count=chosen_count)
            loss = loss + per_example.mean() * weight
        self._log_packed_metrics(mode, inputs, policy, is_chosen, chosen_logps, rejected_logps,
                                 chosen_logratios, rejected_logratios)
        return loss

    def _log_packed_metrics(self, mode, inputs, policy, is_chosen, chosen_logps, rejected_logps,
                            chosen_logratios, rejected_logratios):
        """TRL's metrics, from the scored tokens of the packed rows."""
        acc, metrics = self.accelerator, self._metrics[mode]

        def ratio(num, den):
            num, den = acc.gather_for_metrics(num).sum().item(), acc.gather_for_metrics(den).sum().item()
            return num / den if den > 0 else 0.0

        n_all = torch.tensor(policy.per_token.shape[0], device=policy.per_token.device)
        metrics["entropy"].append(ratio(policy.entropy.sum(), n_all))
        if mode == "train":
            self._total_train_tokens += acc.gather_for_metrics(inputs["unpacked_tokens"]).sum().item() // self._tp_size
            metrics["packed_tokens"].append(acc.gather_for_metrics(
                torch.tensor(inputs["input_ids"].numel(), device=n_all.device)).sum().item())
        metrics["num_tokens"] = [self._total_train_tokens]
        n_chosen, n_rejected = is_chosen.sum(), (~is_chosen).sum()
        metrics["logits/chosen"].append(ratio(policy.mean_logits[is_chosen].sum(), n_chosen))
        metrics["logits/rejected"].append(ratio(policy.mean_logits[~is_chosen].sum(), n_rejected))
        metrics["mean_token_accuracy"].append(ratio(policy.is_top1[is_chosen].sum(), n_chosen))
        chosen_rewards = self.beta * chosen_logratios.detach()
        rejected_rewards = self.beta * rejected_logratios.detach()
        metrics["rewards/chosen"].append(acc.gather(chosen_rewards).mean().item())
        metrics["rewards/rejected"].append(acc.gather(rejected_rewards).mean().item())
        metrics["rewards/accuracies"].append(acc.gather((chosen_rewards > rejected_rewards).float()).mean().item())
        metrics["rewards/margins"].append(acc.gather(chosen_rewards - rejected_rewards).mean().item())
        metrics["logps/chosen"].append(acc.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(acc.gather(rejected_logps.detach()).mean().item())
