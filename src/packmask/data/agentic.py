"""Multi-turn agent trajectories as trees: shared turns once, every fork a branch.

A rollout group of an agent forks at every tool call or turn, so its trajectories share prefixes of
whole messages. :func:`conversation_forest` takes them straight from conversation data — a list of
trajectories (message lists) per example, or messages with ``id`` / ``parent_id`` — merges equal
turn prefixes (a trie over messages), renders every turn with the tokenizer's chat template and
labels assistant turns only. The result is a :class:`~packmask.data.tree.Forest` for
:func:`~packmask.data.tree.pack_forest` / :func:`~packmask.data.tree_collator.collate_forest`, in
depth-first order (what the one-launch tree kernel reads fastest).

Worked example — two trajectories sharing the system/user turns and the first reply, forking at
the second user turn (one segment per turn; an assistant turn is its unlabelled role header, then
its labelled reply)::

    trajectory 0   S U1 A1 U2  A2            trie   S-U1-A1 ─┬─ U2 - A2
    trajectory 1   S U1 A1 U2' A2'                           └─ U2' - A2'
    segments       [S U1] [hdr] [A1] [U2] [hdr] [A2] [U2'] [hdr] [A2']   (depth-first)
    scored               .      1     .     .    1     .     .     1     (assistant replies)
    paths_through   2     2     2     1     1    1     1     1     1     (trajectories through it)

Turn boundaries come from rendering each turn prefix of a trajectory: the rendering of its first
``j`` messages must be a token prefix of the whole (a template that rewrites earlier turns once later
ones exist cannot be split into shared turns and is refused, naming the fix). Labels come from
:func:`packmask.data.chat.tokenize_messages` (generation markers, else turn-by-turn differences).

Weighting every scored segment by ``paths_through`` makes a summed tree loss equal to the sum of
the trajectories' losses run one by one (tests/data/test_agentic.py checks logits, loss and
gradients against that).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from ..errors import PackmaskError
from .chat import IGNORE_INDEX, tokenize_messages
from .tree import Forest, PackedForest, pack_forest

__all__ = ["ConversationForest", "conversation_forest", "pack_conversations", "trajectories_from_message_tree"]

_TREE_KEYS = ("id", "parent_id")


@dataclass
class ConversationForest:
    """A :class:`Forest` of conversation trees plus, per segment, how many trajectories pass through it
    and, per example, each trajectory's segments (root to leaf, global segment indices)."""

    forest: Forest
    paths_through: np.ndarray
    paths: list[list[list[int]]]


def trajectories_from_message_tree(messages: list[dict]) -> list[list[dict]]:
    """Root-to-leaf message lists of a conversation tree given as messages with ``id`` and ``parent_id``
    (``None`` for the root; parents before children not required). ``id``/``parent_id`` are dropped.

    >>> msgs = [{"id": 0, "parent_id": None, "role": "user", "content": "q"},
    ...         {"id": 1, "parent_id": 0, "role": "assistant", "content": "a"},
    ...         {"id": 2, "parent_id": 0, "role": "assistant", "content": "b"}]
    >>> [[m["content"] for m in t] for t in trajectories_from_message_tree(msgs)]
    [['q', 'a'], ['q', 'b']]
    """
    by_id, children = {}, {}
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "id" not in m or "parent_id" not in m:
            raise PackmaskError(f"message {i} of a conversation tree needs 'id' and 'parent_id' (None for the root), "
                                f"got {str(m)[:80]!r}.")
        if m["id"] in by_id:
            raise PackmaskError(f"message {i}: id {m['id']!r} appears twice in one conversation tree.")
        by_id[m["id"]] = m
    for m in messages:
        if m["parent_id"] is not None and m["parent_id"] not in by_id:
            raise PackmaskError(f"message {m['id']!r} has parent_id {m['parent_id']!r}, which is not in the tree.")
        children.setdefault(m["parent_id"], []).append(m["id"])
    paths, stack = [], [[r] for r in reversed(children.get(None, []))]
    while stack:
        path = stack.pop()
        kids = children.get(path[-1], [])
        if len(path) > len(by_id):
            raise PackmaskError("the conversation tree's parent_id links form a cycle.")
        if not kids:
            paths.append([{k: v for k, v in by_id[i].items() if k not in _TREE_KEYS} for i in path])
        stack.extend(path + [c] for c in reversed(kids))
    if not paths:
        raise PackmaskError("a conversation tree has no root (a message with parent_id None).")
    return paths


def _render(tokenizer, messages) -> list[int]:
    return list(tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False,
                                              add_generation_prompt=False))


def _turn_tokens(tokenizer, path, train_on: str, where: str):
    """Per message of ``path``: its ``(token ids, labels)`` in the whole rendering."""
    whole = tokenize_messages(tokenizer, path, train_on=train_on)
    ids, labels = whole["input_ids"], whole["labels"]
    bounds = [0]
    for j in range(1, len(path)):
        prefix = _render(tokenizer, path[:j])
        if ids[:len(prefix)] != prefix:
            raise PackmaskError(
                f"the chat template renders {where} differently once message {j} is added (the first {j} messages "
                f"are not a token prefix of the whole), so shared turns cannot be cut at message boundaries. Use a "
                f"template that renders turn by turn (no rewriting of earlier turns), or pack each trajectory alone.")
        bounds.append(len(prefix))
    bounds.append(len(ids))
    return [(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]


def _runs(labels: list[int]) -> list[tuple[int, int, bool]]:
    """``(start, end, scored)`` runs of labelled / unlabelled tokens."""
    out, start = [], 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or (labels[i] != IGNORE_INDEX) != (labels[start] != IGNORE_INDEX):
            out.append((start, i, labels[start] != IGNORE_INDEX))
            start = i
    return out


def _key(message) -> str:
    return json.dumps(message, sort_keys=True, default=str)


def conversation_forest(examples, tokenizer, *, train_on: str = "assistant") -> ConversationForest:
    """Build conversation trees from ``examples``: each a list of trajectories (lists of messages) that
    may share leading turns, or a ``{"messages": [...]}`` tree with ``id`` / ``parent_id`` per message.

    Equal leading turns (same role, content and other fields, in the same order) become one segment
    run once; every turn's tokens are the chat template's rendering of it in context. Labels: the
    assistant replies (``train_on="assistant"``) or every token (``"all"``); an assistant turn is
    split into its unlabelled header segment and its labelled reply segment.
    """
    segments, parents, example_of, scored, through, all_paths = [], [], [], [], [], []
    for e, example in enumerate(examples):
        if isinstance(example, dict) and "messages" in example:
            trajectories = trajectories_from_message_tree(example["messages"])
        elif isinstance(example, (list, tuple)) and example and all(isinstance(t, (list, tuple)) for t in example):
            trajectories = [list(t) for t in example]
        else:
            raise PackmaskError(f"example {e}: give a list of trajectories (each a list of messages) or "
                                f"{{'messages': [...]}} with 'id' and 'parent_id' per message; "
                                f"got {str(example)[:80]!r}.")
        # trie over messages: node = (parent node, message); children in first-seen order
        node_of, children, turn, node_path = {}, {-1: []}, [], []
        for t, path in enumerate(trajectories):
            if not path:
                raise PackmaskError(f"example {e}, trajectory {t} has no messages.")
            cuts = _turn_tokens(tokenizer, path, train_on, f"example {e}, trajectory {t}")
            parent, nodes = -1, []
            for message, (ids, labels) in zip(path, cuts):
                key = (parent, _key(message))
                if key not in node_of:
                    node_of[key] = len(turn)
                    turn.append([ids, labels, 0])
                    children[parent].append(node_of[key])
                    children[node_of[key]] = []
                node = node_of[key]
                if turn[node][0] != ids or turn[node][1] != labels:
                    raise PackmaskError(f"example {e}, trajectory {t}: a shared turn renders to other tokens here than "
                                        f"in an earlier trajectory; the template is not turn-local.")
                turn[node][2] += 1
                nodes.append(node)
                parent = node
            node_path.append(nodes)
        # depth-first order; every turn becomes 1+ segments (runs of labelled / unlabelled tokens)
        first_seg, last_seg, local = {}, {}, 0
        base = len(segments)
        stack = list(reversed(children[-1]))
        parent_node = {c: p for p, cs in children.items() for c in cs}
        while stack:
            node = stack.pop()
            ids, labels, count = turn[node]
            prev = last_seg.get(parent_node[node], -1)
            first_seg[node] = local
            for a, b, is_scored in _runs(labels):
                segments.append(ids[a:b])
                parents.append(prev)
                example_of.append(e)
                scored.append(is_scored)
                through.append(count)
                prev = local
                local += 1
            last_seg[node] = prev
            stack.extend(reversed(children[node]))
        all_paths.append([[base + s for n in nodes for s in range(first_seg[n], last_seg[n] + 1)]
                          for nodes in node_path])
    forest = Forest.from_segments(segments, parents, example_of, [int(s) for s in scored], scored)
    return ConversationForest(forest, np.asarray(through, np.int64), all_paths)


def pack_conversations(examples, tokenizer, max_length: int, *, train_on: str = "assistant") -> PackedForest:
    """:func:`conversation_forest` packed into rows of at most ``max_length`` tokens (whole trees per row)."""
    return pack_forest(conversation_forest(examples, tokenizer, train_on=train_on).forest, max_length)
