"""packmask.segments: every form of the boundaries converts to every other and back; one restart rule,
one padding rule, shared by every producer (collator, masks, layouts, testing helpers, loss)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packmask
from packmask import PackmaskError, segments
from packmask.data.collator import PackedCollator
from packmask.data.loss import sequence_ids
from packmask.support import is_packed_input
from packmask.testing import pack_rows

FAST = settings(max_examples=40, deadline=None)


@st.composite
def packed_rows(draw, min_total=0):
    """``(seq_lengths, N)``: 1-3 rows of up to 10 tokens, documents of 0..6 tokens, padding or not."""
    N = draw(st.integers(1, 10))
    rows = []
    for _ in range(draw(st.integers(1, 3))):
        row, room = [], N
        for _ in range(draw(st.integers(0, 4))):
            length = draw(st.integers(0, min(6, room)))
            row.append(length)
            room -= length
        if sum(row) < min_total:
            row.append(min(min_total, N) - sum(row))
        rows.append(row)
    return rows, N


def _with_padding(rows, N):
    """The reference for the padding and empty-document rules, written the plain way."""
    out = []
    for row in rows:
        row = [x for x in row if x > 0]
        out.append(row + ([N - sum(row)] if sum(row) < N else []))
    return out


def _naive_starts(pos):
    """The restart rule token by token (reference only)."""
    out = []
    for row in pos.tolist():
        out.append([i == 0 or row[i] != row[i - 1] + 1 for i in range(len(row))])
    return torch.tensor(out, dtype=torch.bool)


@FAST
@given(packed_rows())
def test_lengths_to_every_form_and_back(case):
    rows, N = case
    full = _with_padding(rows, N)
    starts = segments.starts_from_lengths(rows, N)
    assert starts.shape == (len(rows), N) and starts[:, 0].all()
    assert segments.lengths_from_starts(starts) == full
    cu = segments.cu_seqlens_from_starts(starts)
    flat = [0]
    for x in (x for row in full for x in row):
        flat.append(flat[-1] + x)
    assert cu.dtype == torch.int32 and cu.tolist() == flat
    assert segments.check_cu_seqlens(cu, len(rows), N) == segments.max_length(cu) == max(max(r) for r in full)
    doc = segments.doc_ids_from_starts(starts)
    local = segments.doc_ids_from_starts(starts, local=True)
    pos = segments.position_ids_from_starts(starts)
    # each form alone gives the same starts back
    assert torch.equal(segments.starts_from_cu_seqlens(cu, len(rows), N), starts)
    assert torch.equal(segments.starts_from_position_ids(pos), starts)
    assert torch.equal(segments.starts_from_ids(doc), starts)
    assert torch.equal(segments.starts_from_ids(local), starts)
    # cu_seqlens -> ids and positions agrees with starts -> ids and positions
    doc_cu, pos_cu = segments.doc_ids_and_positions_from_cu_seqlens(cu, len(rows), N)
    assert torch.equal(doc_cu, doc) and torch.equal(pos_cu, pos)
    # the flattened form: flatten the starts
    assert torch.equal(segments.cu_seqlens_from_starts(starts.reshape(-1)), cu)
    assert torch.equal(segments.doc_ids_from_starts(starts.reshape(-1)), doc.reshape(-1))
    # document bounds: every token lies in [first, end) of its document, whose length the lengths say
    first, end = segments.doc_bounds_from_starts(starts)
    idx = torch.arange(N)
    assert torch.equal(first, idx - pos)
    lengths = torch.tensor([x for row in full for x in row])
    assert torch.equal(end - first, lengths[doc])
    # spans: the real documents only, laid out back to back
    spans = segments.spans_from_lengths(rows, N)
    assert [length for _, _, length in spans] == [x for row in rows for x in row if x > 0]
    for b, s, length in spans:
        assert starts[b, s] and pos[b, s:s + length].tolist() == list(range(length))


@FAST
@given(st.lists(st.lists(st.integers(-2, 4), min_size=1, max_size=9), min_size=1, max_size=3).filter(
    lambda rows: len({len(r) for r in rows}) == 1))
def test_restart_rule_equals_token_by_token_reference(rows):
    pos = torch.tensor(rows)
    starts = segments.starts_from_position_ids(pos)
    assert torch.equal(starts, _naive_starts(pos))
    # every consumer of position_ids reads the same boundaries
    layout = packmask.DocumentLayout.from_position_ids(pos)
    assert torch.equal(layout.cu_seqlens, segments.cu_seqlens_from_starts(starts))
    assert torch.equal(sequence_ids(position_ids=pos, shape=pos.shape), segments.doc_ids_from_starts(starts))
    assert is_packed_input(position_ids=pos) == bool(starts[:, 1:].any())


def test_restart_rule_cases():
    """Drawn out: where a document starts, and where it does not."""
    cases = {
        (0, 1, 2, 0, 1): [1, 0, 0, 1, 0],      # a 0 after anything but -1
        (2, 3, 4, 2, 3): [1, 0, 0, 1, 0],      # RoBERTa-style positions start at padding_idx + 1
        (0, 1, 5, 6, 7): [1, 0, 1, 0, 0],      # a jump is a restart
        (-1, 0, 1, 0, 0): [1, 0, 0, 1, 1],     # 0 after -1 continues; 0 after 0 restarts
        (7, 8, 9, 10, 11): [1, 0, 0, 0, 0],    # a row continuing a split document: one document
    }
    for pos, expected in cases.items():
        assert segments.starts_from_position_ids(torch.tensor(pos)).int().tolist() == expected, pos
    # the loss used "position == 0" before: RoBERTa-style positions were one sequence; now two
    assert sequence_ids(position_ids=torch.tensor([[2, 3, 4, 2, 3]]), shape=(1, 5)).tolist() == [[0, 0, 0, 1, 1]]


@settings(max_examples=25, deadline=None)
@given(packed_rows(min_total=1))
def test_every_producer_follows_the_padding_rule(case):
    """Collator, block_diagonal_mask, DocumentLayout.from_seq_lengths, pack_rows and analyse_mask agree."""
    rows, N = case
    features = [{"input_ids": list(range(1, sum(r) + 1)), "seq_lengths": r} for r in rows]
    batch = PackedCollator(max_length=N, return_mask=True)(features)
    layout = packmask.DocumentLayout.from_seq_lengths(rows, N)
    mask = packmask.block_diagonal_mask(rows, N)
    slices, pos = pack_rows(rows, N)
    assert batch["cu_seq_lens_q"].tolist() == layout.cu_seqlens.tolist()
    assert batch["max_length_q"] == layout.max_seqlen
    assert torch.equal(batch["position_ids"], layout.position_ids) and torch.equal(pos, layout.position_ids)
    assert torch.equal(batch["attention_mask"], mask)
    assert torch.equal(layout.dense_mask()[:, 0], mask)
    analysed = packmask.analyse_mask(mask)
    assert analysed.cu_seqlens.tolist() == layout.cu_seqlens.tolist()
    doc = packmask.masks.document_ids_from_lengths(rows, N)
    assert torch.equal(doc, segments.doc_ids_from_starts(segments.starts_from_lengths(rows, N), local=True))
    # labels: -100 at every document start (the cross-boundary target), real tokens elsewhere
    starts = segments.starts_from_lengths(rows, N)
    assert (batch["labels"][starts] == -100).all()
    covered = torch.zeros(len(rows), N, dtype=torch.bool)
    for b, s, length in slices:
        covered[b, s:s + length] = True
    assert (batch["labels"][covered & ~starts] > 0).all()
    assert (batch["labels"][~covered] == -100).all()


def test_padding_is_one_causal_block():
    mask = packmask.block_diagonal_mask([[2]], 5)[0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0],
                    [1, 1, 0, 0, 0],
                    [0, 0, 1, 0, 0],
                    [0, 0, 1, 1, 0],
                    [0, 0, 1, 1, 1]]


def test_zero_padded_length_tensor_and_empty_rows():
    starts = segments.starts_from_lengths(torch.tensor([[3, 2], [4, 0]]), 6)
    assert segments.lengths_from_starts(starts) == [[3, 2, 1], [4, 2]]
    assert segments.lengths_from_starts(segments.starts_from_lengths([[], [2]], 3)) == [[3], [2, 1]]
    assert segments.starts_from_lengths([[3, 1]]).shape == (1, 4)  # seq_len defaults to the longest row


@pytest.mark.parametrize("lengths, seq_len, message", [
    ([[4, 4]], 6, "row 0 sum to 8 but the row holds 6 tokens"),
    ([[1], [3, -1]], 6, "row 1 has a negative length"),
    ([], None, "row length is unknown"),
])
def test_bad_lengths_raise(lengths, seq_len, message):
    with pytest.raises(PackmaskError, match=message):
        segments.starts_from_lengths(lengths, seq_len)


@pytest.mark.parametrize("cu, message", [
    ([1, 12], "must start at 0 and end at"),
    ([0, 10], "must start at 0 and end at"),
    ([0, 7, 6, 12], "non-decreasing"),
    ([0, 4, 12], "crosses from row 0 into row 1"),
])
def test_bad_cu_seqlens_raise(cu, message):
    with pytest.raises(PackmaskError, match=message):
        segments.check_cu_seqlens(torch.tensor(cu), 2, 6)
    with pytest.raises(PackmaskError, match="max_length_q=2 is smaller than the longest sequence"):
        segments.check_cu_seqlens(torch.tensor([0, 3, 6, 12]), 2, 6, max_seqlen=2)


def test_loss_validates_cu_seq_lens_like_the_model():
    with pytest.raises(PackmaskError, match="cu_seq_lens must start at 0 and end at"):
        sequence_ids(cu_seq_lens=torch.tensor([0, 3]), shape=(1, 5))
