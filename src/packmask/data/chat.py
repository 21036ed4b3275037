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

__all__ = ["tokenize_messages", "tokenize_chat_dataset", "messages_problem", "template_roles", "ChatRowError", "TRAIN_ON",
           "IGNORE_INDEX", "ROLES", "MESSAGES_FIX"]

#: label value the loss ignores (transformers / PyTorch convention)
IGNORE_INDEX = -100
TRAIN_ON = ("assistant", "all")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
#: message roles the chat templates of transformers models use (``ipython``: Llama 3.1 tool output)
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
MESSAGES_FIX = ('each message needs "role" (one of ' + ", ".join(ROLES) + ', or a role the chat template names) and '
                '"content" (a string, or a list of content parts; null only beside "tool_calls")')
_ROLE_TEST = re.compile(r"""role['"]?\]?\s*[!=]=\s*['"]([\w-]+)['"]""")


def template_roles(template) -> tuple[str, ...]:
    """:data:`ROLES` plus the roles a chat template compares against (``message['role'] == 'document'``),
    so a template's own roles are known roles.

    >>> template_roles("{% if m['role'] == 'document' %}...{% elif m.role != 'system' %}")[-2:]
    ('ipython', 'document')
    """
    if isinstance(template, dict):  # several named templates
        template = " ".join(t for t in template.values() if isinstance(t, str))
    found = _ROLE_TEST.findall(template) if isinstance(template, str) else []
    return ROLES + tuple(dict.fromkeys(r for r in found if r not in ROLES))


class ChatRowError(PackmaskError):
    """A conversation of :func:`tokenize_chat_dataset` is malformed or rejected by the chat template;
    ``row`` is its index in the dataset (``dataset[row]``), ``problem`` what is wrong."""

    def __init__(self, row: int, problem: str, fix: str):
        super().__init__(f"row {row} (dataset[{row}]): {problem}; {fix}")
        self.row, self.problem, self.fix = row, problem, fix


def _kind(value) -> str:
    """``an int (42)``, ``a str ('hi')``, ``a dict``: how a wrong value is named in an error."""
    if value is None:
        return "null"
    kind = type(value).__name__
    article = "an" if kind[0] in "aeiou" else "a"
    return f"{article} {kind}" if isinstance(value, (list, dict)) else f"{article} {kind} ({repr(value)[:40]})"


def messages_problem(messages: Any, name: str = "messages", roles: tuple[str, ...] = ROLES) -> str | None:
    """What is wrong with one conversation, naming the field (``messages[i].role``), or ``None``.

    Messages are numbered as Python indexes them (``messages[0]`` is the first). ``roles``: the
    known roles (:func:`template_roles` of the tokenizer's template adds the template's own).

    >>> messages_problem([{"role": "user", "content": "hi"}, {"role": "assistant", "content": 42}])
    "field 'messages[1].content' is an int (42), not text"
    >>> messages_problem([{"role": "user", "content": None}])
    "field 'messages[0].content' is missing or null"
    >>> messages_problem([{"role": "bot", "content": "x"}])
    "field 'messages[0].role' is 'bot', not a known role"
    >>> messages_problem([{"content": "x"}])
    "field 'messages[0].role' is missing or null"
    >>> messages_problem([]), messages_problem("hi")
    ("field 'messages' is an empty list of messages", "field 'messages' is a str ('hi'), not a list of messages")
    >>> messages_problem([{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]) is None
    True
    """
    if messages is None:
        return f"field {name!r} is missing or null"
    if not isinstance(messages, (list, tuple)):
        return f"field {name!r} is {_kind(messages)}, not a list of messages"
    if not messages:
        return f"field {name!r} is an empty list of messages"
    for i, message in enumerate(messages):
        at = f"{name}[{i}]"
        if not isinstance(message, dict):
            return f"field {at!r} is {_kind(message)}, not a message {{\"role\": ..., \"content\": ...}}"
        role, content = message.get("role"), message.get("content")
        if role is None:
            return f"field {at + '.role'!r} is missing or null"
        if not isinstance(role, str):
            return f"field {at + '.role'!r} is {_kind(role)}, not a role name"
        if role not in roles:
            return f"field {at + '.role'!r} is {role!r}, not a known role"
        if content is None:
            if message.get("tool_calls"):
                continue
            return f"field {at + '.content'!r} is missing or null"
        if not isinstance(content, (str, list)) or (isinstance(content, list)
                                                    and not all(isinstance(part, dict) for part in content)):
            return f"field {at + '.content'!r} is {_kind(content)}, not text"
    return None


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


def _check_messages(messages: Any, where: str = "", name: str = "messages", roles: tuple[str, ...] = ROLES) -> None:
    problem = messages_problem(messages, name, roles)
    if problem is not None:
        raise PackmaskError(f"{where}{problem}; {MESSAGES_FIX}.")


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
    _check_messages(messages, roles=template_roles(template))
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
    roles = template_roles(template)

    def tokenize_batch(batch, indices):
        out = {"input_ids": [], "labels": []}
        for messages, index in zip(batch[column], indices):
            problem = messages_problem(messages, column, roles)
            if problem is not None:
                raise ChatRowError(index, problem, MESSAGES_FIX + ".")
            try:
                one = _tokenize_one(tokenizer, messages, train_on, has_tags, f" of row {index}")
            except PackmaskError:
                raise
            except Exception as error:  # the template's own checks (raise_exception), jinja errors
                raise ChatRowError(index, f"the chat template rejected this conversation ({type(error).__name__}: "
                                          f"{str(error).strip().splitlines()[0] if str(error).strip() else ''})",
                                   "fix the conversation (or use a tokenizer whose template takes it)") from None
            out["input_ids"].append(one["input_ids"])
            out["labels"].append(one["labels"])
        return out

    kwargs = dict(batched=True, with_indices=True, remove_columns=[column])
    if num_proc is not None:
        kwargs["num_proc"] = num_proc
    return dataset.map(tokenize_batch, **kwargs)
