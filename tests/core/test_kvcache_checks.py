"""packmask.kvcache: a mask given with a KV cache must have one column per cached token, then one per
new token; caches whose keys packmask cannot line up with the mask are refused by name."""
from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

import packmask
from packmask.errors import PackmaskError
from packmask.kvcache import cache_past_length, check_mask_against_cache
from packmask.testing import rel_err, tiny_model


def filled_cache(model, n):
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(input_ids=torch.randint(1, 100, (1, n)), past_key_values=cache, use_cache=True)
    return cache


def test_cache_past_length_counts_cached_tokens():
    model = tiny_model("llama", "sdpa")
    assert cache_past_length(None) == 0
    assert cache_past_length(filled_cache(model, 4)) == 4


def test_caches_packmask_cannot_line_up_are_refused_by_name():
    class OtherCache:
        def get_seq_length(self):
            return 3
    with pytest.raises(PackmaskError, match="cannot be used with a OtherCache"):
        cache_past_length(OtherCache())
    cache = filled_cache(tiny_model("llama", "sdpa"), 3)

    class OddLayer:
        pass
    cache.layers[0] = OddLayer()
    with pytest.raises(PackmaskError, match="layer 0 is a OddLayer"):
        cache_past_length(cache)


def test_mask_columns_must_be_cache_then_new_tokens():
    cache = filled_cache(tiny_model("llama", "sdpa"), 4)
    assert check_mask_against_cache(torch.ones(1, 1, 3, 7, dtype=torch.bool), 3, cache) == 4
    with pytest.raises(PackmaskError, match="cache holds 4 tokens and the input 3 new ones: expected 4 \\+ 3 = 7"):
        check_mask_against_cache(torch.ones(1, 1, 3, 6, dtype=torch.bool), 3, cache)
    assert check_mask_against_cache(torch.ones(1, 3, 3, dtype=torch.bool), 3, None) == 0  # no cache: [B, N, N]
    assert check_mask_against_cache(torch.ones(1, 2, 5, dtype=torch.bool), 3, cache) == 0  # not [.., N, K]: analysis names it


def test_a_tree_over_the_cache_equals_each_branch_alone():
    """Through the model: a draft tree after a cached prompt gives, for every token, the logits of its
    root-to-token path run alone after the prompt. Control: the tree as a plain continuation differs;
    a mask built for another cache length is refused."""
    torch.manual_seed(1)
    model = tiny_model("llama")
    prompt, tree = torch.randint(1, 100, (1, 4)), torch.randint(1, 100, (1, 3))
    parents = [-1, 0, 0]  # t1 and t2 both follow t0
    mask, pos = packmask.tree_mask(parents, past_length=4)

    def prompt_cache():
        cache = DynamicCache(config=model.config)
        model(input_ids=prompt, past_key_values=cache, use_cache=True)
        return cache
    with torch.no_grad():
        out = model(input_ids=tree, attention_mask=mask[None, None], position_ids=pos[None],
                    past_key_values=prompt_cache(), use_cache=True).logits
        for i, path in enumerate([[0], [0, 1], [0, 2]]):
            alone = model(input_ids=torch.cat([prompt, tree[:, path]], 1), use_cache=False).logits[:, -1]
            assert rel_err(out[:, i], alone) <= 1e-5, i
        flat = model(input_ids=tree, past_key_values=prompt_cache(), use_cache=True).logits  # control
        assert rel_err(flat[:, 2], alone) > 1e-2
        wrong, _ = packmask.tree_mask(parents, past_length=2)
        with pytest.raises(PackmaskError, match="cache holds 4 tokens"):
            model(input_ids=tree, attention_mask=wrong[None, None], past_key_values=prompt_cache(), use_cache=True)
