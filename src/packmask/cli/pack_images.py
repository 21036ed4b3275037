"""``packmask pack --processor P`` (and ``stats``): image-text records through the model's processor.

Same order and rules as text packing (:mod:`.pack`): everything checkable without the data fails
first (OUTPUT, ``--plot``, the processor loads), then every record is read and checked
(:func:`.inputs.load_input`: file, line, field), then each record goes through the processor one by
one (:mod:`packmask.multimodal.records`: images found and decoded, one placeholder per image, the
processor's own token counts), bad records stop the command with one line or, with
``--skip-invalid``, are counted and listed; a sample longer than ``--max-length`` is an error (or
dropped with ``--overflow drop``), never cut through an image. OUTPUT, its metadata and the
histogram are renamed into place together (:class:`.output.AtomicOutputs`).

    $ packmask pack chats.jsonl --processor ./qwen2.5-vl-processor --max-length 8192 -o packed.parquet

Train from OUTPUT with :func:`packmask.multimodal.load_packed_image_text` (docs/multimodal.md).
"""
from __future__ import annotations

from pathlib import Path

from .errors import CLIError
from .inputs import load_input, looks_like_a_model_name, suffix_of
from .output import AtomicOutputs, write_packed
from .report import input_table, print_warning

__all__ = ["pack_image_report", "resolve_processor", "load_processor"]

_PROCESSOR_FIX = ("pass --processor a folder written by processor.save_pretrained, or a model name already "
                  "downloaded (hf download NAME)")


def resolve_processor(spec: str):
    """Load ``--processor`` before any work: ``(processor, name for the metadata)``, or a one-line error."""
    from transformers import AutoProcessor

    path = Path(spec).expanduser()
    if path.is_file():
        raise CLIError(f"--processor {spec}: is a file, not a folder", _PROCESSOR_FIX)
    if not path.exists() and not looks_like_a_model_name(spec):
        raise CLIError(f"--processor {spec}: no such folder", _PROCESSOR_FIX)
    try:
        processor = AutoProcessor.from_pretrained(str(path) if path.exists() else spec, local_files_only=True)
    except Exception as error:  # noqa: BLE001 -- the hub's messages speak of repo ids and connections
        if not path.exists():
            raise CLIError(f"--processor {spec}: not a local folder, and no model of that name is in the Hugging Face "
                           "cache (packmask never downloads)", _PROCESSOR_FIX) from None
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CLIError(f"--processor {spec}: the folder holds no processor transformers can load "
                       f"({type(error).__name__}: {first.split('. ')[0][:160]})", _PROCESSOR_FIX) from None
    if getattr(processor, "image_processor", None) is None:
        raise CLIError(f"--processor {spec}: loads as {type(processor).__name__}, which has no image processor",
                       "give a vision-language model's processor, or pack text with --tokenizer instead")
    from ..errors import PackmaskError
    from ..multimodal.records import check_processor

    try:
        check_processor(processor)
    except PackmaskError as error:
        raise CLIError(f"--processor {spec}: {error}") from None
    return processor, str(path.resolve()) if path.exists() else spec


def _check_args(args, output: Path | None) -> None:
    args.images_column = args.images_column or "images"  # the defaults (None in the parser: pack.py refuses
    args.num_proc = args.num_proc or 1                    # these flags without --processor)
    if args.tokenizer is not None:
        raise CLIError("--tokenizer and --processor were both given", "image-text records need only --processor "
                       "(the tokenizer is inside it)")
    if output is not None and suffix_of(output) not in (".parquet", ""):
        raise CLIError(f"-o {output}: image-text rows hold image bytes, which {suffix_of(output)} cannot store",
                       "end -o with .parquet, or give a folder name (save_to_disk)")


def load_processor(spec: str):
    """The processor of ``--processor spec`` (what each ``--num-proc`` worker loads once)."""
    return resolve_processor(spec)[0]


def _process(loaded, processor, args, base_dir, console, images_by_place=None) -> tuple[list, list]:
    """Each kept record through the processor: ``(samples, places)``; bad ones to ``loaded.bad``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    fld, bad = loaded.field, loaded.bad
    places = bad.kept_places or [f"row {i}" for i in range(loaded.table.num_rows)]
    from ..multimodal.parallel import process_records
    from ..multimodal.records import takes_suffix

    present = loaded.table.column_names
    columns = [fld.name] + [c for c in (args.images_column, "suffix") if c in present
                            and (c != "suffix" or takes_suffix(processor))]  # PaliGemma's answer: "suffix"
    records = loaded.table.select(columns).to_pylist()
    if images_by_place is not None:
        for record, place in zip(records, places):
            record[args.images_column] = images_by_place.get(place)
    options = dict(field=fld.name, kind=fld.kind, images_field=args.images_column, base_dir=base_dir,
                   train_on=args.train_on)
    samples, kept = [], []
    with Progress(TextColumn("processing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("process", total=len(records))
        results = process_records(records, processor, options, args.num_proc, load=load_processor,
                                  source=args.processor)  # chunks of 64 records; each worker loads --processor once
        for result, place in zip(results, places):
            if result[0] == "ok":
                samples.append(result[1])
                kept.append(place)
            else:
                bad.add(place, result[2], "type", fix=result[3])
            progress.advance(task)
    return samples, kept


def _too_long(samples, places, args, path: Path) -> list:
    """Samples over ``--max-length``: an error naming the first, or (``--overflow drop``) dropped."""
    lengths = [len(s["input_ids"]) for s in samples]
    over = [i for i, n in enumerate(lengths) if n > args.max_length]
    if not over:
        return samples
    if args.overflow != "drop":
        first, count = over[0], len(samples[over[0]]["images"])
        raise CLIError(f"{path}, {places[first]}: the sample has {lengths[first]:,} tokens with its {count} "
                       f"image{'s' * (count != 1)}, more than --max-length {args.max_length:,} ({len(over):,} "
                       f"sample{'s' * (len(over) != 1)} too long)",
                       f"raise --max-length to at least {max(lengths):,}, or pass --overflow drop (a sample with "
                       f"images is never truncated or split)")
    return samples


def _metadata(args, loaded, processor_name, stats, images) -> dict:
    from .. import __version__

    return {"packmask_version": __version__, "input": str(Path(args.input)), "source": "image-text records",
            "source_column": loaded.field.name, "images_column": args.images_column, "processor": processor_name,
            "max_length": args.max_length, "strategy": args.strategy, "overflow": args.overflow,
            "train_on": args.train_on if loaded.field.kind == "chat" else None, "shuffle": args.shuffle,
            "seed": args.seed, "token_column": "input_ids", "skipped_invalid_records": loaded.bad.count,
            "images": images, "rows": stats.rows, "tokens": stats.tokens, "fill": round(stats.fill, 6),
            "dropped_samples": stats.dropped, "dropped_tokens": stats.dropped_tokens,
            "images_stored_as": "encoded bytes; packmask.multimodal.load_packed_image_text re-runs the processor"}


def pack_image_report(args, console, input_path: Path, output: Path | None, plot: Path | None) -> int:
    """The image-text half of ``packmask pack`` / ``stats`` (OUTPUT and ``--plot`` already checked)."""
    import numpy as np

    _check_args(args, output)
    processor, processor_name = resolve_processor(args.processor)
    from ..data.chat import template_roles

    with console.status(f"reading {input_path}"):
        loaded = load_input(input_path, args, template_roles(getattr(processor, "chat_template", None)),
                            keep_places=True)
    if loaded.field.kind == "tokens" or "seq_lengths" in loaded.table.column_names:
        raise CLIError(f"{input_path} holds token ids or packed rows, not image-text records",
                       "give records with \"text\" or \"messages\" and \"images\"")
    odd = loaded.mixed_values.get(args.images_column)  # values of kinds Arrow cannot hold in one column, by place
    if loaded.field.kind == "chat" and not getattr(processor, "chat_template", None):
        raise CLIError(f"{input_path}: column {loaded.field.name!r} holds chat messages, but the processor "
                       f"{processor_name} has no chat template", "pass --processor a chat/instruct model's processor, "
                       "or set processor.chat_template and save it with save_pretrained")
    base_dir = Path(args.image_root) if args.image_root else input_path.parent
    console.print(f"processing {loaded.field.name!r} ({loaded.field.kind}) and {args.images_column!r} with "
                  f"[bold]{processor_name}[/]")
    samples, places = _process(loaded, processor, args, base_dir, console, odd)
    if loaded.bad.count:
        print_warning(console, loaded.bad.summary())
    if not samples:
        raise CLIError(f"{input_path} has no valid image-text records ({loaded.bad.count:,} skipped)",
                       "fix the input records")
    samples = _too_long(samples, places, args, input_path)
    lengths = np.array([len(s["input_ids"]) for s in samples], dtype=np.int64)
    images = sum(len(s["images"]) for s in samples)
    console.print(input_table(input_path, lengths, args.max_length))
    image_tokens = sum(sum(t != 0 for t in s.get("token_types", ())) for s in samples)
    console.print(f"{images:,} images in {sum(bool(s['images']) for s in samples):,} of {len(samples):,} samples; "
                  f"{image_tokens:,} image tokens ({image_tokens / max(int(lengths.sum()), 1):.1%} of all), counted by "
                  "the processor")

    from ..multimodal.packed import pack_processed

    type_key = next((s["token_type_key"] for s in samples if "token_type_key" in s), None)
    with console.status(f"packing {len(samples):,} samples ({args.strategy}, max_length {args.max_length:,})"):
        packed, stats = pack_processed(samples, args.max_length, strategy=args.strategy,
                                       overflow="drop" if args.overflow == "drop" else "error", type_key=type_key)
    if args.shuffle:
        packed = packed.shuffle(seed=args.seed).flatten_indices()
    console.print(stats.table())
    if stats.dropped:
        print_warning(console, f"--overflow drop removed {stats.dropped:,} samples ({stats.dropped_tokens:,} tokens) "
                               f"longer than --max-length {args.max_length:,}")

    from .plots import plot_length_histograms

    metadata = _metadata(args, loaded, processor_name, stats, images)
    with AtomicOutputs() as outputs:
        if output is not None:
            with console.status(f"writing {output}"):
                write_packed(packed, output, metadata, outputs)
        if plot is not None:
            row_lengths = np.array([sum(n) for n in packed["seq_lengths"]], dtype=np.int64)
            plot_length_histograms(lengths, row_lengths, args.max_length, outputs.stage(plot),
                                   title=f"{input_path.name}: {args.strategy}, max_length {args.max_length:,}, "
                                         f"fill {stats.fill:.2%}", image_format=suffix_of(plot).lstrip("."))
    if output is not None:
        console.print(f"wrote {len(packed):,} packed rows ({images:,} images) → [bold]{output}[/] (metadata inside)")
    if plot is not None:
        console.print(f"length / fill histograms → [bold]{plot}[/]")
    return 0

