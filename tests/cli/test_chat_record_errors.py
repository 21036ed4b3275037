"""Bad chat records (issue 21, item 6): one line naming file, 1-based line and field; ``--skip-invalid``
skips them without shifting line numbers; a file mixing ``text`` and ``messages`` is named in one line.

Through ``packmask.cli.main.main`` in this process (the command's code path; tests/test_cli.py runs
the command as a subprocess), and through the API."""
from __future__ import annotations

import json

import pytest
from datasets import Dataset

from packmask.cli.main import main
from packmask.data.chat import tokenize_chat_dataset, tokenize_messages
from packmask.errors import PackmaskError

USER = {"role": "user", "content": "What is one plus one?"}
ASSISTANT = {"role": "assistant", "content": "It is two."}
GOOD = {"messages": [USER, ASSISTANT]}

# (the bad record's messages, fragments of the error); the bad record sits on line 3 of the file
BAD_CHATS = {
    "content is a number": ([USER, {"role": "assistant", "content": 42}], ["'messages[1].content'", "an int (42)"]),
    "content is null": ([USER, {"role": "assistant", "content": None}], ["'messages[1].content'", "missing or null"]),
    "content is missing": ([USER, {"role": "assistant"}], ["'messages[1].content'", "missing or null"]),
    "unknown role": ([{"role": "bot", "content": "hi"}], ["'messages[0].role'", "'bot', not a known role"]),
    "role is missing": ([{"content": "hi"}, ASSISTANT], ["'messages[0].role'", "missing or null"]),
    "message is a string": ([USER, "It is two."], ["'messages[1]'", "a str ('It is two.')"]),
}


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from test_cli import chat_tokenizer_folder

    return chat_tokenizer_folder(tmp_path_factory.mktemp("tok"))


def _write(path, records):
    path.write_text("".join((json.dumps(r) if not isinstance(r, str) else r) + "\n" for r in records))
    return path


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("case", list(BAD_CHATS))
def test_bad_chat_record_is_one_line_naming_file_line_and_field(tmp_path, capsys, tokenizer_folder, case):
    messages, fragments = BAD_CHATS[case]
    source = _write(tmp_path / "chat.jsonl", [GOOD, "", {"messages": messages}, GOOD])  # line 2 is blank
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tokenizer_folder)
    assert code == 2 and len(err) == 1, (out, err)
    for fragment in [str(source), "line 3", *fragments, "fix:", "--skip-invalid"]:
        assert fragment in err[0], (fragment, err[0])


def test_skip_invalid_skips_every_bad_chat_and_keeps_line_numbers(tmp_path, capsys, tokenizer_folder):
    bad = [{"messages": m} for m, _ in BAD_CHATS.values()]
    records = [GOOD, "{not json", bad[0], GOOD, bad[1], bad[2], GOOD, bad[3], bad[4], bad[5], GOOD]
    source = _write(tmp_path / "chat.jsonl", records)
    output = tmp_path / "packed.jsonl"
    code, out, err = _run(capsys, "pack", source, "-o", output, "--max-length", 64, "--tokenizer", tokenizer_folder,
                          "--skip-invalid", "--no-plot")
    assert code == 0, (out, err)
    summary = " ".join(out.split())
    # the lines as an editor shows them, though earlier records were skipped
    assert "skipped 7 invalid records" in summary, summary
    for where in ("line 2 (not valid JSON", "line 3 (field 'messages[1].content' is an int (42)",
                  "line 5 (field 'messages[1].content' is missing or null", "line 6 (field 'messages[1].content'",
                  "line 8 (field 'messages[0].role' is 'bot'"):
        assert where in summary, (where, summary)
    meta = json.loads((tmp_path / "packed.jsonl.packmask.json").read_text())
    assert meta["skipped_invalid_records"] == 7
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sum(len(row["seq_lengths"]) for row in rows) == 4  # the four good conversations, nothing else


def test_skip_invalid_on_the_arrow_path_keeps_line_numbers(tmp_path, capsys, tokenizer_folder):
    # every line parses with one type per field, so Arrow's reader is used; the null content is on line 16
    records = [GOOD] * 12 + [""] + [GOOD] * 2 + [{"messages": [USER, {"role": "assistant", "content": None}]}]
    source = _write(tmp_path / "chat.jsonl", records + [GOOD])
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tokenizer_folder)
    assert code == 2 and "line 16: field 'messages[1].content' is missing or null" in err[0], err
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tokenizer_folder, "--skip-invalid")
    assert code == 0 and "skipped 1 invalid record: line 16" in " ".join(out.split()), (out, err)


def test_a_file_mixing_text_and_messages_is_named_in_one_line(tmp_path, capsys, tokenizer_folder):
    source = _write(tmp_path / "mixed.jsonl", [{"text": "plain text"}] * 2 + [GOOD] * 1000)
    for extra in ([], ["--skip-invalid"]):
        code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tokenizer_folder, *extra)
        assert code == 2 and len(err) == 1, (out, err)
        for fragment in ("mixes kinds of records", "2 hold 'text'", "1,000 hold 'messages' instead", "first: line 3",
                         "fix: pack each kind from its own file"):
            assert fragment in err[0], (fragment, err[0])
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "mixed.parquet"
    pq.write_table(pa.table({"text": ["a", None], "messages": [None, GOOD["messages"]]}), parquet)
    code, out, err = _run(capsys, "stats", parquet, "--max-length", 64, "--tokenizer", tokenizer_folder)
    assert code == 2 and "1 hold 'messages' instead (first: row 1)" in err[0], err
    # control: one kind per file is fine
    code, out, err = _run(capsys, "stats", _write(tmp_path / "chat.jsonl", [GOOD] * 3), "--max-length", 64,
                          "--tokenizer", tokenizer_folder)
    assert code == 0, (out, err)


def test_api_names_row_and_field(tokenizer_folder):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    with pytest.raises(PackmaskError, match=r"'messages\[1\].content' is an int \(42\), not text; each message"):
        tokenize_messages(tokenizer, [USER, {"role": "assistant", "content": 42}])
    with pytest.raises(PackmaskError, match=r"'messages\[0\].role' is 'bot'"):
        tokenize_messages(tokenizer, [{"role": "bot", "content": "hi"}])
    dataset = Dataset.from_dict({"messages": [GOOD["messages"], [USER, {"role": "assistant", "content": None}]]})
    with pytest.raises(PackmaskError, match=r"^row 1 \(dataset\[1\]\): field 'messages\[1\].content' is missing"):
        tokenize_chat_dataset(dataset, tokenizer)
    assert tokenize_chat_dataset(dataset.select([0]), tokenizer).num_rows == 1  # control: the good row alone


def test_chat_content_of_two_kinds_names_the_first_record_of_the_other_kind(tmp_path, capsys, tokenizer_folder):
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, ASSISTANT]}
    source = _write(tmp_path / "chat.jsonl", [GOOD, GOOD, "", parts, GOOD])
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tokenizer_folder)
    assert code == 2 and len(err) == 1, (out, err)
    assert f"{source}, line 4: field 'messages' holds a different kind of value" in err[0], err


def test_a_role_the_chat_template_names_is_known(tmp_path, capsys):
    from test_cli import CHAT_TEMPLATE

    from packmask.cli.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = "{% if messages[0]['role'] == 'document' %}[doc]{% endif %}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tok")
    with_document = {"messages": [{"role": "document", "content": "some text"}, USER, ASSISTANT]}
    source = _write(tmp_path / "chat.jsonl", [GOOD, with_document])
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tmp_path / "tok")
    assert code == 0, (out, err)
    # control: a role neither standard nor in the template is still refused
    source = _write(tmp_path / "bot.jsonl", [GOOD, {"messages": [{"role": "bot", "content": "x"}]}])
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tmp_path / "tok")
    assert code == 2 and "'messages[0].role' is 'bot', not a known role" in err[0], err


def test_a_conversation_the_template_rejects_is_named_by_its_line(tmp_path, capsys):
    from test_cli import CHAT_TEMPLATE
    from transformers import AutoTokenizer

    from packmask.cli.demo import build_demo_tokenizer
    from packmask.data.chat import ChatRowError

    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = "{% if messages|length > 2 %}{{ raise_exception('one turn only') }}{% endif %}" + CHAT_TEMPLATE
    tokenizer.save_pretrained(tmp_path / "tok")
    long = {"messages": [USER, ASSISTANT, USER]}
    source = _write(tmp_path / "chat.jsonl", [GOOD, "{not json", GOOD, long, GOOD])  # skipping line 2 shifts nothing
    code, out, err = _run(capsys, "stats", source, "--max-length", 64, "--tokenizer", tmp_path / "tok", "--skip-invalid")
    assert code == 2 and len(err) == 1, (out, err)
    assert f"{source}, line 4: the chat template rejected this conversation" in err[0] and "one turn only" in err[0], err
    dataset = Dataset.from_dict({"messages": [GOOD["messages"], long["messages"]]})
    with pytest.raises(ChatRowError, match=r"^row 1 \(dataset\[1\]\): the chat template rejected") as error:
        tokenize_chat_dataset(dataset, AutoTokenizer.from_pretrained(tmp_path / "tok"))
    assert error.value.row == 1
