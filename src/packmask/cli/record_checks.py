"""Checking input records: every bad record is named by file, line (or row) and field.

A record is *bad* when the field packing needs is missing or null, its line is not UTF-8 or not
JSON, or its token ids are not non-negative integers. Without ``--skip-invalid`` the first bad
record stops the command with one line; with it, bad records are dropped and counted
(:class:`BadRecords`). Where a record is named:

- JSON lines: ``line N`` (1-based, as an editor shows it; blank lines count);
- a JSON array: ``record N`` (1-based);
- Parquet or a saved dataset: ``row N`` (0-based, as ``dataset[N]``).

Checks run on whole Arrow columns (no Python loop per token). JSON lines go through Arrow's reader
when every line parses; otherwise line by line, so each bad line can be named.

    >>> import pyarrow as pa
    >>> table = pa.table({"input_ids": [[1, 2], None, [3, -4], [5]]})
    >>> bad = BadRecords("docs.jsonl", skip=True)
    >>> check_table(table, Field("tokens", "input_ids"), bad, lambda rows: [f"line {r + 1}" for r in rows]).num_rows
    2
    >>> bad.count, bad.first
    (2, ['line 2', 'line 3'])
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..data.chat import MESSAGES_FIX, ROLES, messages_problem
from .errors import CLIError

__all__ = ["Field", "BadRecords", "check_table", "value_problem", "check_one_kind", "present_in_table",
           "present_in_records", "SHOWN"]

SHOWN = 5  # bad records named in the summary under --skip-invalid

_FIXES = {
    "json": "write one complete JSON object per line",
    "utf8": "re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    "missing": "give every record the field",
    "tokens": "token ids must be lists of non-negative integers",
    "type": "give every record the same kind of value in this field",
    "chat": MESSAGES_FIX,
}


@dataclass(frozen=True)
class Field:
    """The input field packing needs: ``kind`` is ``tokens``, ``text`` or ``chat``; ``name`` its column."""

    kind: str
    name: str
    roles: tuple = field(default=ROLES, repr=False)  # chat: known message roles (the template may add its own)


@dataclass
class BadRecords:
    """Bad records of one input: raises on the first unless ``skip``; else counts them."""

    path: str
    skip: bool
    count: int = 0
    first: list = field(default_factory=list)   # where the first SHOWN bad records are
    problems: list = field(default_factory=list)  # (where, problem) of those
    kept_places: list | None = None  # chat: where each kept record is, to name one the chat template rejects
    keep_places: bool = False  # fill kept_places for every kind (records checked one by one later)

    def add(self, where: str, problem: str, fix_kind: str, fix: str | None = None) -> None:
        """One bad record; ``fix`` (else the fix of ``fix_kind``) says what to change."""
        if not self.skip:
            raise CLIError(f"{self.path}, {where}: {problem}",
                           f"{fix or _FIXES[fix_kind]}, or pass --skip-invalid to skip such records")
        self.count += 1
        if len(self.first) < SHOWN:
            self.first.append(where)
            self.problems.append((where, problem))

    def summary(self) -> str:
        """``skipped 3 invalid records: line 2 (…), line 9 (…), line 12 (…)``."""
        shown = ", ".join(f"{where} ({problem})" for where, problem in self.problems)
        more = f", … {self.count - len(self.problems):,} more" if self.count > len(self.problems) else ""
        return f"skipped {self.count:,} invalid record{'s' if self.count != 1 else ''}: {shown}{more}"


# --------------------------------------------------------------------------- one value (line-by-line path)

def value_problem(kind: str, name: str, value, roles: tuple = ROLES) -> tuple[str, str] | None:
    """What is wrong with one record's ``value`` of field ``name``, as ``(problem, fix_kind)``.

    >>> value_problem("tokens", "input_ids", [1, "a"])
    ("field 'input_ids' holds a non-integer token id 'a'", 'tokens')
    >>> value_problem("tokens", "input_ids", [3, -1]), value_problem("tokens", "input_ids", [1.0, 2]) is None
    (("field 'input_ids' holds a negative token id -1", 'tokens'), True)
    >>> value_problem("text", "text", None)
    ("field 'text' is missing or null", 'missing')
    """
    import numpy as np

    if value is None:
        return f"field {name!r} is missing or null", "missing"
    if kind == "text":
        return None if isinstance(value, str) else (f"field {name!r} is a {type(value).__name__}, not text", "type")
    if kind == "chat":
        problem = messages_problem(value, name, roles)
        return None if problem is None else (problem, "chat")
    if not isinstance(value, list):
        return f"field {name!r} is a {type(value).__name__}, not a list of token ids", "tokens"
    if not value:
        return None
    try:
        ids = np.asarray(value)  # one C call: int64 for a clean list
    except ValueError:
        ids = np.asarray(value, dtype=object)
    if ids.ndim != 1:
        return f"field {name!r} is not a flat list of token ids", "tokens"
    if ids.dtype.kind == "f":
        fractional = np.flatnonzero(ids != np.floor(ids))
        if fractional.size:
            return f"field {name!r} holds a non-integer token id {value[int(fractional[0])]!r}", "tokens"
    elif ids.dtype.kind not in "iu":  # strings, booleans, None, mixed: name the first offender
        offender = next(v for v in value if type(v) is not int)
        return f"field {name!r} holds a non-integer token id {offender!r}", "tokens"
    if ids.min() < 0:
        return f"field {name!r} holds a negative token id {ids.min():g}", "tokens"
    return None


# --------------------------------------------------------------------------- one kind per file

def present_in_table(table, names) -> dict:
    """``{name: bool array}``: which rows of an Arrow table hold a non-null value of each column."""
    import numpy as np

    return {name: ~np.asarray(table.column(name).is_null().to_numpy(zero_copy_only=False), dtype=bool)
            for name in names if name in table.column_names}


def present_in_records(records: list[dict], names) -> dict:
    """``{name: bool array}``: which records hold a non-null value of each field."""
    import numpy as np

    found = {name for record in records for name in record}
    return {name: np.array([record.get(name) is not None for record in records], dtype=bool)
            for name in names if name in found}


def check_one_kind(present: dict, fld: Field, path, where) -> None:
    """One line when records lacking ``fld`` hold another kind's field instead (e.g. text and chat mixed).

    Without this, every record of the other kind would be reported as missing ``fld``.

    >>> import numpy as np
    >>> check_one_kind({"text": np.array([True, False]), "messages": np.array([False, True])},
    ...                Field("text", "text"), "a.jsonl", lambda rows: [f"line {r + 1}" for r in rows])
    ... # doctest: +ELLIPSIS
    Traceback (most recent call last):
    packmask.cli.errors.CLIError: a.jsonl mixes kinds of records: 1 hold 'text', 1 hold 'messages' instead (first: line 2) (fix: pack each kind from its own file ...)
    """
    import numpy as np

    mine = present.get(fld.name)
    if mine is None:
        return
    for name, theirs in present.items():
        others = np.flatnonzero(theirs & ~mine)
        if name != fld.name and others.size:
            raise CLIError(f"{path} mixes kinds of records: {int(mine.sum()):,} hold {fld.name!r}, {others.size:,} hold "
                           f"{name!r} instead (first: {where(others[:1].tolist())[0]})",
                           f"pack each kind from its own file (e.g. jq -c 'select(.{fld.name})' and "
                           f"'select(.{name})'), or give every record {fld.name!r}")


# --------------------------------------------------------------------------- whole columns

def _token_problems(column, name: str):
    """``[(rows, {row: offending value}, text)]`` for a list column of token ids (vectorised)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    values, parents = pc.list_flatten(column), np.asarray(pc.list_parent_indices(column))
    kind = values.type
    if pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_null(kind):
        masks = [(values.is_null(), "holds a null token id")]
        if pa.types.is_floating(kind):
            masks.append((pc.fill_null(pc.not_equal(values, pc.floor(values)), False), "holds a non-integer token id"))
        if not pa.types.is_null(kind):
            masks.append((pc.fill_null(pc.less(values, 0), False), "holds a negative token id"))
    else:  # strings, booleans, nested lists: every value is wrong
        masks = [(pa.array(np.ones(len(values), dtype=bool)), "holds a non-integer token id")]
    found = []
    for mask, text in masks:
        selected = np.asarray(mask.to_numpy(zero_copy_only=False), dtype=bool)
        if selected.any():
            rows, first = np.unique(parents[selected], return_index=True)
            offenders = pc.filter(values, pa.array(selected)).take(pa.array(first[:SHOWN])).to_pylist()
            found.append((rows, dict(zip(rows[:SHOWN].tolist(), offenders)), f"field {name!r} {text}"))
    return found


def _chat_problems(column, name: str, roles: tuple = ROLES):
    """``[(rows, text)]``, one per bad conversation (:func:`packmask.data.chat.messages_problem`).

    A Python loop per record: chat records are rendered one by one by the chat template anyway.
    """
    import numpy as np

    found = []
    for row, messages in enumerate(column.to_pylist()):
        if messages is not None:  # null rows are reported as missing by check_table
            problem = messages_problem(messages, name, roles)
            if problem is not None:
                found.append((np.array([row]), problem))
    return found


def check_table(table, fld: Field, bad: BadRecords, where):
    """``table`` without the bad records of ``fld`` (or the first one raised); token ids as int64.

    ``where(rows)`` turns row indices into ``line N`` / ``row N`` strings.
    """
    import numpy as np
    import pyarrow as pa

    column = table.column(fld.name)
    column = pa.concat_arrays(column.chunks) if column.num_chunks else pa.array([], column.type)
    is_list = pa.types.is_list(column.type) or pa.types.is_large_list(column.type)
    null_rows = np.flatnonzero(np.asarray(column.is_null().to_numpy(zero_copy_only=False), dtype=bool))
    problems = [(null_rows, {}, f"field {fld.name!r} is missing or null", "missing")]
    if fld.kind == "tokens" and is_list:
        problems += [(rows, offenders, text, "tokens") for rows, offenders, text in _token_problems(column, fld.name)]
    if fld.kind == "chat" and is_list:
        problems += [(rows, {}, text, "chat") for rows, text in _chat_problems(column, fld.name, fld.roles)]
    all_bad = np.unique(np.concatenate([rows for rows, *_ in problems]).astype(np.int64))
    if all_bad.size:
        shown = all_bad[: SHOWN if bad.skip else 1].tolist()
        for row, place in zip(shown, where(shown)):
            rows, offenders, text, fix_kind = next(p for p in problems if row in p[0])
            bad.add(place, f"{text} {offenders[row]!r}" if offenders.get(row) is not None else text, fix_kind)
        bad.count += int(all_bad.size) - len(shown)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[all_bad] = False
    if all_bad.size:
        table = table.filter(pa.array(keep))
    if fld.kind == "chat" or bad.keep_places:  # records are processed one by one later: remember where each came from
        bad.kept_places = where(np.flatnonzero(keep).tolist())
    if fld.kind == "tokens" and is_list:
        table = table.set_column(table.schema.get_field_index(fld.name), fld.name,
                                 table.column(fld.name).cast(pa.list_(pa.int64())))
    return table


# --------------------------------------------------------------------------- reading JSON
