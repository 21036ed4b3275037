"""The HF Trainer's default ``remove_unused_columns=True`` drops ``seq_lengths`` (issue 21, item 4).

The silent case: ``Trainer`` + ``Dataset.from_parquet(packed file)`` + ``PackedCollator()`` trains each
packed row as one sequence. Reference: the same run with ``remove_unused_columns=False``. Fixes:
``PackedCollator()`` (``packed=True`` by default) raises with the fix; ``PackedTrainerMixin`` keeps
the column itself, so its per-step losses equal the reference's. The control is the old default,
``packed=None`` (each example by whether it has ``seq_lengths``), which trains the stripped rows silently.
"""
import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, Trainer, TrainingArguments

from packmask.cli.output import AtomicOutputs, write_packed
from packmask.data.collator import PackedCollator
from packmask.data.packing import pack_dataset
from packmask.distributed import PackedTrainerMixin
from packmask.errors import PackmaskError

VOCAB, ROW, STEPS = 64, 48, 3


def _model():
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=ROW,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", dtype=torch.float32)


@pytest.fixture(scope="module")
def packed_parquet(tmp_path_factory):
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, VOCAB, (int(torch.randint(4, 20, (1,), generator=g)),), generator=g).tolist()
            for _ in range(60)]
    packed = pack_dataset(Dataset.from_dict({"input_ids": docs}), ROW)
    path = tmp_path_factory.mktemp("packed") / "packed.parquet"
    with AtomicOutputs() as outputs:  # exactly what `packmask pack -o packed.parquet` writes
        write_packed(packed, path, {"max_length": ROW}, outputs)
    return path


def _args(tmp_path, **extra):
    return TrainingArguments(output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=2,
                             learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none",
                             use_cpu=True, disable_tqdm=True, dataloader_num_workers=0, seed=0, **extra)


class RecordingTrainer(Trainer):
    """Records each step's loss unrounded (the log history rounds to 4 decimals)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.step_losses.append(float((loss[0] if return_outputs else loss).detach()))
        return loss


def _run(trainer_class, packed_parquet, tmp_path, collator, **extra):
    """Per-step losses and the parameter update of a few optimizer steps."""
    model = _model()
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    trainer = trainer_class(model=model, args=_args(tmp_path, **extra),
                            train_dataset=Dataset.from_parquet(str(packed_parquet)), data_collator=collator)
    trainer.step_losses = []
    trainer.train()
    update = torch.cat([p.detach().flatten() for p in model.parameters()]) - before
    return torch.tensor(trainer.step_losses, dtype=torch.float64), update


def _relative_error(a, b):
    return float((a - b).norm() / b.norm())


class KeepingTrainer(PackedTrainerMixin, RecordingTrainer):
    """Only the mixin's column keeping: the Trainer's own sampler and loss, as in the reference run."""

    packmask_balance = False
    packmask_loss_reduction = None


def test_trainer_keeps_packing_only_with_the_fix(packed_parquet, tmp_path):
    ref_losses, ref_update = _run(RecordingTrainer, packed_parquet, tmp_path, PackedCollator(),
                                  remove_unused_columns=False)
    # control, the silent case (the old default collator packed=None, default args): every row
    # trains as one sequence
    losses, update = _run(RecordingTrainer, packed_parquet, tmp_path, PackedCollator(packed=None))
    assert _relative_error(update, ref_update) > 1e-2
    assert _relative_error(losses, ref_losses) > 1e-4
    # fix 1: the mixin keeps seq_lengths itself under the default remove_unused_columns=True
    losses, update = _run(KeepingTrainer, packed_parquet, tmp_path, PackedCollator(packed=True))
    assert _relative_error(losses, ref_losses) <= 1e-5 and _relative_error(update, ref_update) <= 1e-5
    # fix 2: the exact recipe, a bare Trainer with the default PackedCollator(), refuses in one
    # line naming both fixes (and packed=False for data that really is one sequence per example)
    for collator in (PackedCollator(), PackedCollator(packed=True)):
        with pytest.raises(PackmaskError, match=r"no 'seq_lengths'.*remove_unused_columns=False.*packed=False") as error:
            _run(RecordingTrainer, packed_parquet, tmp_path, collator)
        assert "\n" not in str(error.value)


def test_collator_refuses_a_batch_mixing_packed_and_plain_rows():
    rows = [{"input_ids": [5, 6, 7], "seq_lengths": [2, 1]}, {"input_ids": [8, 9]}]
    with pytest.raises(PackmaskError, match="mixes packed rows.*remove_unused_columns=False"):
        PackedCollator(packed=None)(rows)
    with pytest.raises(PackmaskError, match=r"no 'seq_lengths'"):
        PackedCollator()(rows)
    with pytest.raises(PackmaskError, match=r"packed=False"):
        PackedCollator(packed=False)(rows[:1])
    # control: each kind alone is collated as before
    assert PackedCollator()(rows[:1])["position_ids"].tolist() == [[0, 1, 0]]
    assert PackedCollator(packed=False)(rows[1:])["position_ids"].tolist() == [[0, 1]]
