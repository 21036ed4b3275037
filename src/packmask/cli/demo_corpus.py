"""The demo's data: the embedded corpus of standard-library docstrings and the byte-level BPE tokenizer
trained on it offline (``packmask demo``, and ``--tokenizer packmask-demo`` of the other commands).
"""
from __future__ import annotations

import gzip
import json
from importlib import resources

__all__ = ["load_demo_corpus", "build_demo_tokenizer", "tokenize_documents", "CORPUS_FILE", "EOS_TOKEN", "PAD_TOKEN"]

CORPUS_FILE = "stdlib_docstrings.jsonl.gz"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<|pad|>"


def load_demo_corpus() -> list[dict]:
    """The embedded corpus: ``[{"source": "json.dumps", "text": "Serialize ``obj`` ..."}, ...]``.

    >>> docs = load_demo_corpus()
    >>> len(docs) > 3000 and sorted(docs[0])
    ['source', 'text']
    """
    path = resources.files("packmask.cli") / "corpus" / CORPUS_FILE
    with path.open("rb") as raw, gzip.open(raw, "rt", encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def build_demo_tokenizer(texts: list[str] | None = None, vocab_size: int = 1536):
    """A byte-level BPE tokenizer trained offline on ``texts`` (default: the demo corpus).

    Byte-level means every string round-trips, whatever its characters. Training is
    deterministic for the same texts and vocabulary size, and takes well under a second on the
    demo corpus, so callers rebuild it instead of caching files.

    >>> tok = build_demo_tokenizer()
    >>> ids = tok("Return the sum of a and b.")["input_ids"]
    >>> tok.decode(ids)
    'Return the sum of a and b.'
    >>> tok.eos_token, tok.pad_token
    ('<|endoftext|>', '<|pad|>')
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if texts is None:
        texts = [doc["text"] for doc in load_demo_corpus()]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, PAD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN, model_max_length=1 << 20
    )


def tokenize_documents(tokenizer, texts: list[str], max_length: int | None = None) -> list[list[int]]:
    """Token ids of each text followed by EOS, truncated to ``max_length`` (EOS kept last).

    >>> tok = build_demo_tokenizer()
    >>> [ids[-1] == tok.eos_token_id for ids in tokenize_documents(tok, ["a b", "c"], 8)]
    [True, True]
    """
    eos = tokenizer.eos_token_id
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    if max_length is None:
        return [ids + [eos] for ids in encoded]
    return [ids[: max_length - 1] + [eos] for ids in encoded]
