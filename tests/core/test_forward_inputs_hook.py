"""packmask.forward_inputs: the model's forward pre-hook derives what the user omitted (positions, varlen
keys), passes masks on in a form transformers keeps, refuses what it cannot make exact, and the packed
forward it prepares equals each sequence run alone (fp32, logits and gradients, with a control)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModel, LlamaForCausalLM

import packmask
from packmask.errors import PackmaskError, UnsupportedModelError
from packmask.forward_inputs import LAYOUT_KWARG, close_forward_hook, derive_inputs_hook, forward_params, uses_packmask
from packmask.testing import grad_rel_err, rel_err, tiny_config, tiny_model

TOL = 1e-5


def run_hook(model, args=(), **kwargs):
    """What the pre-hook hands the model body (the forward it opens is closed again)."""
    try:
        return derive_inputs_hook(model, args, kwargs)
    finally:
        close_forward_hook(model, args, None)


def test_seq_lengths_become_varlen_keys_and_positions():
    model = tiny_model("llama")
    _, kw = run_hook(model, input_ids=torch.zeros(2, 6, dtype=torch.long), seq_lengths=[[3, 2], [6]])
    assert "seq_lengths" not in kw
    assert kw["cu_seq_lens_q"].tolist() == kw["cu_seq_lens_k"].tolist() == [0, 3, 5, 6, 12]
    assert kw["max_length_q"] == kw["max_length_k"] == 6
    assert kw["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]]


@pytest.mark.parametrize("positional", [False, True], ids=["keyword", "positional"])
def test_a_3d_mask_is_passed_on_as_its_4d_view_with_positions(positional):
    model = tiny_model("llama")
    ids, mask = torch.zeros(1, 5, dtype=torch.long), packmask.block_diagonal_mask([[2, 3]], 5)
    args, kw = run_hook(model, (ids, mask)) if positional else run_hook(model, input_ids=ids, attention_mask=mask)
    passed = args[1] if positional else kw["attention_mask"]
    assert passed.shape == (1, 1, 5, 5) and passed._base is mask  # a view: the analysis cached on it is shared
    assert kw["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


def test_given_positions_are_kept_and_cu_seq_lens_give_positions():
    model = tiny_model("llama")
    ids = torch.zeros(1, 5, dtype=torch.long)
    mine = torch.tensor([[7, 8, 9, 10, 11]])
    assert run_hook(model, input_ids=ids, position_ids=mine, seq_lengths=[[2, 3]])[1]["position_ids"] is mine
    _, kw = run_hook(model, input_ids=ids, cu_seq_lens_q=torch.tensor([0, 2, 5]), cu_seq_lens_k=torch.tensor([0, 2, 5]))
    assert kw["position_ids"].tolist() == [[0, 1, 0, 1, 2]]


def test_roberta_style_positions_start_after_the_padding_index():
    model = AutoModel.from_config(tiny_config("roberta", pad_token_id=1), attn_implementation="packmask")
    _, kw = run_hook(model, input_ids=torch.full((1, 5), 5), seq_lengths=[[2, 3]])
    assert kw["position_ids"].tolist() == [[2, 3, 2, 3, 4]]


def test_stock_models_only_get_the_guards():
    model = tiny_model("llama", "sdpa")
    assert not uses_packmask(model) and uses_packmask(tiny_model("llama"))
    ids = torch.zeros(1, 5, dtype=torch.long)
    assert run_hook(model, input_ids=ids, seq_lengths=[[2, 3]]) is None  # nothing derived, nothing replaced
    with pytest.raises(PackmaskError, match="attn_implementation='packmask'"):
        run_hook(model, input_ids=ids, **{LAYOUT_KWARG: object()})


class NoPositions(LlamaForCausalLM):
    def forward(self, input_ids=None, attention_mask=None, labels=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)


def test_a_forward_without_position_ids_cannot_take_seq_lengths():
    model = NoPositions(tiny_config("llama"))
    model.set_attn_implementation("packmask")
    assert forward_params(NoPositions)[1:] == (False, True)
    with pytest.raises(UnsupportedModelError, match="takes no position_ids"):
        model(input_ids=torch.zeros(1, 5, dtype=torch.long), seq_lengths=[[2, 3]])


def test_packed_forward_equals_each_sequence_alone():
    """seq_lengths through the hook: logits and parameter gradients equal each document run alone.
    Control: the same row without seq_lengths (one sequence) differs."""
    torch.manual_seed(0)
    lengths, N = [5, 3, 4], 12
    ids = torch.randint(1, 100, (1, N))
    packed, alone = tiny_model("llama"), tiny_model("llama")
    out = packed(input_ids=ids, seq_lengths=[lengths], use_cache=False)
    logits, start = [], 0
    for n in lengths:
        part = alone(input_ids=ids[:, start:start + n], use_cache=False).logits
        logits.append(part)
        part.float().square().sum().backward()
        start += n
    reference = torch.cat(logits, 1)
    assert rel_err(out.logits, reference) <= TOL
    out.logits.float().square().sum().backward()
    worst, name = grad_rel_err(packed, alone)
    assert worst <= TOL, name
    with torch.no_grad():
        unpacked = packed(input_ids=ids, use_cache=False).logits
    assert rel_err(unpacked, reference) > 1e-2
