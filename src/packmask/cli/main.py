"""The ``packmask`` command line: ``demo``, ``pack``, ``stats``, ``verify``, ``bench``.

Worked example (see ``docs/cli.md`` for the output of each)::

    $ packmask demo                                   # the whole job on the embedded corpus
    $ packmask pack docs.jsonl -o packed.parquet --max-length 4096
    $ packmask stats docs.jsonl --max-length 4096     # same report, writes nothing
    $ packmask verify --model llama                   # packed == alone on a tiny random Llama
    $ packmask bench                                  # train-step throughput on this device

Every error a user can act on prints one line, ``error: <what> (fix: <what to do>)``, on stderr and
exits with status 2; ``--debug`` (before or after the subcommand) shows the traceback instead.
Unexpected failures print one line too (exit status 1) and ask for ``--debug``.
"""
from __future__ import annotations

import argparse
import gzip
import json
import shutil
import sys
import traceback
from pathlib import Path

__all__ = ["main", "CLIError", "build_parser"]

EXIT_USAGE = 2      # the user can fix it: bad path, column, option
EXIT_FAILED = 1     # the command ran and found a problem (verify failed) or crashed unexpectedly

# mirrors packmask.packing.STRATEGIES / OVERFLOWS (kept literal so --help needs no numba import;
# tests/test_cli.py checks they agree)
STRATEGIES = ("bfd", "ffd", "sequential")
OVERFLOWS = ("truncate", "split", "drop", "error")
JSON_SUFFIXES = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz")


class CLIError(Exception):
    """A problem the user can fix; printed as one line ``error: <problem> (fix: <fix>)``."""

    def __init__(self, problem: str, fix: str | None = None, exit_code: int = EXIT_USAGE):
        super().__init__(problem)
        self.problem = problem
        self.fix = fix
        self.exit_code = exit_code

    def __str__(self) -> str:
        return f"{self.problem} (fix: {self.fix})" if self.fix else self.problem


# --------------------------------------------------------------------------- input

def _suffix(path: Path) -> str:
    """``.jsonl.gz`` for ``a.jsonl.gz``, else the last suffix, lower-cased."""
    suffixes = [s.lower() for s in path.suffixes]
    if len(suffixes) >= 2 and suffixes[-1] in (".gz", ".bz2", ".zst"):
        return "".join(suffixes[-2:])
    return suffixes[-1] if suffixes else ""


def load_input(path: Path, split: str | None = None):
    """Read INPUT into a ``datasets.Dataset``: jsonl / json / parquet or a saved dataset folder."""
    import datasets

    what = "a .jsonl, .json or .parquet file, or a folder written by Dataset.save_to_disk"
    if not path.exists():
        raise CLIError(f"{path}: no such file or directory", f"check the path; INPUT is {what}")
    if path.is_dir():
        try:
            loaded = datasets.load_from_disk(str(path))
        except FileNotFoundError:
            raise CLIError(f"{path} is a folder but not a saved Hugging Face dataset",
                           f"point INPUT at {what}") from None
        if isinstance(loaded, datasets.DatasetDict):
            names = list(loaded)
            chosen = split or ("train" if "train" in loaded else names[0] if len(names) == 1 else None)
            if chosen not in loaded:
                raise CLIError(f"{path} holds splits {', '.join(names)}; which one to use is ambiguous"
                               if split is None else f"{path} has no split {split!r} (splits: {', '.join(names)})",
                               f"pass --split NAME, one of {', '.join(names)}")
            loaded = loaded[chosen]
        return loaded
    suffix = _suffix(path)
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return datasets.Dataset(pq.read_table(path))
        except Exception as error:  # pyarrow raises several types for a damaged file
            raise CLIError(f"{path} could not be read as parquet: {error}",
                           "check that the file is a complete parquet file") from None
    if suffix in JSON_SUFFIXES:
        return _load_json(path)
    raise CLIError(f"{path}: unsupported input type {suffix or '(no extension)'!r}",
                   f"INPUT must be {what}")


def _load_json(path: Path):
    """JSON lines (one object per line) or one JSON array of objects."""
    import datasets

    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        head = handle.read(4096).lstrip()
    if not head:
        raise CLIError(f"{path} is empty", "write one JSON object per line, e.g. {\"text\": \"...\"}")
    if head.startswith("["):  # a JSON array of records
        with opener(path, "rt", encoding="utf-8") as handle:
            try:
                records = json.load(handle)
            except json.JSONDecodeError as error:
                raise CLIError(f"{path} starts with '[' but is not one JSON array ({error})",
                               "write one JSON array of objects, or one object per line such as "
                               "{\"input_ids\": [1, 2, 3]}") from None
        return datasets.Dataset.from_list(records)
    import pyarrow as pa
    import pyarrow.json as pa_json

    try:  # Arrow's reader: fast and memory-lean on big files
        return datasets.Dataset(pa_json.read_json(str(path)))
    except pa.ArrowInvalid:
        pass  # parse again in Python below, to name the offending line
    records = []
    with opener(path, "rt", encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise CLIError(f"{path}, line {number}: not valid JSON ({error.msg})",
                               "write one complete JSON object per line") from None
    if records and not isinstance(records[0], dict):
        raise CLIError(f"{path}: line 1 is a JSON {type(records[0]).__name__}, not an object",
                       "write one object per line, e.g. {\"input_ids\": [1, 2, 3]}")
    return datasets.Dataset.from_list(records)


def _is_token_column(feature) -> bool:
    """True for a list column of integers (``List(Value('int64'))`` and friends)."""
    inner = getattr(feature, "feature", None)
    dtype = getattr(inner, "dtype", "")
    return inner is not None and str(dtype).startswith(("int", "uint"))


def token_dataset(dataset, args, console):
    """The dataset with a token-id column to pack, tokenizing a text column when needed.

    Returns ``(dataset, column)``.
    """
    column, text_column = args.column, args.text_column
    columns = dataset.column_names
    if column in columns:
        if not _is_token_column(dataset.features[column]):
            kind = dataset.features[column]
            is_text = getattr(kind, "dtype", None) in ("string", "large_string")
            fix = (f"pass --text-column {column} to tokenize it" if is_text
                   else "pass --column NAME for the column of token-id lists")
            raise CLIError(f"column {column!r} holds {'text' if is_text else kind}, not lists of token ids", fix)
        return dataset, column
    if text_column in columns:
        return _tokenize(dataset, text_column, args, console), "input_ids"
    raise CLIError(
        f"INPUT has no token column {column!r} and no text column {text_column!r} "
        f"(columns: {', '.join(columns) or 'none'})",
        "pass --column NAME for token-id lists, or --text-column NAME for text to tokenize",
    )


def _load_tokenizer(path: str | None, console):
    if path is None:
        from .demo import build_demo_tokenizer

        console.print("[dim]tokenizing with the built-in demo tokenizer (byte-level BPE, 1.5k vocab); "
                      "pass --tokenizer DIR for your model's[/]")
        return build_demo_tokenizer()
    if not Path(path).exists():
        raise CLIError(f"tokenizer folder {path} does not exist",
                       "pass --tokenizer a local folder holding tokenizer.json / tokenizer_config.json "
                       "(e.g. one written by tokenizer.save_pretrained)")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CLIError(f"could not load a tokenizer from {path}: {first_line}",
                       "point --tokenizer at a folder written by tokenizer.save_pretrained") from None


def _tokenize(dataset, text_column: str, args, console):
    """Tokenize ``text_column`` in batches with a progress bar; EOS appended unless ``--no-eos``."""
    from datasets import Dataset
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    tokenizer = _load_tokenizer(args.tokenizer, console)
    eos = None if args.no_eos else tokenizer.eos_token_id
    texts = dataset[text_column]
    if texts and not isinstance(texts[0], str):
        raise CLIError(f"column {text_column!r} holds {type(texts[0]).__name__}, not text",
                       "pass --text-column NAME for a column of strings, or --column NAME for token ids")
    token_lists: list[list[int]] = []
    batch = 1000
    with Progress(TextColumn("tokenizing"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=console, transient=True, disable=not console.is_terminal) as progress:
        task = progress.add_task("tokenize", total=len(texts))
        for start in range(0, len(texts), batch):
            chunk = [t or "" for t in texts[start : start + batch]]
            for ids in tokenizer(chunk)["input_ids"]:
                if eos is not None and (not ids or ids[-1] != eos):
                    ids = ids + [eos]
                token_lists.append(ids)
            progress.advance(task, len(chunk))
    return Dataset.from_dict({"input_ids": token_lists})


def sequence_lengths(dataset, column: str):
    """Token count of every example of a list column, as a numpy array (no Python loop)."""
    import numpy as np
    import pyarrow.compute as pc

    array = dataset.data.column(column)
    return np.asarray(pc.list_value_length(array).fill_null(0), dtype=np.int64)


# --------------------------------------------------------------------------- pack / stats

def _input_table(path: Path, lengths, max_length: int):
    import numpy as np
    from rich.table import Table

    table = Table(title=f"input: {path}")
    table.add_column("documents", justify="right")
    table.add_column("tokens", justify="right")
    for name in ("min", "median", "p90", "p99", "max"):
        table.add_column(name, justify="right")
    table.add_column(f"> {max_length}", justify="right")
    if len(lengths) == 0:
        table.add_row("0", "0", *["-"] * 6)
        return table
    p50, p90, p99 = np.percentile(lengths, [50, 90, 99])
    table.add_row(f"{len(lengths):,}", f"{int(lengths.sum()):,}", f"{lengths.min():,}", f"{p50:,.0f}",
                  f"{p90:,.0f}", f"{p99:,.0f}", f"{lengths.max():,}", f"{int((lengths > max_length).sum()):,}")
    return table


def _pack_report(args, console, write: bool) -> int:
    """Shared by ``pack`` (``write=True``) and ``stats``: read, check, pack, print, plot."""
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..data.packing import pack_dataset

    input_path = Path(args.input)
    output = Path(args.output) if write else None
    if write:
        _check_output(output, args.force)

    def spinner(text):
        progress = Progress(SpinnerColumn(), TextColumn(text), TimeElapsedColumn(), console=console,
                            transient=True, disable=not console.is_terminal)
        progress.add_task(text, total=None)
        return progress

    with spinner(f"reading {input_path}"):
        dataset = load_input(input_path, args.split)
    dataset, column = token_dataset(dataset, args, console)
    lengths = sequence_lengths(dataset, column)
    console.print(_input_table(input_path, lengths, args.max_length))
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

    with spinner(f"packing {len(lengths):,} sequences ({args.strategy}, max_length {args.max_length:,})"):
        try:
            packed, stats = pack_dataset(dataset, args.max_length, strategy=args.strategy, overflow=args.overflow,
                                         column=column, shuffle=args.shuffle, seed=args.seed, return_stats=True)
        except ValueError as error:  # packing's messages already say what to change
            raise CLIError(str(error)) from error
    console.print(stats.table())

    if write:
        with spinner(f"writing {output}"):
            _write_output(packed, output)
        console.print(f"wrote {len(packed):,} packed rows → [bold]{output}[/]")
    plot_path = _plot_path(args, output)
    if plot_path is not None:
        plot_length_histograms(lengths, sequence_lengths(packed, column), args.max_length, plot_path,
                               title=f"{input_path.name}: {args.strategy}, max_length {args.max_length:,}, "
                                     f"fill {stats.fill:.2%}")
        console.print(f"length / fill histograms → [bold]{plot_path}[/]")
    return 0


def _plot_path(args, output: Path | None) -> Path | None:
    if args.no_plot:
        return None
    if args.plot:
        return Path(args.plot)
    if output is None:  # stats: a plot only when asked for
        return None
    stem = output.name if output.is_dir() or not output.suffix else output.name[: -len(_suffix(output))]
    return output.parent / f"{stem}-histogram.png"


def _check_output(output: Path, force: bool) -> None:
    if not output.exists():
        return
    if not force:
        raise CLIError(f"{output} already exists", "pass --force to replace it, or choose another -o/--output")
    if output.is_dir() and not (output / "dataset_info.json").exists() and any(output.iterdir()):
        # --force replaces packed datasets we wrote, never an arbitrary folder
        raise CLIError(f"{output} is a non-empty folder that is not a saved dataset; not replacing it",
                       "choose another -o/--output")


def _write_output(packed, output: Path) -> None:
    """parquet / jsonl by extension, else a ``save_to_disk`` folder."""
    output.parent.mkdir(parents=True, exist_ok=True)
    suffix = _suffix(output)
    if output.is_dir():
        shutil.rmtree(output)  # checked by _check_output: a dataset folder and --force
    elif output.exists():
        output.unlink()
    if suffix == ".parquet":
        packed.to_parquet(str(output))
    elif suffix in (".jsonl", ".json", ".ndjson"):
        packed.to_json(str(output), lines=True)
    elif suffix in (".jsonl.gz", ".json.gz"):
        packed.to_json(str(output), lines=True, compression="gzip")
    else:
        packed.save_to_disk(str(output))


def plot_length_histograms(lengths, row_lengths, max_length: int, path: Path, title: str = "") -> None:
    """Two histograms: sequence lengths (with ``max_length`` marked) and per-row fill.

    ``lengths``: tokens per input sequence; ``row_lengths``: tokens per packed row.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, (ax_len, ax_fill) = plt.subplots(1, 2, figsize=(11, 4))
    ax_len.hist(lengths, bins=60, color="#4c72b0")
    ax_len.axvline(max_length, color="#c44e52", ls="--", label=f"max_length {max_length:,}")
    ax_len.set_yscale("log")
    ax_len.set_xlabel("tokens per sequence")
    ax_len.set_ylabel("sequences (log)")
    ax_len.set_title(f"{len(lengths):,} sequences, median {int(np.median(lengths)):,} tokens")
    ax_len.legend()
    fill = row_lengths / max_length
    ax_fill.hist(fill, bins=np.linspace(0, 1, 41), color="#55a868")
    ax_fill.axvline(fill.mean(), color="black", ls=":", label=f"mean fill {fill.mean():.1%}")
    ax_fill.set_xlabel("row fill (tokens / max_length)")
    ax_fill.set_yscale("log")  # nearly all rows are full; the log scale shows the few that are not
    ax_fill.set_ylabel("packed rows (log)")
    ax_fill.set_title(f"{len(row_lengths):,} packed rows")
    ax_fill.legend(loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- subcommands

def _resolve_device(name: str | None):
    import torch

    if name in (None, "auto"):
        return None
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {name}: CUDA is not available on this machine",
                       "drop --device (CUDA is used when present) or pass --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise CLIError(f"--device {name!r} is not a torch device", "pass cpu, cuda or cuda:N") from None


def cmd_demo(args, console) -> int:
    from .demo import DemoConfig, run_demo

    config = DemoConfig(max_length=args.max_length, seed=args.seed, time_budget_s=args.time_budget)
    run_demo(steps=args.steps, out_dir=args.out_dir, device=_resolve_device(args.device), config=config,
             console=console, show_progress=not args.no_progress)
    return 0


def cmd_pack(args, console) -> int:
    return _pack_report(args, console, write=True)


def cmd_stats(args, console) -> int:
    return _pack_report(args, console, write=False)


def _model_for_verify(spec: str, console):
    """A tiny random model of a transformers family, or a local model folder."""
    path = Path(spec)
    if path.exists():
        from ..verification import model_for  # the class its config names: BertModel, LlamaForCausalLM, ...

        console.print(f"loading {path} …")
        try:
            return model_for(str(path))
        except (OSError, ValueError) as error:
            first_line = str(error).strip().splitlines()[0]
            raise CLIError(f"could not load a model from {path}: {first_line}",
                           "point --model at a folder written by model.save_pretrained, or pass a family "
                           "name such as llama") from None
    import difflib

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if spec not in CONFIG_MAPPING:
        close = difflib.get_close_matches(spec, list(CONFIG_MAPPING.keys()), n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise CLIError(f"unknown model family {spec!r}: not a transformers model_type nor a local folder",
                       f"pass a model_type such as llama, mistral, qwen2, gemma2{hint}, or a path to a model folder")
    from ..verification import model_for  # encoders (bert, roberta, modernbert) get their base class

    console.print(f"building a tiny random {spec} from its config (no download) …")
    return model_for(spec)


def _print_report(console, report) -> None:
    """Print what verify / bench returned: a rich renderable, or an object with ``.table()``."""
    if report is None:
        return
    if hasattr(report, "__rich__") or hasattr(report, "__rich_console__"):
        console.print(report)
    elif callable(getattr(report, "table", None)):
        console.print(report.table())


def cmd_verify(args, console) -> int:
    model = _model_for_verify(args.model, console)  # first: a typo in --model is the likelier error
    try:
        from ..verification import verify
    except ImportError as error:
        if error.name not in ("packmask.verify",):
            raise
        raise CLIError("packmask.verify is not part of this install",
                       "update packmask (pip install -U packmask) or run from a full checkout") from None
    forms = tuple(f.strip() for f in args.forms.split(",") if f.strip())
    report = verify(model, forms=forms, print_table=False)
    _print_report(console, report)
    summary = getattr(report, "summary", None)
    if callable(summary):
        console.print(summary())
    if not getattr(report, "passed", True):
        return EXIT_FAILED
    return 0


def cmd_bench(args, console) -> int:
    import inspect

    try:
        from .bench import run_train_step_bench
    except ImportError as error:
        if error.name not in ("packmask.bench",):
            raise
        raise CLIError("the train-step benchmark (packmask.bench) is not part of this install",
                       "update packmask, or run benchmarks/train_step.py from a checkout") from None
    kwargs = {}
    device = _resolve_device(args.device)
    if device is not None and "device" in inspect.signature(run_train_step_bench).parameters:
        kwargs["device"] = str(device)
    result = run_train_step_bench(**kwargs)
    _print_report(console, result)
    return 0


# --------------------------------------------------------------------------- parser

def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    # --debug works before or after the subcommand; SUPPRESS keeps a later default from
    # overwriting an earlier --debug
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and library warnings")

    parser = argparse.ArgumentParser(
        prog="packmask", parents=[common],
        description="Train transformers models on packed rows with exactly the per-sequence result.",
        epilog="Start with `packmask demo`. Docs: docs/cli.md",
    )
    from .. import __version__

    parser.add_argument("--version", action="version", version=f"packmask {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", parents=[common], help="pack the embedded corpus, train padded vs packed",
                          description="Train a tiny Llama padded and packed on the embedded stdlib-docstring "
                                      "corpus; print throughput, padding, losses and isolation; write a PNG.")
    demo.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps per run (default 200)")
    demo.add_argument("--out-dir", default="packmask-demo", help="where demo.png / demo.json go")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    demo.add_argument("--max-length", type=_positive_int, default=512, help="tokens per packed row")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--time-budget", type=float, default=75.0, metavar="SECONDS",
                      help="stop both runs at the same step after this much training time, so a busy "
                           "machine still finishes in about two minutes (default 75; 0 = no limit)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    demo.set_defaults(func=cmd_demo)

    def data_options(p):
        p.add_argument("input", metavar="INPUT", help=".jsonl / .json / .parquet file or a save_to_disk folder")
        p.add_argument("--max-length", type=_positive_int, required=True, help="tokens per packed row")
        p.add_argument("--strategy", choices=STRATEGIES, default="bfd",
                       help="bfd: best-fit decreasing (default); ffd: first-fit decreasing; "
                            "sequential: keep order")
        p.add_argument("--overflow", choices=OVERFLOWS, default="truncate",
                       help="what to do with sequences longer than --max-length (default truncate)")
        p.add_argument("--column", default="input_ids", help="column of token-id lists (default input_ids)")
        p.add_argument("--text-column", default="text",
                       help="column of text to tokenize when --column is absent (default text)")
        p.add_argument("--tokenizer", metavar="DIR", help="local tokenizer folder for text input "
                                                          "(default: the built-in demo tokenizer)")
        p.add_argument("--no-eos", action="store_true", help="do not append EOS when tokenizing text")
        p.add_argument("--split", help="split to use when INPUT is a saved DatasetDict")
        p.add_argument("--shuffle", action="store_true", help="shuffle the packed rows")
        p.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
        p.add_argument("--plot", metavar="PNG", help="where to write the length / fill histograms")
        p.add_argument("--no-plot", action="store_true", help="write no histogram")

    pack = sub.add_parser("pack", parents=[common], help="pack a tokenized (or text) dataset into rows",
                          description="Pack INPUT into rows of --max-length tokens; write OUTPUT (.parquet, "
                                      ".jsonl, or a save_to_disk folder) and a histogram PNG next to it.")
    data_options(pack)
    pack.add_argument("-o", "--output", required=True, help="OUTPUT: .parquet, .jsonl or a folder")
    pack.add_argument("--force", action="store_true", help="replace OUTPUT if it exists")
    pack.set_defaults(func=cmd_pack)

    stats = sub.add_parser("stats", parents=[common], help="the packing report without writing data",
                           description="Report what `packmask pack` would produce; writes nothing "
                                       "(a histogram only with --plot).")
    data_options(stats)
    stats.set_defaults(func=cmd_stats)

    verify = sub.add_parser("verify", parents=[common], help="check packed == each sequence alone for a model",
                            description="Run packmask.verify on a tiny random model of a transformers "
                                        "family, or on a local model folder.")
    verify.add_argument("--model", required=True, metavar="FAMILY|PATH",
                        help="transformers model_type (llama, mistral, qwen2, ...) or a local model folder")
    verify.add_argument("--forms", default="mask3d,mask4d,collator", metavar="FORM[,FORM...]",
                        help="packed input forms to check: mask3d, mask4d, collator, position_ids, "
                             "position_ids_ones_2d, seq_lengths (default mask3d,mask4d,collator)")
    verify.set_defaults(func=cmd_verify)

    bench = sub.add_parser("bench", parents=[common], help="train-step throughput on this device",
                           description="Run the train-step benchmark (padded vs packed) on this device.")
    bench.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    bench.set_defaults(func=cmd_bench)
    return parser


def _quiet_libraries() -> None:
    """Library chatter (warnings, datasets bars) would bury the one table the user asked for."""
    import logging
    import os
    import warnings

    warnings.filterwarnings("ignore")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``packmask`` console script; returns the exit status."""
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    debug = getattr(args, "debug", False)
    console = Console()
    errors = Console(stderr=True, highlight=False, soft_wrap=True)
    if not debug:
        _quiet_libraries()
    try:
        return args.func(args, console)
    except KeyboardInterrupt:
        errors.print("interrupted")
        return 130
    except CLIError as error:
        if debug:
            traceback.print_exc()
        errors.print(f"[bold red]error:[/] {_one_line(str(error))}", markup=True)
        return error.exit_code
    except OSError as error:  # unwritable --out-dir / -o, a full disk, ...
        if debug:
            traceback.print_exc()
        errors.print(f"[bold red]error:[/] {_one_line(str(error))} (fix: check that the path exists, "
                     "is writable and has space)", markup=True)
        return EXIT_USAGE
    except Exception as error:  # noqa: BLE001 -- the last line of defence: no traceback unless --debug
        from ..errors import PackmaskError

        if debug:
            traceback.print_exc()
        if isinstance(error, PackmaskError):  # packmask's own messages name the fix
            errors.print(f"[bold red]error:[/] {_one_line(str(error))}", markup=True)
            return EXIT_USAGE
        errors.print(f"[bold red]error:[/] {type(error).__name__}: {_one_line(str(error))} "
                     "(fix: run again with --debug for the traceback, and report it if the cause is "
                     "not your input)", markup=True)
        return EXIT_FAILED


def _one_line(text: str) -> str:
    from rich.markup import escape

    return escape(" ".join(text.split()))


if __name__ == "__main__":
    sys.exit(main())
