"""Multi-turn agent trajectories packed as trees (packmask.data.agentic): every root-to-leaf trajectory
gets the logits it gets alone, and the tree's loss (shared turns weighted by the trajectories through
them) and parameter gradients equal the sum over trajectories run one by one (fp32, tiny llama, CPU).
The tokenizer is built offline (word level, ChatML-style template)."""
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from packmask import PackmaskError
from packmask.data.agentic import conversation_forest, trajectories_from_message_tree
from packmask.data.chat import tokenize_messages
from packmask.data.tree import pack_forest
from packmask.data.tree_collator import collate_forest, token_parents
from packmask.testing import rel_err, tiny_model

SPECIAL = ["[UNK]", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
WORDS = "system user assistant tool be kind find the file ls cat grep ok done found nothing retry it a b c".split()


@pytest.fixture(scope="module")
def tok():
    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS)], trainers.WordLevelTrainer(special_tokens=SPECIAL))
    t = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", additional_special_tokens=SPECIAL[1:])
    t.chat_template = TEMPLATE
    return t


def m(role, content):
    return {"role": role, "content": content}


S, U = m("system", "be kind"), m("user", "find the file")
ROLLOUTS = [  # one rollout group forking at the first reply, at the tool result and at the last reply
    [S, U, m("assistant", "ls"), m("tool", "a b"), m("assistant", "cat a"), m("tool", "nothing"), m("assistant", "done")],
    [S, U, m("assistant", "ls"), m("tool", "a b"), m("assistant", "cat a"), m("tool", "nothing"), m("assistant", "retry")],
    [S, U, m("assistant", "ls"), m("tool", "a b"), m("assistant", "cat b"), m("tool", "found it"), m("assistant", "ok")],
    [S, U, m("assistant", "grep file"), m("tool", "c"), m("assistant", "cat c")],
]
TREE = {"messages": [dict(m("user", "find the file"), id="u", parent_id=None),
                     dict(m("assistant", "ls"), id="a1", parent_id="u"),
                     dict(m("assistant", "grep it"), id="a2", parent_id="u"),
                     dict(m("tool", "a"), id="t1", parent_id="a1"),
                     dict(m("assistant", "cat a"), id="a3", parent_id="t1")]}


def test_turn_trie_and_labels(tok):
    cf = conversation_forest([ROLLOUTS, TREE], tok)
    f = cf.forest
    # example 0: [S U] shared by 4, then the 3 + 1 split at the first reply; segments depth-first
    assert cf.paths_through[:3].tolist() == [4, 4, 3] and f.parent[:3].tolist() == [-1, 0, 1]
    # every trajectory's segments carry exactly its tokens, and the scored ones exactly its labels
    for e, trajs in enumerate([ROLLOUTS, trajectories_from_message_tree(TREE["messages"])]):
        for traj, segs in zip(trajs, cf.paths[e]):
            alone = tokenize_messages(tok, traj)
            toks = np.concatenate([f.tokens[f.seg_offsets[s]:f.seg_offsets[s + 1]] for s in segs]).tolist()
            scored = np.concatenate([np.full(f.seg_lengths[s], f.scored[s]) for s in segs])
            assert toks == alone["input_ids"]
            assert scored.tolist() == [lab != -100 for lab in alone["labels"]]
    shared = sum(f.seg_lengths)
    separate = sum(len(tokenize_messages(tok, t)["input_ids"]) for t in ROLLOUTS)
    assert shared < separate  # the control: shared turns are stored once


def _packed_columns(packed, cf, e, segs):
    """Row and columns of example ``e``'s forest segments ``segs`` in the packed rows."""
    local = np.flatnonzero(cf.forest.example == e)
    mine = np.flatnonzero(packed.seg_example == e)
    where = dict(zip(local.tolist(), mine.tolist()))
    rows = np.searchsorted(packed.seg_row_offsets, mine[0], side="right") - 1
    cols = np.concatenate([packed.seg_start[where[s]] + np.arange(packed.seg_length[where[s]]) for s in segs])
    return int(rows), cols


def test_each_trajectory_in_the_tree_equals_it_alone(tok):
    torch.manual_seed(0)
    cf = conversation_forest([ROLLOUTS, TREE], tok)
    packed = pack_forest(cf.forest, 256)
    batch = collate_forest(packed)
    N = batch["input_ids"].shape[1]
    model = tiny_model("llama", vocab_size=len(tok))
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"], use_cache=False)
    # tree loss: each scored token predicted at its tree parent, weighted by the trajectories through it
    seg_rows = np.repeat(np.arange(packed.num_rows), np.diff(packed.seg_row_offsets))
    parents = torch.from_numpy(token_parents(packed, seg_rows, N))
    weight = torch.zeros(packed.num_rows, N)
    through_packed = np.zeros(packed.seg_start.shape[0])
    for e in range(2):
        local, mine = np.flatnonzero(cf.forest.example == e), np.flatnonzero(packed.seg_example == e)
        through_packed[mine] = cf.paths_through[local] * cf.forest.scored[local]
    for s in range(packed.seg_start.shape[0]):
        weight[seg_rows[s], packed.seg_start[s]:packed.seg_start[s] + packed.seg_length[s]] = float(through_packed[s])
    logp = torch.log_softmax(out.logits, -1)
    src = parents.clamp(min=0)
    tok_logp = torch.gather(logp, 1, src[..., None].expand(-1, -1, logp.shape[-1])).gather(
        2, batch["input_ids"][..., None])[..., 0]
    tree_loss = -(tok_logp * weight * (parents >= 0)).sum()
    tree_loss.backward()
    tree_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    alone_loss = 0.0
    trajs = [ROLLOUTS, trajectories_from_message_tree(TREE["messages"])]
    for e in range(2):
        for traj, segs in zip(trajs[e], cf.paths[e]):
            one = tokenize_messages(tok, traj)
            ids, labels = torch.tensor([one["input_ids"]]), torch.tensor(one["labels"])
            logits = model(input_ids=ids, use_cache=False).logits
            row, cols = _packed_columns(packed, cf, e, segs)
            assert rel_err(out.logits[row, cols].detach(), logits[0].detach()) <= 1e-5
            lp = torch.log_softmax(logits[0, :-1], -1).gather(1, ids[0, 1:, None])[:, 0]
            alone_loss = alone_loss - (lp * (labels[1:] != -100)).sum()
    alone_loss.backward()
    assert rel_err(tree_loss.detach(), alone_loss.detach()) <= 1e-5 and alone_loss.item() > 1.0
    assert max(rel_err(tree_grads[n], p.grad) for n, p in model.named_parameters()) <= 1e-5
    # control: the same packed row under plain causal attention (no tree) is far from every path alone
    with torch.no_grad():
        plain = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits
    row, cols = _packed_columns(packed, cf, 0, cf.paths[0][2])
    assert rel_err(plain[row, cols], out.logits[row, cols].detach()) > 1e-2


def test_bad_inputs_are_named(tok):
    with pytest.raises(PackmaskError, match="parent_id"):
        conversation_forest([{"messages": [m("user", "a")]}], tok)
    with pytest.raises(PackmaskError, match="list of trajectories"):
        conversation_forest(["hello"], tok)
    rewrites = TEMPLATE.replace("{{ m['content'] }}<|im_end|>", "{% if loop.last %}{{ m['content'] }}{% endif %}<|im_end|>")
    tok2 = tok.__class__(tokenizer_object=tok.backend_tokenizer, unk_token="[UNK]", additional_special_tokens=SPECIAL[1:])
    tok2.chat_template = rewrites
    with pytest.raises(PackmaskError):
        conversation_forest([ROLLOUTS[:2]], tok2)
