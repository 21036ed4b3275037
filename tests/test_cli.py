"""The ``packmask`` command as a user runs it: a subprocess per command, checking exit codes, the
one-line errors and the files written.

Each call starts a fresh interpreter (torch + transformers import, ~4 s), so the file keeps to
one call per behaviour and a demo of a few steps.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"


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


def test_demo_trains_padded_and_packed_and_writes_plot(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--steps", 6, "--no-progress", "--out-dir", out, "--max-length", 256)
    assert result.returncode == 0, result.stderr
    for text in ("real tokens / s", "padding fraction", "loss at step 6", "max |per-seq loss − alone|"):
        assert text in result.stdout, (text, result.stdout)
    assert (out / "demo.png").stat().st_size > 10_000
    report = json.loads((out / "demo.json").read_text())
    padded, packed = report["padded"], report["packed"]
    assert len(padded["losses"]) == len(packed["losses"]) == 6
    # identical weights and documents at step 1: the losses agree to float rounding
    assert abs(padded["losses"][0] - packed["losses"][0]) < 1e-4
    assert padded["padding_fraction"] > packed["padding_fraction"]
    assert packed["real_tokens"] == padded["real_tokens"]
    iso = report["isolation"]
    assert iso["max_abs_diff_packed_vs_alone"] < 1e-4
    assert iso["max_abs_diff_plain_causal_vs_alone"] > 1e-3  # the contrast really is contaminated


def test_pack_jsonl_writes_rows_histogram_and_stats(tmp_path, token_jsonl):
    output = tmp_path / "packed.parquet"
    result = run_cli("pack", token_jsonl, "-o", output, "--max-length", 256)
    assert result.returncode == 0, result.stderr
    assert "fill" in result.stdout and "documents in" in result.stdout
    histogram = tmp_path / "packed-histogram.png"
    assert histogram.stat().st_size > 10_000

    import pyarrow.parquet as pq

    table = pq.read_table(output).to_pydict()
    originals = [json.loads(line)["input_ids"] for line in token_jsonl.read_text().splitlines()]
    assert all(sum(lengths) == len(ids) <= 256 for ids, lengths in zip(table["input_ids"], table["seq_lengths"]))
    # every document comes back whole, exactly once (none is longer than 256, so none is cut)
    unpacked = []
    for ids, lengths in zip(table["input_ids"], table["seq_lengths"]):
        starts = [sum(lengths[:i]) for i in range(len(lengths))]
        unpacked += [ids[start : start + length] for start, length in zip(starts, lengths)]
    assert sorted(unpacked) == sorted(originals)

    again = run_cli("pack", token_jsonl, "-o", output, "--max-length", 256)
    assert_one_line_error(again, "already exists", "--force")


def test_pack_text_into_saved_dataset_folder(tmp_path):
    source = tmp_path / "text.jsonl"
    source.write_text("".join(json.dumps({"text": f"Return the sum of {i} numbers. " * (1 + i % 7)}) + "\n"
                              for i in range(120)))
    output = tmp_path / "packed"
    result = run_cli("pack", source, "-o", output, "--max-length", 128, "--strategy", "ffd")
    assert result.returncode == 0, result.stderr
    assert "demo tokenizer" in result.stdout

    from datasets import load_from_disk

    packed = load_from_disk(str(output))
    assert set(packed.column_names) >= {"input_ids", "seq_lengths"}
    assert (tmp_path / "packed-histogram.png").exists()


def test_stats_reports_without_writing(tmp_path, token_jsonl):
    before = sorted(p.name for p in token_jsonl.parent.iterdir())
    result = run_cli("stats", token_jsonl, "--max-length", 128, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "truncated docs" in result.stdout and "> 128" in result.stdout
    assert sorted(p.name for p in token_jsonl.parent.iterdir()) == before
    assert list(tmp_path.iterdir()) == []


def test_error_missing_file(tmp_path):
    assert_one_line_error(run_cli("stats", tmp_path / "nope.jsonl", "--max-length", 64), "no such file")


def test_error_wrong_column(token_jsonl):
    result = run_cli("pack", token_jsonl, "-o", token_jsonl.parent / "x.parquet", "--max-length", 64,
                     "--column", "tokens")
    assert_one_line_error(result, "'tokens'", "--column")
    assert not (token_jsonl.parent / "x.parquet").exists()


def test_error_overflow_when_max_length_below_longest(token_jsonl):
    result = run_cli("stats", token_jsonl, "--max-length", 50, "--overflow", "error")
    assert_one_line_error(result, "longest sequence", "--max-length")


def test_error_unknown_family_and_debug_shows_traceback():
    assert_one_line_error(run_cli("verify", "--model", "lamma"), "unknown model family 'lamma'", "llama")
    debug = run_cli("--debug", "verify", "--model", "lamma")
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_verify_llama():
    result = run_cli("verify", "--model", "llama", "--forms", "mask3d,collator")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "collator" in result.stdout and "PASS llama" in result.stdout


def test_bench_prints_its_table():
    # one method keeps the CPU smoke test short (METHODS is the benchmark's own selector)
    result = run_cli("bench", env={"METHODS": "packmask_collator"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "real tok/s" in result.stdout and "packmask_collator" in result.stdout


def test_console_script_is_installed():
    script = shutil.which("packmask")
    if script is None:
        pytest.skip("the packmask console script is not on PATH (package not pip-installed)")
    result = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and result.stdout.startswith("packmask ")


def test_cli_choices_match_the_packer():
    import importlib

    cli = importlib.import_module("packmask.cli.main")
    from packmask.data import packing

    assert cli.STRATEGIES == packing.STRATEGIES
    assert cli.OVERFLOWS == packing.OVERFLOWS
