"""``packmask pack`` and ``packmask stats``: check, read, tokenize, pack, report, write.

The order matters: everything a user can get wrong without reading the data (OUTPUT is the input
or cannot be written, a bad ``--plot`` path, a tokenizer that does not load) fails before INPUT is
read; bad records fail (or are skipped) before tokenizing; OUTPUT, its metadata and the histogram
are renamed into place together, only once all are complete (:mod:`.output`).
"""
from __future__ import annotations

from pathlib import Path

from .errors import CLIError
from .inputs import load_input, require_tokenizer, resolve_tokenizer, suffix_of, tokenize
from .output import AtomicOutputs, check_output, check_plot_path, packed_metadata, write_packed
from .report import input_table, print_warning, truncation_warning

__all__ = ["cmd_pack", "cmd_stats", "sequence_lengths", "plot_path", "refuse_packed_input"]


def cmd_pack(args, console) -> int:
    return _pack_report(args, console, write=True)


def cmd_stats(args, console) -> int:
    return _pack_report(args, console, write=False)


def sequence_lengths(dataset, column: str):
    """Token count of every example of a list column, as a numpy array (no Python loop)."""
    import numpy as np
    import pyarrow.compute as pc

    return np.asarray(pc.list_value_length(dataset.data.column(column)).fill_null(0), dtype=np.int64)


def plot_path(args, output: Path | None) -> Path | None:
    """``--plot``, else ``OUTPUT-histogram.png`` next to OUTPUT for ``pack``, else none."""
    if args.no_plot:
        return None
    if args.plot:
        return Path(args.plot)
    if output is None:  # stats: a plot only when asked for
        return None
    suffix = suffix_of(output)
    stem = output.name[: -len(suffix)] if suffix else output.name
    return output.parent / f"{stem}-histogram.png"


def _spinner(console, text: str):
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    progress = Progress(SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=console,
                        transient=True, disable=not console.is_terminal)
    progress.add_task(text, total=None)
    return progress


def _metadata(args, loaded, tokenizer_name, column, stats, dropped_columns) -> dict:
    """What made this output: recorded in Parquet schema metadata, a sidecar JSON, or the folder."""
    from .. import __version__

    kind = loaded.field.kind
    return {
        "packmask_version": __version__,
        "input": str(Path(args.input)),
        "source": {"tokens": "token ids", "text": "text", "chat": "chat messages"}[kind],
        "source_column": loaded.field.name,
        "tokenizer": tokenizer_name,
        "max_length": args.max_length,
        "strategy": args.strategy,
        "overflow": args.overflow,
        "eos_appended": kind == "text" and not args.no_eos,
        "train_on": args.train_on if kind == "chat" else None,
        "shuffle": args.shuffle,
        "seed": args.seed,
        "token_column": column,
        "dropped_columns": dropped_columns,
        "skipped_invalid_records": loaded.bad.count,
        "rows": stats.rows,
        "tokens": stats.tokens,
        "fill": round(stats.fill, 6),
        "truncated_tokens": stats.truncated_tokens,
        "dropped_tokens": stats.dropped_tokens,
    }


def refuse_packed_input(input_path: Path, recorded: dict | None, columns=(), command: str = "pack") -> None:
    """An input that is already packed is refused before any report: its rows hold several
    documents each, and only its ``seq_lengths`` knows where they end, so packing it again (or
    dropping that column) would merge them.

    >>> refuse_packed_input(Path("p.parquet"), {"input": "docs.jsonl", "max_length": 16, "rows": 2})
    Traceback (most recent call last):
    packmask.cli.errors.CLIError: p.parquet is already packed (2 rows of up to 16 tokens, written by packmask pack from docs.jsonl) (fix: give the source records instead (packmask pack docs.jsonl --max-length N -o OUTPUT); this file's packing report is in the metadata packmask pack recorded with it)
    """
    if recorded is None and "seq_lengths" not in columns:
        return
    if recorded is not None:
        what = (f"{recorded.get('rows', '?'):,} rows of up to {recorded.get('max_length', '?'):,} tokens, written by "
                f"packmask pack from {recorded.get('input', 'another file')}")
        source = recorded.get("input") or "SOURCE"
    else:
        what, source = "its rows have a 'seq_lengths' column: each row holds several documents", "SOURCE"
    usage = f"packmask {command} {source} --max-length N" + (" -o OUTPUT" if command == "pack" else "")
    report = ("this file's packing report is in the metadata packmask pack recorded with it" if recorded is not None
              else "never drop seq_lengths: it is the only record of where each document ends")
    raise CLIError(f"{input_path} is already packed ({what})", f"give the source records instead ({usage}); {report}")


def _pack_report(args, console, write: bool) -> int:
    input_path = Path(args.input)
    output = Path(args.output) if write else None
    plot = plot_path(args, output)
    # -- checks that need no data: before anything is read ------------------------------------
    if write:
        check_output(output, input_path, args.force)
    if plot is not None:
        check_plot_path(plot, input_path)
    command = "pack" if write else "stats"
    refuse_packed_input(input_path, packed_metadata(input_path), command=command)
    image_only = [flag for flag, name in (("--images-column", "images_column"), ("--image-root", "image_root"),
                                          ("--num-proc", "num_proc")) if getattr(args, name, None) is not None]
    if image_only and getattr(args, "processor", None) is None:  # they would be ignored, silently
        raise CLIError(f"{', '.join(image_only)} apply to image-text records only, and no --processor was given",
                       "add --processor DIR|NAME for image-text records, or leave them out for text")
    if getattr(args, "processor", None) is not None:  # image-text records, through the model's processor
        from .pack_images import pack_image_report

        return pack_image_report(args, console, input_path, output, plot)
    tokenizer, tokenizer_name = resolve_tokenizer(args.tokenizer)

    # -- read and check every record --------------------------------------------------------------
    from ..data.chat import template_roles

    roles = template_roles(getattr(tokenizer, "chat_template", None)) if tokenizer is not None else None
    with _spinner(console, f"reading {input_path}"):
        loaded = load_input(input_path, args, roles)
    refuse_packed_input(input_path, None, loaded.table.column_names, command=command)
    require_tokenizer(tokenizer, loaded.field, input_path, tokenizer_name)
    if loaded.bad.count:
        print_warning(console, loaded.bad.summary())
    if tokenizer is not None and loaded.field.kind != "tokens":
        console.print(f"tokenizing {loaded.field.name!r} ({'chat template, labels on ' + args.train_on if loaded.field.kind == 'chat' else 'text'}) "
                      f"with [bold]{tokenizer_name}[/]")
    dataset, column = tokenize(loaded, tokenizer, args, console)
    lengths = sequence_lengths(dataset, column)
    console.print(input_table(input_path, lengths, args.max_length))
    if len(lengths) == 0:
        raise CLIError(f"{input_path} has no examples", "point INPUT at a non-empty dataset")
    longest = int(lengths.max())
    if args.overflow == "error" and longest > args.max_length:
        n_over = int((lengths > args.max_length).sum())
        raise CLIError(
            f"the longest sequence has {longest:,} tokens, more than --max-length {args.max_length:,} "
            f"({n_over:,} sequence{'s' if n_over != 1 else ''} too long)",
            f"raise --max-length to at least {longest:,}, or pass --overflow truncate, split or drop",
        )

    # -- pack ---------------------------------------------------------------------------------------
    from ..data.packing import pack_dataset

    with _spinner(console, f"packing {len(lengths):,} sequences ({args.strategy}, max_length {args.max_length:,})"):
        try:
            packed, stats = pack_dataset(dataset, args.max_length, strategy=args.strategy, overflow=args.overflow,
                                         column=column, shuffle=args.shuffle, seed=args.seed, return_stats=True)
        except ValueError as error:  # packing's messages already say what to change
            raise CLIError(str(error)) from error
    console.print(stats.table())
    warning = truncation_warning(lengths, stats.truncated_tokens + stats.dropped_tokens, args.max_length, args.overflow)
    if warning:
        print_warning(console, warning)
    consumed = {loaded.field.name} if loaded.field.kind != "tokens" else set()
    dropped_columns = [name for name in loaded.table.column_names
                       if name not in packed.column_names and name not in consumed] + loaded.mixed_columns
    if dropped_columns:
        console.print(f"input columns not in the output: [bold]{', '.join(dropped_columns)}[/] "
                      "(only per-token lists, such as labels, are carried into packed rows)")

    # -- write: everything renamed into place together, only when complete -------------------------
    from .plots import plot_length_histograms

    row_lengths = sequence_lengths(packed, column)
    metadata = _metadata(args, loaded, tokenizer_name, column, stats, dropped_columns)
    with AtomicOutputs() as outputs:
        if write:
            with _spinner(console, f"writing {output}"):
                written = write_packed(packed, output, metadata, outputs)
        if plot is not None:
            plot_length_histograms(lengths, row_lengths, args.max_length, outputs.stage(plot),
                                   title=f"{input_path.name}: {args.strategy}, max_length {args.max_length:,}, "
                                         f"fill {stats.fill:.2%}", image_format=suffix_of(plot).lstrip("."))
    if write:
        console.print(f"wrote {len(packed):,} packed rows → [bold]{output}[/]"
                      + (f" (metadata → {written[1]})" if len(written) > 1 else " (metadata inside)"))
    if plot is not None:
        console.print(f"length / fill histograms → [bold]{plot}[/]")
    return 0
