"""How the generic recurrent path groups packed sequences into right-padded calls (recurrent/batched.py):
the cost-model partition is contiguous in sorted order, covers every sequence once, and is the cheapest
one (against every set partition for small n, an O(n^2) reference DP, the former 0.75-ratio rule, one
call, one call per sequence); a group of very different lengths stays exact (logits, loss, gradients)."""
import math
from itertools import combinations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from packmask import PackmaskError
from packmask.recurrent import configure
from packmask.recurrent.batched import call_overhead_rows_for, cheapest_groups, groups_cost, length_groups
from packmask.testing import pack_rows, rel_err, tiny_model

OVERHEADS = st.one_of(st.integers(0, 40), st.floats(0, 40, allow_nan=False), st.sampled_from([0.5, 8.0]))
LENGTHS = st.lists(st.integers(1, 300), min_size=1, max_size=40)


def _spans(lengths):
    spans, at = [], 0
    for n in lengths:
        spans.append((0, at, at + n))
        at += n
    return spans


def _price(groups, overhead):
    """Price of a set partition (groups of lengths): each group padded to its longest."""
    return sum((overhead + len(g)) * max(g) for g in groups)


def _close_or_below(price, reference):
    return price <= reference + 1e-9 * max(1.0, abs(reference))


def _ratio_groups(sorted_lengths, ratio=0.75):
    """The former rule, as a reference: a length joins the group when >= ratio of its longest."""
    groups = []
    for n in sorted_lengths:
        if groups and n >= ratio * groups[-1][0]:
            groups[-1].append(n)
        else:
            groups.append([n])
    return groups


def _quadratic_dp(lengths, overhead):
    """The plain O(n^2) dynamic program: the least price of contiguous groups of sorted lengths."""
    best = [0.0] + [math.inf] * len(lengths)
    for j in range(1, len(lengths) + 1):
        best[j] = min(best[i] + (overhead + j - i) * lengths[i] for i in range(j))
    return best[-1]


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for size in range(len(rest) + 1):
        for chosen in combinations(range(len(rest)), size):
            group = [first] + [rest[k] for k in chosen]
            others = [rest[k] for k in range(len(rest)) if k not in chosen]
            for partition in _set_partitions(others):
                yield [group] + partition


@settings(max_examples=60, deadline=None)
@given(LENGTHS, OVERHEADS)
def test_groups_are_contiguous_in_sorted_order_and_cover_every_span_once(lengths, overhead):
    spans = _spans(lengths)
    groups = length_groups(spans, overhead)
    members = [i for group, _ in groups for i in group]
    assert members == sorted(range(len(spans)), key=lambda i: -lengths[i])  # stable, longest first, each once
    for group, longest in groups:
        assert group and longest == lengths[group[0]] == max(lengths[i] for i in group)


@settings(max_examples=80, deadline=None)
@given(LENGTHS, OVERHEADS)
def test_partition_is_no_dearer_than_the_ratio_rule_one_call_or_one_call_each(lengths, overhead):
    ordered = sorted(lengths, reverse=True)
    cuts = cheapest_groups(ordered, overhead)
    assert cuts[0] == 0 and cuts[-1] == len(ordered) and all(a < b for a, b in zip(cuts, cuts[1:]))
    price = groups_cost(ordered, cuts, overhead)
    assert price == pytest.approx(_price([ordered[a:b] for a, b in zip(cuts, cuts[1:])], overhead))
    for ratio in (0.5, 0.75, 0.9):
        assert _close_or_below(price, _price(_ratio_groups(ordered, ratio), overhead))
    assert _close_or_below(price, _price([ordered], overhead))  # one call
    assert _close_or_below(price, _price([[n] for n in ordered], overhead))  # one call per sequence
    assert price == pytest.approx(_quadratic_dp(ordered, overhead), rel=1e-9, abs=1e-9)  # the hull = the plain DP


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 12), min_size=1, max_size=7), OVERHEADS)
def test_partition_is_the_cheapest_of_all_set_partitions(lengths, overhead):
    """Brute force over every set partition (not only contiguous ones): none is cheaper."""
    ordered = sorted(lengths, reverse=True)
    price = groups_cost(ordered, cheapest_groups(ordered, overhead), overhead)
    cheapest = min(_price(p, overhead) for p in _set_partitions(lengths))
    assert price == pytest.approx(cheapest, rel=1e-9, abs=1e-9)


def test_price_moves_the_cuts():
    """The control of the properties above: the price decides (CPU tight groups, CUDA few calls)."""
    lengths = [1218, 1092, 858, 745, 548, 534, 527, 445, 320, 319, 300, 270, 145, 141, 128, 118, 86, 59]
    counts = [len(cheapest_groups(lengths, c)) - 1 for c in (0, 0.5, 8, 1000)]
    assert counts[0] >= counts[1] > counts[2] > counts[3] == 1
    assert cheapest_groups(lengths, 0) == [0] + list(range(1, len(lengths) + 1))  # no price: no padding at all


def test_device_defaults_and_configure_validation():
    assert call_overhead_rows_for("cpu") < call_overhead_rows_for("cuda") == call_overhead_rows_for("mps")
    previous = configure(call_overhead_rows=3)
    try:
        assert previous["call_overhead_rows"] == "auto"
        assert configure(call_overhead_rows=2.5)["call_overhead_rows"] == 3
        refusal = r'configure\(call_overhead_rows=...\) takes "auto" or a number >= 0, got '
        for bad in (-1, float("nan"), float("inf"), True, "8", "fast", [8]):
            with pytest.raises(PackmaskError, match=refusal) as err:
                configure(call_overhead_rows=bad)
            assert "\n" not in str(err.value)
        assert configure(call_overhead_rows="auto")["call_overhead_rows"] == 2.5
    finally:
        configure(**previous)


LONG, SHORT = 70, 3  # one group: the short one padded with 67 zeros, across the kernels' chunks (8 / 64 tokens)


@pytest.mark.parametrize("family", ["qwen3_5_text", "mamba2"])
def test_a_group_of_very_different_lengths_is_exact(family):
    """A price high enough to put 70 and 3 tokens in one call: logits, loss and every parameter gradient
    equal each document alone (fp32); control: the same row with no reset differs."""
    model = tiny_model(family).train()
    seq_lengths = [[LONG, SHORT]]
    slices, _ = pack_rows(seq_lengths, LONG + SHORT)
    ids = torch.randint(3, 100, (1, LONG + SHORT), generator=torch.Generator().manual_seed(0))
    labels = torch.full_like(ids, -100)
    for b, s, n in slices:
        labels[b, s + 1:s + n] = ids[b, s + 1:s + n]
    assert length_groups(_spans([LONG, SHORT]), 100) == [([0, 1], LONG)]

    model.zero_grad(set_to_none=True)
    parts = [model(input_ids=ids[:, s:s + n], labels=labels[:, s:s + n], use_cache=False) for _, s, n in slices]
    alone_logits = torch.cat([p.logits for p in parts], 1)
    alone_loss = sum(p.loss * (n - 1) for p, (_, _, n) in zip(parts, slices)) / sum(n - 1 for _, _, n in slices)
    alone_loss.backward()
    alone_grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}

    previous = configure(call_overhead_rows=100, cap_calls=False)  # 2 x 70 slots > the row's 73: uncapped
    calls = []
    try:
        model.zero_grad(set_to_none=True)
        model(input_ids=ids, seq_lengths=seq_lengths, use_cache=False)  # installs the mixers' forwards
        for module in model.modules():  # count each mixer's calls and their [G, L] (hidden states first)
            wrapper = module.__dict__.get("forward")
            if hasattr(wrapper, "original"):
                def counted(*a, _original=wrapper.original, **k):
                    calls.append(tuple((a or tuple(k.values()))[0].shape[:2]))
                    return _original(*a, **k)
                wrapper.original = counted
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=labels, seq_lengths=seq_lengths, use_cache=False)
        out.loss.backward()
    finally:
        configure(**previous)
    assert calls and all(shape[0] == 2 and shape[1] >= LONG for shape in calls), calls  # one call of both
    packed_grads = {k.replace(".inner.", "."): p.grad for k, p in model.named_parameters() if p.grad is not None}
    assert rel_err(out.logits, alone_logits) <= 1e-5
    assert rel_err(out.loss, alone_loss) <= 1e-5
    assert packed_grads.keys() == alone_grads.keys()
    assert max(rel_err(packed_grads[k], alone_grads[k]) for k in alone_grads if alone_grads[k].norm() > 0) <= 1e-5

    with torch.no_grad():  # control: the same row with no reset carries the long document's state into the short
        contaminated = model(input_ids=ids, use_cache=False).logits
    assert rel_err(contaminated[:, LONG:], alone_logits[:, LONG:]) > 1e-2


@settings(max_examples=60, deadline=None)
@given(LENGTHS, OVERHEADS, st.integers(1, 2000))
def test_capped_groups_fit_and_cover_every_span_once(lengths, overhead, cap):
    """No call holds more than ``max_call_tokens`` slots unless it is one sequence; each span once."""
    groups = length_groups(_spans(lengths), overhead, cap)
    members = sorted(i for g, _ in groups for i in g)
    assert members == list(range(len(lengths)))
    for g, longest in groups:
        assert longest == max(lengths[i] for i in g)
        assert len(g) == 1 or len(g) * longest <= cap


def test_cap_splits_what_the_price_merges():
    spans = _spans([100] * 10)
    assert [len(g) for g, _ in length_groups(spans, 8)] == [10]  # control: uncapped, one call of 1000 slots
    assert [len(g) for g, _ in length_groups(spans, 8, 300)] == [3, 3, 3, 1]


def test_mixer_kinds_price_calls():
    """Mamba2's state-space duality and short convolutions run every token at once ('vectorized'); gated
    delta rules and Mamba1 loop ('looped'). On CUDA a looped call costs far more than a vectorized one."""
    from packmask.recurrent.detect import find_mixers, mixer_kind
    kinds = {fam: {mixer_kind(m) for _, m in find_mixers(tiny_model(fam))} for fam in ("qwen3_5_text", "mamba2", "mamba")}
    assert kinds == {"qwen3_5_text": {"looped"}, "mamba2": {"vectorized"}, "mamba": {"looped"}}
    assert call_overhead_rows_for("cuda", kind="vectorized") < 1 < call_overhead_rows_for("cuda", kind="looped")
    assert call_overhead_rows_for("cuda", 3, kind="vectorized") == 3  # a number set by configure wins
