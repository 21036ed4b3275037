"""Tree packing of preference pairs / completion groups, the tree collator and branch_logps."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import packmask
from packmask.data.logps import branch_logps, per_branch_padded
from packmask.data.tree_collator import TreeCollator
from packmask.errors import PackmaskError
from packmask.testing import rel_err, tiny_model

tokens = st.lists(st.integers(3, 127), min_size=1, max_size=12)
examples = st.lists(st.tuples(tokens, tokens, tokens), min_size=1, max_size=8)


def as_columns(exs):
    return {"prompt_ids": [e[0] for e in exs], "chosen_ids": [e[1] for e in exs], "rejected_ids": [e[2] for e in exs]}


def ancestors(parents, s):
    out = set()
    while s >= 0:
        out.add(s)
        s = parents[s]
    return out


@settings(max_examples=40, deadline=None)
@given(examples, st.integers(12, 40), st.sampled_from(["keep_start", "keep_end"]))
def test_tree_packing_properties(exs, max_length, mode):
    rows, stats = packmask.pack_preference(as_columns(exs), max_length, truncation_mode=mode, return_stats=True)
    if len(rows) == 0:  # every example dropped by the documented policy, and counted
        assert stats.dropped == len(exs) and stats.packed_examples == 0
        return
    batch = TreeCollator()(list(rows))
    seen = {}
    for r, row in enumerate(rows):
        n = len(row["input_ids"])
        assert n <= max_length                                              # nothing exceeds max_length
        starts = np.cumsum([0] + row["seg_lengths"][:-1])
        parents = row["seg_parents"]
        mask = batch["attention_mask"][r, :n, :n]
        seg_of = np.repeat(np.arange(len(starts)), row["seg_lengths"])
        for s, (start, length) in enumerate(zip(starts, row["seg_lengths"])):
            ex, kind = row["seg_examples"][s], row["seg_kinds"][s]
            key = (ex, kind)
            assert key not in seen                                          # every segment (token span) once
            seen[key] = row["input_ids"][start:start + length]
            visible = {int(seg_of[k]) for k in np.flatnonzero(mask[start + length - 1].numpy())}
            assert visible == ancestors(parents, s)                         # exactly its ancestors (and itself)
            p = parents[s]
            first_pos = 0 if p < 0 else row["position_ids"][starts[p] + row["seg_lengths"][p] - 1] + 1
            assert row["position_ids"][start:start + length] == list(range(first_pos, first_pos + length))
            if kind in (1, 2):
                assert row["position_ids"][start] == row["seg_lengths"][p]   # branches restart at len(prompt)
    kept = {e for e, _ in seen}
    assert len(kept) == stats.packed_examples == len(exs) - stats.dropped
    for e in kept:                                                         # tokens are the input's, cut per policy
        p, c, r = exs[e]
        got_p, got_c, got_r = seen[(e, 0)], seen[(e, 1)], seen[(e, 2)]
        assert got_c == c[:len(got_c)] and got_r == r[:len(got_r)] and got_p == p[len(p) - len(got_p):]
        if mode == "keep_start":
            assert got_p == p
    assert stats.tokens == sum(len(r["input_ids"]) for r in rows)


def test_groups_and_positions():
    rows = packmask.pack_groups({"prompt_ids": [[1, 2, 3]], "completion_ids": [[[4], [5, 6], [7, 8, 9]]]}, 16)
    assert rows[0]["position_ids"] == [0, 1, 2, 3, 3, 4, 3, 4, 5]
    batch = TreeCollator()(list(rows))
    assert batch["branch_length"].tolist() == [1, 2, 3]
    assert batch["logp_source"].tolist() == [2, 2, 4, 2, 6, 7]


def test_bad_input():
    good = [[1, 2], [3], [4]]
    with pytest.raises(PackmaskError, match="example 1.*empty"):
        packmask.pack_preference(as_columns([good, ([1, 2], [], [4])]), 16)
    with pytest.raises(PackmaskError, match="prompt is empty"):
        packmask.pack_preference(as_columns([([], [3], [4])]), 16)
    long_prompt = ([5] * 20, [3, 3], [4, 4])
    _, stats = packmask.pack_preference(as_columns([good, long_prompt]), 16, return_stats=True)
    assert stats.dropped == stats.dropped_prompt_too_long == 1 and stats.dropped_tokens == 24
    _, stats = packmask.pack_preference(as_columns([good, long_prompt]), 16, truncation_mode="keep_end", return_stats=True)
    assert stats.truncated == 1 and stats.truncated_tokens == 24 - 16 and stats.dropped == 0
    big = ([1] * 6, [2] * 8, [3] * 8)   # larger than a row
    with pytest.raises(PackmaskError, match="exceed max_length=16"):
        packmask.pack_preference(as_columns([big]), 16, overflow="error")
    rows, stats = packmask.pack_preference(as_columns([big, good]), 16, overflow="drop", return_stats=True)
    assert stats.dropped == 1 and stats.dropped_tokens == 22 and len(rows) == 1
    rows, stats = packmask.pack_preference(as_columns([big]), 16, return_stats=True)
    assert stats.truncated == 1 and rows[0]["seg_lengths"] == [6, 5, 5]
    same = ([1, 2], [3, 4], [3, 4])
    _, stats = packmask.pack_preference(as_columns([same, good]), 16, return_stats=True)
    assert stats.identical == 1 and stats.dropped == 0
    _, stats = packmask.pack_preference(as_columns([same, good]), 16, drop_identical=True, return_stats=True)
    assert stats.identical == 1 and stats.dropped == 1
    with pytest.raises(PackmaskError, match="overflow"):
        packmask.pack_preference(as_columns([good]), 16, overflow="split")


def alone_logps(model, prompt, answer):
    ids = torch.tensor([prompt + answer], device=model.device)
    logits = model(input_ids=ids).logits[0]
    lp = logits[len(prompt) - 1:-1].log_softmax(-1)
    return lp.gather(1, torch.tensor(answer, device=model.device)[:, None])[:, 0]


def test_branch_logps_equal_each_sequence_alone_and_control():
    check_branch_logps("cpu")


@pytest.mark.cuda
def test_branch_logps_equal_each_sequence_alone_and_control_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    check_branch_logps("cuda")


def check_branch_logps(device):
    rng = np.random.default_rng(0)
    exs = [tuple(rng.integers(3, 128, n).tolist() for n in lens) for lens in [(5, 4, 6), (3, 7, 2), (6, 3, 3)]]
    rows = packmask.pack_preference(as_columns(exs), 48)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in TreeCollator()(list(rows)).items()}
    model = tiny_model("llama").to(device)
    torch.manual_seed(0)
    out = branch_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             position_ids=batch["position_ids"]).logits, batch)
    kept = branch_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                              position_ids=batch["position_ids"], logits_to_keep=batch["logits_to_keep"]).logits, batch)
    reference = torch.cat([alone_logps(model, exs[e][0], exs[e][k]) for k, e in
                           zip(batch["branch_kind"].tolist(), batch["branch_example"].tolist())])
    assert rel_err(out.per_token, reference) < 1e-5 and rel_err(kept.per_token, reference) < 1e-5
    sums = torch.stack([alone_logps(model, exs[e][0], exs[e][k]).sum() for k, e in
                        zip(batch["branch_kind"].tolist(), batch["branch_example"].tolist())])
    assert rel_err(out.sums, sums) < 1e-5
    padded = per_branch_padded(out.per_token, batch)
    assert padded.shape == (6, int(batch["branch_length"].max()))
    # control 1: a plain causal mask over the row (rejected sees chosen) gives wrong log-probs
    N = batch["input_ids"].shape[1]
    causal = torch.ones(N, N, dtype=torch.bool, device=device).tril()[None]
    bad = branch_logps(model(input_ids=batch["input_ids"], attention_mask=causal,
                             position_ids=batch["position_ids"]).logits, batch)
    assert rel_err(bad.per_token, reference) > 1e-2
    # control 2: predicting r0 from the row predecessor (c[-1]) instead of its parent (p[-1]) is wrong
    shifted = dict(batch, logp_source=batch["logp_target"] - 1)
    wrong = branch_logps(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               position_ids=batch["position_ids"]).logits, shifted)
    assert rel_err(wrong.per_token, reference) > 1e-2


def test_text_through_tokenizer():
    pytest.importorskip("trl")
    from _trl_data import tiny_tokenizer

    tok = tiny_tokenizer()
    rows = packmask.pack_preference([{"prompt": "t5 t6", "chosen": " t7", "rejected": " t8 t9"}], 16, tokenizer=tok)
    assert rows[0]["input_ids"] == [5, 6, 7, 2, 8, 9, 2] and rows[0]["seg_lengths"] == [2, 2, 3]   # EOS added, like TRL


@st.composite
def forests(draw):
    """Random multi-level forests: every segment's parent is an earlier segment of its example or -1."""
    from packmask.data.tree import Forest

    segs, parents, example, scored = [], [], [], []
    for e in range(draw(st.integers(1, 4))):
        n = draw(st.integers(1, 5))
        for s in range(n):
            segs.append(draw(st.lists(st.integers(3, 127), min_size=1, max_size=5)))
            parents.append(draw(st.integers(-1, s - 1)))
            example.append(e)
            scored.append(draw(st.booleans()))
    return Forest.from_segments(segs, parents, example, [0] * len(segs), scored)


@settings(max_examples=30, deadline=None)
@given(forests())
def test_general_forest_mask_and_positions(forest):
    from packmask.data.tree import pack_forest
    from packmask.data.tree_collator import collate_forest

    packed = pack_forest(forest, 64)
    batch = collate_forest(packed)
    for r, segments in enumerate(packed.segments()):
        parents = [p for _, _, p in segments]
        depth_end = {}
        for s, (start, length, parent) in enumerate(segments):
            first = 0 if parent < 0 else depth_end[parent] + 1
            assert batch["position_ids"][r, start:start + length].tolist() == list(range(first, first + length))
            depth_end[s] = first + length - 1
            for q in range(start, start + length):
                allowed = set()
                for a in ancestors(parents, s):
                    a_start, a_len, _ = segments[a]
                    allowed |= set(range(a_start, min(a_start + a_len, q + 1)))
                assert set(np.flatnonzero(batch["attention_mask"][r, q].numpy()).tolist()) == allowed


def test_messages_through_chat_template():
    pytest.importorskip("trl")
    from _trl_data import tiny_tokenizer

    tok = tiny_tokenizer()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}{% if add_generation_prompt %}t3 {% endif %}"
    ex = {"prompt": [{"role": "user", "content": "t5 t6"}], "chosen": [{"role": "assistant", "content": "t7"}],
          "rejected": [{"role": "assistant", "content": "t8 t9"}]}
    rows = packmask.pack_preference([ex], 16, tokenizer=tok)
    # the generation prompt "t3" is not a prefix of prompt+answer: the answer starts where they diverge (TRL's rule)
    assert rows[0]["input_ids"] == [5, 6, 7, 8, 9] and rows[0]["seg_lengths"] == [2, 1, 2]


def test_branch_logps_chunked_equals_whole():
    """Chunks with activation checkpointing give the same values and gradients as one piece."""
    rows = packmask.pack_groups({"prompt_ids": [[1, 2, 3]], "completion_ids": [[[4, 5, 6], [7, 8], [9, 10, 11, 12]]]}, 32)
    batch = TreeCollator()(list(rows))
    grads = []
    for chunk in (1000, 3):
        logits = torch.randn(1, batch["input_ids"].shape[1], 20, generator=torch.Generator().manual_seed(0),
                             requires_grad=True)
        out = branch_logps(logits, batch, with_stats=True, chunk_size=chunk)
        (out.sums.sum() + out.entropy.sum()).backward()
        grads.append((out.per_token.detach(), out.entropy.detach(), logits.grad))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-6)
