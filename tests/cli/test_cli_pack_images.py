"""``packmask pack --processor``: image-text records through a tiny Gemma 3 processor saved offline, in this
process (``main``), as tests/cli/test_cli_records.py runs the text path: one-line errors naming file,
line and field; ``--skip-invalid`` counts; outputs appear whole or not at all."""
from __future__ import annotations

import io
import json
import os

import pytest

from _cli_run import assert_error, run  # tests/cli/_cli_run.py

PH = "<start_of_image>"


@pytest.fixture(scope="module")
def processor_dir(tmp_path_factory):
    from packmask.multimodal.tiny_processor import tiny_processor

    folder = tmp_path_factory.mktemp("processor")
    tiny_processor("gemma3").save_pretrained(folder)
    return folder


def png(seed=0, h=16, w=20):
    from packmask.multimodal.tiny_processor import tiny_image

    buffer = io.BytesIO()
    tiny_image(h, w, seed).save(buffer, format="PNG")
    return buffer.getvalue()


def write(folder, records, name="in.jsonl"):
    (folder / "imgs").mkdir(exist_ok=True)
    (folder / "imgs" / "a.png").write_bytes(png(0))
    (folder / "imgs" / "b.png").write_bytes(png(1, 24, 16))
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


GOOD = [{"text": f"w5 {PH} w7", "images": ["imgs/a.png"]}, {"text": "w3 w4 w5"},
        {"text": f"{PH} w6 {PH} w8", "images": ["imgs/b.png", "imgs/a.png"]}]


def test_pack_writes_rows_that_read_back(tmp_path, capsys, processor_dir):
    from transformers import AutoProcessor

    from packmask.multimodal.packed import load_packed_image_text

    source = write(tmp_path, GOOD)
    code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 24, "-o",
                         tmp_path / "out.parquet")
    assert code == 0, err
    assert "3 images in 2 of 3 samples; 12 image tokens" in out and (tmp_path / "out-histogram.png").exists()
    assert not [p for p in os.listdir(tmp_path) if "packmask-tmp" in p]
    import pyarrow.parquet as pq

    metadata = json.loads(pq.read_schema(tmp_path / "out.parquet").metadata[b"packmask"])
    assert metadata["processor"] == str(processor_dir.resolve()) and metadata["images"] == 3
    rows = load_packed_image_text(tmp_path / "out.parquet", AutoProcessor.from_pretrained(processor_dir))
    samples = [s for i in range(len(rows)) for s in rows[i]]
    assert sorted(s["input_ids"].shape[1] for s in samples) == [3, 8, 14]
    assert sum(s.get("pixel_values", []).__len__() for s in samples) == 3
    # packing an output again is refused (it is already packed)
    assert_error(run(capsys, "pack", tmp_path / "out.parquet", "--processor", processor_dir, "--max-length", 24,
                     "-o", tmp_path / "again.parquet"), "already packed")


def test_parquet_input_with_datasets_image_feature(tmp_path, capsys, processor_dir):
    import datasets

    features = datasets.Features({"text": datasets.Value("string"), "images": datasets.Sequence(datasets.Image())})
    data = datasets.Dataset.from_dict({"text": [f"w5 {PH}", "w6 w7"],
                                       "images": [[{"bytes": png(3), "path": None}], []]}, features=features)
    data.to_parquet(str(tmp_path / "in.parquet"))
    code, out, err = run(capsys, "pack", tmp_path / "in.parquet", "--processor", processor_dir, "--max-length", 16,
                         "-o", tmp_path / "out.parquet")
    assert code == 0, err
    assert "1 images in 1 of 2 samples" in out


def test_paligemma_records_pack_with_their_suffix(tmp_path, capsys):
    """PaliGemma's processor takes the answer apart (``suffix``): the rows keep it, and a record without one is
    an error naming its line and field."""
    from transformers import AutoProcessor

    from packmask.multimodal.packed import load_packed_image_text
    from packmask.multimodal.tiny_processor import tiny_processor

    folder = tmp_path / "paligemma"
    tiny_processor("paligemma").save_pretrained(folder)
    good = [{"text": "w5 w6", "suffix": "w7 w8", "images": ["imgs/a.png"]},
            {"text": "w9", "suffix": "w3", "images": ["imgs/b.png"]}]
    code, out, err = run(capsys, "pack", write(tmp_path, good), "--processor", folder, "--max-length", 24, "-o",
                         tmp_path / "out.parquet")
    assert code == 0, err
    rows = load_packed_image_text(tmp_path / "out.parquet", AutoProcessor.from_pretrained(folder))
    samples = [s for i in range(len(rows)) for s in rows[i]]
    assert sorted(s["input_ids"][0][s["labels"][0] != -100].tolist() for s in samples) == [[3, 2], [7, 8, 2]]
    bad = good + [{"text": "w5", "images": ["imgs/a.png"]}]
    assert_error(run(capsys, "pack", write(tmp_path, bad, "bad.jsonl"), "--processor", folder, "--max-length", 24,
                     "-o", tmp_path / "bad.parquet"), "bad.jsonl, line 3", "'suffix'", "is missing")


BAD = {  # the bad record (written as line 3), fragments of the error
    "missing image file": ({"text": f"w5 {PH}", "images": ["imgs/nope.png"]},
                           ["in.jsonl, line 3", "'images[0]'", "no such image file", "--image-root"]),
    "corrupt image": ({"text": f"w5 {PH}", "images": ["imgs/broken.png"]},
                      ["line 3", "'images[0]' (file 'imgs/broken.png') is not an image PIL can read", "re-save"]),
    "not an image": ({"text": f"w5 {PH}", "images": [{"bytes": "aGVsbG8="}]},  # base64 of b"hello"
                     ["line 3", "'images[0]' (5 bytes given) is not an image PIL can read (cannot identify image "
                      "file) (fix: re-save"]),
    "count mismatch": ({"text": f"w5 {PH} {PH}", "images": ["imgs/a.png"]},
                       ["line 3", "'images' holds 1 image but field 'text' has 2 image placeholders"]),
    "images not a list": ({"text": f"w5 {PH}", "images": "imgs/a.png"}, ["line 3", "not a list of images"]),
    "text null": ({"text": None, "images": ["imgs/a.png"]}, ["line 3", "'text'", "missing or null"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_record_is_one_line_and_skip_invalid_counts_it(tmp_path, capsys, processor_dir, case):
    record, fragments = BAD[case]
    source = write(tmp_path, [GOOD[0], GOOD[1], record, GOOD[2]])
    (tmp_path / "imgs" / "broken.png").write_bytes(png(0)[:50])
    output = tmp_path / "out.parquet"
    assert_error(run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 24, "-o", output),
                 *fragments, "--skip-invalid")
    assert not output.exists() and not [p for p in os.listdir(tmp_path) if "packmask-tmp" in p]
    code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 24, "-o", output,
                         "--skip-invalid")
    assert code == 0, err
    assert "skipped 1 invalid record: line 3" in " ".join(out.split())
    import pyarrow.parquet as pq

    assert json.loads(pq.read_schema(output).metadata[b"packmask"])["skipped_invalid_records"] == 1


def test_too_long_sample_names_its_line_or_is_dropped(tmp_path, capsys, processor_dir):
    source = write(tmp_path, GOOD)
    assert_error(run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 10, "-o",
                     tmp_path / "o.parquet"), "line 3", "14 tokens with its 2 images", "--overflow drop")
    code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 10, "-o",
                         tmp_path / "o.parquet", "--overflow", "drop")
    assert code == 0 and "removed 1 samples" in " ".join(out.split()), (out, err)


def test_processor_and_output_checks_come_first(tmp_path, capsys, processor_dir):
    missing = tmp_path / "nope.jsonl"  # never read: each check below fails before INPUT is opened
    assert_error(run(capsys, "pack", missing, "--processor", tmp_path / "none", "--max-length", 8, "-o",
                     tmp_path / "o.parquet"), "--processor", "no such folder")
    (tmp_path / "empty").mkdir()
    assert_error(run(capsys, "pack", missing, "--processor", tmp_path / "empty", "--max-length", 8, "-o",
                     tmp_path / "o.parquet"), "no processor transformers can load")
    assert_error(run(capsys, "pack", missing, "--processor", "some-org/some-model", "--max-length", 8, "-o",
                     tmp_path / "o.parquet"), "not a local folder", "never downloads")
    assert_error(run(capsys, "pack", missing, "--processor", processor_dir, "--max-length", 8, "-o",
                     tmp_path / "o.jsonl"), "image bytes", ".parquet")
    assert_error(run(capsys, "pack", missing, "--processor", processor_dir, "--tokenizer", "demo", "--max-length", 8,
                     "-o", tmp_path / "o.parquet"), "both given")


def test_failed_write_leaves_the_previous_output(tmp_path, capsys, processor_dir, monkeypatch):
    source = write(tmp_path, GOOD)
    output = tmp_path / "out.parquet"
    output.write_bytes(b"previous")
    from packmask.cli import pack_images

    def interrupted(packed, target, metadata, outputs):
        outputs.stage(target).write_bytes(b"PAR1 half")
        raise KeyboardInterrupt

    monkeypatch.setattr(pack_images, "write_packed", interrupted)
    code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 24, "-o", output,
                         "--force")
    assert code == 130 and output.read_bytes() == b"previous"
    assert not [p for p in os.listdir(tmp_path) if "packmask-tmp" in p]
    assert not (tmp_path / "out-histogram.png").exists()


def test_chat_records_score_the_assistant_turns(tmp_path, capsys, processor_dir):
    from transformers import AutoProcessor

    from packmask.multimodal.packed import load_packed_image_text

    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w9 w10"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "w11 w12"}]}]
    source = write(tmp_path, [{"messages": chat, "images": ["imgs/a.png"]}, {"messages": chat[1:] and
                              [{"role": "user", "content": [{"type": "text", "text": "w3"}]}, chat[1]]}])
    code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 40, "-o",
                         tmp_path / "out.parquet")
    assert code == 0, err
    rows = load_packed_image_text(tmp_path / "out.parquet", AutoProcessor.from_pretrained(processor_dir))
    samples = [s for i in range(len(rows)) for s in rows[i]]
    assert len(samples) == 2 and sum("pixel_values" in s for s in samples) == 1
    for s in samples:  # the reply and its end-of-turn token only (105 = <|im_end|>), never the image
        assert s["input_ids"][0][s["labels"][0] != -100].tolist() == [11, 12, 105]


def test_stats_reports_and_writes_nothing(tmp_path, capsys, processor_dir):
    source = write(tmp_path, GOOD)
    before = sorted(os.listdir(tmp_path))
    code, out, err = run(capsys, "stats", source, "--processor", processor_dir, "--max-length", 24)
    assert code == 0, err
    assert "3 images in 2 of 3 samples" in out and "rows" in out and sorted(os.listdir(tmp_path)) == before


def test_chat_without_a_template_is_one_error(tmp_path, capsys, processor_dir):
    from transformers import AutoProcessor

    bare = AutoProcessor.from_pretrained(processor_dir)
    bare.chat_template = None
    bare.save_pretrained(tmp_path / "bare")
    for name in ("chat_template.jinja", "chat_template.json"):
        (tmp_path / "bare" / name).unlink(missing_ok=True)
    source = write(tmp_path, [{"messages": [{"role": "user", "content": [{"type": "text", "text": "w3"}]}]}] * 3)
    assert_error(run(capsys, "pack", source, "--processor", tmp_path / "bare", "--max-length", 24, "-o",
                     tmp_path / "o.parquet", "--skip-invalid"), "has no chat template")


def test_num_proc_writes_the_same_rows_and_names_the_same_bad_line(tmp_path, capsys, processor_dir):
    import pyarrow.parquet as pq

    many = [GOOD[i % 3] for i in range(150)]  # three chunks of records: two worker processes
    source = write(tmp_path, many)
    outputs = []
    for procs in (1, 2):
        output = tmp_path / f"out{procs}.parquet"
        code, out, err = run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 64, "-o", output,
                             "--num-proc", procs, "--no-plot")
        assert code == 0, err
        outputs.append(pq.read_table(output).replace_schema_metadata(None))
    assert outputs[0].equals(outputs[1])
    many[130] = BAD["count mismatch"][0]
    source = write(tmp_path, many)
    assert_error(run(capsys, "pack", source, "--processor", processor_dir, "--max-length", 64, "-o",
                     tmp_path / "bad.parquet", "--num-proc", 2), "line 131", "2 image placeholders")


def test_a_column_of_mixed_kinds_is_kept_by_place_from_the_one_read(tmp_path):
    """Image values of kinds Arrow cannot hold in one column (a list here, a string there) stay out of the
    table but come back by place from the same read of the file, for each record to be checked alone."""
    from types import SimpleNamespace

    from packmask.cli.inputs import load_input

    source = write(tmp_path, [GOOD[0], {"text": "w5", "images": "imgs/a.png"}, {"text": "w3"}, GOOD[2]])
    args = SimpleNamespace(column="input_ids", text_column="text", messages_column="messages", skip_invalid=False,
                           split=None)
    loaded = load_input(source, args, keep_places=True)
    assert loaded.mixed_columns == ["images"] and "images" not in loaded.table.column_names
    assert loaded.mixed_values == {"images": {"line 1": ["imgs/a.png"], "line 2": "imgs/a.png", "line 3": None,
                                              "line 4": ["imgs/b.png", "imgs/a.png"]}}


def test_image_flags_without_processor_are_refused(tmp_path, capsys):
    """--images-column / --image-root / --num-proc only drive image-text records: with text (no --processor)
    they would be ignored silently, so the command refuses them and writes nothing."""
    source = tmp_path / "docs.jsonl"
    source.write_text('{"text": "t5 t6 t7"}\n{"text": "t8 t9"}\n')
    out = tmp_path / "o.parquet"
    assert_error(run(capsys, "pack", source, "--tokenizer", "demo", "--max-length", 8, "-o", out, "--num-proc", 2,
                     "--image-root", tmp_path), "--image-root, --num-proc", "--processor")
    assert not out.exists()
    code, _, _ = run(capsys, "pack", source, "--tokenizer", "demo", "--max-length", 8, "-o", out)  # control
    assert code == 0 and out.exists()
