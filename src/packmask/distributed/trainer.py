"""HF ``Trainer`` / TRL ``SFTTrainer`` glue: balanced rows per rank and a globally normalised loss.

``PackedTrainerMixin`` overrides three public ``Trainer`` methods (no monkeypatching), and keeps the
``seq_lengths`` column through the Trainer's ``remove_unused_columns`` (the signature-columns hook
that TRL's trainers override the same way), so a packed row is never collated as one sequence:

* ``get_train_dataloader`` -- a :class:`~packmask.distributed.sampler.BalancedBatchSampler` over
  the packed dataset's ``seq_lengths`` yields every rank's micro-batch step by step, and
  ``accelerator.prepare`` hands batch ``i`` to process ``i % world_size`` (its ordinary split).
* ``get_batch_samples`` -- the divisor of one optimizer step, counted as the loss scores it
  (predicted tokens, or sequences for ``"sequence"``) over all accumulated micro-batches and
  summed over ranks with one all-reduce (the Trainer's own ``num_items_in_batch`` counts labels
  only, which is no divisor for a per-sequence loss).
* ``compute_loss`` -- :func:`packmask.packed_causal_lm_loss` divided by that count, times the
  number of processes (DDP / FSDP average gradients over ranks), like the Trainer's own rule with
  ``average_tokens_across_devices``.

Use::

    from transformers import Trainer, TrainingArguments
    from packmask.distributed import PackedTrainerMixin

    class PackedTrainer(PackedTrainerMixin, Trainer):       # or (PackedTrainerMixin, trl.SFTTrainer)
        packmask_loss_reduction = "sequence"                 # "token" (default) or "sequence"

    args = TrainingArguments(...)                            # seq_lengths is kept by the mixin
    PackedTrainer(model=model, args=args, train_dataset=packed,   # packed = pack_dataset(...)
                  data_collator=packmask.PackedCollator()).train()

With TRL's ``SFTTrainer`` the mixin's ``compute_loss`` replaces TRL's (its token-accuracy metrics
are not logged) and the ``data_collator`` must be ``packmask.PackedCollator``.
"""
from __future__ import annotations

from torch.utils.data import DataLoader

from ..data.loss import packed_causal_lm_loss
from ..errors import PackmaskError
from .loss import count_loss_items
from .sampler import BalancedBatchSampler

__all__ = ["PackedTrainerMixin", "BalancedTrainer"]


class PackedTrainerMixin:
    """Mix into a ``transformers.Trainer`` subclass (left of it): see the module docstring.

    Class attributes (override in your subclass):
        packmask_loss_reduction: ``"token"``, ``"sequence"``, or ``None`` (keep the Trainer's loss).
        packmask_balance: balance rows across ranks (needs a ``seq_lengths`` column); ``False``
            keeps the Trainer's own sampler.
        packmask_window_steps: the sampler's ``window_steps``.
    """

    packmask_loss_reduction: str | None = "token"
    packmask_balance: bool = True
    packmask_window_steps: int = 64
    loss_is_scaled_for_ga = True  # the count covers every accumulated micro-batch (Trainer API)

    def _set_signature_columns_if_needed(self) -> None:
        # The Trainer keeps only the model's forward arguments when remove_unused_columns=True (its
        # default); seq_lengths is not one, and without it a packed row trains as one long sequence.
        super()._set_signature_columns_if_needed()
        if "seq_lengths" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "seq_lengths"]

    def _packmask_has_lengths(self) -> bool:
        names = getattr(self.train_dataset, "column_names", None) or []
        return "seq_lengths" in names

    def get_train_dataloader(self) -> DataLoader:
        if not self.packmask_balance:
            return super().get_train_dataloader()
        if not self._packmask_has_lengths():
            raise PackmaskError("PackedTrainerMixin balances packed rows by their 'seq_lengths' column, which the "
                                "train_dataset lacks; pack it with packmask.pack_dataset, or set "
                                "packmask_balance = False on your Trainer subclass to keep the Trainer's sampler.")
        args = self.args
        sampler = BalancedBatchSampler(
            self.train_dataset, args.per_device_train_batch_size, world_size=max(1, args.world_size), rank=None,
            seed=args.data_seed if args.data_seed is not None else args.seed,
            window_steps=self.packmask_window_steps, drop_last=args.dataloader_drop_last)
        loader = DataLoader(self.train_dataset, batch_sampler=sampler, collate_fn=self.data_collator,
                            num_workers=args.dataloader_num_workers, pin_memory=args.dataloader_pin_memory,
                            persistent_workers=args.dataloader_persistent_workers and args.dataloader_num_workers > 0)
        return self.accelerator.prepare(loader)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        if self.packmask_loss_reduction is None:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        batch_samples = []
        for _ in range(num_batches):
            try:
                batch_samples.append(next(epoch_iterator))
            except StopIteration:
                break
        if not batch_samples:
            return batch_samples, None
        group = True if self.args.world_size > 1 else None
        count = count_loss_items(batch_samples, reduction=self.packmask_loss_reduction, group=group)
        return batch_samples, count.to(device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.packmask_loss_reduction is None:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        inputs = dict(inputs)
        labels = inputs.pop("labels")
        inputs.pop("seq_lengths", None)  # a column, not a model argument
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        if not model.training:  # evaluation: this batch's own mean (the Trainer's count is of labels)
            num_items_in_batch = None
        elif num_items_in_batch is None:
            group = True if self.args.world_size > 1 else None
            num_items_in_batch = count_loss_items(dict(inputs, labels=labels),
                                                  reduction=self.packmask_loss_reduction, group=group)
        loss = packed_causal_lm_loss(logits, labels, position_ids=inputs.get("position_ids"),
                                     cu_seq_lens=inputs.get("cu_seq_lens_q"),
                                     reduction=self.packmask_loss_reduction, num_items_in_batch=num_items_in_batch)
        if self.args.world_size > 1 and model.training:
            loss = loss * self.accelerator.num_processes  # gradients are averaged over ranks
        return (loss, outputs) if return_outputs else loss


def _balanced_trainer():
    from transformers import Trainer

    class BalancedTrainer(PackedTrainerMixin, Trainer):
        """``transformers.Trainer`` with :class:`PackedTrainerMixin` (per-token loss by default)."""

    BalancedTrainer.__qualname__ = "BalancedTrainer"
    return BalancedTrainer


def __getattr__(name):
    if name == "BalancedTrainer":
        value = _balanced_trainer()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

