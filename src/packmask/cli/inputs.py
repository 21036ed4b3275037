"""Reading INPUT and turning it into token ids: files, folders, tokenizers, text and chat.

Which field is packed, in order: ``--column`` (token ids, default ``input_ids``), else
``--text-column`` (text, default ``text``), else ``--messages-column`` (chat, default
``messages``). Text and chat need ``--tokenizer``: a local folder, a model name already in the
Hugging Face cache, or ``demo`` for the built-in toy tokenizer (never chosen silently).

    >>> from types import SimpleNamespace
    >>> args = SimpleNamespace(column="input_ids", text_column="text", messages_column="messages")
    >>> field_chooser(args)(["id", "messages"])
    Field(kind='chat', name='messages')
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .errors import CLIError
from .parser import DEMO_TOKENIZER
from .records import BadRecords, Field, check_one_kind, check_table, present_in_table, read_json_array, read_json_lines

__all__ = ["Loaded", "suffix_of", "field_chooser", "load_input", "resolve_tokenizer", "tokenize", "JSON_SUFFIXES",
           "looks_like_a_model_name"]

JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz")
WHAT_INPUT = "a .jsonl, .json or .parquet file, or a folder written by Dataset.save_to_disk"


@dataclass
class Loaded:
    """INPUT read and checked: the Arrow ``table``, the ``field`` to pack, and what was left out."""

    table: object
    field: Field
    bad: BadRecords
    mixed_columns: list = field(default_factory=list)  # columns whose values disagree in type
    mixed_values: dict = field(default_factory=dict)  # {column: {place ("line 3"): value}} of those columns


def suffix_of(path: Path) -> str:
    """``.jsonl.gz`` for ``a.jsonl.gz``, else the last suffix, lower-cased.

    >>> suffix_of(Path("out/a.JSONL.gz")), suffix_of(Path("packed")), suffix_of(Path("x.parquet"))
    ('.jsonl.gz', '', '.parquet')
    """
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2", ".zst"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def field_chooser(args, chat_roles: tuple | None = None):
    """``choose(columns) -> Field``: the token, text or messages column, or a one-line error.

    ``choose.candidates`` lists the three names, to find files that mix kinds of records;
    ``chat_roles`` are the message roles a chat field accepts (default :data:`packmask.data.chat.ROLES`).
    """
    candidates = (("tokens", args.column), ("text", args.text_column), ("chat", args.messages_column))

    def choose(columns) -> Field:
        for kind, name in candidates:
            if name in columns:
                return Field(kind, name, chat_roles) if kind == "chat" and chat_roles else Field(kind, name)
        raise CLIError(
            f"INPUT has no token column {args.column!r}, no text column {args.text_column!r} and no messages "
            f"column {args.messages_column!r} (columns: {', '.join(columns) or 'none'})",
            "pass --column NAME for token-id lists, --text-column NAME for text, or --messages-column NAME for chat",
        )

    choose.candidates = [name for _, name in candidates]
    return choose


def check_column_type(kind, fld: Field) -> None:
    """A column-level mistake (text passed as --column, numbers as text) is one error, not N bad records."""
    import pyarrow as pa

    if fld.kind == "tokens" and not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_null(kind)):
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind)
        raise CLIError(f"column {fld.name!r} holds {'text' if is_text else kind}, not lists of token ids",
                       f"pass --text-column {fld.name} to tokenize it" if is_text
                       else "pass --column NAME for the column of token-id lists")
    if fld.kind == "text" and not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise CLIError(f"column {fld.name!r} holds {kind}, not text",
                       "pass --text-column NAME for a column of strings, or --column NAME for token ids")
    if fld.kind == "chat" and not (pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_null(kind)):
        raise CLIError(f"column {fld.name!r} holds {kind}, not lists of chat messages",
                       "each record needs \"messages\": [{\"role\": \"user\", \"content\": \"...\"}, ...]")


def load_input(path: Path, args, chat_roles: tuple | None = None, keep_places: bool = False) -> Loaded:
    """Read INPUT (jsonl / json / parquet / a saved dataset folder) and check its records.

    ``chat_roles``: the message roles chat records may use (those the tokenizer's template names too);
    ``keep_places``: fill ``bad.kept_places`` (where each kept record is) for every kind of field.
    """
    bad = BadRecords(str(path), skip=args.skip_invalid, keep_places=keep_places)
    choose = field_chooser(args, chat_roles)
    if not path.exists():
        raise CLIError(f"{path}: no such file or directory", f"check the path; INPUT is {WHAT_INPUT}")
    suffix = suffix_of(path)
    if path.is_dir():
        table = _table_of_saved_dataset(path, args.split)
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise CLIError(f"{path} could not be read as parquet: {error}",
                           "check that the file is a complete parquet file") from None
    elif suffix in JSON_SUFFIXES:
        return _load_json(path, choose, bad)
    else:
        raise CLIError(f"{path}: unsupported input type {suffix or '(no extension)'!r}", f"INPUT must be {WHAT_INPUT}")
    fld = choose(table.column_names)
    check_column_type(table.schema.field(fld.name).type, fld)
    check_one_kind(present_in_table(table, choose.candidates), fld, path, lambda rows: [f"row {r}" for r in rows])
    return Loaded(check_table(table, fld, bad, lambda rows: [f"row {r}" for r in rows]), fld, bad)


def _table_of_saved_dataset(path: Path, split: str | None):
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except FileNotFoundError:
        raise CLIError(f"{path} is a folder but not a saved Hugging Face dataset", f"point INPUT at {WHAT_INPUT}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
        if chosen not in loaded:
            raise CLIError(f"{path} holds splits {', '.join(names)}; which one to use is ambiguous" if split is None
                           else f"{path} has no split {split!r} (splits: {', '.join(names)})",
                           f"pass --split NAME, one of {', '.join(names)}")
        loaded = loaded[chosen]
    return loaded.with_format("arrow")[:]  # one Arrow table, row order as dataset[i]


def _load_json(path: Path, choose, bad: BadRecords) -> Loaded:
    """JSON lines (one object per line) or one JSON array of objects."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        head = handle.read(4096).lstrip()
    if not head:
        raise CLIError(f"{path} is empty", "write one JSON object per line, e.g. {\"text\": \"...\"}")
    if head.startswith(b"["):  # a JSON array of records
        try:
            with opener(path, "rt", encoding="utf-8") as handle:
                records = json.load(handle)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise CLIError(f"{path} starts with '[' but is not one UTF-8 JSON array ({error})",
                           "write one JSON array of objects, or one object per line") from None
        table, fld, mixed = read_json_array(path, records, choose, check_column_type, bad)
    else:
        table, fld, mixed = read_json_lines(path, choose, check_column_type, bad)
    if not table.num_rows:
        raise CLIError(f"{path} has no valid records ({bad.count:,} skipped)", "fix the input records")
    return Loaded(table, fld, bad, list(mixed), mixed)


# --------------------------------------------------------------------------- tokenizers

def resolve_tokenizer(spec: str | None):
    """Load ``--tokenizer`` before any work: ``(tokenizer, name for the metadata)``, or ``(None, None)``."""
    if spec is None:
        return None, None
    if spec == DEMO_TOKENIZER:
        from .demo_corpus import build_demo_tokenizer

        return build_demo_tokenizer(), "packmask-demo-bpe (built-in toy tokenizer)"
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    name = str(path.resolve()) if path.exists() else spec
    if path.is_file():
        raise CLIError(f"--tokenizer {spec}: is a file, not a folder", _TOKENIZER_FIX)
    if not path.exists() and not looks_like_a_model_name(spec):
        raise CLIError(f"--tokenizer {spec}: no such folder", _TOKENIZER_FIX)
    try:
        return AutoTokenizer.from_pretrained(str(path) if path.exists() else spec, local_files_only=True), name
    except (OSError, ValueError) as error:
        if not path.exists():  # the hub's own message speaks of repo ids and connecting to huggingface.co
            raise CLIError(f"--tokenizer {spec}: not a local folder, and no model of that name is in the Hugging "
                           "Face cache (packmask never downloads)", _TOKENIZER_FIX) from None
        if not any((path / f).exists() for f in _TOKENIZER_FILES):
            raise CLIError(f"--tokenizer {spec}: the folder holds no tokenizer files "
                           f"({', '.join(_TOKENIZER_FILES[:2])})", _TOKENIZER_FIX) from None
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"--tokenizer {spec}: the folder holds no tokenizer transformers can load ({first_line})",
                       _TOKENIZER_FIX) from None


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                    "spiece.model")


_TOKENIZER_FIX = ("pass --tokenizer a folder written by tokenizer.save_pretrained, a model name already downloaded "
                  "(hf download NAME), or 'demo' for the built-in toy tokenizer")


def looks_like_a_model_name(spec: str) -> bool:
    """Whether ``spec`` could be a Hugging Face model name (``name`` or ``owner/name``) rather than a path.

    >>> [looks_like_a_model_name(s) for s in ("gpt2", "Qwen/Qwen2.5-0.5B", "./tok", "a/b/c", "/abs", "x-")]
    [True, True, False, False, False, False]
    """
    part = r"[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?"
    return re.fullmatch(f"{part}(?:/{part})?", spec) is not None and ".." not in spec


def require_tokenizer(tokenizer, fld: Field, path: Path, tokenizer_name: str | None = None) -> None:
    """Text and chat need a tokenizer, chat one with a chat template: checked before tokenizing."""
    if fld.kind == "chat" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        raise CLIError(f"{path}: column {fld.name!r} holds chat messages, but the tokenizer {tokenizer_name} has no "
                       "chat template", "pass --tokenizer a chat/instruct model's tokenizer, or set "
                       "tokenizer.chat_template and save it with save_pretrained")
    if tokenizer is None and fld.kind != "tokens":
        what = "text" if fld.kind == "text" else "chat messages"
        raise CLIError(f"{path}: column {fld.name!r} holds {what}, and no tokenizer was given",
                       "pass --tokenizer DIR (your model's tokenizer folder, or a model name in the Hugging "
                       "Face cache), or --tokenizer demo for the built-in toy tokenizer")


# --------------------------------------------------------------------------- tokenizing

def tokenize(loaded: Loaded, tokenizer, args, console):
    """The ``datasets.Dataset`` to pack and its token column: as is, or tokenized text / chat."""
    import datasets

    fld = loaded.field
    if fld.kind == "tokens":
        return datasets.Dataset(loaded.table), fld.name
    if fld.kind == "chat":
        return _tokenize_chat(loaded, tokenizer, args), "input_ids"
    return _tokenize_text(loaded.table.column(fld.name).to_pylist(), tokenizer, args, console), "input_ids"


def _tokenize_text(texts: list[str], tokenizer, args, console):
    """Tokenize in batches with a progress bar; EOS appended unless ``--no-eos``."""
    from datasets import Dataset
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    eos = None if args.no_eos else tokenizer.eos_token_id
    token_lists: list[list[int]] = []
    batch = 1000
    with Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("tokenize", total=len(texts))
        for start in range(0, len(texts), batch):
            chunk = texts[start : start + batch]
            for ids in tokenizer(chunk)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                token_lists.append(ids)
            progress.advance(task, len(chunk))
    return Dataset.from_dict({"input_ids": token_lists})


def _tokenize_chat(loaded: Loaded, tokenizer, args):
    """Chat messages through the tokenizer's chat template (:mod:`packmask.data.chat`)."""
    import datasets

    try:
        from ..data.chat import tokenize_chat_dataset
    except ImportError as error:
        if error.name not in ("packmask.data.chat",):
            raise
        raise CLIError("chat input needs packmask.data.chat, which this install lacks",
                       "update packmask, or tokenize the messages yourself into input_ids / labels") from None
    from ..data.chat import ChatRowError

    dataset = datasets.Dataset(loaded.table.select([loaded.field.name]))
    try:
        tokenized = tokenize_chat_dataset(dataset, tokenizer, column=loaded.field.name, train_on=args.train_on)
    except ChatRowError as error:  # named by the record's own line, as the checks before tokenizing name it
        places = loaded.bad.kept_places
        place = places[error.row] if places is not None and error.row < len(places) else f"record {error.row + 1}"
        raise CLIError(f"{loaded.bad.path}, {place}: {error.problem}", error.fix) from None
    keep = [name for name in ("input_ids", "labels") if name in tokenized.column_names]
    return tokenized.select_columns(keep)
