"""The ``packmask`` command as a user runs it: a subprocess per command, checking exit codes, the
one-line errors and the files written.

Each call starts a fresh interpreter (torch + transformers import, ~4 s), so the file keeps to
one call per behaviour and a demo of a few steps; variants of one behaviour (every kind of bad
record, every way OUTPUT can be the input) run in-process in tests/cli/test_cli_records.py.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

SRC = next(p for p in Path(__file__).resolve().parents if (p / "pyproject.toml").is_file()) / "src"


def run_cli(*args, cwd=None, timeout=180, env=None):
    """``python -m packmask ARGS`` with this checkout first on the path; returns CompletedProcess."""
    env = {**os.environ, **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["COLUMNS"] = "120"  # rich wraps tables to the terminal width; keep rows on one line
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return subprocess.run([sys.executable, "-m", "packmask", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result, *fragments):
    """Exit status 2, exactly one line on stderr starting ``error:``, naming a fix, no traceback."""
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: "), lines[0]
    assert "fix:" in lines[0], lines[0]
    assert "Traceback" not in result.stderr + result.stdout
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture(scope="module")
def token_jsonl(tmp_path_factory):
    """300 tokenized documents of 1..200 tokens, with an extra non-token column."""
    import random

    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "docs.jsonl"
    with path.open("w") as handle:
        for i in range(300):
            ids = [rng.randrange(1000) for _ in range(rng.randint(1, 200))]
            handle.write(json.dumps({"input_ids": ids, "doc_id": i}) + "\n")
    return path


def test_help_answers_at_once_without_importing_torch():
    # the console script's launcher: parse first, import the library only for real work
    probe = ("import json, sys, packmask_cli\n"
             "try:\n    code = packmask_cli.main(sys.argv[1:])\nexcept SystemExit as stop:\n    code = stop.code\n"
             "print(json.dumps({'code': code, 'heavy': sorted(m for m in ('torch', 'transformers', 'datasets', "
             "'numba', 'packmask') if m in sys.modules)}), file=sys.stderr)")
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    for args in (["--help"], ["--version"], ["pack"], *([name, "--help"] for name in
                                                       ("demo", "pack", "stats", "verify", "bench"))):
        started = time.perf_counter()
        result = subprocess.run([sys.executable, "-c", probe, *args], env=env, capture_output=True, text=True,
                                timeout=60)
        seconds = time.perf_counter() - started
        report = json.loads(result.stderr.strip().splitlines()[-1])
        assert report["heavy"] == [], (args, report)
        assert report["code"] == (2 if args == ["pack"] else 0), (args, result.stderr)
        assert seconds < 2.0, (args, seconds)  # about 0.1 s on an idle machine; generous for a loaded one
        assert result.stdout.startswith("packmask ") if args == ["--version"] else True
        assert "docs/" not in result.stdout, (args, result.stdout)  # pip users have no docs/ folder
        if args == ["--help"]:
            assert "`packmask COMMAND --help`" in " ".join(result.stdout.split()), result.stdout


def test_demo_trains_padded_and_packed_and_writes_plot(tmp_path):
    out = tmp_path / "packmask-demo"  # the default --out-dir, in the working folder (git-ignored)
    result = run_cli("demo", "--steps", 4, "--no-progress", "--max-length", 256, "--heldout", 16, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"written to packmask-demo{os.sep} (packmask demo --out-dir DIR" in result.stdout  # says where, first
    for text in ("real tokens / s", "padding fraction", "loss at step 4", "max |per-seq loss − alone|"):
        assert text in result.stdout, (text, result.stdout)
    assert (out / "demo.png").stat().st_size > 10_000
    assert sorted(p.name for p in out.iterdir()) == ["demo.json", "demo.png"]  # no temporary file left
    report = json.loads((out / "demo.json").read_text())
    padded, packed = report["padded"], report["packed"]
    assert len(padded["losses"]) == len(packed["losses"]) == 4
    # identical weights and documents at step 1: the losses agree to float rounding
    assert abs(padded["losses"][0] - packed["losses"][0]) < 1e-4
    assert padded["padding_fraction"] > packed["padding_fraction"]
    assert packed["real_tokens"] == padded["real_tokens"]
    iso = report["isolation"]
    assert iso["documents"] == 16
    assert iso["max_abs_diff_packed_vs_alone"] < 1e-4
    assert iso["max_abs_diff_plain_causal_vs_alone"] > 1e-3  # the contrast really is contaminated


def test_pack_jsonl_writes_rows_metadata_histogram_and_stats(tmp_path, token_jsonl):
    output = tmp_path / "packed.parquet"
    result = run_cli("pack", token_jsonl, "-o", output, "--max-length", 256)
    assert result.returncode == 0, result.stderr
    assert "fill" in result.stdout and "documents in" in result.stdout
    assert "input columns not in the output: doc_id" in result.stdout
    histogram = tmp_path / "packed-histogram.png"
    assert histogram.stat().st_size > 10_000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed-histogram.png", "packed.parquet"]

    import pyarrow.parquet as pq

    table = pq.read_table(output)
    meta = json.loads(table.schema.metadata[b"packmask"])
    assert meta["max_length"] == 256 and meta["strategy"] == "bfd" and meta["overflow"] == "truncate"
    assert meta["tokenizer"] is None and meta["source"] == "token ids" and meta["dropped_columns"] == ["doc_id"]
    assert meta["packmask_version"]
    table = table.to_pydict()
    originals = [json.loads(line)["input_ids"] for line in token_jsonl.read_text().splitlines()]
    assert all(sum(lengths) == len(ids) <= 256 for ids, lengths in zip(table["input_ids"], table["seq_lengths"]))
    # every document comes back whole, exactly once (none is longer than 256, so none is cut)
    unpacked = []
    for ids, lengths in zip(table["input_ids"], table["seq_lengths"]):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        unpacked += [ids[start : start + length] for start, length in zip(starts, lengths)]
    assert sorted(unpacked) == sorted(originals)


def test_pack_text_into_saved_dataset_folder(tmp_path):
    source = tmp_path / "text.jsonl"
    source.write_text("".join(json.dumps({"text": f"Return the sum of {i} numbers. " * (1 + i % 7), "id": i}) + "\n"
                              for i in range(120)))
    output = tmp_path / "packed"
    result = run_cli("pack", source, "-o", output, "--max-length", 128, "--strategy", "ffd", "--tokenizer", "demo")
    assert result.returncode == 0, result.stderr
    assert "packmask-demo-bpe" in result.stdout  # says which tokenizer it used

    from datasets import load_from_disk

    packed = load_from_disk(str(output))
    assert set(packed.column_names) >= {"input_ids", "seq_lengths"}
    assert (tmp_path / "packed-histogram.png").exists()
    meta = json.loads((output / "packmask.json").read_text())
    assert meta["tokenizer"].startswith("packmask-demo-bpe") and meta["source"] == "text"
    assert meta["eos_appended"] is True and meta["dropped_columns"] == ["id"] and meta["strategy"] == "ffd"


def test_stats_reports_and_warns_about_truncation_without_writing(tmp_path, token_jsonl):
    before = sorted(p.name for p in token_jsonl.parent.iterdir())
    result = run_cli("stats", token_jsonl, "--max-length", 128, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "truncated docs" in result.stdout and "> 128" in result.stdout
    warning = " ".join(result.stdout[result.stdout.index("warning:"):].split())
    assert "truncation cut 3,592 of 28,150 tokens (12.8%)" in warning and "--overflow split" in warning
    assert sorted(p.name for p in token_jsonl.parent.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def big_jsonl(tmp_path_factory):
    """60k documents, 1.9M tokens: writing the packed JSON lines takes about a second."""
    import numpy as np

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 64, size=60_000)
    ids = rng.integers(0, 50_000, size=int(lengths.sum())).astype(str)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    path = tmp_path_factory.mktemp("big") / "big.jsonl"
    path.write_text("".join('{"input_ids": [%s]}\n' % ",".join(ids[s : s + n]) for s, n in zip(starts, lengths)))
    return path


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_mid_write_leaves_previous_output_untouched(tmp_path, big_jsonl, signum):
    output = tmp_path / "packed.jsonl"
    sidecar = tmp_path / "packed.jsonl.packmask.json"
    output.write_bytes(b'{"input_ids": [1, 2, 3], "seq_lengths": [3]}\n')  # a previous, good output
    sidecar.write_bytes(b'{"max_length": 3}\n')
    before = {path.name: path.read_bytes() for path in (output, sidecar)}
    env = {**os.environ, "PYTHONPATH": str(SRC), "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen([sys.executable, "-m", "packmask", "pack", str(big_jsonl), "-o", str(output), "--max-length", "64",
                                "--force", "--no-plot"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while True:  # wait until the data is being written: the staged temporary file has bytes
        staged = [p for p in tmp_path.glob(".packed.jsonl.*packmask-tmp") if ".probe." not in p.name]
        if any(p.exists() and p.stat().st_size > 0 for p in staged):
            break
        assert process.poll() is None, ("finished before it could be interrupted", process.communicate())
        assert time.monotonic() < deadline
        time.sleep(0.005)
    process.send_signal(signum)
    stdout, stderr = process.communicate(timeout=120)
    print(stderr)  # whole, in the failure report (a native crash's traceback from faulthandler is long)
    assert process.returncode == (130 if signum == signal.SIGINT else 143), (process.returncode, stdout, stderr)
    assert ("interrupted" if signum == signal.SIGINT else "terminated") in stderr
    assert "Traceback" not in stderr
    assert {path.name: path.read_bytes() for path in (output, sidecar)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["packed.jsonl", "packed.jsonl.packmask.json"]


def test_output_that_is_the_input_is_refused(tmp_path, token_jsonl):
    source = tmp_path / "good.jsonl"
    shutil.copy(token_jsonl, source)
    before = source.read_bytes()
    result = run_cli("pack", "good.jsonl", "-o", "good.jsonl", "--max-length", 256, "--force", cwd=tmp_path)
    assert_one_line_error(result, "is the input")
    assert source.read_bytes() == before


def test_missing_text_is_a_one_line_error_naming_the_line(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "one"}\n{"body": "no text field"}\n{"text": "three"}\n')
    result = run_cli("pack", source, "-o", tmp_path / "out.parquet", "--max-length", 64, "--tokenizer", "demo")
    assert_one_line_error(result, f"{source}, line 2: field 'text' is missing or null", "--skip-invalid")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl"]


def test_non_utf8_bytes_are_a_one_line_error_naming_the_line(tmp_path):
    source = tmp_path / "docs.jsonl"
    source.write_bytes(b'{"input_ids": [1, 2]}\n{"input_ids": [3], "note": "caf\xe9"}\n')
    result = run_cli("stats", source, "--max-length", 64)
    assert_one_line_error(result, f"{source}, line 2: not UTF-8 text", "re-encode")


CHAT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'assistant' %}<|assistant|>{% generation %}"
                 "{{ m['content'] }}<|endoftext|>{% endgeneration %}{% else %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "<|endoftext|>{% endif %}{% endfor %}")


def chat_tokenizer_folder(folder: Path) -> Path:
    """The demo tokenizer with a chat template that marks assistant turns, saved like a model's."""
    from packmask.cli.demo import build_demo_tokenizer

    tokenizer = build_demo_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


def write_chat(path: Path, n: int = 20) -> Path:
    path.write_text("".join(json.dumps({"id": i, "messages": [{"role": "user", "content": f"What is {i} + {i}?"},
                                                              {"role": "assistant", "content": f"It is {2 * i}."}]})
                            + "\n" for i in range(n)))
    return path


def test_chat_messages_go_through_the_chat_template_with_labels_on_assistant_turns(tmp_path):
    tokenizer_folder = chat_tokenizer_folder(tmp_path / "tok")
    source = write_chat(tmp_path / "chat.jsonl")
    output = tmp_path / "packed.jsonl"
    result = run_cli("pack", source, "-o", output, "--max-length", 128, "--tokenizer", tokenizer_folder, "--no-plot")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "chat template" in result.stdout and "input columns not in the output: id" in " ".join(result.stdout.split())

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder)
    rows = [json.loads(line) for line in output.read_text().splitlines()]
    assert sum(len(row["seq_lengths"]) for row in rows) == 20
    for row in rows:
        assert len(row["labels"]) == len(row["input_ids"])
        labelled = [label for label in row["labels"] if label != -100]
        assert all(label == token for label, token in zip(row["labels"], row["input_ids"]) if label != -100)
        text = tokenizer.decode(labelled)
        assert text.count("It is") == len(row["seq_lengths"]) and "What" not in text and "user" not in text, text
    meta = json.loads((tmp_path / "packed.jsonl.packmask.json").read_text())
    assert meta["source"] == "chat messages" and meta["train_on"] == "assistant"
    assert meta["tokenizer"] == str(tokenizer_folder.resolve()) and meta["dropped_columns"] == ["id"]


def test_error_unknown_family_and_debug_shows_traceback():
    assert_one_line_error(run_cli("verify", "--model", "lamma"), "unknown model family 'lamma'", "llama")
    debug = run_cli("--debug", "verify", "--model", "lamma")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_verify_llama():
    result = run_cli("verify", "--model", "llama", "--forms", "mask3d,collator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "collator" in result.stdout and "PASS llama" in result.stdout


def test_bench_on_cpu_times_packmask_against_transformers_and_skips_gpu_methods(tmp_path):
    result = run_cli("bench", "--device", "cpu", "--steps", 1, "--row-length", 128, "--json", tmp_path / "b.json")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    for line in ("skipped packmask flex: needs CUDA", "skipped transformers flex: needs CUDA"):
        assert sum(line in out for out in result.stdout.splitlines()) == 1, result.stdout
    def no_nan(token):
        raise AssertionError(f"invalid JSON token {token} in the --json output")

    report = json.loads((tmp_path / "b.json").read_text(), parse_constant=no_nan)  # strict JSON: no NaN
    rows = report["results"]
    assert rows["transformers sdpa"]["step_gib"] is None  # not measured on a CPU: null, not NaN
    assert rows["transformers sdpa"]["attention"] == "sdpa"
    assert rows["packmask collator"]["packmask_backend"] == "sdpa"  # what the dispatcher picks on a CPU
    assert "flex" in rows["packmask collator"]["dispatch"]["refused"]  # and why not a GPU kernel
    for name in ("transformers sdpa", "packmask collator", "packmask [B,N,N] mask"):
        assert rows[name]["passed"] and rows[name]["rel_err_vs_alone"] < 1e-4, (name, rows[name])


def test_console_script_is_installed():
    script = shutil.which("packmask")
    if script is None:
        pytest.skip("the packmask console script is not on PATH (package not pip-installed)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("packmask ")


def test_cli_choices_match_the_packer():
    from packmask.cli import parser
    from packmask.data import packing

    assert parser.STRATEGIES == packing.STRATEGIES
    assert parser.OVERFLOWS == packing.OVERFLOWS
