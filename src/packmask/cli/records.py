"""Reading input records (JSON lines, JSON arrays) so that every bad record is named by file, line
(or record) and field; the checks themselves are in :mod:`packmask.cli.record_checks`.

- JSON lines: ``line N`` (1-based, as an editor shows it; blank lines count);
- a JSON array: ``record N`` (1-based).

JSON lines go through Arrow's reader when every line parses; otherwise line by line, so each bad
line can be named.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from .errors import CLIError
from .record_checks import (BadRecords, Field, check_one_kind, check_table, present_in_records,  # noqa: F401
                            present_in_table, value_problem)  # (re-exported)

__all__ = ["read_json_lines", "read_json_array", "Field", "BadRecords", "check_table", "value_problem",
           "check_one_kind", "present_in_table", "present_in_records"]


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
    """Arrow table of parsed records, and ``{column: {place: value}}`` of each column whose values
    disagree in type (other than the checked field): left out of the table, kept by place (``where(rows)``
    names records: ``line 3``), so a caller checks each record's value on its own without reading the
    file again. ``where`` also names the record in the one-line error when the checked field disagrees."""
    import pyarrow as pa

    try:
        return pa.Table.from_pylist(records), {}
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        pass
    names = list(dict.fromkeys(key for record in records for key in record))
    arrays, kept, mixed = [], [], {}
    for name in names:
        values = [record.get(name) for record in records]
        try:
            arrays.append(pa.array(values))
            kept.append(name)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            if fld is not None and name == fld.name:
                place = ""
                if where is not None:
                    place = f"{path}, {where([_first_other_kind(values)])[0]}: "
                raise CLIError(f"{place}field {name!r} holds a different kind of value than the records before it",
                               "give every record the same kind of value in this field (chat: every content a "
                               "string, or every content a list of parts)") from None
            places = where(range(len(records))) if where is not None else [f"row {r}" for r in range(len(records))]
            mixed[name] = dict(zip(places, values))
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
    """Read JSON lines into ``(table, field, mixed)`` with bad records handled (``mixed``: the values of
    the columns whose kinds differ between records, by place, as :func:`_table_from_records` gives them).

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
            return check_table(table, fld, bad, where), fld, {}
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
    """A parsed JSON array of objects as ``(table, field, mixed)`` (as :func:`read_json_lines`); records
    named ``record N``."""
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
