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
    mask, _ = tree_mask([-1, 0], 3)  # a mask over 3 cached tokens
    with pytest.raises(PackmaskError, match="EncoderDecoderCache"):
        model(input_ids=torch.ones(1, 2, dtype=torch.long), attention_mask=mask[None],
              **{CACHE: EncoderDecoderCache(DynamicCache(), DynamicCache())})


def test_bad_segments():
    with pytest.raises(PackmaskError, match="overlap"):
        tree_mask_from_segments([[(0, 3, -1), (2, 2, -1)]], 6)
    with pytest.raises(PackmaskError, match="end before it starts"):
        tree_mask_from_segments([[(0, 3, 1), (3, 2, -1)]], 6)


# ---- the varlen decomposition, checked on CPU against a per-piece reference kernel -----------

def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size=(-1, -1), enable_gqa=False,
                      return_aux=None, **_):
    """What FlashAttention's varlen computes (bottom-right aligned causal / window), piece by piece,
    with its log-sum-exp in FlashAttention's ``[H, total_q]`` layout."""
    outs, lses = [], []
    rep = q.shape[1] // k.shape[1]
    for i in range(len(cu_q) - 1):
        qs = q[cu_q[i]:cu_q[i + 1]].float()
        ks = k[cu_k[i]:cu_k[i + 1]].repeat_interleave(rep, 1).float()
        vs = v[cu_k[i]:cu_k[i + 1]].repeat_interleave(rep, 1).float()
        Lq, Lk = qs.shape[0], ks.shape[0]
        s = torch.einsum("qhd,khd->hqk", qs, ks) * scale
        qi = torch.arange(Lq)[:, None] + (Lk - Lq)
        kj = torch.arange(Lk)[None]
        m = torch.ones(Lq, Lk, dtype=torch.bool)
        if window_size[1] == 0:
            m &= kj <= qi
        if window_size[0] >= 0:
            m &= qi - kj <= window_size[0]
        s = s.masked_fill(~m, float("-inf"))
        lse = torch.logsumexp(s, -1)
        p = torch.softmax(s, -1).nan_to_num(0.0)
        outs.append(torch.einsum("hqk,khd->qhd", p, vs).to(q.dtype))
        lses.append(lse)
    out, lse = torch.cat(outs), torch.cat(lses, 1)
    return (out, lse) if return_aux is not None else out


@pytest.mark.parametrize("grad, window, crop", [(True, None, False), (False, None, False), (True, 5, True)],
                         ids=["gathered-keys+backward", "cache-split-by-lse", "sliding-cropped-cache"])
def test_varlen_tree_decomposition_equals_dense_math(fake_varlen_kernel, grad, window, crop):
    from packmask.backends.spec import AttentionSpec
    from packmask.backends.varlen import tree_varlen_attention
    from packmask.backends.eager import eager_attention
    fake_varlen_kernel(_reference_varlen)
    torch.manual_seed(4)
    parents, past = torch.tensor([PARENTS, [-1, 0, 1, 1, -1, 4, 5, 3, 7, 7, 2, 0, 11, 12]]), [9, 0]  # row 1: none
    layout = TreeLayout.from_parents(parents, past)
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    kv = (window - 1 + N) if crop else K
    q = torch.randn(B, 4, N, 8, requires_grad=grad)
    k, v = (torch.randn(B, 2, kv, 8, requires_grad=grad) for _ in range(2))
    spec = AttentionSpec(scale=0.3, sliding_window=window)
    with torch.set_grad_enabled(grad):
        out = tree_varlen_attention(q, k, v, layout, spec)
        ref = eager_attention(q, k, v, layout.dense_mask(window, kv_len=kv), spec, False)
    assert ((("split", kv) in layout._memo) == (not grad))
    assert rel_err(out, ref) <= TOL
    if grad:
        g = torch.randn_like(ref)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
            assert rel_err(a, b) <= TOL
    # control: the pieces of another tree over the same keys give other outputs
    other = TreeLayout.from_parents(torch.full_like(parents, -1), past)
    with torch.no_grad():
        assert rel_err(tree_varlen_attention(q, k, v, other, spec), ref) > 1e-2


@pytest.mark.parametrize("window, kv_extra", [(None, 0), (7, -1), (None, 9)], ids=["cache", "sliding-crop", "static"])
def test_tree_block_mask_tiles_and_mask_mod(window, kv_extra):
    """The flex BlockMask built from the tree: mask_mod equals the dense mask, every visible pair lies
    in a listed tile, and every tile marked full is fully visible (a wrong full tile would leak)."""
    from packmask.backends.flex import tree_block_mask
    g = torch.Generator().manual_seed(5)
    parents = torch.stack([torch.tensor([-1] + [int(torch.randint(-1, i, (1,), generator=g)) for i in range(1, 45)])
                           for _ in range(2)])
    layout = TreeLayout.from_parents(parents, torch.tensor([70, 33]))
    B, N, K = layout.batch_size, layout.seq_len, layout.key_len
    kv = K + kv_extra if kv_extra >= 0 else window - 1 + N
    bs = 16
    bm = tree_block_mask(layout, kv, window, "cpu", block=bs)
    dense = layout.dense_mask(window, kv_len=kv)[:, 0]
    b, q, k = torch.arange(B)[:, None, None], torch.arange(N)[None, :, None], torch.arange(kv)[None, None, :]
    assert torch.equal(bm.mask_mod(b, None, q, k).expand_as(dense), dense)
    nqb, nkb = -(-N // bs), -(-kv // bs)
    grid = torch.zeros(B, nqb * bs, nkb * bs, dtype=torch.bool)
    grid[:, :N, :kv] = dense
    tiles = grid.view(B, nqb, bs, nkb, bs)
    listed = bm.to_dense()[:, 0].bool()
    assert not (tiles.any(4).any(2) & ~listed).any()
    full = torch.zeros(B, nqb, nkb + 1, dtype=torch.bool)
    idx = torch.where(torch.arange(nkb)[None, None] < bm.full_kv_num_blocks[:, 0, :, None],
                      bm.full_kv_indices[:, 0].long(), nkb)
    full.scatter_(2, idx, True)
    assert not (full[..., :nkb] & ~tiles.all(4).all(2)).any()
    if window is None:
        assert full.any()  # cache tiles are skipped from mask evaluation, not just listed


def test_dispatch_of_tree_layouts():
    """varlen and flex both run trees on CUDA (varlen first); the cost table, which prices documents,
    leaves trees to that order; the CPU takes sdpa, or eager for softcapping."""
    from packmask.backends import choose_backend, costs
    from packmask.backends.spec import AttentionSpec
    layout = TreeLayout.from_parents(torch.tensor([PARENTS]), PAST)
    q = torch.zeros(1, 4, len(PARENTS), 16)
    assert costs.choose_kernel(["varlen", "flex"], layout, q)[0] == "varlen"
    assert choose_backend(layout, AttentionSpec(scale=1.0), q, False) == "sdpa"
    assert choose_backend(layout, AttentionSpec(scale=1.0, softcap=30.0), q, False) == "eager"


def test_tree_layout_from_segments_errors_name_the_segment():
    with pytest.raises(PackmaskError, match=r"segment 1 \(row 0, start 5, length 3"):
        TreeLayout.from_segments([[(0, 3, -1), (5, 3, 0)]], 6)  # past the row's end
    with pytest.raises(PackmaskError, match=r"segments_per_row\[0\]\[1\].*index of a segment of the same row"):
        TreeLayout.from_segments([[(0, 3, -1), (3, 2, 4)]], 6)
    with pytest.raises(PackmaskError, match="same row"):  # a parent in another row (global arrays)
        TreeLayout.from_segment_arrays([0, 1], [0, 0], [3, 3], [-1, 0], 2, 4)


def test_tree_layout_from_segments_padding_rule():
    """Tokens no segment covers are a root chain per run (between segments too): the same rule as
    PackedCollator's row padding, one causal block."""
    layout = TreeLayout.from_segments([[(0, 2, -1), (4, 2, 0)], []], 7)
    assert layout.parent.tolist() == [[-1, 0, -1, 2, 1, 4, -1], [-1, 0, 1, 2, 3, 4, 5]]
    assert layout.position_ids.tolist() == [[0, 1, 0, 1, 2, 3, 0], [0, 1, 2, 3, 4, 5, 6]]
