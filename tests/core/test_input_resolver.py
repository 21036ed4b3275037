"""packmask.inputs: every input form resolves to the same layout; errors name the input and the fix;
the running forward's layout is readable by any layer, also when checkpointing recomputes it."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings, strategies as st

import packmask
from packmask.errors import PackmaskError, UnsupportedModelError
from packmask.inputs import (ForwardLayout, current_forward, forward_scope, is_packed, layout_from_cu_seq_lens,
                             layout_from_mask, layout_from_position_ids, resolve_layout)
from packmask.layout import DocumentLayout, GeneralLayout
from packmask.segments import cu_seqlens_from_starts, starts_from_lengths
from packmask.testing import pack_rows, tiny_model


def all_forms(seq_lengths, N):
    """The same packed batch in every form the resolver reads (padding: one document of its own)."""
    starts = starts_from_lengths(seq_lengths, N)
    _, pos = pack_rows(seq_lengths, N)
    block = packmask.block_diagonal_mask(seq_lengths, N)
    forms = {
        "seq_lengths": dict(seq_lengths=seq_lengths),
        "cu_seq_lens": dict(cu_seq_lens_q=cu_seqlens_from_starts(starts), cu_seq_lens_k=cu_seqlens_from_starts(starts)),
        "position_ids": dict(position_ids=pos),
        "mask [B, N, N]": dict(attention_mask=packmask.block_diagonal_mask(seq_lengths, N)),
        "mask [B, 1, N, N]": dict(attention_mask=packmask.block_diagonal_mask(seq_lengths, N)[:, None]),
        "mask 0/1 int": dict(attention_mask=packmask.block_diagonal_mask(seq_lengths, N).long()),
    }
    if not block.all():  # an additive mask without a blocked entry reads as 0/1 (all zero: nothing visible)
        forms["mask additive"] = dict(attention_mask=torch.zeros(block.shape).masked_fill(
            ~block, torch.finfo(torch.float32).min))
    return forms


def test_every_form_resolves_to_the_same_layout():
    rows, N = [[3, 2, 1], [4]], 6
    expected = DocumentLayout.from_seq_lengths(rows, N)
    for name, form in all_forms(rows, N).items():
        layout = resolve_layout(2, N, **form)
        assert isinstance(layout, DocumentLayout) and layout.causal, name
        assert layout.cu_seqlens.tolist() == expected.cu_seqlens.tolist(), name
        assert torch.equal(layout.position_ids, expected.position_ids), name
    # control: a different split is told apart by every form
    other = DocumentLayout.from_seq_lengths([[2, 3, 1], [4]], N)
    assert all(resolve_layout(2, N, **f).cu_seqlens.tolist() != other.cu_seqlens.tolist()
               for f in all_forms(rows, N).values())


@settings(max_examples=25, deadline=None)
@given(st.lists(st.lists(st.integers(0, 5), min_size=1, max_size=4), min_size=1, max_size=3), st.integers(0, 3))
def test_forms_agree_on_random_batches(rows, extra):
    """Property: for any lengths, every form gives one documents split (or all say: nothing packed)."""
    N = max(sum(r) for r in rows) + extra
    if N == 0:
        return
    results = {}
    for name, form in all_forms(rows, N).items():
        layout = resolve_layout(len(rows), N, **form)
        results[name] = None if not is_packed(layout) else layout.cu_seqlens.tolist()
    assert len(set(map(str, results.values()))) == 1, results


def test_one_sequence_per_row_is_not_packed_and_a_mask_is_taken_literally():
    assert resolve_layout(2, 4, position_ids=torch.arange(4).expand(2, 4)) is None
    assert resolve_layout(2, 4, cu_seq_lens_q=torch.tensor([0, 4, 8])) is None
    assert resolve_layout(2, 4, seq_lengths=[[4], [4]]) is None
    assert resolve_layout(2, 4, cu_seq_lens_q=torch.tensor([0, 4, 8]), packed_only=False).seq_lengths == [4, 4]
    plain = resolve_layout(2, 4, attention_mask=torch.ones(2, 4, 4, dtype=torch.bool).tril())
    assert isinstance(plain, DocumentLayout) and not is_packed(plain)  # a plain causal mask: one document per row
    prefix = resolve_layout(1, 5, attention_mask=packmask.prefix_lm_mask([[5]], [[2]], 5))
    assert isinstance(prefix, GeneralLayout) and is_packed(prefix)
    assert resolve_layout(2, 4) is None  # no boundaries at all


def test_positions_with_padding_split_the_padding_off():
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
    assert resolve_layout(1, 10, position_ids=pos, attention_mask=pad).cu_seqlens.tolist() == [0, 4, 7, 10]
    pad = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 1, 1]])  # padding between sequences, then a new sequence
    assert resolve_layout(1, 10, position_ids=pos, attention_mask=pad).cu_seqlens.tolist() == [0, 4, 6, 7, 10]


def test_each_form_is_analysed_once_per_tensor(monkeypatch):
    import packmask.inputs as resolver
    calls = []
    real = resolver.analyse_mask
    monkeypatch.setattr(resolver, "analyse_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    mask = packmask.block_diagonal_mask([[3, 2]], 5)
    assert layout_from_mask(mask) is resolve_layout(1, 5, attention_mask=mask) is layout_from_mask(mask)
    assert len(calls) == 1
    cu = torch.tensor([0, 3, 5])
    assert layout_from_cu_seq_lens(cu, 1, 5) is resolve_layout(1, 5, cu_seq_lens_q=cu)
    pos = torch.tensor([[0, 1, 2, 0, 1]])
    assert layout_from_position_ids(pos) is resolve_layout(1, 5, position_ids=pos)
    mask[0, 4, 0] = True  # an in-place edit is a new mask: analysed again
    resolve_layout(1, 5, attention_mask=mask)
    assert len(calls) == 2


@pytest.mark.parametrize("form, error, match", [
    (dict(cu_seq_lens_q=torch.tensor([0, 3, 5]), cu_seq_lens_k=torch.tensor([0, 2, 5])), PackmaskError,
     "cu_seq_lens_k differs"),
    (dict(cu_seq_lens_q=torch.tensor([0, 4, 10])), PackmaskError, "crosses from row 0 into row 1"),
    (dict(seq_lengths=[[4, 3], [1]]), PackmaskError, "row 0 sum to 7 but the row holds 5"),
    (dict(position_ids=torch.tensor([[0, 1, 2, 0, 1]] * 2), attention_mask=torch.tensor([[1, 0, 1, 1, 1]] * 2)),
     PackmaskError, "padding inside a packed sequence"),
    (dict(position_ids=torch.tensor([[0, 1, 2, 0, 1]]).expand(3, 2, 5)), UnsupportedModelError, "3D .multimodal RoPE."),
    (dict(attention_mask=torch.zeros(2, 5, 5, dtype=torch.bool)), PackmaskError, "attend to no key"),
    (dict(attention_mask=torch.ones(2, 4, 4, dtype=torch.bool)), PackmaskError, "expected \\[2, 5, 5\\]"),
])
def test_bad_inputs_name_what_and_the_fix(form, error, match):
    with pytest.raises(error, match=match):
        resolve_layout(2, 5, **form)


# ---- the running forward --------------------------------------------------------------------------

def _recording_model(**overrides):
    """A tiny llama whose first MLP (a layer that is not attention) records current_forward(module) as
    it starts (a pre-hook: checkpointing's recomputation stops early, before forward hooks run)."""
    model = tiny_model("llama", **overrides)
    seen = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: seen.append(current_forward(m)))
    return model, seen


def test_a_layer_reads_the_layout_of_the_running_forward():
    model, seen = _recording_model()
    ids = torch.randint(1, 100, (2, 6))
    for form in all_forms([[3, 2, 1], [4]], 6).values():
        seen.clear()
        with torch.no_grad():
            model(input_ids=ids, **form, use_cache=False)
        fwd = seen[0]
        assert isinstance(fwd, ForwardLayout) and (fwd.batch_size, fwd.seq_len) == (2, 6)
        assert fwd.layout.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    assert current_forward() is None  # closed when the forward returned
    with torch.no_grad():
        model(input_ids=ids, use_cache=False)
    assert seen[-1].layout is None  # control: an unpacked forward has no packed layout


def test_the_forward_is_closed_when_it_raises():
    model, _ = _recording_model()
    with pytest.raises(PackmaskError):
        model(input_ids=torch.randint(1, 100, (1, 5)), seq_lengths=[[4, 3]])
    assert current_forward() is None and not model.__dict__.get("_packmask_open_forwards")


def test_forward_scope_nests():
    outer, inner = ForwardLayout(1, 4), ForwardLayout(2, 3)
    with forward_scope(outer):
        with forward_scope(inner):
            assert current_forward() is inner
        assert current_forward() is outer
    assert current_forward() is None


def test_checkpoint_recomputation_reads_the_forward_it_recomputes():
    """Gradient checkpointing reruns the layer in backward, after the forward closed: the layer's own
    read is replayed. Control: a read without the module sees no forward there."""
    model, seen = _recording_model()
    plain = []
    model.model.layers[0].mlp.register_forward_pre_hook(lambda m, a: plain.append(current_forward()))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(1, 100, (1, 6))
    model(input_ids=ids, seq_lengths=[[4, 2]], labels=ids, use_cache=False).loss.backward()
    assert len(seen) == 2  # the forward and its recomputation in backward
    assert seen[1] is seen[0] and seen[0].layout.cu_seqlens.tolist() == [0, 4, 6]
    assert plain[0] is seen[0] and plain[1] is None
