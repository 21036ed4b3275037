"""MultimodalCollator's rows, masks and refusals (no model forward except where stated)."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packmask
from packmask import PackmaskError, UnsupportedModelError
from packmask.multimodal import MultimodalCollator, pack_samples
from packmask.multimodal.attention import sample_mask
from packmask.multimodal.tiny import tiny_sample, tiny_vlm
from packmask.testing import tiny_model


@pytest.fixture(scope="module")
def qwen():
    return tiny_vlm("qwen2_5_vl")


def _samples(model, specs, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [tiny_sample(model, n_text, n_images, g) for n_text, n_images in specs]


def test_lazy_export():
    assert packmask.MultimodalCollator is MultimodalCollator


def test_batch_layout(qwen):
    samples = _samples(qwen, [(5, 1), (4, 0)])
    batch = MultimodalCollator(qwen)(samples)
    n0, n1 = (s["input_ids"].shape[1] for s in samples)
    assert batch["input_ids"].shape == (1, n0 + n1) and batch["use_cache"] is False
    pos = batch["position_ids"]
    assert pos.shape == (4, 1, n0 + n1)  # text row first, then the 3 mRoPE rows
    assert pos[0, 0].tolist() == list(range(n0)) + list(range(n1))  # the text row restarts per sample
    alone, _ = qwen.model.get_rope_index(samples[0]["input_ids"], mm_token_type_ids=samples[0]["mm_token_type_ids"],
                                         image_grid_thw=samples[0]["image_grid_thw"])
    assert torch.equal(pos[1:, :, :n0], alone)  # each sample's own mRoPE positions, unshifted
    assert batch["labels"][0, 0] == -100 and batch["labels"][0, n0] == -100  # no prediction across the boundary
    assert torch.equal(batch["pixel_values"], samples[0]["pixel_values"])
    assert "attention_mask" not in batch  # causal: packmask reads the samples from the restarting text row


def test_rows_keep_order_and_split_at_max_length(qwen):
    samples = _samples(qwen, [(4, 0), (5, 0), (6, 0), (3, 0)])
    n = [s["input_ids"].shape[1] for s in samples]
    rows = MultimodalCollator(qwen, max_length=n[0] + n[1]).rows(samples)
    assert [[s["input_ids"].shape[1] for s in row] for row in rows] == [[n[0], n[1]], [n[2], n[3]]]


def test_sample_longer_than_max_length(qwen):
    samples = _samples(qwen, [(4, 0), (30, 1)])
    with pytest.raises(PackmaskError, match=r"sample 1 has \d+ tokens, more than max_length=20"):
        MultimodalCollator(qwen, max_length=20)(samples)


def test_best_fit_rows(qwen):
    samples = _samples(qwen, [(4, 0), (5, 1), (6, 0), (3, 0)])
    rows = pack_samples(samples, max_length=40)
    assert sorted(id(s) for row in rows for s in row) == sorted(id(s) for s in samples)
    assert all(sum(s["input_ids"].shape[1] for s in row) <= 40 for row in rows)
    batch = MultimodalCollator(qwen)(rows)  # a list of samples is one row
    assert batch["input_ids"].shape[0] == len(rows)


def test_refusals(qwen):
    with pytest.raises(UnsupportedModelError, match="no multimodal packing rule"):
        MultimodalCollator(tiny_model("llama"))
    qwen.set_attn_implementation("sdpa")
    try:
        with pytest.raises(PackmaskError, match="attn_implementation='packmask'"):
            MultimodalCollator(qwen)
    finally:
        qwen.set_attn_implementation("packmask")
    sample = _samples(qwen, [(4, 0)])[0]
    padded = dict(sample, attention_mask=torch.tensor([[1] * (sample["input_ids"].shape[1] - 1) + [0]]))
    with pytest.raises(PackmaskError, match="sample 0: attention_mask has padding"):
        MultimodalCollator(qwen)([padded])
    unlabeled = {k: v for k, v in sample.items() if k != "labels"}
    with pytest.raises(PackmaskError, match="some samples have labels"):
        MultimodalCollator(qwen)([sample, unlabeled])


def _oracle(starts, types, rule):
    """Per token pair: same sample, and key before query or both in one block."""
    B, N = starts.shape
    out = torch.zeros(B, N, N, dtype=torch.bool)
    for b in range(B):
        sample = starts[b].long().cumsum(0)
        for i in range(N):
            for j in range(N):
                if sample[i] != sample[j]:
                    continue
                if j <= i:
                    out[b, i, j] = True
                elif rule == "prefix":
                    out[b, i, j] = bool(types[b, i] == 0 and types[b, j] == 0)
                elif rule == "image_bidirectional":
                    between = types[b, i:j + 1]
                    out[b, i, j] = bool((between == 1).all()) and not bool(starts[b, i + 1:j + 1].any())
    return out


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 1)), min_size=1, max_size=12),
       st.sampled_from(["causal", "image_bidirectional", "prefix"]))
def test_sample_mask_matches_oracle(tokens, rule):
    starts = torch.tensor([[True] + [s for s, _ in tokens[1:]]])
    types = torch.tensor([[t for _, t in tokens]])
    assert torch.equal(sample_mask(starts, types, rule), _oracle(starts, types, rule))


def test_text_row_of_4_row_positions_is_read_by_attention():
    """integration: [4, B, N] position ids that reach an attention layer are read by their text row."""
    from packmask.integration import packmask_attention

    class Layer(torch.nn.Module):
        is_causal = True
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 8) for _ in range(3))
    text = torch.tensor([[0, 1, 2, 0, 1, 2]])
    four = torch.cat([text[None], torch.zeros(3, 1, 6, dtype=torch.long)])
    got, _ = packmask_attention(Layer(), q, k, v, None, position_ids=four)
    ref, _ = packmask_attention(Layer(), q, k, v, None, position_ids=text)
    whole, _ = packmask_attention(Layer(), q, k, v, None)
    assert torch.equal(got, ref) and not torch.allclose(got, whole)


def test_missing_mm_token_type_ids(qwen):
    sample = {k: v for k, v in _samples(qwen, [(4, 1)])[0].items() if k != "mm_token_type_ids"}
    with pytest.raises(PackmaskError, match="return_mm_token_type_ids=True"):
        MultimodalCollator(qwen)([sample])


def test_stock_model_with_a_cache_warns_on_4_row_positions(qwen):
    """On sdpa, [4, B, L] packed positions with use_cache on are silently contaminated by transformers; the
    stock-model guard reads the text row and warns. With use_cache=False (the collator's) it stays quiet."""
    import warnings

    from packmask import PackmaskWarning, guards

    batch = MultimodalCollator(qwen)(_samples(qwen, [(4, 1), (5, 0)]))
    qwen.set_attn_implementation("sdpa")
    guards._ONCE.discard("packed-positions")
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("error", PackmaskWarning)
            qwen(**batch)  # use_cache=False: transformers' own packed path, no warning
            with pytest.warns(PackmaskWarning, match="packed position_ids"):
                qwen(**dict(batch, use_cache=True))
    finally:
        qwen.set_attn_implementation("packmask")
        guards._ONCE.discard("packed-positions")
