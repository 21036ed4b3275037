"""Image-text records packed through the family's real processor (built offline, tiny), written to Parquet,
read back as rows and trained on: each sample exact against itself alone (logits, loss, every gradient),
the same batch as packing the directly processed samples on the fly, and every bad record one problem
naming its field."""
import base64
import inspect
import io

import pytest
import torch

from packmask.multimodal import MultimodalCollator, pack_samples
from packmask.multimodal.packed import PackedImageText, load_packed_image_text, pack_image_text
from packmask.multimodal.records import RecordProblem, process_record
from packmask.multimodal.tiny import tiny_vlm
from packmask.multimodal.tiny_processor import processor_unavailable, tiny_image, tiny_processor
from packmask.multimodal.verify import compare_packed

TOL = 1e-5
QWEN = "<|vision_start|><|image_pad|><|vision_end|>"
PLACEHOLDER = {"qwen2_vl": QWEN, "qwen2_5_vl": QWEN, "qwen3_vl": QWEN, "gemma3": "<start_of_image>", "llava": "<image>",
               "llava_next": "<image>", "idefics3": "<image>", "smolvlm": "<image>", "mistral3": "[IMG]"}
TYPE_KEY = {"gemma3": "token_type_ids"}  # the others: mm_token_type_ids
MAX_LENGTH = {"llava": 64, "llava_next": 160, "idefics3": 64, "smolvlm": 64}  # the others: 40 (>= 2 rows each)


def family_param(family):
    """``family``, skipped (with the reason) only where its processor needs a missing optional package."""
    missing = processor_unavailable(family)
    return pytest.param(family, marks=pytest.mark.skipif(missing is not None, reason=missing or ""))


def encoded(h, w, seed, fmt="PNG"):
    buffer = io.BytesIO()
    tiny_image(h, w, seed).save(buffer, format=fmt)
    return buffer.getvalue()


def records(folder, family):
    """Every image form: a relative path, raw bytes, datasets' {"bytes"}, a base64 data URI; text and chat."""
    (folder / "imgs").mkdir(exist_ok=True)
    tiny_image(24, 32, 0).save(folder / "imgs" / "a.png")
    ph = PLACEHOLDER[family]
    uri = "data:image/jpeg;base64," + base64.b64encode(encoded(20, 20, 3, "JPEG")).decode()
    chat = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "w9 w10"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "w11 w12 w13"}]}]
    return [{"text": f"w5 {ph} w7 w8", "images": ["imgs/a.png"]},
            {"text": "w3 w4 w5 w6 w7"},
            {"messages": chat, "images": [{"bytes": encoded(16, 16, 1), "path": None}]},
            {"text": f"w5 {ph} w6 {ph} w4", "images": [encoded(40, 20, 2), uri]},
            {"text": "w8 w9 w10"}]


def direct(processor, record, folder):
    """The record processed directly (the reference path: no packmask record code)."""
    from PIL import Image

    images = []
    for value in record.get("images", []):
        if isinstance(value, str) and value.startswith("data:"):
            value = base64.b64decode(value.split(",", 1)[1])
        elif isinstance(value, dict):
            value = value["bytes"]
        images.append(Image.open(folder / value) if isinstance(value, str) else Image.open(io.BytesIO(value)))
    text = record.get("text") or processor.apply_chat_template(record["messages"], tokenize=False)
    out = processor(text=[text], images=images or None, return_tensors="pt", return_mm_token_type_ids=True)
    return {k: v for k, v in out.items() if k != "attention_mask"}


@pytest.mark.parametrize("family", [family_param(f) for f in PLACEHOLDER])
def test_packed_file_trains_exactly_per_sample(tmp_path, family):
    model, processor = tiny_vlm(family), tiny_processor(family)
    recs = records(tmp_path, family)
    max_length = MAX_LENGTH.get(family, 40)  # LLaVA: 16 tokens per image; LLaVA-NeXT, Idefics3: tiles / crops
    packed = pack_image_text(recs, processor, max_length, base_dir=tmp_path)
    packed.to_parquet(str(tmp_path / "packed.parquet"))
    rows = load_packed_image_text(tmp_path / "packed.parquet", processor)
    assert len(rows) >= 2 and sum(len(r) for r in rows) == len(recs)
    read = [rows[i] for i in range(len(rows))]

    # the samples read back are the processor's own output for each record
    alone = [direct(processor, r, tmp_path) for r in recs]
    by_text = {s["input_ids"][0].tolist().__repr__(): s for s in alone}
    for sample in (s for row in read for s in row):
        ref = by_text[sample["input_ids"][0].tolist().__repr__()]
        for key, value in ref.items():
            assert torch.equal(sample[key], value), key
        types = sample.get(TYPE_KEY.get(family, "mm_token_type_ids"))  # Idefics3: none for text-only samples
        assert types is not None or "pixel_values" not in sample
        if types is not None:
            assert (sample["labels"][0][types[0] != 0] == -100).all()
    chat = next(s for row in read for s in row if s["input_ids"].shape[1] == alone[2]["input_ids"].shape[1]
                and torch.equal(s["input_ids"], alone[2]["input_ids"]))
    scored = chat["input_ids"][0][chat["labels"][0] != -100].tolist()
    assert scored == [11, 12, 13, 105]  # the assistant reply and its end-of-turn token, nothing else

    # exact: each sample of the rows read back against itself alone; the control (one sequence) differs
    result = compare_packed(model, read, control=True)
    assert result["logits"] <= TOL and result["loss"] <= TOL and result["grad"] <= TOL, result
    assert result["control"] > 1e-2, result

    # the same batch as packing the directly processed samples on the fly
    collator = MultimodalCollator(model)
    labelled = [dict(a, labels=s["labels"]) for a, s in zip(alone, [by_text_label(read, a) for a in alone])]
    on_the_fly = collator(pack_samples(labelled, max_length))
    from_file = collator(read)
    assert set(on_the_fly) == set(from_file)
    for key, value in on_the_fly.items():
        assert torch.equal(value, from_file[key]) if isinstance(value, torch.Tensor) else value == from_file[key], key


def by_text_label(read, sample):
    return next(s for row in read for s in row if torch.equal(s["input_ids"], sample["input_ids"]))


def test_another_processor_is_refused_when_reading(tmp_path):
    processor = tiny_processor("qwen2_5_vl")
    packed = pack_image_text(records(tmp_path, "qwen2_5_vl"), processor, 64, base_dir=tmp_path)
    other = tiny_processor("qwen2_5_vl")
    other.image_processor.size = {"shortest_edge": 16 * 16, "longest_edge": 16 * 16}  # fewer image tokens
    rows = PackedImageText(packed, other)
    with pytest.raises(Exception, match="not the processor that packed this data"):
        [rows[i] for i in range(len(rows))]


def test_too_long_sample_is_refused_or_dropped(tmp_path):
    processor = tiny_processor("gemma3")
    recs = records(tmp_path, "gemma3")
    with pytest.raises(Exception, match="never cut"):
        pack_image_text(recs, processor, 12, base_dir=tmp_path)
    packed, stats = pack_image_text(recs, processor, 12, base_dir=tmp_path, overflow="drop", return_stats=True)
    assert stats.dropped >= 1 and all(sum(r) <= 12 for r in packed["seq_lengths"])
    with pytest.raises(Exception, match="never truncated or split"):
        pack_image_text(recs, processor, 12, base_dir=tmp_path, overflow="truncate")


def corrupt(tmp_path):
    (tmp_path / "broken.png").write_bytes(encoded(16, 16, 0)[:40])  # a PNG cut short
    return "broken.png"


BAD = {  # record -> (field named, fragment of the problem)
    "missing file": (lambda p, ph: {"text": f"w5 {ph}", "images": ["nope.png"]}, "images[0]", "no such image file"),
    "corrupt image": (lambda p, ph: {"text": f"w5 {ph}", "images": [corrupt(p)]}, "images[0]",
                      "'images[0]' (file 'broken.png') is not an image PIL"),
    "not an image": (lambda p, ph: {"text": f"w5 {ph}", "images": [b"hello"]}, "images[0]",
                     "'images[0]' (5 bytes given) is not an image PIL"),
    "too few placeholders": (lambda p, ph: {"text": "w5 w6", "images": [encoded(16, 16, 0)]}, "images",
                             "holds 1 image but field 'text' has 0 image placeholders"),
    "too many placeholders": (lambda p, ph: {"text": f"{ph} w5 {ph}", "images": [encoded(16, 16, 0)]}, "images",
                              "has 2 image placeholders"),
    "images not a list": (lambda p, ph: {"text": f"w5 {ph}", "images": "a.png"}, "images", "not a list of images"),
    "image of wrong type": (lambda p, ph: {"text": f"w5 {ph}", "images": [7]}, "images[0]", "is an int (7)"),
    "bad base64": (lambda p, ph: {"text": f"w5 {ph}", "images": [{"bytes": "not base64!"}]}, "images[0].bytes",
                   "not base64"),
    "text not a string": (lambda p, ph: {"text": 5}, "text", "is an int (5), not text"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_each_bad_record_names_its_field(tmp_path, case):
    make, field, fragment = BAD[case]
    processor = tiny_processor("gemma3")
    record = make(tmp_path, PLACEHOLDER["gemma3"])
    with pytest.raises(RecordProblem) as info:
        process_record(record, processor, field="text", kind="text", base_dir=tmp_path)
    assert info.value.field == field and fragment in info.value.problem, str(info.value)
    assert "\n" not in str(info.value) and "(fix: " in str(info.value) and " object at 0x" not in str(info.value)
    skipped = []
    good = {"text": "w3 w4"}
    packed = pack_image_text([good, record], processor, 32, base_dir=tmp_path,
                             on_problem=lambda i, p: skipped.append((i, p.field)))
    assert skipped == [(1, field)] and len(packed) == 1


def test_trainer_trains_from_the_packed_file(tmp_path):
    """The HF Trainer's DataLoader hands PackedImageText items (rows) to the collator as rows: each batch
    is exactly the collator's batch of those rows (whose exactness is proven above)."""
    from transformers import Trainer, TrainingArguments

    model, processor = tiny_vlm("qwen2_5_vl"), tiny_processor("qwen2_5_vl")
    pack_image_text(records(tmp_path, "qwen2_5_vl"), processor, 40, base_dir=tmp_path).to_parquet(
        str(tmp_path / "p.parquet"))
    rows = load_packed_image_text(tmp_path / "p.parquet", processor)
    collator = MultimodalCollator(model)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=1, per_device_train_batch_size=2,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
                             dataloader_num_workers=0, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator)
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["position_ids"].shape[:2] == (4, 2)  # two packed rows, [4, B, L] mRoPE positions
    file_rows = [torch.cat([s["input_ids"][0] for s in rows[i]]) for i in range(len(rows))]
    for b in range(2):  # each row of the batch is one of the file's rows, whole, then padding (id 0)
        assert any(torch.equal(batch["input_ids"][b, :len(r)], r) and not batch["input_ids"][b, len(r):].any()
                   for r in file_rows), b
    trainer.train()
    assert torch.isfinite(torch.tensor(trainer.state.log_history[-1]["train_loss"]))


def test_a_datasets_dataset_with_an_image_feature_packs(tmp_path):
    """A ``datasets.Dataset`` whose images decode to PIL images packs as records do: the same tokens and pixels."""
    import datasets

    processor = tiny_processor("gemma3")
    features = datasets.Features({"text": datasets.Value("string"), "images": datasets.Sequence(datasets.Image())})
    data = datasets.Dataset.from_dict({"text": [f"w5 {PLACEHOLDER['gemma3']} w7", "w3 w4"],
                                       "images": [[{"bytes": encoded(20, 28, 4), "path": None}], []]},
                                      features=features)
    from_dataset = pack_image_text(data, processor, 32)
    from_bytes = pack_image_text([{"text": r["text"], "images": [encoded(20, 28, 4)] if r["images"] else []}
                                  for r in data], processor, 32)
    a, b = PackedImageText(from_dataset, processor)[0], PackedImageText(from_bytes, processor)[0]
    assert len(a) == len(b) == 2
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_processors_the_records_cannot_drive_are_refused():
    from packmask.errors import PackmaskError
    from packmask.multimodal.tiny_processor import tiny_tokenizer

    with pytest.raises(PackmaskError, match="not a vision-language processor"):
        pack_image_text([{"text": "w3"}], tiny_tokenizer("llava"), 8)


def test_paligemma_prompt_and_suffix_train_exactly(tmp_path):
    """PaliGemma: the record's text is the prompt (prefix: images + prompt, seeing each other), its
    ``suffix`` the answer (scored, causal); packed, written, read back and trained exactly per sample."""
    model, processor = tiny_vlm("paligemma"), tiny_processor("paligemma")
    recs = [{"text": "w5 w6", "suffix": "w7 w8", "images": [encoded(20, 24, 0)]},
            {"text": "<image> w9", "suffix": "w3 w4 w5 w6", "images": [encoded(16, 16, 1)]},
            {"text": "w5", "suffix": "w7", "images": [encoded(30, 16, 2)]}]
    pack_image_text(recs, processor, 48).to_parquet(str(tmp_path / "p.parquet"))
    rows = load_packed_image_text(tmp_path / "p.parquet", processor)
    read = [rows[i] for i in range(len(rows))]
    assert sorted(len(r) for r in read) == [1, 2]
    from PIL import Image

    for record in recs:  # each sample is the processor's own output for its prompt and suffix
        ref = processor(text=[record["text"]], images=[Image.open(io.BytesIO(record["images"][0]))],
                        suffix=[record["suffix"]], return_tensors="pt", return_mm_token_type_ids=True)
        sample = by_text_label(read, ref)
        for key in ("input_ids", "token_type_ids", "mm_token_type_ids", "pixel_values"):
            assert torch.equal(sample[key], ref[key]), key
        answer = processor.tokenizer(record["suffix"])["input_ids"] + [processor.tokenizer.eos_token_id]
        assert sample["input_ids"][0][sample["labels"][0] != -100].tolist() == answer  # the answer only
    result = compare_packed(model, read, control=True)
    assert result["logits"] <= TOL and result["loss"] <= TOL and result["grad"] <= TOL, result
    assert result["control"] > 1e-2, result

    cases = {"suffix": {"text": "w5", "images": [encoded(16, 16, 0)]},  # field named -> record
             "messages": {"messages": [{"role": "user", "content": "w5"}], "suffix": "w7", "images": []}}
    for field, record in cases.items():
        with pytest.raises(RecordProblem) as info:
            pack_image_text([record], processor, 48)
        assert info.value.field == field and "record 0" in str(info.value), str(info.value)
    with pytest.raises(Exception, match="no 'suffixes' column"):
        PackedImageText(pack_image_text([{"text": "w3 w4"}], tiny_processor("llava"), 8), processor)


@pytest.mark.parametrize("form", ["strict signature", "kwargs that refuse it"])
def test_a_processor_without_return_mm_token_type_ids_packs_the_same(tmp_path, form):
    """A processor whose call does not take ``return_mm_token_type_ids`` (a strict signature, or ``**kwargs``
    that raise on it) is called without it: the same rows as the processor that takes it, read back alike."""
    processor = tiny_processor("gemma3")
    base = type(processor)

    class Strict(base):
        def __call__(self, images=None, text=None, return_tensors=None, **rest):
            if form == "strict signature" and rest:
                raise AssertionError(f"called with {sorted(rest)}")
            if rest:
                raise TypeError(f"__call__() got an unexpected keyword argument {next(iter(rest))!r}")
            return base.__call__(self, images=images, text=text, return_tensors=return_tensors)

    if form == "strict signature":
        Strict.__call__.__signature__ = inspect.signature(lambda self, images=None, text=None, return_tensors=None: 0)
    strict = tiny_processor("gemma3")
    strict.__class__ = Strict  # this one test object only
    recs = records(tmp_path, "gemma3")
    want = pack_image_text(recs, processor, 40, base_dir=tmp_path)
    got = pack_image_text(recs, strict, 40, base_dir=tmp_path)
    assert got.to_dict() == want.to_dict()
    for a, b in zip(PackedImageText(got, strict)[0], PackedImageText(want, processor)[0]):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_num_proc_packs_the_same_rows_and_reports_the_same_records(tmp_path):
    """``num_proc=2`` (three chunks of records over two worker processes) packs the same rows as one process and
    reports the same bad records, by index, in order."""
    processor = tiny_processor("gemma3")
    recs = [records(tmp_path, "gemma3")[i % 5] for i in range(150)]
    recs[70] = {"text": "w5", "images": [7]}
    recs[140] = {"text": None}
    found = {}
    for procs in (1, 2):
        problems = []
        packed = pack_image_text(recs, processor, 40, base_dir=tmp_path, num_proc=procs,
                                 on_problem=lambda i, p: problems.append((i, p.field, str(p))))
        found[procs] = (packed.to_dict(), problems)
    assert found[1] == found[2]
    assert [p[:2] for p in found[1][1]] == [(70, "images[0]"), (140, "text")]
    assert len(found[1][0]["input_ids"]) >= 2
    with pytest.raises(RecordProblem, match="record 70: field 'images"):
        pack_image_text(recs, processor, 40, base_dir=tmp_path, num_proc=2)


def test_an_unknown_tiny_processor_family_is_a_packmask_error():
    from packmask import PackmaskError

    with pytest.raises(PackmaskError, match=r"no tiny processor for family 'nope': pass one of qwen2_vl, "):
        tiny_processor("nope")
