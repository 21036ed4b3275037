"""Preference triples as TRL's ``DPOTrainer`` tokenizes them: ``{prompt, chosen, rejected}`` (text or
chat messages) -> ``prompt_ids / chosen_ids / rejected_ids``.

    >>> common_prefix([1, 2, 3], [1, 2, 4, 5])
    2
"""
from __future__ import annotations

import numpy as np

__all__ = ["tokenize_preference", "common_prefix"]


def tokenize_preference(example: dict, tokenizer) -> dict:
    """``{prompt, chosen, rejected}`` as text or chat messages -> ``prompt_ids / chosen_ids / rejected_ids``
    the way TRL's DPOTrainer tokenizes, so packed and unpacked training see the same tokens: EOS appended
    to text answers; messages rendered by the chat template (:func:`packmask.data.chat.tokenize_messages`
    for the conversations, the prompt with its generation prompt), each answer starting where the
    tokenized prompt and prompt+answer diverge."""
    if isinstance(example["prompt"], str):
        def ids(text):
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        eos = tokenizer.eos_token or ""
        chosen, rejected = (a if a.endswith(eos) else a + eos for a in (example["chosen"], example["rejected"]))
        prompt_ids, pc, pr = ids(example["prompt"]), ids(example["prompt"] + chosen), ids(example["prompt"] + rejected)
    else:
        from .chat import tokenize_messages

        pc, pr = (tokenize_messages(tokenizer, list(example["prompt"]) + list(example[k]), train_on="all")["input_ids"]
                  for k in ("chosen", "rejected"))   # validates the messages and the template
        prompt_ids = list(tokenizer.apply_chat_template(list(example["prompt"]), tokenize=True, return_dict=False,
                                                        add_generation_prompt=True))
    n = min(common_prefix(prompt_ids, pc), common_prefix(prompt_ids, pr))
    return {"prompt_ids": prompt_ids[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def common_prefix(a, b) -> int:
    """Length of the longest common prefix of two token lists."""
    m = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:m]) != np.asarray(b[:m]))
    return int(diff[0]) if diff.size else m
