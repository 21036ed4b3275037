"""Chat data: conversations (``[{"role": ..., "content": ...}, ...]``) to token ids and labels.

The tokenizer's own chat template renders the conversation; labels are the token ids on the
assistant's turns and ``-100`` everywhere else (``train_on="assistant"``, the default), or every token
(``train_on="all"``). The result packs like any tokenized dataset (:func:`packmask.pack_dataset`
carries ``labels`` token by token).

Which tokens belong to the assistant is found in one of two ways, tried in this order:

1. **Generation markers.** A template that wraps assistant text in ``{% generation %} ...
   {% endgeneration %}`` lets transformers return the exact mask
   (``apply_chat_template(..., return_assistant_tokens_mask=True)``, fast tokenizers). Exactly the
   marked tokens are labels.
2. **Prefix difference** (every other template). The conversation is rendered turn by turn: for the
   assistant message ``k``, the tokens after ``messages[:k]`` rendered with the generation prompt and
   up to ``messages[:k + 1]`` rendered are that turn's tokens -- the reply and whatever the template
   closes it with (end-of-turn token), but not the role header the generation prompt already wrote.
   This needs each shorter rendering to be a token prefix of the whole conversation; a template that
   rewrites earlier turns once later ones exist (e.g. drops old reasoning) fails that check and is
   refused with a :class:`~packmask.PackmaskError` naming the fix (add generation markers).

Worked example (a ChatML-style template, one token per word)::

    messages   [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello you"}]
    tokens     <im_start> user hi there <im_end> <im_start> assistant hello you <im_end>
    labels       -100     -100 -100 -100  -100     -100      -100     hello you <im_end>
                 \\_______________ prompt + generation prompt ______/ \\__ assistant turn __/
"""
from __future__ import annotations

import re
from typing import Any

from ..errors import PackmaskError

__all__ = ["tokenize_messages", "tokenize_chat_dataset", "TRAIN_ON", "IGNORE_INDEX"]

#: label value the loss ignores (transformers / PyTorch convention)
IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


def _check_args(tokenizer, train_on: str) -> str:
    if train_on not in TRAIN_ON:
        raise PackmaskError(f"train_on={train_on!r}: use 'assistant' (labels on assistant turns only) or 'all'.")
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: transformers uses "default"
        template = template.get("default")
    if not template:
        raise PackmaskError(
            f"{type(tokenizer).__name__} has no chat template, so conversations cannot be rendered. Use the tokenizer "
            f"of a chat/instruct model, or set tokenizer.chat_template = '<jinja template>' first.")
    return template


def _check_messages(messages: Any, where: str = "") -> None:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise PackmaskError(f"messages{where} must be a non-empty list of {{'role': ..., 'content': ...}} dicts, "
                            f"got {type(messages).__name__} {str(messages)[:60]!r}.")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not message["role"]:
            raise PackmaskError(f"message {i}{where} has no 'role' string (got {str(message)[:80]!r}); every message "
                                f"needs 'role' ('system', 'user', 'assistant', ...) and 'content'.")
        if message.get("content") is None and not message.get("tool_calls"):
            raise PackmaskError(f"message {i}{where} (role {message['role']!r}) has no 'content'; give it a string "
                                f"(an empty string for an empty turn).")


def _render_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(list(messages), tokenize=True, return_dict=False,
                                        add_generation_prompt=add_generation_prompt)
    return list(ids)


def _assistant_mask_by_prefixes(tokenizer, messages, ids: list[int], where: str) -> list[bool]:
    """Assistant tokens found by rendering the conversation turn by turn (see the module docstring)."""
    mask = [False] * len(ids)
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_ids(tokenizer, messages[:k], True) if k else []
        through = _render_ids(tokenizer, messages[:k + 1], False)
        for label, prefix_ids in (("before", before), ("through", through)):
            if ids[:len(prefix_ids)] != prefix_ids:
                raise PackmaskError(
                    f"the chat template renders the conversation{where} differently once later turns are added "
                    f"(the rendering {label} assistant message {k} is not a prefix of the whole), so assistant tokens "
                    f"cannot be located. Add {{% generation %}}...{{% endgeneration %}} around the assistant content in "
                    f"tokenizer.chat_template, or pass train_on='all'.")
        mask[len(before):len(through)] = [True] * max(0, len(through) - len(before))
    return mask


def tokenize_messages(tokenizer, messages, *, train_on: str = "assistant") -> dict:
    """Token ids and labels of one conversation, rendered by the tokenizer's chat template.

    Args:
        tokenizer: a transformers tokenizer with a ``chat_template``.
        messages: ``[{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]``.
        train_on: ``"assistant"`` (default): labels only on assistant turns, ``-100`` elsewhere;
            ``"all"``: labels on every token.

    Returns:
        ``{"input_ids": [...], "labels": [...]}`` (plain lists, same length; labels are not shifted:
        the model shifts them, as for any transformers causal LM).

    Raises:
        PackmaskError: the tokenizer has no chat template, a message is malformed, or (without
            generation markers) the template does not render turn by turn as a prefix.

    Example (``tok`` has a ChatML-style template; see :mod:`packmask.data.chat`)::

        >>> out = tokenize_messages(tok, [{"role": "user", "content": "hi"},      # doctest: +SKIP
        ...                               {"role": "assistant", "content": "hello"}])
        >>> tok.convert_ids_to_tokens(out["input_ids"])                           # doctest: +SKIP
        ['<|im_start|>', 'user', 'hi', '<|im_end|>', '<|im_start|>', 'assistant', 'hello', '<|im_end|>']
        >>> out["labels"][-2:] == out["input_ids"][-2:], set(out["labels"][:-2])  # doctest: +SKIP
        (True, {-100})

    (skipped as doctests: they need a tokenizer, which the tests build offline in tests/data/test_chat.py)
    """
    template = _check_args(tokenizer, train_on)
    _check_messages(messages)
    return _tokenize_one(tokenizer, messages, train_on, bool(_GENERATION_TAG.search(template)), "")


def _tokenize_one(tokenizer, messages, train_on: str, has_generation_tags: bool, where: str) -> dict:
    messages = list(messages)
    # transformers maps generation markers to tokens through a fast tokenizer's offsets
    if has_generation_tags and train_on == "assistant" and getattr(tokenizer, "is_fast", False):
        out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=True)
        ids, mask = list(out["input_ids"]), [bool(m) for m in out["assistant_masks"]]
    else:
        ids = _render_ids(tokenizer, messages, False)
        if train_on == "all":
            return {"input_ids": ids, "labels": list(ids)}
        mask = _assistant_mask_by_prefixes(tokenizer, messages, ids, where)
    labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask)]
    return {"input_ids": ids, "labels": labels}


def tokenize_chat_dataset(dataset, tokenizer, *, column: str = "messages", train_on: str = "assistant",
                          num_proc: int | None = None):
    """Tokenize a :class:`datasets.Dataset` (or ``IterableDataset``) of conversations.

    Each row's ``column`` (a list of ``{"role", "content"}`` dicts) becomes ``input_ids`` and
    ``labels`` as in :func:`tokenize_messages`; ``column`` itself is removed, other columns are kept.
    Runs as a batched ``dataset.map``. The result is ready for :func:`packmask.pack_dataset`.

    Example::

        >>> ds = Dataset.from_dict({"messages": [[{"role": "user", "content": "hi"},   # doctest: +SKIP
        ...                                       {"role": "assistant", "content": "hello"}]]})
        >>> packmask.pack_dataset(tokenize_chat_dataset(ds, tok), 4096)                # doctest: +SKIP
    """
    template = _check_args(tokenizer, train_on)
    names = getattr(dataset, "column_names", None)
    if names is not None and column not in names:
        raise PackmaskError(f"column {column!r} not found (columns: {names}); pass column=<the column holding the "
                            f"list of messages>.")
    clashes = [c for c in ("input_ids", "labels") if names is not None and c in names]
    if clashes:
        raise PackmaskError(f"the dataset already has {clashes}; remove them first (dataset.remove_columns({clashes})) "
                            f"so the chat tokens are not mixed with older ones.")
    has_tags = bool(_GENERATION_TAG.search(template))

    def tokenize_batch(batch, indices):
        out = {"input_ids": [], "labels": []}
        for messages, index in zip(batch[column], indices):
            where = f" of row {index}"
            _check_messages(messages, where)
            one = _tokenize_one(tokenizer, messages, train_on, has_tags, where)
            out["input_ids"].append(one["input_ids"])
            out["labels"].append(one["labels"])
        return out

    kwargs = dict(batched=True, with_indices=True, remove_columns=[column])
    if num_proc is not None:
        kwargs["num_proc"] = num_proc
    return dataset.map(tokenize_batch, **kwargs)
