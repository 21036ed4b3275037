"""PackedTrainerMixin with TRL's SFTTrainer (one process): the balanced sampler is in the dataloader,
the per-sequence count reaches the loss, and training works. Exactness across 2 processes is in
test_distributed_multiprocess.py (HF Trainer under accelerate launch)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from datasets import Dataset

from packmask import segments
from packmask.data.collator import PackedCollator
from packmask.data.packing import pack_dataset
from packmask.distributed import BalancedBatchSampler, PackedTrainerMixin
from packmask.testing import tiny_model

VOCAB = 128


def _packed():
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(200):
        n = int(torch.randint(4, 24, (1,), generator=g))
        start, step = int(torch.randint(0, VOCAB - 3, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        docs.append([3 + (start + step * i) % (VOCAB - 3) for i in range(n)])
    return pack_dataset(Dataset.from_dict({"input_ids": docs}), 64)


def test_sft_trainer_with_mixin_uses_balanced_rows_and_sequence_count(tmp_path):
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")

    class PackedSFTTrainer(PackedTrainerMixin, trl.SFTTrainer):
        packmask_loss_reduction = "sequence"

    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant",
                         logging_steps=1, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                         seed=0, remove_unused_columns=False, packing=False, max_length=None,
                         dataset_kwargs={"skip_prepare_dataset": True})
    trainer = PackedSFTTrainer(model=tiny_model("llama").train(), args=args, train_dataset=_packed(),
                               processing_class=tokenizer, data_collator=PackedCollator(pad_token_id=0))
    loader = trainer.get_train_dataloader()
    assert isinstance(loader.batch_sampler, BalancedBatchSampler)

    seen = []
    original = trainer.get_batch_samples

    def recording(epoch_iterator, num_batches, device):
        batches, count = original(epoch_iterator, num_batches, device)
        seen.append((sum(len(s) for b in batches for s in _sequences(b)), int(count)))
        return batches, count

    trainer.get_batch_samples = recording
    trainer.train()
    # the divisor is the number of sequences of the optimizer step (length-1 sequences predict nothing)
    assert seen and all(expected == got for expected, got in seen), seen
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert all(torch.isfinite(torch.tensor(losses))) and sum(losses[-3:]) < sum(losses[:3])


def _sequences(batch):
    """Per row, the sequences (start, end) with at least one label to predict (row padding has none)."""
    out = []
    for lengths, labels in zip(segments.lengths_from_starts(segments.starts_from_position_ids(batch["position_ids"])),
                               batch["labels"]):
        ends = np.cumsum(lengths).tolist()
        spans = zip([0] + ends[:-1], ends)
        out.append([(a, b) for a, b in spans if (labels[a + 1:b] != -100).any()])
    return out


def test_mixin_refuses_a_dataset_without_seq_lengths(tmp_path):
    from transformers import TrainingArguments

    from packmask.distributed import BalancedTrainer
    from packmask.errors import PackmaskError

    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, per_device_train_batch_size=2)
    trainer = BalancedTrainer(model=tiny_model("llama"), args=args, data_collator=PackedCollator(),
                              train_dataset=Dataset.from_dict({"input_ids": [[1, 2, 3]] * 4}))
    with pytest.raises(PackmaskError, match="packmask_balance = False"):
        trainer.get_train_dataloader()
