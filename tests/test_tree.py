"""Tree layouts: draft trees over a KV cache (speculative decoding) and shared-prefix training rows.

Every comparison is against the unpacked computation: each tree token's logits equal running its
root-to-token path alone after the same cache; each training branch equals prompt+branch run alone
(logits and parameter gradients). fp32 CPU, relative error <= 1e-5, each with a control that fails.
"""
from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import given, settings, strategies as st

import packmask
from packmask.errors import PackmaskError
from packmask.layout import GeneralLayout, TreeLayout, analyse_mask
from packmask.layout_tree import analyse_tree_mask
from packmask.masks import tree_mask, tree_mask_from_segments
from packmask.testing import grad_rel_err, rel_err, tiny_model
from transformers import LlamaForCausalLM

TOL = 1e-5
PAST = 20
# a 3-level draft tree of 14 tokens, breadth-first: 3 children of the cache, then their children, ...
PARENTS = [-1, -1, -1, 0, 0, 1, 2, 2, 3, 3, 4, 5, 7, 7]
VOCAB = 100
# transformers >= 5.2x names the cache argument `cache` (`past_key_values` is a deprecated alias)
CACHE = "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"


def _ancestor_paths(parents):
    """Root-to-leaf token index paths of a parent list (test helper, tiny trees)."""
    children = {i: [] for i in range(-1, len(parents))}
    for i, p in enumerate(parents):
        children[p].append(i)
    paths = []
    for leaf in (i for i in range(len(parents)) if not children[i]):
        path, j = [], leaf
        while j >= 0:
            path.append(j)
            j = parents[j]
        paths.append(path[::-1])
    return paths


def _prefill(model, ids, attention_mask=None):
    pos = None if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return model(input_ids=ids, attention_mask=attention_mask, position_ids=pos, use_cache=True).past_key_values


def _path_logits(model, cache, tree_ids, parents, past):
    """Reference: each root-to-leaf path run alone after a copy of the cache; logits per tree token."""
    out = torch.zeros(len(parents), model.config.vocab_size)
    for path in _ancestor_paths(parents):
        idx = torch.tensor(path)
        pos = torch.arange(past, past + len(path))[None]
        logits = model(input_ids=tree_ids[idx][None], position_ids=pos, **{CACHE: copy.deepcopy(cache)},
                       use_cache=True).logits[0]
        out[idx] = logits
    return out


@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "qwen3_moe"])
@torch.no_grad()
def test_draft_tree_equals_each_path_after_the_cache(family):
    torch.manual_seed(0)
    model = tiny_model(family)
    prefix = torch.randint(1, VOCAB, (1, PAST))
    tree_ids = torch.randint(1, VOCAB, (len(PARENTS),))
    cache = _prefill(model, prefix)
    mask, pos = tree_mask(PARENTS, PAST)
    out = model(input_ids=tree_ids[None], attention_mask=mask[None], **{CACHE: copy.deepcopy(cache)},
                use_cache=True).logits[0]  # positions derived: past + depth
    ref = _path_logits(model, cache, tree_ids, PARENTS, PAST)
    assert rel_err(out, ref) <= TOL
    # control: the same tokens as one causal continuation (each sees every earlier draft) is wrong
    wrong = model(input_ids=tree_ids[None], **{CACHE: copy.deepcopy(cache)}, use_cache=True).logits[0]
    assert rel_err(wrong, ref) > 1e-2


@torch.no_grad()
def test_batch_of_trees_with_left_padded_cache():
    torch.manual_seed(1)
    model = tiny_model("mistral")
    parents = torch.tensor([PARENTS, [-1, 0, 1, 1, -1, 4, 5, 3, 7, 7, 2, 0, 11, 12]])
    real = [PAST, PAST - 6]
    prefix = torch.randint(1, VOCAB, (2, PAST))
    pad = torch.ones(2, PAST, dtype=torch.long)
    pad[1, :PAST - real[1]] = 0
    tree_ids = torch.randint(1, VOCAB, parents.shape)
    cache = _prefill(model, prefix, pad)
    mask, pos = tree_mask(parents, real)
    assert mask.shape == (2, 14, PAST + 14) and not mask[1, :, :6].any()
    out = model(input_ids=tree_ids, attention_mask=mask, **{CACHE: copy.deepcopy(cache)}, use_cache=True).logits
    for b in range(2):
        alone = _prefill(model, prefix[b:b + 1, PAST - real[b]:])
        ref = _path_logits(model, alone, tree_ids[b], parents[b].tolist(), real[b])
        assert rel_err(out[b], ref) <= TOL, b


@torch.no_grad()
def test_static_cache_full_and_sliding_layers():
    from transformers import StaticCache
    torch.manual_seed(2)
    model = tiny_model("gemma2")
    prefix = torch.randint(1, VOCAB, (1, PAST))
    tree_ids = torch.randint(1, VOCAB, (len(PARENTS),))
    static = StaticCache(config=model.config, max_cache_len=64)
    model(input_ids=prefix, **{CACHE: static}, use_cache=True)
    mask, _ = tree_mask(PARENTS, PAST)
    out = model(input_ids=tree_ids[None], attention_mask=mask[None], **{CACHE: static}, use_cache=True).logits[0]
    ref = _path_logits(model, _prefill(model, prefix), tree_ids, PARENTS, PAST)
    assert rel_err(out, ref) <= TOL


def _preference_rows():
    """Two rows, each packing prompt | chosen | rejected examples (the second row two of them)."""
    rows = [[(0, 5, -1), (5, 4, 0), (9, 3, 0)],
            [(0, 3, -1), (3, 2, 0), (5, 4, 0), (9, 2, -1), (11, 3, 3), (14, 2, 3)]]
    return rows, 18


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_shared_prefix_rows_equal_each_branch_alone(family):
    torch.manual_seed(3)
    model = tiny_model(family)
    ref_model = copy.deepcopy(model)
    rows, N = _preference_rows()
    ids = torch.randint(1, VOCAB, (len(rows), N))
    covered = torch.zeros(len(rows), N, dtype=torch.bool)
    for b, row in enumerate(rows):
        for s, length, _ in row:
            covered[b, s:s + length] = True
    weight = torch.randn(len(rows), N, model.config.vocab_size) * covered[..., None]  # padding: no loss
    mask, pos = tree_mask_from_segments(rows, N)
    assert isinstance(analyse_mask(mask), TreeLayout)
    out = model(input_ids=ids, attention_mask=mask).logits  # positions derived from the mask
    (out * weight).sum().backward()
    expected = torch.zeros_like(out)
    loss = 0.0
    for b, row in enumerate(rows):
        for s, length, parent in row:
            if parent < 0:
                continue
            ps, pl, _ = row[parent]
            idx = torch.cat([torch.arange(ps, ps + pl), torch.arange(s, s + length)])
            logits = ref_model(input_ids=ids[b, idx][None], use_cache=False).logits[0]
            first_branch = next(i for i, seg in enumerate(row) if seg[2] == parent) == row.index((s, length, parent))
            w = weight[b, idx].clone()
            if not first_branch:  # the prompt's own logits count once, as in the packed row
                w[:pl] = 0
            else:
                expected[b, ps:ps + pl] = logits[:pl]
            expected[b, s:s + length] = logits[pl:]
            loss = loss + (logits * w).sum()
    loss.backward()
    assert rel_err(out[covered], expected[covered]) <= TOL
    err, name = grad_rel_err(model, ref_model)
    assert err <= TOL, name
    # control: plain causal packing of the same row lets the rejected answer see the chosen one
    wrong = ref_model(input_ids=ids, position_ids=pos, use_cache=False).logits
    assert rel_err(wrong[0, 9:12], expected[0, 9:12]) > 1e-2


# ---- properties and helpers -------------------------------------------------------------------

@st.composite
def forests(draw):
    B = draw(st.integers(1, 3))
    N = draw(st.integers(1, 24))
    parents = [[draw(st.integers(-1, i - 1)) if draw(st.booleans()) else i - 1 for i in range(N)] for _ in range(B)]
    past = [draw(st.integers(0, 6)) for _ in range(B)]
    return torch.tensor(parents), past


def _brute_force_mask(parents, past):
    B, N = parents.shape
    P = max(past)
    m = torch.zeros(B, N, P + N, dtype=torch.bool)
    for b in range(B):
        for i in range(N):
            m[b, i, P - past[b]:P] = True
            j = i
            while j >= 0:
                m[b, i, P + j] = True
                j = int(parents[b, j])
    return m


@settings(max_examples=60, deadline=None)
@given(forests())
def test_random_forest_mask_round_trip(forest):
    parents, past = forest
    mask, pos = tree_mask(parents, past)
    assert torch.equal(mask, _brute_force_mask(parents, past))
    layout = analyse_mask(mask)
    assert torch.equal(layout.dense_mask()[:, 0], mask) and torch.equal(layout.position_ids, pos)
    tree = analyse_tree_mask(mask)  # a square forest may be documents (the faster layout) for analyse_mask
    assert torch.equal(tree.parent, parents) and torch.equal(tree.dense_mask()[:, 0], mask)
    if max(past) > 0:
        assert isinstance(layout, TreeLayout)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(1, 4), st.integers(0, 3)), min_size=1, max_size=4))
def test_segments_match_brute_force(examples):
    """prompt | branches... examples packed in one row: branch tokens see the prompt and themselves."""
    row, start = [], 0
    for prompt, branch, n_branches in examples:
        root = len(row)
        row.append((start, prompt, -1))
        start += prompt
        for _ in range(n_branches):
            row.append((start, branch, root))
            start += branch
    N = start + 2  # two padding tokens at the end
    mask, pos = tree_mask_from_segments([row], N)
    parents = list(range(-1, N - 1))
    for s, length, parent in row:
        parents[s] = row[parent][0] + row[parent][1] - 1 if parent >= 0 else -1
    parents[start] = -1
    assert torch.equal(mask, _brute_force_mask(torch.tensor([parents]), [0]))
    assert pos[0, start:].tolist() == [0, 1]


def test_general_masks_stay_general():
    m = torch.ones(4, 4, dtype=torch.bool).tril()
    m[3, 1] = False  # token 3 sees 0 and 2 but not 1, while 2 sees 1: not a tree
    assert isinstance(analyse_mask(m[None]), GeneralLayout)


# ---- bad input --------------------------------------------------------------------------------

def test_mask_key_length_must_match_the_cache():
    model = tiny_model("llama")
    cache = _prefill(model, torch.randint(1, VOCAB, (1, PAST)))
    mask, _ = tree_mask(PARENTS, PAST - 1)
    with pytest.raises(PackmaskError, match=f"expected {PAST} \\+ {len(PARENTS)}"):
        model(input_ids=torch.ones(1, len(PARENTS), dtype=torch.long), attention_mask=mask[None],
              **{CACHE: cache})


def test_tree_token_that_sees_a_later_token():
    model = tiny_model("llama")
    cache = _prefill(model, torch.randint(1, VOCAB, (1, PAST)))
    mask, _ = tree_mask(PARENTS, PAST)
    mask[2, PAST + 5] = True
    with pytest.raises(PackmaskError, match="sees the later token 5"):
        model(input_ids=torch.ones(1, len(PARENTS), dtype=torch.long), attention_mask=mask[None],
              **{CACHE: cache})
    with pytest.raises(PackmaskError, match="earlier token"):
        tree_mask([-1, 2, 0], 3)


def test_unusable_cache_is_named():
    from transformers.cache_utils import DynamicCache, EncoderDecoderCache
    model = tiny_model("llama")
    mask, _ = tree_mask([-1, 0], 0)
    with pytest.raises(PackmaskError, match="EncoderDecoderCache"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=mask[None],
              **{CACHE: EncoderDecoderCache(DynamicCache(), DynamicCache())})


def test_bad_segments():
    with pytest.raises(PackmaskError, match="overlap"):
        tree_mask_from_segments([[(0, 3, -1), (2, 2, -1)]], 6)
    with pytest.raises(PackmaskError, match="end before it starts"):
        tree_mask_from_segments([[(0, 3, 1), (3, 2, -1)]], 6)
