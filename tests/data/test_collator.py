"""PackedCollator: keys, labels at boundaries, padding segments, masks; equal to DataCollatorWithFlattening."""
import pytest
import packmask
from packmask import PackmaskError
import torch
from transformers import DataCollatorWithFlattening

from packmask.data.collator import PackedCollator


def test_worked_example_rows_with_padding():
    # docstring example: seq_lengths [[3, 2], [4]], padded to a multiple of 6
    features = [
        {"input_ids": [10, 11, 12, 20, 21], "seq_lengths": [3, 2]},
        {"input_ids": [30, 31, 32, 33], "seq_lengths": [4]},
    ]
    batch = PackedCollator(pad_token_id=0, pad_to_multiple_of=6)(features)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21, 0], [30, 31, 32, 33, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21, -100], [-100, 31, 32, 33, -100, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 3, 5, 6, 10, 12]
    assert batch["cu_seq_lens_q"].dtype == torch.int32
    assert torch.equal(batch["cu_seq_lens_k"], batch["cu_seq_lens_q"])
    assert batch["cu_seq_lens_q"][-1] == batch["input_ids"].numel()
    assert batch["max_length_q"] == batch["max_length_k"] == 4
    assert isinstance(batch["max_length_q"], int)
    assert "attention_mask" not in batch


@pytest.mark.parametrize("with_labels", [False, True])
def test_flatten_matches_transformers_data_collator_with_flattening(with_labels):
    g = torch.Generator().manual_seed(0)
    features = []
    for n in (5, 1, 7, 3):
        ids = torch.randint(1, 100, (n,), generator=g).tolist()
        f = {"input_ids": ids}
        if with_labels:
            f["labels"] = [t + 1000 for t in ids]
        features.append(f)
    ours = PackedCollator(flatten=True, packed=False)(features)
    theirs = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(features)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q", "cu_seq_lens_k"):
        assert ours[key].tolist() == theirs[key].tolist(), key
        assert ours[key].dtype == theirs[key].dtype, key
    assert ours["max_length_q"] == theirs["max_length_q"]


def test_packed_rows_flattened_equal_the_same_sequences_as_plain_examples():
    seqs = [[1, 2, 3], [4, 5], [6, 7, 8, 9]]
    packed = [{"input_ids": seqs[0] + seqs[1], "seq_lengths": [3, 2]}, {"input_ids": seqs[2], "seq_lengths": [4]}]
    plain = [{"input_ids": s} for s in seqs]
    a = PackedCollator(flatten=True)(packed)
    b = DataCollatorWithFlattening(return_flash_attn_kwargs=True)(plain)
    for key in ("input_ids", "labels", "position_ids", "cu_seq_lens_q"):
        assert a[key].tolist() == b[key].tolist(), key


def test_mask_block_diagonal_causal_and_padding_one_causal_block():
    features = [{"input_ids": [1, 2, 3], "seq_lengths": [2, 1]}, {"input_ids": [4], "seq_lengths": [1]}]
    batch = PackedCollator(return_mask=True, max_length=4, return_seq_lengths=True)(features)
    mask = batch["attention_mask"]
    assert mask.shape == (2, 4, 4) and mask.dtype == torch.bool
    expected0 = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], dtype=torch.bool)
    expected1 = torch.tensor([[1, 0, 0, 0], [0, 1, 0, 0], [0, 1, 1, 0], [0, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(mask[0], expected0)
    assert torch.equal(mask[1], expected1)
    assert mask.any(-1).all()  # no empty query row
    assert batch["seq_lengths"] == [[2, 1], [1]]
    assert batch["cu_seq_lens_q"].tolist() == [0, 2, 3, 4, 5, 8]
    # the padding rule of packmask.segments: the mask, cu_seq_lens and positions describe the same documents
    assert torch.equal(mask, packmask.block_diagonal_mask(batch["seq_lengths"], 4))
    layout = packmask.analyse_mask(mask)
    assert layout.cu_seqlens.tolist() == batch["cu_seq_lens_q"].tolist()
    assert torch.equal(layout.position_ids, batch["position_ids"])


def test_completion_mask_and_given_labels_and_empty_examples():
    features = [
        {"input_ids": [1, 2, 3, 4], "labels": [9, 9, 9, 9], "completion_mask": [0, 0, 1, 1], "seq_lengths": [4]},
        {"input_ids": []},
    ]
    batch = PackedCollator()(features)
    assert batch["labels"].tolist() == [[-100, -100, 9, 9]]
    assert batch["input_ids"].shape == (1, 4)


def test_bad_inputs_say_what_to_fix():
    with pytest.raises(PackmaskError, match="tokenize"):
        PackedCollator()([{"text": "hi"}])
    with pytest.raises(PackmaskError, match="seq_lengths"):
        PackedCollator()([{"input_ids": [1, 2, 3], "seq_lengths": [2, 2]}])
    with pytest.raises(PackmaskError, match="max_length"):
        PackedCollator(max_length=2, packed=False)([{"input_ids": [1, 2, 3]}])
    with pytest.raises(PackmaskError, match="empty"):
        PackedCollator(packed=False)([{"input_ids": []}])
    with pytest.raises(PackmaskError, match="pad_to_multiple_of"):
        PackedCollator(pad_to_multiple_of=0)
