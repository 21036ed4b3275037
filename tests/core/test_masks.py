"""Arbitrary masks (prefix-LM, shared-prefix trees) equal a dense eager reference; bad masks fail clearly."""
import pytest
import torch

import packmask
from packmask import PackmaskError
from packmask.testing import rel_err, tiny_model

TOL = 1e-5


def _additive(mask_bool):
    """transformers' eager path adds a 4D float mask to the scores: 0 = attend, min = blocked."""
    return torch.where(mask_bool, 0.0, torch.finfo(torch.float32).min)[:, None]


def _pair(family="llama"):
    model = tiny_model(family, "packmask")
    ref = tiny_model(family, "eager")
    ref.load_state_dict(model.state_dict())
    return model, ref


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_prefix_lm_mask_equals_dense_eager(family):
    model, ref = _pair(family)
    mask = packmask.prefix_lm_mask([[7, 5, 4], [9, 7]], [[3, 2, 0], [4, 1]], seq_len=16)
    layout = packmask.analyse_mask(mask)
    assert isinstance(layout, packmask.GeneralLayout)
    ids = torch.randint(1, 128, (2, 16))
    pos = layout.position_ids
    assert pos[0].tolist() == [0, 1, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 0, 1, 2, 3]
    out = model(input_ids=ids, attention_mask=mask).logits  # positions derived
    dense = _additive(mask)
    window = getattr(ref.config, "sliding_window", None)
    if window is not None:  # transformers passes a 4D mask as-is; give sliding layers their own
        windowed = mask & ((pos[:, :, None] - pos[:, None, :]) < window)
        dense = {"full_attention": dense, "sliding_attention": _additive(windowed)}
    exp = ref(input_ids=ids, attention_mask=dense, position_ids=pos, use_cache=False).logits
    assert rel_err(out, exp) <= TOL
    w = torch.randn_like(out)
    (out * w).sum().backward()
    (exp * w).sum().backward()
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) <= TOL, n


def test_shared_prefix_tree_equals_dense_eager_and_each_branch_alone():
    model, ref = _pair()
    prompt, branches = 5, [4, 6, 3]
    mask = packmask.shared_prefix_tree_mask(prompt, branches)[None]
    N = mask.shape[-1]
    pos = packmask.position_ids_from_mask(mask)
    assert pos[0].tolist() == [0, 1, 2, 3, 4] + [5, 6, 7, 8] + [5, 6, 7, 8, 9, 10] + [5, 6, 7]
    ids = torch.randint(1, 128, (1, N))
    out = model(input_ids=ids, attention_mask=mask).logits
    dense = ref(input_ids=ids, attention_mask=_additive(mask), position_ids=pos, use_cache=False).logits
    assert rel_err(out, dense) <= TOL
    start = prompt
    for length in branches:  # the prompt followed by one branch, run alone as a plain sequence
        seq = torch.cat([ids[:, :prompt], ids[:, start:start + length]], 1)
        alone = ref(input_ids=seq, use_cache=False).logits
        assert rel_err(out[:, start:start + length], alone[:, prompt:]) <= TOL
        assert rel_err(out[:, :prompt], alone[:, :prompt]) <= TOL
        start += length


def test_sliding_window_is_applied_per_sequence():
    """The mistral check can fail: dropping the window changes the logits."""
    model, ref = _pair("mistral")
    mask = packmask.block_diagonal_mask([[9, 9]], 18)
    ids = torch.randint(1, 128, (1, 18))
    out = model(input_ids=ids, attention_mask=mask).logits
    nowin = tiny_model("mistral", "eager", sliding_window=None)
    nowin.load_state_dict(model.state_dict())
    alone_nowin = nowin(input_ids=ids[:, 9:], use_cache=False).logits
    alone = ref(input_ids=ids[:, 9:], use_cache=False).logits
    assert rel_err(out[:, 9:], alone) <= TOL
    assert rel_err(alone_nowin, alone) > 1e-3


@pytest.mark.parametrize("bad, message", [
    (torch.ones(2, 6, 5, dtype=torch.bool), "tokens, tokens"),
    (torch.ones(2, 3, 6, 6, dtype=torch.bool), "heads"),
    (torch.ones(1, 6, 6, dtype=torch.bool), "expected [2, 6, 6]"),
    (torch.full((2, 6, 6), 0.5), "only 0 and 1"),
    (torch.ones(2, 6, 6, dtype=torch.complex64), "not supported"),
])
def test_bad_mask_shapes_and_dtypes_raise_clear_errors(bad, message):
    model = tiny_model("llama", "packmask")
    with pytest.raises(PackmaskError, match=message.replace("[", r"\[").replace("]", r"\]")):
        model(input_ids=torch.randint(1, 128, (2, 6)), attention_mask=bad)


def test_empty_query_row_is_an_error_naming_the_row():
    model = tiny_model("llama", "packmask")
    mask = packmask.block_diagonal_mask([[3, 3]], 6)
    mask[0, 4] = False
    with pytest.raises(PackmaskError, match=r"attention_mask\[0, 4\].*attend to no key"):
        model(input_ids=torch.randint(1, 128, (1, 6)), attention_mask=mask)


def test_document_longer_than_row_is_an_error():
    model = tiny_model("llama", "packmask")
    with pytest.raises(PackmaskError, match="longer than the row"):
        model(input_ids=torch.randint(1, 128, (1, 6)), seq_lengths=[[4, 4]])
    cu = torch.tensor([0, 4, 12], dtype=torch.int32)  # second sequence crosses rows 0 -> 1
    with pytest.raises(PackmaskError, match="crosses from row 0 into row 1"):
        model(input_ids=torch.randint(1, 128, (2, 6)), cu_seq_lens_q=cu, cu_seq_lens_k=cu,
              max_length_q=8, max_length_k=8)


def test_padding_inside_a_packed_sequence_is_an_error():
    model = tiny_model("llama", "packmask")
    pos = torch.tensor([[0, 1, 2, 3, 0, 1]])
    am = torch.tensor([[1, 0, 1, 1, 1, 1]])
    with pytest.raises(PackmaskError, match="padding inside a packed sequence"):
        model(input_ids=torch.randint(1, 128, (1, 6)), position_ids=pos, attention_mask=am)


def test_mask_is_analysed_once_per_forward(monkeypatch):
    import packmask.inputs as resolver
    calls = []
    real = resolver.analyse_mask
    # the pre-hook (positions), the mask interface and the layers share one analysis (the one resolver)
    monkeypatch.setattr(resolver, "analyse_mask", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny_model("llama", "packmask", num_hidden_layers=4)
    model(input_ids=torch.randint(1, 128, (1, 8)), attention_mask=packmask.block_diagonal_mask([[3, 5]], 8))
    assert len(calls) == 1
    calls.clear()
    model(input_ids=torch.randint(1, 128, (1, 8)), attention_mask=packmask.block_diagonal_mask([[3, 5]], 8)[:, None])
    assert len(calls) == 1


def test_attention_dropout_keeps_sequences_isolated():
    """With dropout on (training), no output of one document may depend on another document's input:
    the gradient of document 2's logits w.r.t. document 1's embeddings is exactly zero."""
    model = tiny_model("llama", "packmask", attention_dropout=0.5).train()
    mask = packmask.block_diagonal_mask([[6, 5]], 11)
    embeds = model.get_input_embeddings()(torch.randint(1, 128, (1, 11))).detach().requires_grad_()
    out = model(inputs_embeds=embeds, attention_mask=mask).logits
    out[:, 6:].sum().backward()
    assert embeds.grad[:, :6].abs().max() == 0
    assert embeds.grad[:, 6:].abs().max() > 0
    # and the test can fail: the same rows under plain causal attention leak
    leaky = tiny_model("llama", "sdpa", attention_dropout=0.5).train()
    embeds.grad = None
    leaky(inputs_embeds=embeds).logits[:, 6:].sum().backward()
    assert embeds.grad[:, :6].abs().max() > 0


def test_cu_seq_lens_k_must_equal_q():
    model = tiny_model("llama", "packmask")
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 8], dtype=torch.int32)
    with pytest.raises(PackmaskError, match="cu_seq_lens_k differs"):
        model(input_ids=torch.randint(1, 128, (1, 8)), cu_seq_lens_q=cu_q, cu_seq_lens_k=cu_k,
              max_length_q=5, max_length_k=5)
