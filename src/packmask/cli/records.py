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

import gzip
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..data.chat import MESSAGES_FIX, ROLES, messages_problem
from .errors import CLIError

__all__ = ["Field", "BadRecords", "check_table", "read_json_lines", "read_json_array", "value_problem",
           "check_one_kind", "present_in_table", "present_in_records"]

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

    def add(self, where: str, problem: str, fix_kind: str) -> None:
        if not self.skip:
            raise CLIError(f"{self.path}, {where}: {problem}", f"{_FIXES[fix_kind]}, or pass --skip-invalid to skip such records")
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
    if fld.kind == "chat":  # records are tokenized one by one later: remember where each came from
        bad.kept_places = where(np.flatnonzero(keep).tolist())
    if fld.kind == "tokens" and is_list:
        table = table.set_column(table.schema.get_field_index(fld.name), fld.name,
                                 table.column(fld.name).cast(pa.list_(pa.int64())))
    return table


# --------------------------------------------------------------------------- reading JSON

def _open_binary(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _is_utf8(path: Path) -> bool:
    """Whether the whole file decodes as UTF-8 (streamed, 16 MiB at a time)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with _open_binary(path) as handle:
            while chunk := handle.read(1 << 24):
                decoder.decode(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        return False
    return True


def _nonblank_line_numbers(path: Path) -> list[int]:
    """1-based numbers of the non-blank lines: Arrow's row ``i`` came from line ``result[i]``."""
    with _open_binary(path) as handle:
        return [number for number, line in enumerate(handle, 1) if line.strip()]


def _first_other_kind(values: list) -> int:
    """Index of the first value Arrow cannot hold in one column with the first non-null value."""
    import pyarrow as pa

    first = next((v for v in values if v is not None), None)
    for index, value in enumerate(values):
        try:
            pa.array([first, value])
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return index
    return 0


def _table_from_records(records: list[dict], fld: Field | None, path=None, where=None):
    """Arrow table of parsed records; a column whose values disagree in type (other than the
    checked field) is left out and named in the returned list. ``where(rows)`` names records for
    the one-line error when the checked field itself disagrees."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(records), []
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    names = list(dict.fromkeys(key for record in records for key in record))
    arrays, kept, mixed = [], [], []
    for name in names:
        try:
            arrays.append(pa.array([record.get(name) for record in records]))
            kept.append(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if fld is not None and name == fld.name:
                place = ""
                if where is not None:
                    place = f"{path}, {where([_first_other_kind([record.get(name) for record in records])])[0]}: "
                raise CLIError(f"{place}field {name!r} holds a different kind of value than the records before it",
                               "give every record the same kind of value in this field (chat: every content a "
                               "string, or every content a list of parts)") from None
            mixed.append(name)
    return pa.table(dict(zip(kept, arrays))), mixed


def _parse_lines(path: Path):
    """Records, their line numbers, and ``(line, problem, fix_kind)`` of the lines that are not records."""
    records, lines, problems = [], [], []
    with _open_binary(path) as handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                text = raw.decode("utf-8").strip()
            except UnicodeDecodeError as error:
                problems.append((number, f"not UTF-8 text (byte 0x{raw[error.start]:02x} at byte {error.start + 1} of "
                                         "the line)", "utf8"))
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                problems.append((number, f"not valid JSON ({error.msg} at column {error.colno})", "json"))
                continue
            if not isinstance(record, dict):
                problems.append((number, f"a JSON {type(record).__name__}, not an object", "json"))
                continue
            records.append(record)
            lines.append(number)
    return records, lines, problems


def _sample_type(records: list[dict], name: str):
    """Arrow type of the first non-null values of ``name`` (None when they disagree in type)."""
    import pyarrow as pa

    sample = [record[name] for record in records[:1000] if record.get(name) is not None]
    try:
        return pa.array(sample).type if sample else pa.null()
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return None


def _candidates(choose) -> list[str]:
    """The field names ``choose`` picks from (``choose.candidates``, set by the CLI's field chooser)."""
    return list(getattr(choose, "candidates", ()))


def _choose(records: list[dict], choose, check_type) -> Field:
    fld = choose(list(dict.fromkeys(key for record in records for key in record)))
    kind = _sample_type(records, fld.name)
    if kind is not None:
        check_type(kind, fld)
    return fld


def read_json_lines(path: Path, choose, check_type, bad: BadRecords):
    """Read JSON lines into ``(table, field, mixed_columns)`` with bad records handled.

    ``choose(columns) -> Field`` picks the field to check from the column names;
    ``check_type(arrow_type, field)`` raises for a column-level mistake (one error, not N records).
    """
    import pyarrow as pa
    import pyarrow.json as pa_json

    if _is_utf8(path):
        try:  # Arrow's reader: fast and memory-lean on big files
            with pa.input_stream(str(path), compression="detect") as stream:
                table = pa_json.read_json(stream)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            table = None  # parse again line by line, to name the offending line
        if table is not None:
            fld = choose(table.column_names)
            check_type(table.schema.field(fld.name).type, fld)
            lines: list[int] | None = None

            def where(rows):
                nonlocal lines
                lines = lines if lines is not None else _nonblank_line_numbers(path)
                return [f"line {lines[r]}" for r in rows]

            check_one_kind(present_in_table(table, _candidates(choose)), fld, path, where)
            return check_table(table, fld, bad, where), fld, []
    records, lines, problems = _parse_lines(path)
    if not records:
        if problems:
            _report_in_order(problems, bad, "line")
        raise CLIError(f"{path} has no valid JSON records" + (f" ({bad.count:,} skipped)" if bad.count else ""),
                       "write one JSON object per line, e.g. {\"text\": \"...\"}")
    fld = _choose(records, choose, check_type)
    check_one_kind(present_in_records(records, _candidates(choose)), fld, path,
                   lambda rows: [f"line {lines[r]}" for r in rows])
    records, lines, value_problems = _drop_bad_values(records, lines, fld)
    _report_in_order(problems + value_problems, bad, "line")
    table, mixed = _table_from_records(records, fld, path, lambda rows: [f"line {lines[r]}" for r in rows])
    return check_table(table, fld, bad, lambda rows: [f"line {lines[r]}" for r in rows]), fld, mixed


def _drop_bad_values(records, numbers, fld: Field):
    """Records (and their numbers) whose ``fld`` value passes :func:`value_problem`, and the problems."""
    kept, kept_numbers, problems = [], [], []
    for record, number in zip(records, numbers):
        problem = value_problem(fld.kind, fld.name, record.get(fld.name), fld.roles)
        if problem is not None:
            problems.append((number, *problem))
            continue
        kept.append(record)
        kept_numbers.append(number)
    return kept, kept_numbers, problems


def _report_in_order(problems, bad: BadRecords, unit: str) -> None:
    """Hand problems to ``bad`` by line, so the first one named is the first in the file."""
    for number, problem, fix_kind in sorted(problems, key=lambda p: p[0]):
        bad.add(f"{unit} {number}", problem, fix_kind)


def read_json_array(path: Path, records: list, choose, check_type, bad: BadRecords):
    """A parsed JSON array of objects as ``(table, field, mixed_columns)``; records named ``record N``."""
    objects, numbers, problems = [], [], []
    for number, record in enumerate(records, 1):
        if isinstance(record, dict):
            objects.append(record)
            numbers.append(number)
        else:
            problems.append((number, f"a JSON {type(record).__name__}, not an object", "json"))
    if not objects:
        _report_in_order(problems, bad, "record")
        raise CLIError(f"{path} holds no JSON objects", "write one JSON array of objects, e.g. [{\"text\": \"...\"}]")
    fld = _choose(objects, choose, check_type)
    check_one_kind(present_in_records(objects, _candidates(choose)), fld, path,
                   lambda rows: [f"record {numbers[r]}" for r in rows])
    objects, numbers, value_problems = _drop_bad_values(objects, numbers, fld)
    _report_in_order(problems + value_problems, bad, "record")
    table, mixed = _table_from_records(objects, fld, path, lambda rows: [f"record {numbers[r]}" for r in rows])
    return check_table(table, fld, bad, lambda rows: [f"record {numbers[r]}" for r in rows]), fld, mixed
