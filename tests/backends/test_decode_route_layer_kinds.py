"""The decode route (packmask.backends.decode) in a model whose layers differ: sliding and full attention
layers share one draft-tree mask tensor (gemma3: alternating ``layer_types``, a window shorter than the
cache and tree, a DynamicCache whose sliding layers keep fewer keys — or, over a short cache, as many
keys as the full layers, so only the window tells the routes apart). Each layer kind must take its own route.

Reference: every tree token's logits from its root-to-leaf path run alone after the prefix (no cache,
transformers' sdpa), fp32 CPU, rel. error <= 1e-5. Control: the same reference with no window (every layer
a full one, as if the sliding layers had taken the full layers' route) is off by > 1e-2.
"""
from __future__ import annotations

import pytest
import torch

import packmask
from packmask.masks import tree_mask
from packmask.testing import rel_err
from packmask.tiny import tiny_model

TOL = 1e-5
PARENTS = [[-1, 0, 1, 1, 3, 4], [-1, 0, 0, 2, 3, 2]]


def _path(parents, i):
    path = []
    while i >= 0:
        path.append(i)
        i = parents[i]
    return path[::-1]


@pytest.mark.parametrize("PAST", [10, 3], ids=["sliding layers keep fewer keys", "every layer the same keys"])
@torch.no_grad()
def test_sliding_and_full_layers_sharing_one_mask_take_their_own_routes(PAST):
    model = tiny_model("gemma3_text", num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2)
    model.eval()
    assert model.config.sliding_window < PAST + 3  # the window hides keys from the sliding layers' deeper tokens
    torch.manual_seed(1)
    V = model.config.vocab_size
    prefix, ids = torch.randint(1, V, (2, PAST)), torch.randint(1, V, (2, len(PARENTS[0])))
    model.set_attn_implementation("sdpa")

    def paths_alone():
        return torch.stack([torch.stack([
            model(input_ids=torch.cat([prefix[b], ids[b, _path(PARENTS[b], i)]])[None]).logits[0, -1]
            for i in range(len(PARENTS[b]))]) for b in range(2)])

    ref = paths_alone()
    window, model.config.sliding_window = model.config.sliding_window, 10_000  # read by the mask builder per call
    no_window = paths_alone()
    model.config.sliding_window = window
    mask, pos = tree_mask(torch.tensor(PARENTS), PAST)

    def verify(impl, m4):
        model.set_attn_implementation(impl)
        cache = model(input_ids=prefix, use_cache=True).past_key_values
        return model(input_ids=ids, attention_mask=m4, position_ids=pos, past_key_values=cache, use_cache=True).logits

    m4 = mask.clone()[:, None]
    mine = verify("packmask", m4)
    assert rel_err(mine, ref) <= TOL
    assert len(m4.__dict__["_packmask_decode_routes"]) == 2  # one route per layer kind
    assert rel_err(verify("packmask", m4), ref) <= TOL  # the same mask tensor again: routes reused
    with packmask.backend("eager"):  # another backend asked for, same mask tensor: not the remembered route
        assert rel_err(verify("packmask", m4), ref) <= TOL
    assert rel_err(no_window, ref) > 1e-2 and rel_err(mine, no_window) > 1e-2  # control: the window matters
