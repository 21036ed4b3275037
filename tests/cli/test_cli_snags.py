"""Smaller CLI snags of issue 21 (item 7): re-packing a packed file, tokenizer errors, the demo folder.

Through ``packmask.cli.main.main`` in this process (the command's code path)."""
from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
from datasets import Dataset

from packmask.cli.main import main
from packmask.data.packing import pack_dataset
from packmask.errors import PackmaskError

REPO = Path(__file__).resolve().parents[2]


def _run(capsys, *args):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, [line for line in captured.err.splitlines() if line.strip()]


def _tokens(path: Path, n: int = 30) -> Path:
    path.write_text("".join(json.dumps({"input_ids": list(range(1, 2 + i % 7))}) + "\n" for i in range(n)))
    return path


@pytest.mark.parametrize("suffix", [".parquet", ".jsonl", ""])
def test_repacking_a_packed_output_is_refused_before_any_report(tmp_path, capsys, suffix):
    source = _tokens(tmp_path / "docs.jsonl")
    packed = tmp_path / f"packed{suffix}"
    code, out, err = _run(capsys, "pack", source, "-o", packed, "--max-length", 16, "--no-plot")
    assert code == 0, (out, err)  # control: the source packs
    for command in (["pack", packed, "-o", tmp_path / "again.parquet"], ["stats", packed]):
        code, out, err = _run(capsys, *command, "--max-length", 16, "--no-plot")
        assert code == 2 and len(err) == 1, (out, err)
        assert f"{packed} is already packed" in err[0] and f"written by packmask pack from {source}" in err[0], err
        assert f"give the source records instead (packmask {command[0]} {source}" in err[0], err
        assert "drop that column" not in err[0] and out.strip() == "", out  # no stats table first


def test_a_packed_dataset_without_metadata_is_refused_by_its_seq_lengths(tmp_path, capsys):
    packed = pack_dataset(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5], [6]]}), 8)
    packed.to_parquet(str(tmp_path / "p.parquet"))  # written without packmask's metadata
    code, out, err = _run(capsys, "stats", tmp_path / "p.parquet", "--max-length", 8)
    assert code == 2 and "already packed (its rows have a 'seq_lengths' column" in err[0], err
    assert "never drop seq_lengths" in err[0] and "documents" not in out, (out, err)
    with pytest.raises(PackmaskError, match="packed already.*pack the unpacked source dataset instead") as error:
        pack_dataset(packed, 8)
    assert "drop that column" not in str(error.value)


@pytest.mark.parametrize("spec, fragment", [
    ("./no-such-folder", "no such folder"),
    ("not a/valid//name", "no such folder"),
    ("nobody-here/no-such-model-for-packmask", "not a local folder, and no model of that name is in the Hugging Face cache"),
])
def test_tokenizer_errors_name_the_local_problem_not_the_hub(tmp_path, capsys, spec, fragment):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "hello"}\n')
    code, out, err = _run(capsys, "stats", source, "--max-length", 8, "--tokenizer", spec)
    assert code == 2 and len(err) == 1, (out, err)
    assert f"--tokenizer {spec}: {fragment}" in err[0] and "--tokenizer demo" not in err[0], err
    assert "'demo' for the built-in toy tokenizer" in err[0], err
    for leak in ("Repo id", "huggingface.co", "repo_type", "alphanumeric"):
        assert leak not in err[0], (leak, err[0])


def test_tokenizer_folder_without_tokenizer_files(tmp_path, capsys):
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "hello"}\n')
    (tmp_path / "empty").mkdir()
    code, out, err = _run(capsys, "stats", source, "--max-length", 8, "--tokenizer", tmp_path / "empty")
    assert code == 2 and "the folder holds no tokenizer files (tokenizer.json, tokenizer_config.json)" in err[0], err


def test_demo_output_folder_is_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    ignored = subprocess.run(["git", "check-ignore", "-q", "packmask-demo/demo.png"], cwd=REPO)
    assert ignored.returncode == 0, "packmask-demo/ (packmask demo's default --out-dir) is not git-ignored"
    control = subprocess.run(["git", "check-ignore", "-q", "src/packmask/__init__.py"], cwd=REPO)
    assert control.returncode == 1
