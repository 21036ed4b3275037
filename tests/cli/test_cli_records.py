"""Bad input records, checks before work and atomic writing, through ``packmask.cli.main.main``
in this process (the same code path as the command, without a 5-second interpreter start per
case). tests/cli/test_cli.py runs one case of each kind as a real subprocess."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from _cli_run import assert_error, run  # tests/cli/_cli_run.py
from packmask.cli.output import AtomicOutputs


GOOD = [{"input_ids": [1, 2, 3], "text": "a"}, {"input_ids": [4, 5], "text": "b"}]


def write_lines(path: Path, lines) -> Path:
    path.write_bytes(b"".join(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode() for line in lines))
    return path


# one bad record per case: (lines, extra args, fragments the error names)
BAD_RECORDS = {
    "null text": ([{"text": "fine"}, {"text": None}], ["--tokenizer", "demo"], ["line 2", "'text'", "missing or null"]),
    "missing text": ([{"text": "fine"}, {"body": "no text"}], ["--tokenizer", "demo"], ["line 2", "'text'", "missing"]),
    "non-UTF-8": ([{"text": "fine"}, b'{"text": "caf\xe9"}\n'], ["--tokenizer", "demo"], ["line 2", "not UTF-8", "0xe9"]),
    "broken JSON": ([{"input_ids": [1]}, b'{"input_ids": [1, 2\n'], [], ["line 2", "not valid JSON"]),
    "string token": ([{"input_ids": [1]}, {"input_ids": [1, "a"]}], [], ["line 2", "'input_ids'", "non-integer token id 'a'"]),
    "float token": ([{"input_ids": [1]}, {"input_ids": [1, 2.5]}], [], ["line 2", "non-integer token id 2.5"]),
    "negative token": ([{"input_ids": [1]}, {"input_ids": [3, -1]}], [], ["line 2", "negative token id -1"]),
    "null token": ([{"input_ids": [1]}, {"input_ids": [3, None]}], [], ["line 2", "null token id"]),
    "empty chat": ([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": []}], ["--tokenizer", "demo"],
                   ["line 2", "'messages'", "empty list of messages"]),
    "message without role": ([{"messages": [{"role": "user", "content": "hi"}]}, {"messages": [{"content": "x"}]}],
                             ["--tokenizer", "demo"], ["line 2", "'messages[0].role' is missing"]),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_bad_record_is_one_line_naming_file_line_and_field(tmp_path, capsys, case):
    lines, extra, fragments = BAD_RECORDS[case]
    source = write_lines(tmp_path / "in.jsonl", [b"\n", *lines])  # a blank first line: numbers are file lines
    fragments = [f.replace("line 2", "line 3") for f in fragments]
    result = run(capsys, "stats", source, "--max-length", 16, *extra)
    assert_error(result, str(source), "--skip-invalid", *fragments)


def test_bad_rows_of_parquet_are_named_by_row(tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    source = tmp_path / "in.parquet"
    pq.write_table(pa.table({"input_ids": [[1, 2], [3], [4, -5]]}), source)
    assert_error(run(capsys, "stats", source, "--max-length", 8), "row 2", "negative token id -5")


def test_skip_invalid_counts_and_names_the_skipped_lines(tmp_path, capsys):
    lines = [{"input_ids": [1, 2]}, {"input_ids": [1, -2]}, b"not json\n", {"input_ids": [7] * 5}, {"tokens": [1]}]
    source = write_lines(tmp_path / "in.jsonl", lines)
    code, out, err = run(capsys, "pack", source, "-o", tmp_path / "out.jsonl", "--max-length", 8, "--skip-invalid",
                         "--no-plot")
    assert code == 0, (out, err)
    summary = " ".join(out.split())
    assert "skipped 3 invalid records" in summary and "line 2" in summary and "line 3" in summary \
        and "line 5" in summary, summary
    packed = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert sorted(sum((row["input_ids"] for row in packed), [])) == [1, 2, 7, 7, 7, 7, 7]
    meta = json.loads((tmp_path / "out.jsonl.packmask.json").read_text())
    assert meta["skipped_invalid_records"] == 3 and meta["max_length"] == 8


def test_text_without_tokenizer_is_refused(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [{"text": "hello"}])
    assert_error(run(capsys, "stats", source, "--max-length", 8), "no tokenizer", "--tokenizer demo")


def test_output_checks_come_before_reading_the_input(tmp_path, capsys):
    missing_input = tmp_path / "nope.jsonl"  # would fail too, but only once read
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_error(run(capsys, "pack", missing_input, "-o", blocker / "out.parquet", "--max-length", 8),
                 "is a file, not a folder")
    assert_error(run(capsys, "pack", missing_input, "-o", tmp_path / "o.parquet", "--max-length", 8,
                     "--plot", tmp_path / "hist.txt"), "--plot", ".png")
    assert_error(run(capsys, "pack", missing_input, "-o", tmp_path / "o.parquet", "--max-length", 8,
                     "--tokenizer", tmp_path / "no-tokenizer"), "no such folder")
    assert not (tmp_path / "o.parquet").exists()


def test_output_that_is_the_input_is_refused(tmp_path, capsys, monkeypatch):
    source = write_lines(tmp_path / "good.jsonl", GOOD)
    before = source.read_bytes()
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    for output in ("good.jsonl", "sub/../good.jsonl", str(source)):
        assert_error(run(capsys, "pack", "good.jsonl", "-o", output, "--max-length", 8, "--force"), "is the input")
    assert source.read_bytes() == before


def test_output_linked_to_the_input_is_refused(tmp_path, capsys):
    source = write_lines(tmp_path / "good.jsonl", GOOD)
    (tmp_path / "link.jsonl").symlink_to(source)
    assert_error(run(capsys, "pack", source, "-o", tmp_path / "link.jsonl", "--max-length", 8, "--force"), "is the input")
    os.link(source, tmp_path / "hard.jsonl")
    assert_error(run(capsys, "pack", tmp_path / "hard.jsonl", "-o", source, "--max-length", 8, "--force"), "is the input")


def test_existing_output_needs_force(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", GOOD)
    (tmp_path / "out.parquet").write_bytes(b"previous")
    assert_error(run(capsys, "pack", source, "-o", tmp_path / "out.parquet", "--max-length", 8), "already exists",
                 "--force")
    assert (tmp_path / "out.parquet").read_bytes() == b"previous"


def test_chat_train_on_all_labels_every_token(tmp_path, capsys):
    from test_cli import chat_tokenizer_folder, write_chat

    folder = chat_tokenizer_folder(tmp_path / "tok")
    code, out, err = run(capsys, "pack", write_chat(tmp_path / "chat.jsonl", 4), "-o", tmp_path / "all.jsonl",
                         "--max-length", 64, "--tokenizer", folder, "--train-on", "all", "--no-plot")
    assert code == 0, (out, err)
    rows = [json.loads(line) for line in (tmp_path / "all.jsonl").read_text().splitlines()]
    assert all(row["labels"] == row["input_ids"] for row in rows)
    assert json.loads((tmp_path / "all.jsonl.packmask.json").read_text())["train_on"] == "all"


def test_chat_without_template_is_one_line_error(tmp_path, capsys):
    from packmask.cli.demo import build_demo_tokenizer

    build_demo_tokenizer().save_pretrained(tmp_path / "plain")
    source = tmp_path / "chat.jsonl"
    source.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    assert_error(run(capsys, "stats", source, "--max-length", 8, "--tokenizer", tmp_path / "plain"),
                 "has no chat template", "chat_template")


def test_error_missing_file(tmp_path, capsys):
    assert_error(run(capsys, "stats", tmp_path / "nope.jsonl", "--max-length", 64), "no such file")


def test_error_wrong_column(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [{"input_ids": [1, 2]}])
    assert_error(run(capsys, "pack", source, "-o", tmp_path / "x.parquet", "--max-length", 64, "--column", "tokens"),
                 "'tokens'", "--column")
    assert not (tmp_path / "x.parquet").exists()
    assert_error(run(capsys, "stats", source, "--max-length", 64, "--column", "text", "--text-column", "input_ids"),
                 "holds list", "not text")


def test_error_overflow_when_max_length_below_longest(tmp_path, capsys):
    source = write_lines(tmp_path / "in.jsonl", [{"input_ids": [1] * 60}, {"input_ids": [2] * 3}])
    assert_error(run(capsys, "stats", source, "--max-length", 50, "--overflow", "error"), "longest sequence",
                 "--max-length")


def test_parquet_output_is_replaced_only_when_complete(tmp_path):
    target = tmp_path / "out.parquet"
    target.write_bytes(b"previous")
    with pytest.raises(KeyboardInterrupt):
        with AtomicOutputs() as outputs:
            outputs.stage(target).write_bytes(b"PAR1 half")
            raise KeyboardInterrupt
    assert target.read_bytes() == b"previous" and os.listdir(tmp_path) == ["out.parquet"]
    with AtomicOutputs() as outputs:
        outputs.stage(target).write_bytes(b"new")
    assert target.read_bytes() == b"new" and os.listdir(tmp_path) == ["out.parquet"]


def test_folder_output_is_swapped_whole(tmp_path):
    target = tmp_path / "packed"
    target.mkdir()
    (target / "dataset_info.json").write_text("old")
    with AtomicOutputs() as outputs:
        staged = outputs.stage(target)
        staged.mkdir()
        (staged / "dataset_info.json").write_text("new")
    assert (target / "dataset_info.json").read_text() == "new" and os.listdir(tmp_path) == ["packed"]
