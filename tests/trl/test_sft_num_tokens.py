"""TRL's ``SFTTrainer`` logs ``num_tokens`` as ``attention_mask.sum()``, else the row width
(``position_ids.size(1)``): with ``PackedCollator(flatten=False)`` that is the padded width of one row
per step. ``return_attention_mask=True`` gives it a 2D mask of the real tokens (issue 21, item 7)."""
from __future__ import annotations

import pytest

trl = pytest.importorskip("trl")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

from packmask.data.collator import PackedCollator  # noqa: E402
from packmask.data.packing import pack_dataset  # noqa: E402
from packmask.errors import PackmaskError  # noqa: E402
from packmask.testing import tiny_model  # noqa: E402

WIDTH = 32


def _packed():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 100, (int(torch.randint(3, 12, (1,), generator=g)),), generator=g).tolist()
            for _ in range(24)]
    return pack_dataset(Dataset.from_dict({"input_ids": docs}), 28)


def _run(tmp_path, collator):
    from _trl_data import tiny_tokenizer

    packed = _packed()
    args = trl.SFTConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=-(-len(packed) // 2),
                         learning_rate=1e-2, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                         disable_tqdm=True, dataloader_num_workers=0, seed=0, packing=False, max_length=None,
                         dataset_kwargs={"skip_prepare_dataset": True}, bf16=False)
    trainer = trl.SFTTrainer(model=tiny_model("llama").train(), args=args, train_dataset=packed,
                             processing_class=tiny_tokenizer(), data_collator=collator)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return packed, [h["num_tokens"] for h in logs], torch.tensor([h["loss"] for h in logs])


def test_sft_num_tokens_counts_real_tokens(tmp_path):
    packed, counted, losses = _run(tmp_path / "a", PackedCollator(pad_to_multiple_of=WIDTH, return_attention_mask=True))
    real = sum(sum(row) for row in packed["seq_lengths"])  # two steps of half the rows: one epoch
    assert counted[-1] == real and 0 < counted[0] < real, (counted, real)
    # control: without the 2D mask TRL counts the padded width of one row per step
    _, width_counted, plain_losses = _run(tmp_path / "b", PackedCollator(pad_to_multiple_of=WIDTH))
    assert width_counted == [WIDTH, 2 * WIDTH], width_counted
    # the mask changes the count only, not training (packmask takes it with the packed keys)
    assert torch.allclose(losses, plain_losses, rtol=1e-5, atol=0), (losses, plain_losses)


def test_padding_mask_marks_real_tokens_and_excludes_the_3d_mask():
    rows = [{"input_ids": [5, 6, 7], "seq_lengths": [2, 1]}, {"input_ids": [8, 9]}]
    batch = PackedCollator(pad_to_multiple_of=4, return_attention_mask=True, packed=None)(rows[:1] + [
        {"input_ids": [8, 9], "seq_lengths": [2]}])
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    flat = PackedCollator(flatten=True, pad_to_multiple_of=8, return_attention_mask=True, packed=False)(rows[1:])
    assert flat["attention_mask"].tolist() == [[1, 1, 0, 0, 0, 0, 0, 0]]
    with pytest.raises(PackmaskError, match="choose one"):
        PackedCollator(return_mask=True, return_attention_mask=True)
