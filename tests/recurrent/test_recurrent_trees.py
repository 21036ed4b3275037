"""Shared-prefix trees on hybrid / recurrent models: every branch == its root-to-leaf path run alone.

A packed batch of tree rows (two DPO-like ``prompt | chosen | rejected`` trees in row 0; an agentic
tree four levels deep and a plain sequence in row 1) runs once; the reference runs every
root-to-leaf path alone. fp32 CPU, relative error <= 1e-5 on the logits, the loss (every token
counted once, as in the packed row) and every parameter gradient. The control runs the same rows
with the mixers' original forwards (no reset: a branch continues from the previous branch's state),
which must differ by more than 1e-2.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

import packmask
from packmask import support
from packmask.layout_tree import TreeLayout
from packmask.recurrent import attention_free, configure, installed, uninstall
from packmask.recurrent.tree_paths import tree_paths
from packmask.testing import grad_rel_err, rel_err, tiny_model
from packmask.tiny_hybrid import HYBRID_FAMILIES

from _float64 import GATE_PARAMETERS, double, float64_everywhere  # tests/_float64.py

TOL = 1e-5
#: conv weights x16: random-init short convolutions barely mix, the control must see their reach
SHARPEN = 16

N = 22
#: per row, segments (start, length, parent segment): row 0 two DPO trees and one padding token; row 1 a
#: depth-4 agentic tree (root -> a -> b -> {c, d}; a -> e; root -> f) and a plain sequence
ROWS = [[(0, 4, -1), (4, 3, 0), (7, 5, 0), (12, 3, -1), (15, 2, 3), (17, 4, 3)],
        [(0, 3, -1), (3, 2, 0), (5, 3, 1), (8, 2, 2), (10, 3, 2), (13, 2, 1), (15, 4, 0), (19, 3, -1)]]
#: families whose attention cannot take a packed mask at all (see test_recurrent_families.REFUSED)
REFUSED = {"qwen4_exp_text", "inkling_text", "inkling2_text", "inkling2_loop_text"}
FAMILIES = sorted(f for f in HYBRID_FAMILIES if f in CONFIG_MAPPING_NAMES and f not in REFUSED)
#: the families the brief names (Gated DeltaNet, Mamba2 hybrid, pure SSM, short convolution): also in
#: the one-call-per-path mode and under gradient checkpointing
CORE = ["qwen3_5_text", "nemotron_h", "mamba", "lfm2"]


def root_to_leaf_paths(rows):
    """Per row, the token indices of every root-to-leaf path (test-side, by walking the parents)."""
    out = []
    for b, row in enumerate(rows):
        parents = {p for _, _, p in row}
        for k in range(len(row)):
            if k in parents:
                continue
            chain, j = [], k
            while j >= 0:
                chain.append(j)
                j = row[j][2]
            tokens = [t for j in reversed(chain) for t in range(row[j][0], row[j][0] + row[j][1])]
            out.append((b, tokens))
    return out


def _batch(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 100, (len(ROWS), N), generator=gen)
    labels = torch.randint(0, model.config.vocab_size, (len(ROWS), N), generator=gen)
    covered = torch.zeros(len(ROWS), N, dtype=torch.bool)
    for b, row in enumerate(ROWS):
        for s, n, _ in row:
            covered[b, s:s + n] = True
    mask, pos = packmask.tree_mask_from_segments(ROWS, N)
    return ids, labels, covered, mask, pos


def _packed(model, ids, labels, covered, mask, pos, **kwargs):
    """Logits and summed token loss of the packed tree rows (each covered token once)."""
    logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False, **kwargs).logits
    loss = F.cross_entropy(logits[covered], labels[covered], reduction="sum")
    return logits, loss


def _paths_alone(model, ids, labels):
    """Every root-to-leaf path run alone: the logits of each token, and the loss of each token counted
    once (in the first path that holds it, as the packed row counts it)."""
    expected = torch.zeros(len(ROWS), N, model.config.vocab_size, dtype=model.dtype)
    counted = torch.zeros(len(ROWS), N, dtype=torch.bool)
    loss = 0.0
    for b, tokens in root_to_leaf_paths(ROWS):
        idx = torch.tensor(tokens)
        logits = model(input_ids=ids[b, idx][None], use_cache=False).logits[0]
        new = ~counted[b, idx]
        loss = loss + F.cross_entropy(logits[new], labels[b, idx][new], reduction="sum")
        expected[b, idx[new]] = logits[new].detach()
        counted[b, idx] = True
    return expected, loss


#: lara_mini's gate parameters get a gradient that is a sum with heavy cancellation: in fp32 the tree and
#: the paths (same math, another summation order) differ by ~5e-5 there; in float64 everywhere they agree
#: to 1e-12 (test_gate_gradients_in_float64)
ILL_CONDITIONED = {"lara_mini": GATE_PARAMETERS}


def _grad_error(model, ref_model, family):
    """Worst relative gradient error; an ill-conditioned gate parameter is held to 10x the tolerance."""
    loose = ILL_CONDITIONED.get(family, ())
    worst, worst_name = 0.0, ""
    ref = dict(ref_model.named_parameters())
    for name, p in model.named_parameters():
        if p.grad is None and ref[name].grad is None:
            continue
        if (p.grad is None) != (ref[name].grad is None):
            return float("inf"), name
        err = rel_err(p.grad, ref[name].grad) if ref[name].grad.norm() > 0 or p.grad.norm() > 0 else 0.0
        err = err / 10 if any(part in name for part in loose) else err
        if err > worst:
            worst, worst_name = err, name
    return worst, worst_name


def _sharpen_convolutions(model):
    """Random-init short convolutions barely mix: make their reach visible to the control."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Conv1d):
                module.weight.mul_(SHARPEN)


def test_paths_of_the_test_rows():
    """The layout's paths (packmask) are the test's own walk of the parents, in the same order."""
    plan = tree_paths(TreeLayout.from_segments(ROWS, N))
    expected = [b * N + t for b, tokens in root_to_leaf_paths(ROWS) for t in tokens]
    padding = [N - 1]  # row 0's padding token: a path of its own
    got = [t for path in plan.paths for t in path.tolist()]
    assert sorted(got) == sorted(expected + padding)
    assert len(plan.paths) == len(root_to_leaf_paths(ROWS)) + 1
    assert max(len(tokens) for _, tokens in root_to_leaf_paths(ROWS)) == 11  # root, a, b, d: depth 4


@pytest.mark.parametrize("family", FAMILIES)
def test_tree_rows_equal_each_path_alone(family, monkeypatch):
    model = tiny_model(family).train() if family in CORE else tiny_model(family)
    _sharpen_convolutions(model)
    model.config.use_cache = False
    ref_model = copy.deepcopy(model)
    ids, labels, covered, mask, pos = _batch(model)
    logits, loss = _packed(model, ids, labels, covered, mask, pos)
    loss.backward()
    assert installed(model), f"{family}: the mixers run per path"
    expected, ref_loss = _paths_alone(ref_model, ids, labels)
    ref_loss.backward()
    assert rel_err(logits[covered], expected[covered]) <= TOL
    assert rel_err(loss, ref_loss) <= TOL
    err, name = _grad_error(model, ref_model, family)
    assert err <= TOL, f"{family}: {name} {err:.1e}"

    # control: the same rows through the mixers' original forwards (a branch continues the previous one's state)
    with torch.no_grad():
        assert uninstall(model) > 0
        monkeypatch.setattr(support, "_runs_per_sequence", lambda m: True)  # let the packed input through
        tree = {} if attention_free(model) else dict(attention_mask=mask)  # mamba & co. take no tree mask
        contaminated = model(input_ids=ids, position_ids=pos, use_cache=False, **tree).logits
    # the first tokens of rejected (after chosen) and of d (after c): a short convolution reaches only these
    worst = max(rel_err(contaminated[b, t], expected[b, t]) for b, t in ((0, 7), (0, 8), (1, 10), (1, 11)))
    assert worst > 1e-2, f"{family}: the control does not differ ({worst:.1e})"


@pytest.mark.parametrize("family", CORE)
def test_one_call_per_path_and_checkpointing(family):
    """The same comparison with one mixer call per path, and under gradient checkpointing (the recompute
    outside the forward runs the paths again)."""
    model = tiny_model(family).train()
    ref_model = copy.deepcopy(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids, labels, covered, mask, pos = _batch(model, seed=1)
    previous = configure(batched=False)
    try:
        logits, loss = _packed(model, ids, labels, covered, mask, pos)
        loss.backward()
    finally:
        configure(**previous)
    expected, ref_loss = _paths_alone(ref_model, ids, labels)
    ref_loss.backward()
    assert rel_err(logits[covered], expected[covered]) <= TOL and rel_err(loss, ref_loss) <= TOL
    err, name = grad_rel_err(model, ref_model)
    assert err <= TOL, name


def test_general_masks_and_trees_over_a_cache_stay_refused():
    model = tiny_model("qwen3_5_text")
    ids = torch.randint(3, 100, (1, 6))
    general = torch.tril(torch.ones(6, 6, dtype=torch.bool))
    general[4, 1] = False  # token 4 skips a token its parent sees: no forest
    with pytest.raises(packmask.UnsupportedModelError, match="general mask"):
        model(input_ids=ids, attention_mask=general[None], use_cache=False)
    cache = model(input_ids=ids[:, :3], use_cache=True).past_key_values
    tree, _ = packmask.tree_mask([-1, 0, 0, 1, 2, 2], past_length=3)
    with pytest.raises(packmask.PackmaskError, match="(?i)cache"):  # a draft tree after a recurrent cache
        model(input_ids=ids, attention_mask=tree[None], past_key_values=cache, use_cache=False)


@pytest.mark.parametrize("family", sorted(f for f in ILL_CONDITIONED if f in CONFIG_MAPPING_NAMES))
def test_gate_gradients_in_float64(family, monkeypatch):
    """In float64 throughout, the tree equals the paths to 1e-10 on every gradient, the ill-conditioned
    gates included: their fp32 difference is round-off, not a different computation."""
    float64_everywhere(monkeypatch)
    model = double(tiny_model(family))
    ref_model = copy.deepcopy(model)
    ids, labels, covered, mask, pos = _batch(model)
    logits, loss = _packed(model, ids, labels, covered, mask, pos)
    loss.backward()
    expected, ref_loss = _paths_alone(ref_model, ids, labels)
    ref_loss.backward()
    assert rel_err(logits[covered], expected[covered]) <= 1e-12
    err, name = grad_rel_err(model, ref_model)
    assert err <= 1e-10, f"{name} {err:.1e}"


_MODELS = {}


@settings(max_examples=6, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5), st.integers(-1, 6)), min_size=1, max_size=7))
def test_random_forests_equal_each_path_alone(spec):
    """Any forest in any token order (a child may come after other subtrees): every token's logits are
    those of its root-to-leaf path run alone (Qwen3.5: gated delta net + attention)."""
    if "model" not in _MODELS:
        _MODELS["model"] = tiny_model("qwen3_5_text")
    model = _MODELS["model"]
    row, at = [], 0
    for k, (length, parent) in enumerate(spec):
        row.append((at, length, parent if 0 <= parent < k else -1))
        at += length
    ids = torch.randint(3, 100, (1, at), generator=torch.Generator().manual_seed(at))
    mask, pos = packmask.tree_mask_from_segments([row], at)
    with torch.no_grad():
        packed = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False).logits[0]
        for _, tokens in root_to_leaf_paths([row]):
            alone = model(input_ids=ids[:, tokens], use_cache=False).logits[0]
            assert rel_err(packed[tokens], alone) <= TOL


@pytest.mark.parametrize("family", ["qwen3_5_text", "nemotron_h"])
def test_control_branches_from_a_zero_state(family, monkeypatch):
    """Second control: every segment run from a zero state (a branch that forgets its prompt, as per-document
    packing of the segments would do) differs from the paths alone."""
    from packmask.recurrent import segmented
    from packmask.recurrent.tree_paths import TreePaths

    def segments_alone(layout):
        seg = layout.segments()
        lengths = seg["length"]
        tokens = torch.arange(layout.batch_size * layout.seq_len)
        return TreePaths(paths=list(torch.split(tokens, lengths.tolist())),
                         spans=[(int(r), 0, int(n)) for r, n in zip(seg["row"], lengths)], tokens=tokens,
                         offsets=seg["cu_seqlens"].long(), source=tokens)

    model = tiny_model(family)
    ids, labels, covered, mask, pos = _batch(model)
    with torch.no_grad():
        expected, _ = _paths_alone(model, ids, labels)
        logits, _ = _packed(model, ids, labels, covered, mask, pos)
        assert rel_err(logits[covered], expected[covered]) <= TOL
        monkeypatch.setattr(segmented, "tree_paths", segments_alone)
        forgetful, _ = _packed(model, ids, labels, covered, mask, pos)
    answers = torch.zeros_like(covered)
    answers[0, 4:12], answers[1, 3:19] = True, True  # every non-root segment of the first tree and row 1
    assert rel_err(forgetful[answers], expected[answers]) > 1e-2
