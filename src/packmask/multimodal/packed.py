"""Image-text records packed ahead of training, and read back as rows for :class:`MultimodalCollator`.

:func:`pack_image_text` runs each record through the model's processor (:mod:`.records`), assigns the
samples to rows of at most ``max_length`` tokens by best fit over all of them (image tokens counted
by the processor), and returns an Arrow-backed ``datasets.Dataset`` with one row per packed row:

================  =========================================================================
column            per packed row
================  =========================================================================
input_ids         the samples' token ids, concatenated (image tokens included)
labels            their labels (``-100`` on image tokens; chat: on all but assistant turns)
mm_token_type_ids  the processor's token types (``token_type_ids`` for Gemma 3), where it returns them
seq_lengths       tokens of each sample (sums to the row length), as text packing writes
image_counts      images of each sample
images            the row's images, in reading order, as their **encoded bytes** (PNG, JPEG, ...)
texts             each sample's text as given to the processor (chat: the rendered template)
suffixes          PaliGemma: each sample's answer (the processor's ``suffix=``), beside its prompt
================  =========================================================================

Images are stored encoded, not as pixel tensors: one Qwen2.5-VL image of 1,024 tokens is ~19 MB of
float32 ``pixel_values`` but ~0.1-0.5 MB as JPEG, and pixel layouts differ per family (patches,
tiles, crops). :class:`PackedImageText` runs the same processor again on each sample's text and
images when a row is read (in DataLoader workers), and checks that its tokens equal the stored ones,
so a different processor (another ``max_pixels``: other image token counts) is an error, never a
silently different row length. Worked example (``max_length=16``; ``b`` has one 12-token image)::

    samples        a: 5 tokens   b: 15 tokens (a 12-token image)   c: 9 tokens   d: 7 tokens
    best fit       row 0: b        (15)
                   row 1: c, d     (16)   each row keeps dataset order
                   row 2: a        (5)
    row 0          input_ids [b0 <vs> I x12 <ve> b1]   seq_lengths [15]   image_counts [1]   images [b.png bytes]
    row 1          input_ids [c0..c8 d0..d6]           seq_lengths [9, 7]  image_counts [0, 0] images []

>>> samples = [dict(input_ids=[3] * n, labels=[3] * n, images=[b"b.png bytes"] if n == 15 else [], text=name)
...            for name, n in zip("abcd", (5, 15, 9, 7))]
>>> packed, stats = pack_processed(samples, 16)
>>> [(row["texts"], row["seq_lengths"], row["image_counts"], row["images"]) for row in packed]
[(['b'], [15], [1], [b'b.png bytes']), (['c', 'd'], [9, 7], [0, 0], []), (['a'], [5], [0], [])]

Training: ``Trainer(train_dataset=PackedImageText(packed, processor), data_collator=
MultimodalCollator(model), args=TrainingArguments(..., remove_unused_columns=False))``; each item is
one row (a list of samples), and the collator packs the items of a batch as they are.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from ..errors import PackmaskError
from .parallel import process_records
from .records import RecordProblem, check_processor, open_image, processor_call, takes_suffix

__all__ = ["pack_image_text", "pack_processed", "PackedImageText", "load_packed_image_text", "IMAGE_TEXT_COLUMNS"]

IMAGE_TEXT_COLUMNS = ("input_ids", "labels", "seq_lengths", "image_counts", "images", "texts")  # + the type ids


def pack_processed(samples: list[dict], max_length: int, *, strategy: str = "bfd", overflow: str = "error",
                   type_key: str | None = None):
    """Samples of :func:`~packmask.multimodal.records.process_record` into packed rows: ``(dataset, stats)``.

    ``overflow``: ``"error"`` (a sample longer than ``max_length`` raises) or ``"drop"`` (dropped,
    counted in ``stats.dropped``); a sample with images is never cut.
    """
    import pyarrow as pa

    from ..data.packing import pack_lengths
    from ..data.spans import lengths_from_offsets, offsets_from_lengths

    if overflow not in ("error", "drop"):
        raise PackmaskError(f"overflow={overflow!r}: an image-text sample is never truncated or split (its image "
                            f"tokens would be cut); use overflow='error' or 'drop'.")
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    assignment = pack_lengths(lengths, max_length, strategy=strategy, overflow=overflow)
    offsets = assignment.row_offsets.tolist()
    order = [i for a, b in zip(offsets, offsets[1:]) for i in sorted(assignment.doc_index[a:b].tolist())]

    def rows(values, per_row):  # a list column of ``values`` (flat, in row order) cut at ``per_row`` boundaries
        return pa.ListArray.from_arrays(pa.array(offsets_from_lengths(np.asarray(per_row)).astype(np.int32)), values)

    per_sample = np.array([len(samples[i]["input_ids"]) for i in order], dtype=np.int64)
    per_row_tokens = [int(per_sample[a:b].sum()) for a, b in zip(offsets, offsets[1:])]
    samples_per_row = lengths_from_offsets(assignment.row_offsets)
    image_counts = [len(samples[i]["images"]) for i in order]
    images_per_row = [sum(image_counts[a:b]) for a, b in zip(offsets, offsets[1:])]
    flat = {key: pa.array([t for i in order for t in samples[i][key]], pa.int64())
            for key in ("input_ids", "labels")}
    columns = {key: rows(flat[key], per_row_tokens) for key in flat}
    if type_key is not None:
        types = [t for i in order for t in samples[i].get("token_types", [0] * len(samples[i]["input_ids"]))]
        columns[type_key] = rows(pa.array(types, pa.int64()), per_row_tokens)  # none returned (text only): 0
    columns["seq_lengths"] = rows(pa.array(per_sample.astype(np.int32)), samples_per_row)
    columns["image_counts"] = rows(pa.array(image_counts, pa.int32()), samples_per_row)
    columns["images"] = rows(pa.array([d for i in order for d in samples[i]["images"]], pa.binary()), images_per_row)
    columns["texts"] = rows(pa.array([samples[i]["text"] for i in order], pa.string()), samples_per_row)
    if any("suffix" in s for s in samples):  # PaliGemma: each sample's answer, given to the processor apart
        columns["suffixes"] = rows(pa.array([samples[i].get("suffix") for i in order], pa.string()), samples_per_row)
    from datasets import Dataset

    return Dataset(_in_memory(pa.table(columns))), assignment.stats


def _in_memory(table):
    from datasets.table import InMemoryTable

    return InMemoryTable(table)


def pack_image_text(records: Iterable[dict], processor, max_length: int, *, strategy: str = "bfd",
                    overflow: str = "error", text_field: str = "text", messages_field: str = "messages",
                    images_field: str = "images", suffix_field: str = "suffix", base_dir=".",
                    train_on: str = "assistant",
                    on_problem: Callable[[int, RecordProblem], None] | None = None, return_stats: bool = False,
                    num_proc: int = 1):
    """Pack image-text records through ``processor`` into rows of at most ``max_length`` tokens.

    Args:
        records: dicts with ``text_field`` (text) or ``messages_field`` (a conversation) and, optionally,
            ``images_field`` (see :mod:`packmask.multimodal.records` for the image forms).
        processor: the model's processor (``AutoProcessor.from_pretrained(name)``), called on ONE
            sample at a time, unpadded.
        max_length: tokens per row, image tokens included (as the processor counts them).
        overflow: ``"error"`` or ``"drop"`` for a sample longer than ``max_length``.
        base_dir: folder that relative image paths are read from.
        train_on: conversations: ``"assistant"`` (labels on assistant turns) or ``"all"``.
        suffix_field: PaliGemma (a processor taking ``suffix=``): the answer, scored; ``text_field``
            holds the prompt (prefix).
        on_problem: ``on_problem(index, problem)`` for a bad record, which is then skipped; ``None``
            (default) raises the :class:`~packmask.multimodal.records.RecordProblem`, with
            ``record <index>:`` in front.
        num_proc: worker processes for the processor calls (chunks of 64 records, as ``packmask pack
            --num-proc``; :mod:`packmask.multimodal.parallel`); the rows are the same for any number.

    Returns:
        The packed ``datasets.Dataset`` (columns in the module docstring); with ``return_stats``,
        ``(dataset, PackingStats)``. Read it for training with :class:`PackedImageText`.
    """
    check_processor(processor)
    def with_field(record):  # each record with its field: text, or a conversation
        chat = record.get(text_field) is None and messages_field in record
        return record, dict(field=messages_field, kind="chat") if chat else dict(field=text_field, kind="text")

    items = map(with_field, records)  # lazily: num_proc=1 holds one chunk of records at a time
    options = dict(images_field=images_field, base_dir=base_dir, train_on=train_on, suffix_field=suffix_field)
    samples, type_key = [], None
    for index, result in enumerate(process_records(items, processor, options, num_proc)):
        if result[0] == "bad":
            problem = RecordProblem(*result[1:])
            if on_problem is None:
                raise RecordProblem(problem.field, f"record {index}: {problem.problem}", problem.fix)
            on_problem(index, problem)
            continue
        sample = result[1]
        type_key = sample.get("token_type_key", type_key)
        samples.append(sample)
    if not samples:
        raise PackmaskError("no valid image-text records to pack.")
    if overflow == "error":
        longest = max(range(len(samples)), key=lambda i: len(samples[i]["input_ids"]))
        n = len(samples[longest]["input_ids"])
        if n > max_length:
            raise PackmaskError(f"a sample has {n} tokens (image tokens included), more than max_length={max_length}; "
                                f"an image-text sample is never cut. Raise max_length, or pass overflow='drop'.")
    packed, stats = pack_processed(samples, max_length, strategy=strategy, overflow=overflow, type_key=type_key)
    return (packed, stats) if return_stats else packed


class PackedImageText:
    """A packed image-text dataset (from :func:`pack_image_text` or ``packmask pack --processor``) read
    for training: item ``r`` is row ``r`` as a list of samples, each a dict of ``[1, n]`` tensors plus
    the processor's pixel tensors, ready for :class:`~packmask.multimodal.MultimodalCollator`.

    ``processor`` must be the one that packed the data: each sample's tokens from it are compared with
    the stored ones (a mismatch raises, naming the row and sample).
    """

    def __init__(self, dataset, processor):
        missing = [c for c in IMAGE_TEXT_COLUMNS if c not in dataset.column_names]
        if missing:
            raise PackmaskError(f"this dataset lacks {missing}: it was not written by packmask pack --processor / "
                                f"pack_image_text; pack the image-text records with it first.")
        if takes_suffix(processor) and "suffixes" not in dataset.column_names:
            raise PackmaskError(f"{type(processor).__name__} trains on a prompt and a suffix, but this dataset has no "
                                f"'suffixes' column: pack the records with this processor (pack_image_text).")
        self.dataset = dataset.with_format(None)
        self.processor = processor

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> list[dict]:
        import torch

        row = self.dataset[int(index)]
        samples, token_start, image_start = [], 0, 0
        suffixes = row.get("suffixes") or [None] * len(row["texts"])
        for k, (n, count, text) in enumerate(zip(row["seq_lengths"], row["image_counts"], row["texts"])):
            pil = [open_image(data, f"images[{image_start + i}]")
                   for i, data in enumerate(row["images"][image_start:image_start + count])]
            out = processor_call(self.processor, text, pil, "texts", suffixes[k])
            ids = row["input_ids"][token_start:token_start + n]
            if out["input_ids"][0].tolist() != ids:
                raise PackmaskError(
                    f"row {index}, sample {k}: the processor gives {out['input_ids'].shape[1]} tokens where the packed "
                    f"data holds {n} (or other ids): it is not the processor that packed this data (another "
                    f"tokenizer or image size settings). Load the data with that processor, or pack again with "
                    f"this one.")
            sample = {key: value for key, value in out.items() if key != "attention_mask"}
            sample["labels"] = torch.tensor([row["labels"][token_start:token_start + n]])
            samples.append(sample)
            token_start, image_start = token_start + n, image_start + count
        return samples


def load_packed_image_text(path, processor) -> PackedImageText:
    """:class:`PackedImageText` over a file ``packmask pack --processor`` wrote (``.parquet`` or a
    ``save_to_disk`` folder)."""
    import datasets

    path = Path(path)
    if path.is_dir():
        dataset = datasets.load_from_disk(str(path))
    else:
        import pyarrow.parquet as pq

        dataset = datasets.Dataset(_in_memory(pq.read_table(path)))
    return PackedImageText(dataset, processor)
