"""Draft-tree verification under ``torch.inference_mode`` (what serving and speculative-decoding loops use).

Inference tensors keep no version counter, so packmask's per-tensor caches (keyed on ``_version``) must
not be used for them: the forward still runs, equals transformers' sdpa with the same mask (fp32 CPU,
rel. error <= 1e-5), and an in-place edit of the mask between two forwards is followed (control: the
first tree's logits differ from the edited tree's by > 1e-2).
"""
from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

import packmask
from packmask.masks import tree_mask
from packmask.testing import rel_err, tiny_config

TOL = 1e-5
PAST, VOCAB = 12, 100
PARENTS = [[-1, -1, 0, 0, 1, 2, 2, 4], [-1, 0, 1, 1, -1, 4, 3, 6]]
CHAIN = [[-1, 0, 1, 2, 3, 4, 5, 6]] * 2


def _verify(model, impl, prefix, ids, mask4, pos):
    model.set_attn_implementation(impl)
    cache = model(input_ids=prefix, use_cache=True).past_key_values
    return model(input_ids=ids, attention_mask=mask4, position_ids=pos, past_key_values=cache, use_cache=True).logits


def test_tree_verification_under_inference_mode_equals_sdpa_and_follows_edits():
    torch.manual_seed(0)
    cfg = tiny_config("llama", num_hidden_layers=2)
    cfg._attn_implementation = "sdpa"
    model = LlamaForCausalLM(cfg).eval()
    torch.manual_seed(1)
    prefix, ids = torch.randint(1, VOCAB, (2, PAST)), torch.randint(1, VOCAB, (2, len(PARENTS[0])))
    with torch.inference_mode():
        mask, pos = tree_mask(torch.tensor(PARENTS), PAST)
        chain, chain_pos = tree_mask(torch.tensor(CHAIN), PAST)
        m4 = mask.clone()[:, None]
        first = _verify(model, "packmask", prefix, ids, m4, pos)
        assert rel_err(first, _verify(model, "sdpa", prefix, ids, mask[:, None], pos)) <= TOL
        m4.copy_(chain[:, None])  # the same inference tensor, now another tree (no version counter to see it)
        edited = _verify(model, "packmask", prefix, ids, m4, chain_pos)
        ref = _verify(model, "sdpa", prefix, ids, chain[:, None], chain_pos)
    assert rel_err(edited, ref) <= TOL
    assert rel_err(first, ref) > 1e-2  # control
