"""A real transformers Trainer (and TRL SFTTrainer) run on packed rows: tiny Llama, CPU, loss falls."""
import math

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from packmask.data.collator import PackedCollator
from packmask.data.loss import packed_causal_lm_loss
from packmask.data.packing import pack_dataset

VOCAB = 64
ROW = 64
STEPS = 20


def _model():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ROW,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


def _packed_dataset():
    # learnable documents: arithmetic progressions mod (VOCAB - 3), shifted past the special ids
    g = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(400):
        n = int(torch.randint(4, 24, (1,), generator=g))
        start, step = int(torch.randint(0, VOCAB - 3, (1,), generator=g)), int(torch.randint(1, 4, (1,), generator=g))
        docs.append([3 + (start + step * i) % (VOCAB - 3) for i in range(n)])
    packed, stats = pack_dataset(Dataset.from_dict({"input_ids": docs}), ROW, return_stats=True)
    assert stats.fill > 0.95
    return packed


def _losses(trainer):
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def _args(cls, tmp_path, **extra):
    return cls(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=4, learning_rate=1e-2,
               lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
               disable_tqdm=True, dataloader_num_workers=0, seed=0,
               remove_unused_columns=False,  # keep `seq_lengths`: it is not a model argument
               **extra)


def _assert_loss_falls(losses):
    assert len(losses) == STEPS
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    assert last < 0.8 * first, f"loss did not fall: first {first:.3f}, last {last:.3f}"


def test_trainer_with_packed_collator(tmp_path):
    trainer = Trainer(model=_model(), args=_args(TrainingArguments, tmp_path), train_dataset=_packed_dataset(),
                      data_collator=PackedCollator(pad_to_multiple_of=16))
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 4 and batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    trainer.train()
    _assert_loss_falls(_losses(trainer))


class SequenceMeanTrainer(Trainer):
    """The docs' recipe for the per-sequence-mean loss (docs/packing.md)."""

    loss_is_scaled_for_ga = False  # a mean per micro-batch: let the Trainer divide by the accumulation steps

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_accepts_loss_kwargs = False  # the same for transformers 5.17, which reads only this

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        outputs = model(**inputs, use_cache=False)
        loss = packed_causal_lm_loss(outputs.logits, labels, position_ids=inputs["position_ids"], reduction="sequence")
        return (loss, outputs) if return_outputs else loss


def test_trainer_with_sequence_mean_loss_and_gradient_accumulation(tmp_path):
    trainer = SequenceMeanTrainer(model=_model(), args=_args(TrainingArguments, tmp_path, gradient_accumulation_steps=2),
                                  train_dataset=_packed_dataset(), data_collator=PackedCollator())
    trainer.train()
    losses = _losses(trainer)
    # a random model starts near log(VOCAB) per token; summed over the 2 micro-batches it would start near 2x that
    assert 0.8 * math.log(VOCAB) < losses[0] < 1.2 * math.log(VOCAB)
    _assert_loss_falls(losses)


def test_sft_trainer_with_packed_collator(tmp_path):
    trl = pytest.importorskip("trl")
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel(vocab, unk_token="<pad>")),
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    args = _args(trl.SFTConfig, tmp_path, packing=False, max_length=None,
                 dataset_kwargs={"skip_prepare_dataset": True})
    trainer = trl.SFTTrainer(model=_model(), args=args, train_dataset=_packed_dataset(), processing_class=tokenizer,
                             data_collator=PackedCollator(pad_token_id=tokenizer.pad_token_id))
    trainer.train()
    _assert_loss_falls(_losses(trainer))
