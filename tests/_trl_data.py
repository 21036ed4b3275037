"""Offline word-level tokenizer and preference rows shared by the TRL, preference and trainer tests."""
from __future__ import annotations

import random

VOCAB = 128


def tiny_tokenizer():
    """A whitespace word-level tokenizer over ``t3 .. t127`` (offline; ids 0/1/2 are pad/bos/eos)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{f"t{i}": i for i in range(3, VOCAB)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


def text(rng, n):
    return " ".join(f"t{rng.randrange(3, VOCAB)}" for _ in range(n))


def preference_data(n=8, seed=0):
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        rows.append({"prompt": text(rng, rng.randint(2, 9)), "chosen": " " + text(rng, rng.randint(1, 8)),
                     "rejected": " " + text(rng, rng.randint(1, 8))})
    return rows


def counting_tree_calls(cls):
    """``cls`` (a packmask TRL trainer) counting its tree forwards (``_branch_logps``): the check that a
    comparison ran the tree path, not a fallback to TRL's own."""
    class Counting(cls):
        tree_calls = 0

        def _branch_logps(self, *args, **kwargs):
            type(self).tree_calls += 1
            return super()._branch_logps(*args, **kwargs)
    return Counting
