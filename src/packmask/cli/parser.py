"""The ``packmask`` command's arguments: one ``argparse`` parser, nothing else.

This module imports only the standard library and nothing from packmask, so ``packmask --help``
answers without importing torch or transformers (the ``packmask`` console script loads this file
before the package; see ``src/packmask_cli.py``). Each subcommand names the function that runs it
as ``"module:function"`` inside :mod:`packmask.cli` (``args.run``); :func:`packmask.cli.main.main`
imports it only after parsing.

    >>> args = build_parser().parse_args(["pack", "docs.jsonl", "-o", "out.parquet", "--max-length", "512"])
    >>> args.run, args.max_length, args.strategy, args.overflow, args.train_on
    ('pack:cmd_pack', 512, 'bfd', 'truncate', 'assistant')
"""
from __future__ import annotations

import argparse

__all__ = ["build_parser", "STRATEGIES", "OVERFLOWS", "TRAIN_ON", "DEMO_TOKENIZER", "version"]

# mirrors packmask.data.packing.STRATEGIES / OVERFLOWS (literal so --help needs no numba import;
# tests/cli/test_cli.py checks they agree)
STRATEGIES = ("bfd", "ffd", "sequential")
OVERFLOWS = ("truncate", "split", "drop", "error")
TRAIN_ON = ("assistant", "all")
DEMO_TOKENIZER = "demo"  # --tokenizer demo: the built-in toy BPE tokenizer, only when asked for


def version() -> str:
    """The installed packmask version, read from package metadata (no package import)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("packmask")
    except PackageNotFoundError:
        return "unknown (not installed)"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _data_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", metavar="INPUT", help=".jsonl / .json / .parquet file or a save_to_disk folder")
    p.add_argument("--max-length", type=_positive_int, required=True, help="tokens per packed row")
    p.add_argument("--strategy", choices=STRATEGIES, default="bfd",
                   help="bfd: best-fit decreasing (default); ffd: first-fit decreasing; sequential: keep order")
    p.add_argument("--overflow", choices=OVERFLOWS, default="truncate",
                   help="what to do with sequences longer than --max-length (default truncate; a warning "
                        "is printed when it cuts more than 1%% of the tokens)")
    p.add_argument("--column", default="input_ids", help="column of token-id lists (default input_ids)")
    p.add_argument("--text-column", default="text",
                   help="column of text to tokenize when --column is absent (default text)")
    p.add_argument("--messages-column", default="messages",
                   help="column of chat messages [{role, content}, ...] to tokenize with the tokenizer's "
                        "chat template when neither --column nor --text-column is present (default messages)")
    p.add_argument("--tokenizer", metavar="DIR|NAME",
                   help="tokenizer for text or chat input: a local folder from save_pretrained, a model "
                        "name already in the Hugging Face cache, or 'demo' for the built-in toy tokenizer. "
                        "Required for text and chat input")
    p.add_argument("--processor", metavar="DIR|NAME",
                   help="image-text records: the model's processor (AutoProcessor; a local folder or a model name "
                        "already in the Hugging Face cache). Rows then hold token ids, labels and image bytes, "
                        "read for training by packmask.multimodal.load_packed_image_text")
    p.add_argument("--images-column",
                   help="with --processor: column of each record's images (paths, bytes or {\"bytes\": ...}; "
                        "default images)")
    p.add_argument("--image-root", metavar="DIR",
                   help="with --processor: folder relative image paths are read from (default: INPUT's folder)")
    p.add_argument("--num-proc", type=_positive_int, metavar="N",
                   help="with --processor: processes that run the processor (each loads it once; default 1)")
    p.add_argument("--train-on", choices=TRAIN_ON, default="assistant",
                   help="chat input: which tokens get labels (default assistant turns only)")
    p.add_argument("--no-eos", action="store_true", help="do not append EOS when tokenizing text")
    p.add_argument("--skip-invalid", action="store_true",
                   help="skip records with missing/null fields, bad JSON, non-UTF-8 bytes or bad token ids "
                        "(counted and listed in the summary) instead of stopping at the first")
    p.add_argument("--split", help="split to use when INPUT is a saved DatasetDict")
    p.add_argument("--shuffle", action="store_true", help="shuffle the packed rows")
    p.add_argument("--seed", type=int, default=0, help="seed for --shuffle")
    p.add_argument("--plot", metavar="PNG", help="where to write the length / fill histograms")
    p.add_argument("--no-plot", action="store_true", help="write no histogram")


def build_parser() -> argparse.ArgumentParser:
    """The whole command line; ``args.run`` names the function that runs the chosen subcommand."""
    # --debug works before or after the subcommand; SUPPRESS keeps a later default from
    # overwriting an earlier --debug
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show full tracebacks and library warnings")

    parser = argparse.ArgumentParser(
        prog="packmask", parents=[common],
        description="Train transformers models on packed rows with exactly the per-sequence result.",
        epilog="Start with `packmask demo`. Each command's options and defaults: `packmask COMMAND --help` "
               "(e.g. `packmask pack --help`); the Python API: `python -m pydoc packmask`.",
    )
    parser.add_argument("--version", action="version", version=f"packmask {version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser("demo", parents=[common], help="pack the embedded corpus, train padded vs packed",
                          description="Train a tiny Llama padded and packed on the embedded stdlib-docstring "
                                      "corpus; print throughput, padding, losses and isolation; write a PNG.")
    demo.add_argument("--steps", type=_positive_int, default=200, help="optimizer steps per run (default 200)")
    demo.add_argument("--out-dir", default="packmask-demo", metavar="DIR",
                      help="folder for demo.png / demo.json (default: packmask-demo in the current folder)")
    demo.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    demo.add_argument("--max-length", type=_positive_int, default=512, help="tokens per packed row")
    demo.add_argument("--heldout", type=_positive_int, default=64, metavar="N",
                      help="held-out documents for the isolation check (default 64)")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--time-budget", type=float, default=75.0, metavar="SECONDS",
                      help="stop both runs at the same step after this much training time, so a busy "
                           "machine still finishes in about two minutes (default 75; 0 = no limit)")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars (logs, CI)")
    demo.set_defaults(run="commands:cmd_demo")

    pack = sub.add_parser("pack", parents=[common], help="pack a tokenized, text or chat dataset into rows",
                          description="Pack INPUT into rows of --max-length tokens; write OUTPUT (.parquet, "
                                      ".jsonl, or a save_to_disk folder) atomically, its metadata, and a "
                                      "histogram PNG next to it.")
    _data_options(pack)
    pack.add_argument("-o", "--output", required=True, help="OUTPUT: .parquet, .jsonl or a folder")
    pack.add_argument("--force", action="store_true",
                      help="replace OUTPUT if it exists (the old file stays until the new one is complete)")
    pack.set_defaults(run="pack:cmd_pack")

    stats = sub.add_parser("stats", parents=[common], help="the packing report without writing data",
                           description="Report what `packmask pack` would produce; writes nothing "
                                       "(a histogram only with --plot).")
    _data_options(stats)
    stats.set_defaults(run="pack:cmd_stats")

    verify = sub.add_parser("verify", parents=[common], help="check packed == each sequence alone for a model",
                            description="Run packmask.verify on a tiny random model of a transformers "
                                        "family, or on a local model folder.")
    verify.add_argument("--model", required=True, metavar="FAMILY|PATH",
                        help="transformers model_type (llama, mistral, qwen2, ...) or a local model folder")
    verify.add_argument("--forms", default="mask3d,mask4d,collator", metavar="FORM[,FORM...]",
                        help="packed input forms to check: mask3d, mask4d, collator, position_ids, "
                             "position_ids_ones_2d, seq_lengths (default mask3d,mask4d,collator)")
    verify.set_defaults(run="commands:cmd_verify")

    bench = sub.add_parser("bench", parents=[common], help="train-step time: packmask vs transformers' packing",
                           description="Time a training step of a small Llama on packed rows: packmask's "
                                       "input forms against transformers' sdpa packing (position_ids), same "
                                       "data; check each against the documents run alone; report the "
                                       "backend packmask chose. GPU-only methods are skipped on a CPU.")
    bench.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    bench.add_argument("--steps", type=_positive_int, default=5, help="timed steps per method (default 5)")
    bench.add_argument("--row-length", type=_positive_int, default=None, metavar="N",
                       help="tokens per packed row (default 2048 on CUDA, 256 on CPU)")
    bench.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    bench.set_defaults(run="bench:cmd_bench")
    return parser
