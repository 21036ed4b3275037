"""Packed rows through ``attn_implementation="packmask"`` equal each sequence run alone.

fp32 on CPU, tiny random models: logits and parameter gradients within 1e-5 relative error,
for every input form (3D mask, 4D mask, collator keys, position_ids pitfalls).
"""
import pytest
import torch

import packmask
from packmask.testing import grad_rel_err, pack_rows, rel_err, run_alone, tiny_model

FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma2", "phi3", "gpt2", "gpt_neox", "olmo2", "qwen3_moe"]
# two rows; documents longer than mistral's / gemma2's sliding window (4), trailing padding in row 1
SEQ_LENGTHS = [[5, 9, 4], [11, 6]]
N = 18
TOL = 1e-5


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 128, (len(SEQ_LENGTHS), N), generator=g)
    slices, pos = pack_rows(SEQ_LENGTHS, N)
    weights = torch.randn(len(SEQ_LENGTHS), N, 128, generator=g)
    return ids, slices, pos, weights * _covered(slices)  # loss ignores the padding tail


def _covered(slices):
    """``[B, N, 1]``: 1 on tokens of real documents, 0 on the padding tail."""
    covered = torch.zeros(len(SEQ_LENGTHS), N, 1)
    for b, s, length in slices:
        covered[b, s:s + length] = 1
    return covered


def _inputs(form, ids, pos):
    B = ids.shape[0]
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N)
    if form == "mask3d":  # positions derived from the mask
        return dict(attention_mask=mask)
    if form == "mask4d":
        return dict(attention_mask=mask[:, None], position_ids=pos)
    if form == "mask3d_int":
        return dict(attention_mask=mask.long())
    if form == "collator":  # transformers.DataCollatorWithFlattening keys: one flattened row
        flat_pos = pos.reshape(1, -1)
        layout = packmask.DocumentLayout.from_position_ids(pos)
        return dict(position_ids=flat_pos, cu_seq_lens_q=layout.cu_seqlens, cu_seq_lens_k=layout.cu_seqlens,
                    max_length_q=layout.max_seqlen, max_length_k=layout.max_seqlen, _flatten=True)
    if form == "position_ids_use_cache_default":
        return dict(position_ids=pos)
    if form == "position_ids_all_ones_2d":
        return dict(position_ids=pos, attention_mask=torch.ones(B, N, dtype=torch.long))
    if form == "seq_lengths":
        return dict(seq_lengths=SEQ_LENGTHS)
    raise KeyError(form)


def _check(family, form):
    model = tiny_model(family, "packmask")
    ref = tiny_model(family, "eager")
    ref.load_state_dict(model.state_dict())
    ids, slices, pos, weights = _batch()
    kwargs = _inputs(form, ids, pos)
    flatten = kwargs.pop("_flatten", False)
    if flatten:
        logits = model(input_ids=ids.reshape(1, -1), **kwargs).logits.reshape(ids.shape + (-1,))
    else:
        logits = model(input_ids=ids, **kwargs).logits
    expected = run_alone(ref, ids, slices)
    covered = weights.abs().sum(-1, keepdim=True) > 0
    err = rel_err(logits * covered, expected)
    assert err <= TOL, f"{family}/{form}: logits rel err {err:.2e}"
    (logits * weights).sum().backward()
    (expected * weights).sum().backward()
    gerr, name = grad_rel_err(model, ref)
    assert gerr <= TOL, f"{family}/{form}: grad rel err {gerr:.2e} in {name}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("form", ["mask3d", "mask4d", "collator"])
def test_family_matches_each_sequence_alone(family, form):
    _check(family, form)


@pytest.mark.parametrize("form", ["position_ids_use_cache_default", "position_ids_all_ones_2d", "mask3d_int",
                                  "seq_lengths"])
def test_transformers_pitfalls_are_isolated(form):
    _check("llama", form)


def test_contamination_reference_is_detectable():
    """The comparison must be able to fail: plain causal attention over packed rows is far off."""
    model = tiny_model("llama", "sdpa")
    ids, slices, pos, _ = _batch()
    out = model(input_ids=ids, position_ids=pos).logits  # use_cache default: transformers drops packing
    expected = run_alone(model, ids, slices)
    assert rel_err(out * _covered(slices), expected) > 1e-2


def test_set_attn_implementation_switches_existing_model():
    model = tiny_model("llama", "sdpa")
    model.set_attn_implementation("packmask")
    ids, slices, pos, _ = _batch()
    out = model(input_ids=ids, attention_mask=packmask.block_diagonal_mask(SEQ_LENGTHS, N)).logits
    ref = tiny_model("llama", "eager")
    ref.load_state_dict(model.state_dict())
    expected = run_alone(ref, ids, slices)
    assert rel_err(out * _covered(slices), expected) <= TOL


def test_plain_2d_padding_mask_unchanged():
    """An ordinary right-padded batch gives what sdpa gives."""
    model = tiny_model("llama", "packmask")
    ref = tiny_model("llama", "sdpa")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (2, 10))
    am = torch.ones(2, 10, dtype=torch.long)
    am[1, 6:] = 0
    a = model(input_ids=ids, attention_mask=am).logits
    b = ref(input_ids=ids, attention_mask=am).logits
    assert rel_err(a[am.bool()], b[am.bool()]) <= TOL


def test_generation_with_cache_matches_sdpa():
    model = tiny_model("llama", "packmask")
    ref = tiny_model("llama", "sdpa")
    ref.load_state_dict(model.state_dict())
    ids = torch.randint(1, 128, (2, 6))
    am = torch.ones(2, 6, dtype=torch.long)
    am[0, :2] = 0  # left padding
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, attention_mask=am, **kw), ref.generate(ids, attention_mask=am, **kw))


def test_encoder_style_bidirectional_documents():
    """A bidirectional block-diagonal mask equals each document run with full attention."""
    model = tiny_model("llama", "packmask")
    ref = tiny_model("llama", "eager")
    ref.load_state_dict(model.state_dict())
    ids, slices, pos, _ = _batch()
    mask = packmask.block_diagonal_mask(SEQ_LENGTHS, N, causal_within=False)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos).logits
    for b, s, length in slices:
        alone = torch.ones(1, 1, length, length, dtype=torch.bool)
        exp = ref(input_ids=ids[b:b + 1, s:s + length], attention_mask=alone, use_cache=False).logits
        assert rel_err(out[b:b + 1, s:s + length], exp) <= TOL


def test_seq_lengths_on_a_model_without_position_ids_is_refused():
    """BART's forward takes no ``position_ids``: ``seq_lengths`` used to flow on through ``**kwargs``,
    unread, and the packed row ran as one sequence (contaminated, positions never restarting)."""
    from transformers import AutoModel

    from packmask.testing import tiny_config
    model = AutoModel.from_config(tiny_config("bart"), attn_implementation="packmask").eval()
    ids = torch.randint(0, 100, (1, 8))
    with torch.no_grad():
        model(input_ids=ids, decoder_input_ids=ids)  # unpacked: still runs
        with pytest.raises(packmask.UnsupportedModelError, match="position_ids"):
            model(input_ids=ids, decoder_input_ids=ids, seq_lengths=[[4, 4]])


def test_user_windowed_mask_derives_unsaturated_positions():
    """A block-diagonal mask that already holds a sliding window (packmask.masks), no position_ids:
    each document equals it run alone with the same window and positions 0..n-1. Before the fix the
    derived positions stopped at window − 1 (wrong RoPE)."""
    from packmask import masks
    model = tiny_model("llama", "packmask").eval()
    lengths, n, window = [[7, 5]], 12, 3
    ids = torch.randint(1, 128, (1, n))

    def windowed(seq_lengths, size):
        doc = masks.document_ids_from_lengths(seq_lengths, size)
        return masks.materialize(masks.and_masks(masks.same_document(doc), masks.causal,
                                                 masks.sliding_window(window)), 1, size)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=windowed(lengths, n)).logits
        alone = torch.cat([model(input_ids=ids[:, s:s + k], attention_mask=windowed([[k]], k),
                                 position_ids=torch.arange(k)[None]).logits for s, k in ((0, 7), (7, 5))], 1)
        unwindowed = model(input_ids=ids, attention_mask=packmask.block_diagonal_mask(lengths, n)).logits
    assert rel_err(packed, alone) < TOL
    assert rel_err(unwindowed, alone) > 1e-2  # control: the window matters at these lengths


@pytest.mark.parametrize("family,overrides", [
    ("phimoe", dict(sliding_window=3)),  # config window, applied only through the model's mask
    ("qwen2_moe", dict(use_sliding_window=True, sliding_window=3,
                       layer_types=["sliding_attention", "full_attention"])),  # module.sliding_window
])
def test_window_applied_only_through_the_mask_is_kept_when_packed(family, overrides):
    """Some models never hand their sliding window to the attention function: their mask holds it. A
    packed layout replaces that mask, so packmask used to drop the window (documents longer than it
    attended too far back)."""
    model = tiny_model(family, "packmask", **overrides)
    ref = tiny_model(family, "eager", **overrides)
    ids = torch.randint(1, 100, (1, 12))
    with torch.no_grad():
        alone = torch.cat([ref(input_ids=ids[:, s:s + k]).logits for s, k in ((0, 7), (7, 5))], 1)
        packed = model(input_ids=ids, attention_mask=packmask.block_diagonal_mask([[7, 5]], 12)).logits
        no_window = tiny_model(family, "eager", **dict(overrides, sliding_window=None, use_sliding_window=False,
                                                        layer_types=None))(input_ids=ids[:, :7]).logits
    assert rel_err(packed, alone) < TOL
    assert rel_err(no_window, alone[:, :7]) > 1e-2  # control: the window matters at these lengths


def test_chunked_attention_layers_keep_their_chunks_when_packed():
    """llama4's chunked layers (a query sees only its own chunk of positions) apply chunks through the
    mask alone; a packed layout used to drop them. Documents are now cut into chunks."""
    model = tiny_model("llama4_text", "packmask", attention_chunk_size=3)
    ref = tiny_model("llama4_text", "eager", attention_chunk_size=3)
    ids = torch.randint(1, 100, (1, 12))
    with torch.no_grad():
        alone = torch.cat([ref(input_ids=ids[:, s:s + k]).logits for s, k in ((0, 7), (7, 5))], 1)
        for inputs in (dict(attention_mask=packmask.block_diagonal_mask([[7, 5]], 12)), dict(seq_lengths=[[7, 5]])):
            assert rel_err(model(input_ids=ids, **inputs).logits, alone) < TOL
        unchunked = tiny_model("llama4_text", "eager", attention_chunk_size=64)(input_ids=ids[:, :7]).logits
        assert rel_err(unchunked, alone[:, :7]) > 1e-2  # control: chunks matter at these lengths
        with pytest.raises(packmask.UnsupportedModelError, match="chunked-attention"):
            model(input_ids=ids, attention_mask=packmask.prefix_lm_mask([[7, 5]], [[2, 0]], 12))


def test_position_layout_is_not_reused_for_another_padding_at_a_recycled_address():
    """The layout read from packed position_ids and a 2D padding mask was cached on the position
    tensor under the padding tensor's id; a later padding tensor allocated at the freed address got
    the stale layout (its padding run not split off)."""
    from packmask.integration import PackmaskMask, layer_layout

    class Layer(torch.nn.Module):
        is_causal = True
    pos = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 0, 1, 2]])

    def cu_for(mask2d):
        padded = PackmaskMask(1, 10, 10, padding_mask=mask2d.bool())
        return layer_layout(Layer(), padded, dict(position_ids=pos), 1, 10, 10).cu_seqlens.tolist()
    assert cu_for(torch.tensor([[1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])) == [0, 4, 7, 10]
    assert cu_for(torch.tensor([[1, 1, 1, 1, 1, 1, 0, 1, 1, 1]])) == [0, 4, 6, 7, 10]
    # whether the allocator recycles the address is up to it; what makes a recycled id impossible is
    # that the cache entry keeps the padding tensor it was keyed on alive
    import gc
    import weakref
    padded = PackmaskMask(1, 10, 10, padding_mask=torch.tensor([[1, 1, 1, 1, 1, 0, 0, 1, 1, 1]]).bool())
    alive = weakref.ref(padded.padding_mask)
    layer_layout(Layer(), padded, dict(position_ids=pos), 1, 10, 10)
    del padded
    gc.collect()
    assert alive() is not None
