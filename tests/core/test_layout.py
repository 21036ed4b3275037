"""packmask.layout: analyse_mask keeps every mask exactly; DocumentLayout / GeneralLayout units; clear errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packmask
from packmask import DocumentLayout, GeneralLayout, PackmaskError, analyse_mask
from packmask.layout import cached_on

FAST = settings(max_examples=40, deadline=None)


def _additive(mask_bool):
    return torch.where(mask_bool, 0.0, torch.finfo(torch.float32).min)[:, None]


@st.composite
def row_lengths(draw, N):
    row, room = [], N
    while room and draw(st.booleans()):
        length = draw(st.integers(1, room))
        row.append(length)
        room -= length
    return row


@st.composite
def masks(draw):
    """``[B, N, N]`` bool masks with no empty query row: random bits, block-diagonal documents
    (causal or bidirectional), prefix-LM, and documents with a few bits flipped."""
    B, N = draw(st.integers(1, 2)), draw(st.integers(1, 8))
    rows = [draw(row_lengths(N)) for _ in range(B)]
    kind = draw(st.sampled_from(["random", "causal", "bidirectional", "prefix", "flipped"]))
    if kind == "random":
        bits = draw(st.lists(st.booleans(), min_size=B * N * N, max_size=B * N * N))
        mask = torch.tensor(bits).reshape(B, N, N)
    elif kind == "prefix":
        prefixes = [[draw(st.integers(0, x)) for x in row] for row in rows]
        mask = packmask.prefix_lm_mask(rows, prefixes, N)
    else:
        mask = packmask.block_diagonal_mask(rows, N, causal_within=kind != "bidirectional")
        if kind == "flipped":
            for _ in range(draw(st.integers(1, 3))):
                b, i, j = draw(st.integers(0, B - 1)), draw(st.integers(0, N - 1)), draw(st.integers(0, N - 1))
                mask[b, i, j] = ~mask[b, i, j]
    mask[:, torch.arange(N), torch.arange(N)] |= ~mask.any(-1)  # a query that saw nothing sees itself
    return mask


def _reference_causal_positions(mask):
    """Causal-row positions by their definition, one token at a time (test oracle)."""
    out = mask.sum(-1) - 1
    for b in range(mask.shape[0]):
        rows = [set(torch.nonzero(mask[b, i]).flatten().tolist()) for i in range(mask.shape[1])]
        parent = [max((j for j in r if j < i), default=-1) for i, r in enumerate(rows)]
        if all(i in r and r <= (rows[p] if p >= 0 else set()) | {i} for i, (r, p) in enumerate(zip(rows, parent))):
            depth = []
            for p in parent:
                depth.append(0 if p < 0 else depth[p] + 1)
            out[b] = torch.tensor(depth)
    return out


@FAST
@given(masks())
def test_analyse_mask_reproduces_every_mask_exactly(mask):
    layout = analyse_mask(mask)
    assert torch.equal(layout.dense_mask()[:, 0], mask)
    assert layout.batch_size == mask.shape[0] and layout.seq_len == mask.shape[1]
    # positions restart per segment; on causal rows they are the depth along parents (the last earlier
    # key a query sees) where every query sees itself and at most what its parent sees (trees, windows),
    # else the number of visible keys - 1
    causal_rows = (mask.int().triu(1) == 0).all(-1).all(-1)
    assert torch.equal(layout.position_ids[causal_rows], _reference_causal_positions(mask)[causal_rows])
    if isinstance(layout, DocumentLayout):  # the same mask written as lengths gives the same layout
        lengths = packmask.segments.lengths_from_starts(packmask.segments.starts_from_ids(layout.doc_ids))
        again = packmask.block_diagonal_mask(lengths, mask.shape[1], causal_within=layout.causal)
        assert torch.equal(again, mask)


@FAST
@given(st.integers(1, 2).flatmap(lambda B: st.lists(row_lengths(7), min_size=B, max_size=B)), st.booleans())
def test_block_diagonal_masks_become_document_layouts(rows, causal):
    mask = packmask.block_diagonal_mask(rows, 7, causal_within=causal)
    layout = analyse_mask(mask)
    direct = DocumentLayout.from_seq_lengths(rows, 7, causal=causal)
    single_tokens = direct.max_seqlen == 1  # then causal and bidirectional are the same mask
    assert isinstance(layout, DocumentLayout) and (layout.causal == causal or single_tokens)
    assert layout.cu_seqlens.tolist() == direct.cu_seqlens.tolist()
    assert layout.max_seqlen == direct.max_seqlen
    assert torch.equal(layout.position_ids, direct.position_ids)


def test_block_diagonal_mask_is_analysed_into_document_layout():
    mask = packmask.block_diagonal_mask([[3, 4], [7]], 7)
    layout = packmask.analyse_mask(mask)
    assert isinstance(layout, packmask.DocumentLayout) and layout.causal
    assert layout.cu_seqlens.tolist() == [0, 3, 7, 14]
    assert layout.max_seqlen == 7
    assert torch.equal(layout.dense_mask()[:, 0], mask)
    bidir = packmask.analyse_mask(packmask.block_diagonal_mask([[3, 4]], 7, causal_within=False))
    assert isinstance(bidir, packmask.DocumentLayout) and not bidir.causal


def test_additive_float_and_integer_masks_are_understood():
    mask = packmask.block_diagonal_mask([[3, 4]], 7)
    for form in (_additive(mask), mask.long(), mask.float(), mask[:, None]):
        layout = packmask.analyse_mask(form)
        assert isinstance(layout, packmask.DocumentLayout)
        assert layout.cu_seqlens.tolist() == [0, 3, 7]


def test_all_zero_float_mask_is_additive_all_visible():
    """Pixtral (Mistral 3) gives its vision attention an additive block mask: for one image it is all
    zero, which lets every patch see every patch (read as 0/1 it would let none attend: never valid)."""
    layout = packmask.analyse_mask(torch.zeros(1, 1, 5, 5))
    assert isinstance(layout, packmask.DocumentLayout) and not layout.causal
    assert layout.cu_seqlens.tolist() == [0, 5]
    with pytest.raises(PackmaskError, match="attend to no key"):  # control: the same mask as bool sees nothing
        packmask.analyse_mask(torch.zeros(1, 1, 5, 5, dtype=torch.bool))


def test_general_layout_for_prefix_lm():
    mask = packmask.prefix_lm_mask([[5, 3]], [[2, 0]])
    layout = analyse_mask(mask)
    assert isinstance(layout, GeneralLayout)
    assert layout.doc_ids.tolist() == [[0, 0, 0, 0, 0, 1, 1, 1]]  # segments counted inside the row
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2]]
    windowed = layout.dense_mask(sliding_window=2)[0, 0]
    assert windowed[4].int().tolist() == [0, 0, 0, 1, 1, 0, 0, 0]  # positions 3, 4 only
    assert windowed[1].int().tolist() == [1, 1, 0, 0, 0, 0, 0, 0]  # the prompt keeps what the window allows
    assert layout.dense_mask(sliding_window=2) is layout.dense_mask(sliding_window=2)  # memoised


@pytest.mark.parametrize("bad, message", [
    (torch.ones(2, 6, 5, dtype=torch.bool), "tokens, tokens"),
    (torch.ones(2, 3, 6, 6, dtype=torch.bool), "heads"),
    (torch.full((2, 6, 6), 0.5), "only 0 and 1"),
    (torch.full((2, 6, 6), -0.5), "soft biases"),
    (torch.full((2, 6, 6), 2), "integer attention_mask must hold only 0 and 1"),
    (torch.ones(2, 6, 6, dtype=torch.complex64), "not supported"),
    ([[1]], "must be a torch.Tensor"),
])
def test_analyse_mask_errors(bad, message):
    with pytest.raises(PackmaskError, match=message):
        analyse_mask(bad)


def test_analyse_mask_checks_the_input_shape_and_empty_rows():
    with pytest.raises(PackmaskError, match=r"expected \[2, 6, 6\]"):
        analyse_mask(torch.ones(1, 6, 6, dtype=torch.bool), 2, 6)
    mask = packmask.block_diagonal_mask([[3, 3], [6]], 6)
    mask[1, 4] = False
    with pytest.raises(PackmaskError, match=r"attention_mask\[1, 4\] lets query 4 of row 1 attend to no key"):
        analyse_mask(mask)


def test_document_layout_from_cu_seqlens():
    cu = torch.tensor([0, 3, 5, 6, 10, 12])
    layout = DocumentLayout.from_cu_seqlens(cu, 2, 6)
    assert layout.cu_seqlens.dtype == torch.int32 and layout.max_seqlen == 4
    assert layout.seq_lengths == [3, 2, 1, 4, 2]
    assert layout.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]  # numbered over the batch
    assert layout.position_ids.tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]]
    with pytest.raises(PackmaskError, match="crosses from row 0 into row 1"):
        DocumentLayout.from_cu_seqlens(torch.tensor([0, 4, 12]), 2, 6)
    with pytest.raises(PackmaskError, match="must start at 0 and end at"):
        DocumentLayout.from_cu_seqlens(torch.tensor([0, 4, 11]), 2, 6)
    with pytest.raises(PackmaskError, match="max_length_q=3 is smaller"):
        DocumentLayout.from_cu_seqlens(cu, 2, 6, max_seqlen=3)


def test_document_layout_from_seq_lengths_and_position_ids():
    layout = DocumentLayout.from_seq_lengths([[3, 0, 2], [4]], 6)  # empty documents vanish; padding is one
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    same = DocumentLayout.from_position_ids(layout.position_ids)
    assert same.cu_seqlens.tolist() == layout.cu_seqlens.tolist() and same.max_seqlen == layout.max_seqlen
    offset = DocumentLayout.from_position_ids(layout.position_ids + 2)  # RoBERTa-style offsets: same documents
    assert offset.cu_seqlens.tolist() == layout.cu_seqlens.tolist()
    with pytest.raises(PackmaskError, match="longer than the row"):
        DocumentLayout.from_seq_lengths([[4, 4]], 6)


def test_document_layout_dense_mask_and_window():
    layout = DocumentLayout.from_seq_lengths([[4, 2]], 6)
    full = layout.dense_mask()[0, 0].int().tolist()
    assert full[3] == [1, 1, 1, 1, 0, 0] and full[5] == [0, 0, 0, 0, 1, 1]
    windowed = layout.dense_mask(sliding_window=2)[0, 0].int().tolist()
    assert windowed[3] == [0, 0, 1, 1, 0, 0] and windowed[5] == [0, 0, 0, 0, 1, 1]
    bidir = DocumentLayout.from_seq_lengths([[4, 2]], 6, causal=False).dense_mask()[0, 0].int().tolist()
    assert bidir[0] == [1, 1, 1, 1, 0, 0]
    assert layout.to("cpu") is layout


def test_cached_on_memoises_per_tensor_and_sees_in_place_edits():
    mask = packmask.block_diagonal_mask([[2, 2]], 4)
    calls = []

    def compute():
        calls.append(1)
        return analyse_mask(mask)

    first = cached_on(mask, "layout", compute)
    assert cached_on(mask, "layout", compute) is first and len(calls) == 1
    view = mask[:, None][:, 0]  # a view shares its base's cache (same shape, strides, offset)
    assert cached_on(view, "layout", compute) is first and len(calls) == 1
    mask[0, 3, 0] = True  # an in-place edit bumps the version: computed again
    assert cached_on(mask, "layout", compute) is not first and len(calls) == 2


def test_positions_of_a_user_windowed_mask_do_not_saturate():
    """A causal mask that already holds a sliding window (block-diagonal ∧ window, built with
    packmask.masks) is no tree: its positions are the document index, not ``visible keys − 1``
    (which stops growing at window − 1). Trees keep their depth."""
    from packmask import masks
    doc = masks.document_ids_from_lengths([[6, 2]], 8)
    windowed = masks.materialize(masks.and_masks(masks.same_document(doc), masks.causal, masks.sliding_window(3)), 1, 8)
    layout = analyse_mask(windowed)
    assert isinstance(layout, GeneralLayout)
    assert layout.position_ids.tolist() == [[0, 1, 2, 3, 4, 5, 0, 1]]
    assert torch.equal(layout.dense_mask()[:, 0], windowed)
    # a shared-prefix tree with a window on top: positions are depths along each branch
    from packmask.layout import TreeLayout
    tree = TreeLayout.from_parents(torch.tensor([[-1, 0, 1, 2, 3, 1, 5]]))  # prompt 2 | branch 3 | branch 2
    assert analyse_mask(tree.dense_mask(sliding_window=2)[:, 0]).position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]


def test_cached_on_memoises_a_none_result_once_per_forward(monkeypatch):
    """"Nothing is packed" (None) is a result too: unpacked position_ids used to be re-analysed by
    every layer (a host sync per layer)."""
    from packmask.testing import tiny_model
    pos = torch.arange(8)[None]
    calls = []
    assert cached_on(pos, "k", lambda: calls.append(1)) is None
    assert cached_on(pos, "k", lambda: calls.append(1)) is None and len(calls) == 1
    from packmask import segments
    model = tiny_model("llama")
    counted, original = [], segments.starts_from_position_ids
    monkeypatch.setattr(segments, "starts_from_position_ids", lambda *a, **k: counted.append(1) or original(*a, **k))
    with torch.no_grad():
        model(input_ids=torch.randint(1, 100, (1, 8)), position_ids=torch.arange(8)[None], use_cache=False)
    assert len(counted) == 1 < model.config.num_hidden_layers
